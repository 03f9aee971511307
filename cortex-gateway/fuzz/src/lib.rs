//! Differential harness: reads the same bytes as cortex's front end reads
//! a client connection (`cortex_gateway::front::read_message`, exactly the
//! serving code) and as hyper 1.x's HTTP/1 server does, and says where the
//! two disagree.
//!
//! Why: cortex frames HTTP/1 itself for speed (`h1.rs`, `front/`). Two HTTP
//! hops that split one byte stream into messages differently is how request
//! smuggling happens, so every difference from a well-trodden server must
//! be one cortex chose (it is stricter) and is written down here as a rule;
//! any other difference is a bug and the fuzz targets panic on it.
//!
//! What is compared: the whole connection, up to [`MAX_MESSAGES`] pipelined
//! requests. Each request both accept must have the same method, path,
//! version and body bytes, and both must accept the same number of them
//! (so they agree on where each message ends). How the reading stops must
//! match too ([`Tail`]): refused, incomplete (waiting for more bytes), or
//! closed after a request without keep-alive.
//!
//! "Incomplete": the input is everything the client has sent so far, and
//! the client has *not* closed its side. For cortex that is `Ok(None)`.
//! hyper is given the input through an in-memory transport whose read side
//! returns `Pending` once the input is used up (never end-of-file: hyper
//! would then report a half-read message as an error, where cortex would
//! wait — the serving loop treats an EOF mid-message as a cut connection,
//! not a refusal, so the comparison is between "waiting" states). The
//! runtime's clock is paused: once hyper has nothing left to do, the clock
//! jumps to a deadline and hyper is recorded as waiting for more.

use bytes::{Bytes, BytesMut};
use cortex_gateway::front::{read_message, Message};
use cortex_gateway::h1;
use http_body_util::BodyExt;
use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// cortex's default `gateway.max_header_bytes`; hyper gets the same
/// `max_header_size`.
pub const MAX_HEAD: usize = 65536;
/// cortex's default `gateway.max_body_bytes`. hyper has no body limit of
/// its own (that is left to the service), so the one difference is rule D.
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// cortex's (and hyper's default) limit on header fields.
pub const MAX_HEADERS: usize = 100;
/// Pipelined requests compared per input.
pub const MAX_MESSAGES: usize = 4;

/// One request as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub http_1_1: bool,
    pub body: Bytes,
}

/// How reading the connection stopped after the accepted requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The next request was refused (cortex: the status; hyper: its error).
    Refused(String),
    /// The next request is not complete yet: read more.
    Incomplete,
    /// The last request had no keep-alive: the connection is closed.
    Closed,
    /// [`MAX_MESSAGES`] were read; the rest is not compared.
    Stopped,
}

/// What one side read: the accepted requests, where each began in the
/// input, and how it stopped.
#[derive(Debug, Clone)]
pub struct Reading {
    pub reqs: Vec<Req>,
    pub starts: Vec<usize>,
    /// cortex only: where each accepted request ended.
    pub ends: Vec<usize>,
    pub tail: Tail,
    /// cortex only: the status of a refusal.
    pub status: Option<u16>,
}

/// cortex's reading: `read_message` again and again on what is left, as the
/// serving loop does with its buffer.
pub fn cortex_read(input: &[u8]) -> Reading {
    let mut reqs = Vec::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    let mut at = 0;
    let (tail, status) = loop {
        starts.push(at);
        match read_message(&input[at..], MAX_HEAD, MAX_BODY) {
            Ok(Some(Message {
                method,
                path,
                http_1_1,
                keep_alive,
                body,
                used,
            })) => {
                assert!(used > 0 && at + used <= input.len(), "used {used} at {at}");
                at += used;
                ends.push(at);
                reqs.push(Req {
                    method,
                    path,
                    http_1_1,
                    body,
                });
                if reqs.len() == MAX_MESSAGES {
                    break (Tail::Stopped, None);
                }
                if !keep_alive {
                    break (Tail::Closed, None);
                }
            }
            Ok(None) => break (Tail::Incomplete, None),
            Err(status) => break (Tail::Refused(status.to_string()), Some(status)),
        }
    };
    Reading {
        reqs,
        starts,
        ends,
        tail,
        status,
    }
}

/// The client side of an in-memory connection: reads give the input (as
/// much as hyper asks for), then `Pending` forever (the client is still
/// there but sends nothing more); writes (hyper's answers) are dropped.
struct Transport {
    input: Bytes,
    at: usize,
}

impl hyper::rt::Read for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let left = self.input.len() - self.at;
        if left == 0 {
            // No waker is kept: nothing will ever wake this read, so the
            // runtime goes idle and its paused clock runs to the deadline.
            return Poll::Pending;
        }
        let n = left.min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A request as hyper's service saw it; `body` once it was read to the end
/// (or failed).
#[derive(Default)]
struct Seen {
    head: Option<(String, String, bool)>,
    body: Option<Result<Bytes, String>>,
}

thread_local! {
    // One runtime for every input: current-thread, clock paused.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
}

/// How long hyper may sit idle before it is taken to be waiting for more
/// bytes. The clock is paused, so this costs no real time.
const IDLE: Duration = Duration::from_secs(3600);

/// hyper's reading of the same connection.
pub fn hyper_read(input: &[u8]) -> Reading {
    let seen: Rc<RefCell<Vec<Seen>>> = Rc::default();
    let service = {
        let seen = seen.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let uri = req.uri();
                let path = uri
                    .path_and_query()
                    .map_or_else(|| uri.to_string(), |p| p.to_string());
                let i = {
                    let mut s = seen.borrow_mut();
                    s.push(Seen {
                        head: Some((
                            req.method().to_string(),
                            path,
                            req.version() == http::Version::HTTP_11,
                        )),
                        body: None,
                    });
                    s.len() - 1
                };
                let body = req.into_body().collect().await;
                seen.borrow_mut()[i].body =
                    Some(body.map(|c| c.to_bytes()).map_err(|e| format!("{e:?}")));
                Ok::<_, Infallible>(hyper::Response::new(http_body_util::Empty::<Bytes>::new()))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .half_close(false)
        .keep_alive(true)
        .header_read_timeout(None::<Duration>)
        .auto_date_header(false);
    let transport = Transport {
        input: Bytes::copy_from_slice(input),
        at: 0,
    };
    enum End {
        Conn(Result<(), String>),
        Enough,
        Idle,
    }
    let end = RT.with(|rt| {
        rt.block_on(async {
            let mut conn = pin!(builder.serve_connection(transport, service));
            let mut idle = pin!(tokio::time::sleep(IDLE));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(End::Conn(r.map_err(|e| format!("{e:?}"))));
                }
                {
                    let s = seen.borrow();
                    if s.len() >= MAX_MESSAGES && s.iter().all(|r| r.body.is_some()) {
                        return Poll::Ready(End::Enough);
                    }
                }
                if idle.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Idle);
                }
                Poll::Pending
            })
            .await
        })
    });
    let seen = std::mem::take(&mut *seen.borrow_mut());
    let mut reqs = Vec::new();
    let mut tail = None;
    for s in seen.into_iter().take(MAX_MESSAGES) {
        let (method, path, http_1_1) = s.head.expect("recorded with the head");
        match s.body {
            Some(Ok(body)) => reqs.push(Req {
                method,
                path,
                http_1_1,
                body,
            }),
            Some(Err(e)) => {
                tail = Some(Tail::Refused(e));
                break;
            }
            None => {
                // The body was neither complete nor failed.
                tail = Some(match &end {
                    End::Conn(Err(e)) => Tail::Refused(e.clone()),
                    End::Idle => Tail::Incomplete,
                    End::Conn(Ok(())) | End::Enough => {
                        panic!("hyper ended the connection with a body half read")
                    }
                });
                break;
            }
        }
    }
    let tail = tail.unwrap_or_else(|| match end {
        _ if reqs.len() == MAX_MESSAGES => Tail::Stopped,
        End::Conn(Err(e)) => Tail::Refused(e),
        End::Conn(Ok(())) => Tail::Closed,
        End::Idle => Tail::Incomplete,
        End::Enough => Tail::Stopped,
    });
    Reading {
        reqs,
        starts: Vec::new(),
        ends: Vec::new(),
        tail,
        status: None,
    }
}

/// The fields of a complete request head at the front of `input`, and the
/// head's length; `None` when httparse cannot parse a complete one.
fn head_fields(input: &[u8]) -> Option<(usize, u8, Vec<(String, Vec<u8>)>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(input) {
        Ok(httparse::Status::Complete(n)) => Some((
            n,
            r.version?,
            r.headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        )),
        _ => None,
    }
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> impl Iterator<Item = &'a [u8]> {
    let name = name.to_string();
    fields
        .iter()
        .filter(move |(n, _)| *n == name)
        .map(|(_, v)| v.as_slice())
}

fn trim(v: &[u8]) -> &[u8] {
    let v = v.trim_ascii_start();
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    &v[..end]
}

/// Why cortex's refusal of the request at the front of `input` is one it
/// chose (it is stricter than hyper there), or `None`. Each rule says what
/// cortex refuses and why hyper does not.
pub fn stricter(input: &[u8], status: u16) -> Option<&'static str> {
    let (head_len, _minor, fields) = head_fields(input)?;
    let te: Vec<&[u8]> = field(&fields, "transfer-encoding").collect();
    let has_cl = field(&fields, "content-length").next().is_some();
    // Rule A. cortex implements no transfer coding but `chunked` and says
    // so with 501 (RFC 9112 §6.1); hyper accepts any list that ends in
    // `chunked` ("gzip, chunked") and hands the still-coded body on.
    if status == 501 && !te.is_empty() {
        return Some("A: 501 for a transfer coding other than one chunked");
    }
    if status == 400 && !te.is_empty() {
        // Rule B. Transfer-Encoding with Content-Length is refused by
        // cortex (a smuggling pattern, RFC 9112 §6.3 allows refusing it);
        // hyper drops the Content-Length and reads chunked.
        if has_cl {
            return Some("B: Transfer-Encoding together with Content-Length");
        }
        // Rule C. `chunked` must be applied exactly once, across every
        // Transfer-Encoding field; hyper looks only at the last element of
        // the last field ("chunked, chunked"; a field of empty elements).
        let codings = te
            .iter()
            .flat_map(|v| v.split(|b| *b == b','))
            .filter(|c| !trim(c).is_empty())
            .count();
        if codings != 1 {
            return Some("C: chunked not applied exactly once");
        }
        // Rule C2. A Transfer-Encoding field line with no coding at all
        // (empty, or only commas) is refused wherever it stands; hyper
        // reads only the last line, so an empty line before
        // "Transfer-Encoding: chunked" passes there
        // (regressions/h1_request/te_empty_then_chunked).
        if te
            .iter()
            .any(|v| v.split(|b| *b == b',').all(|c| trim(c).is_empty()))
        {
            return Some("C2: an empty Transfer-Encoding field line");
        }
    }
    // Rule D. A declared Content-Length over max_body_bytes is refused
    // (413) before any of the body is read; hyper has no body limit and
    // waits for the body.
    if status == 413 {
        return Some("D: Content-Length over max_body_bytes");
    }
    if status == 400 && codings(&fields) == [b"chunked".as_slice()] && !has_cl {
        return chunked_stricter(&input[head_len..]);
    }
    None
}

/// Rules for a chunked body that cortex's decoder refuses: runs the
/// decoder to the error and looks at what it stopped on.
fn chunked_stricter(body: &[u8]) -> Option<&'static str> {
    let mut dec = h1::Chunked::new(MAX_HEAD);
    let mut buf = BytesMut::from(body);
    let err = loop {
        match dec.step(&mut buf) {
            Ok(h1::Step::Data(_)) => continue,
            Ok(_) => return None,
            Err(e) => break e,
        }
    };
    match err {
        h1::FramingError::ChunkSize => {
            let line = match buf.iter().position(|b| *b == b'\r' || *b == b'\n') {
                Some(end) => &buf[..end],
                None => &buf[..],
            };
            // Rule E1. A chunk-size line still without its CRLF once
            // `h1::MAX_CHUNK_LINE` bytes are buffered is refused; hyper
            // allows 16 KiB of extensions per body and waits.
            if long_incomplete_line(&buf) {
                return Some("E1: chunk-size line longer than MAX_CHUNK_LINE");
            }
            // Rule E2. Chunk extensions may hold visible characters, SP
            // and HTAB only (RFC 9112 §7.1.1 tokens and quoted strings);
            // hyper skips every byte up to CR except LF, control
            // characters and DEL included.
            if let Some(semi) = line.iter().position(|b| *b == b';') {
                if line[semi..]
                    .iter()
                    .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
                {
                    return Some("E2: control character in a chunk extension");
                }
            }
            None
        }
        h1::FramingError::Trailers(_) => {
            // Rule E3. cortex checks the trailer section with room for 64
            // fields (they are then dropped); hyper allows max_headers
            // (100). Anything else wrong with them hyper refuses too.
            let mut many = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            let whole = if buf.starts_with(b"\r\n") { 2 } else { end? };
            match httparse::parse_headers(&buf[..whole], &mut many) {
                // Rule E4. httparse ends the section early, at an empty
                // line made with a bare LF ("0\r\n\nGET / ..."): cortex
                // refuses, since a reader that accepts bare LFs would end
                // the body there and read what follows as the next
                // request. hyper 1.x ignores where httparse stopped and
                // takes everything up to the CRLF CRLF as trailers
                // (regressions/h1_request/trailer_lf_swallows_request).
                Ok(httparse::Status::Complete((used, _))) if used < whole => {
                    Some("E4: trailer section ended early by a bare LF")
                }
                Ok(httparse::Status::Complete((_, f))) if f.len() > 64 => {
                    Some("E3: more than 64 trailer fields")
                }
                _ => None,
            }
        }
        h1::FramingError::ChunkEnd => None,
    }
}

/// The non-empty Transfer-Encoding elements across every field, lower
/// case.
fn codings(fields: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    field(fields, "transfer-encoding")
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|c| trim(c).to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Rule G: the head's Transfer-Encoding lines hold one `chunked` and
/// some empty list elements, and no Content-Length.
fn empty_te_elements(input: &[u8]) -> bool {
    let Some((_, _, fields)) = head_fields(input) else {
        return false;
    };
    if field(&fields, "content-length").next().is_some() {
        return false;
    }
    let elements: Vec<&[u8]> = field(&fields, "transfer-encoding")
        .flat_map(|v| v.split(|b| *b == b','))
        .map(trim)
        .collect();
    let codings: Vec<&&[u8]> = elements.iter().filter(|c| !c.is_empty()).collect();
    codings.len() == 1
        && codings[0].eq_ignore_ascii_case(b"chunked")
        && codings.len() < elements.len()
}

/// The trailer section of a whole chunked body (after the last chunk's
/// size line), walking the size lines with cortex's own parser.
fn trailer_section(body: &[u8]) -> Option<&[u8]> {
    let mut at = 0usize;
    loop {
        let (used, size) = h1::parse_chunk_size(body.get(at..)?).ok()??;
        at += used;
        if size == 0 {
            return body.get(at..);
        }
        at = at
            .checked_add(usize::try_from(size).ok()?)?
            .checked_add(2)?;
    }
}

/// Compares the two readings of `input`; `Err` says how they differ in a
/// way no rule allows.
pub fn compare(input: &[u8], c: &Reading, h: &Reading) -> Result<(), String> {
    let n = c.reqs.len().min(h.reqs.len());
    for i in 0..n {
        if c.reqs[i] != h.reqs[i] {
            return Err(format!(
                "request {i} read differently:\n  cortex: {:?}\n  hyper:  {:?}",
                c.reqs[i], h.reqs[i]
            ));
        }
    }
    let same_tail = match (&c.tail, &h.tail) {
        (Tail::Refused(_), Tail::Refused(_)) => true,
        (a, b) => a == b,
    };
    if c.reqs.len() == h.reqs.len() && same_tail {
        return Ok(());
    }
    // They part at request `n`: only cortex refusing it (where hyper reads
    // it, or waits for more of it) may be allowed, and only by a rule.
    if c.reqs.len() == n {
        if let (Tail::Refused(_), Some(status)) = (&c.tail, c.status) {
            let at = c.starts[n];
            if stricter(&input[at..], status).is_some() {
                return Ok(());
            }
        }
    }
    // Rule I. A Connection field holding non-ASCII bytes (obs-text) is
    // read token by token by cortex ("\xff, close" closes); hyper cannot
    // make a string of it and ignores the field. Only whether the
    // connection stays open after request n-1 differs; the messages read
    // are the same (regressions/h1_request/connection_obs_text_close).
    let closed_here = |r: &Reading, other: &Reading| {
        r.reqs.len() == n && r.tail == Tail::Closed && other.reqs.len() >= n
    };
    if n > 0 && (closed_here(c, h) || closed_here(h, c)) {
        let head = head_fields(&input[c.starts[n - 1]..]);
        if head.is_some_and(|(_, _, f)| field(&f, "connection").any(|v| !v.is_ascii())) {
            return Ok(());
        }
    }
    // Rule G (cortex laxer, by design). Empty list elements beside a
    // coding in a Transfer-Encoding line ("chunked, ") are skipped, as
    // RFC 9110 §5.6.1 tells recipients to (h1.rs's tests assert
    // "CHUNKED , " is chunked); hyper reads only the last element of the
    // last line and refuses. Both read the framing as
    // chunked or not at all, so they never split the stream differently.
    if h.reqs.len() == n && matches!(h.tail, Tail::Refused(_)) && c.starts.len() > n {
        if empty_te_elements(&input[c.starts[n]..]) {
            return Ok(());
        }
    }
    // Rule H (cortex laxer, harmless). Trailer field lines may end in a
    // bare LF for cortex (httparse's reading, as for heads); hyper counts
    // CRLFs and refuses. A bare LF that would make an empty line (an
    // earlier end of the section for a reader that accepts bare LFs) is
    // refused by cortex too: it requires httparse to end the section
    // exactly at the CRLF CRLF it found (h1.rs; see
    // regressions/h1_request/trailer_lf_swallows_request), so both still
    // agree on where the message ends.
    if h.reqs.len() == n && matches!(h.tail, Tail::Refused(_)) && c.reqs.len() > n {
        let (start, end) = (c.starts[n], c.ends[n]);
        if let Some((head, _, _)) = head_fields(&input[start..end]) {
            if let Some(t) = trailer_section(&input[start + head..end]) {
                if (0..t.len()).any(|i| t[i] == b'\n' && (i == 0 || t[i - 1] != b'\r')) {
                    return Ok(());
                }
            }
        }
    }
    // Rule F. cortex checks a chunked body's trailer section once it has
    // all of it (up to the empty line, or max_trailers bytes), hyper line
    // by line as it comes: on a malformed trailer line hyper refuses at
    // once where cortex still waits. Allowed when cortex refuses the
    // message too as soon as the section is ended (CRLF CRLF appended):
    // it never reads such a message.
    if c.reqs.len() == n && h.reqs.len() == n && c.tail == Tail::Incomplete {
        if let Tail::Refused(_) = h.tail {
            let rest = &input[c.starts[n]..];
            let chunked = head_fields(rest)
                .is_some_and(|(_, _, f)| field(&f, "transfer-encoding").next().is_some());
            if chunked {
                let mut ended = rest.to_vec();
                ended.extend_from_slice(b"\r\n\r\n");
                match read_message(&ended, MAX_HEAD, MAX_BODY) {
                    Err(_) => return Ok(()),
                    other => {
                        return Err(format!(
                            "hyper refuses request {n}; cortex waits, and with CRLF CRLF appended reads {other:?}"
                        ))
                    }
                }
            }
        }
    }
    Err(format!(
        "readings differ after {n} request(s):\n  cortex: {} request(s), then {:?}\n  hyper:  {} request(s), then {:?}",
        c.reqs.len(),
        c.tail,
        h.reqs.len(),
        h.tail
    ))
}

/// Reads `input` both ways and panics on a difference no rule allows.
pub fn check(input: &[u8]) {
    let c = cortex_read(input);
    let h = hyper_read(input);
    if let Err(why) = compare(input, &c, &h) {
        panic!(
            "cortex and hyper disagree on {:?}\n{why}",
            String::from_utf8_lossy(input)
        );
    }
}

/// The request head `chunked_decode` puts before its bodies.
pub const CHUNKED_HEAD: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nTransfer-Encoding: chunked\r\n\r\n";

/// What cortex's body reader made of a chunked body: the body and the
/// bytes left after it, waiting for more, or the error.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyRead {
    Done(Bytes, Bytes),
    NeedMore,
    Failed(cortex_gateway::front::BodyError),
}

/// cortex's body reader over `body`, given in pieces of `sizes` (cycled;
/// a 0 is read as 1) or, with `sizes` empty, all at once.
/// On failure, also what was buffered then.
pub fn read_chunked(body: &[u8], sizes: &[u8]) -> (BodyRead, Bytes) {
    use cortex_gateway::front::BodyReader;
    let mut reader =
        BodyReader::new(h1::Framing::Chunked, MAX_BODY, MAX_HEAD).expect("no declared length");
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut k = 0;
    loop {
        let n = if sizes.is_empty() {
            body.len()
        } else {
            usize::from(sizes[k % sizes.len()]).max(1)
        };
        k += 1;
        let end = (at + n).min(body.len());
        buf.extend_from_slice(&body[at..end]);
        at = end;
        match reader.advance(&mut buf) {
            Ok(Some(b)) => {
                buf.extend_from_slice(&body[at..]);
                return (BodyRead::Done(b, buf.freeze()), Bytes::new());
            }
            Ok(None) if at == body.len() => return (BodyRead::NeedMore, Bytes::new()),
            Ok(None) => {}
            Err(e) => return (BodyRead::Failed(e), buf.freeze()),
        }
    }
}

/// `chunked_decode`: the differential check on a chunked request, then
/// cortex's reading in pieces against its reading at once.
pub fn check_chunked(sizes: &[u8], body: &[u8]) {
    let mut input = CHUNKED_HEAD.to_vec();
    input.extend_from_slice(body);
    check(&input);
    let (whole, _) = read_chunked(body, &[]);
    let (pieces, left) = read_chunked(body, sizes);
    if pieces == whole {
        return;
    }
    // Rule E1 across reads: a chunk-size line is refused when it is still
    // incomplete with MAX_CHUNK_LINE bytes buffered, so a long line (long
    // extensions) that arrives in one read is accepted and the same line
    // split over reads is not. Allowed (cortex is the stricter one either
    // way, and hyper would read it); noted in docs/benchmarks.md.
    if let BodyRead::Failed(cortex_gateway::front::BodyError::Framing(
        h1::FramingError::ChunkSize,
    )) = pieces
    {
        if long_incomplete_line(&left) {
            return;
        }
    }
    panic!(
        "cortex reads a chunked body differently in pieces of {sizes:?}:\n  at once:   {whole:?}\n  in pieces: {pieces:?}\n  body: {:?}",
        String::from_utf8_lossy(body)
    );
}

/// Whether `buf` (what the decoder had buffered when it failed) is one
/// incomplete line of at least MAX_CHUNK_LINE bytes: no LF, a CR only as
/// its last byte.
fn long_incomplete_line(buf: &[u8]) -> bool {
    buf.len() >= h1::MAX_CHUNK_LINE
        && !buf.contains(&b'\n')
        && !buf[..buf.len() - 1].contains(&b'\r')
}
