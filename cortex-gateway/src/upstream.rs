//! The `/v1/*` client: HTTP/1.1 keep-alive connections to the neurons,
//! read and written by the request's own task.
//!
//! Each serving worker (see `server.rs`) is one thread with its own event
//! loop and its own pool of idle connections here. A request checks out a
//! connection (or opens one), writes its head and body in one write, reads
//! the response head (parsed with `httparse`), and its body is then decoded
//! straight from the socket as the relay polls it: a read from the neuron is
//! decoded and written to the client in the same poll, with no connection
//! task, body channel or per-frame hand-off in between (see `h1.rs` for why).
//!
//! A connection goes back to the pool when its response body has been read
//! to the end; a body dropped early (the client went away) drops it, which
//! closes it, so the neuron sees the cancellation at once.

use crate::config::ms;
use crate::h1::{self, Chunked, Framing, Step};
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted from a neuron.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted from a neuron.
const MAX_HEADERS: usize = 64;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// One connection to a neuron, with bytes read but not yet consumed.
struct Link {
    stream: TcpStream,
    buf: BytesMut,
    authority: Box<str>,
}

/// Idle connections by `host:port`, newest last, with when each went idle.
type Idle = HashMap<Box<str>, Vec<(Box<Link>, Instant)>>;

thread_local! {
    /// This worker's idle connections.
    static IDLE: RefCell<Idle> = RefCell::new(HashMap::new());
}

/// Whether an idle connection is still usable: nothing arrived on it (no
/// close, no stray bytes). Free in the common case: tokio's cached
/// readiness says "not readable" without a syscall.
fn usable(link: &mut Link) -> bool {
    if !link.buf.is_empty() {
        return false;
    }
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match link.stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(link.stream.try_read(&mut probe),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[derive(Clone, Copy)]
struct PoolLimits {
    max_idle: usize,
    idle_timeout: Duration,
}

fn checkout(authority: &str) -> Option<Box<Link>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(authority)?;
        // Age is left to `prune_idle` (once a second), so taking a
        // connection reads no clock; one closed by its neuron is never used.
        while let Some((mut link, _)) = list.pop() {
            if usable(&mut link) {
                return Some(link);
            }
        }
        None
    })
}

fn checkin(link: Box<Link>, limits: PoolLimits) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(link.authority.clone()).or_default();
        if list.len() < limits.max_idle {
            list.push((link, Instant::now()));
        }
    });
}

/// Closes this worker's idle connections that are past the idle timeout
/// or were closed by their neuron.
fn prune_idle(limits: PoolLimits) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain_mut(|(link, since)| since.elapsed() < limits.idle_timeout && usable(link));
        }
        idle.retain(|_, list| !list.is_empty());
    });
}

/// Why a request got no response head.
#[derive(Debug)]
pub enum SendError {
    /// No TCP connection (refused, unreachable, connect timeout): the
    /// neuron did nothing.
    Connect(String),
    /// The connection failed after the request was written.
    Other(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(m) | SendError::Other(m) => f.write_str(m),
        }
    }
}

pub struct Upstream {
    limits: PoolLimits,
    connect_timeout: Duration,
    /// `Authorization: Bearer …` for the neurons (`[auth] token`).
    auth: Option<HeaderValue>,
}

/// What cortex keeps of a neuron's response head: the status and the
/// fields it passes on or reads (no header map is built).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHead {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub retry_after: Option<HeaderValue>,
    /// The body's length, when the neuron sent `Content-Length`.
    pub content_length: Option<u64>,
}

impl UpstreamHead {
    /// Whether the body is a server-sent event stream.
    pub fn is_sse(&self) -> bool {
        self.content_type
            .as_ref()
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    }
}

/// A response from a neuron: its head, and a body that reads the connection.
pub struct UpstreamResponse {
    pub head: UpstreamHead,
    pub body: UpstreamBody,
}

impl UpstreamResponse {
    pub fn status(&self) -> StatusCode {
        self.head.status
    }
}

/// Where to send a request: the connect address (the pool key) and the
/// pieces of the request line and `Host`.
struct Target<'a> {
    addr: std::borrow::Cow<'a, str>,
    authority: &'a str,
    prefix: &'a str,
}

fn target(base: &str) -> Result<Target<'_>, SendError> {
    let bad = |why: &str| SendError::Connect(format!("bad neuron URL {base}: {why}"));
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// neuron endpoints are supported"))?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    // Checked cheaply, per request: a host, and whether a port follows it.
    let host_end = if authority.starts_with('[') {
        authority
            .find(']')
            .map(|i| i + 1)
            .ok_or_else(|| bad("unclosed [ in host"))?
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    if host_end == 0 || authority.contains(['@', ' ', '?', '#']) {
        return Err(bad("no host"));
    }
    let port = &authority[host_end..];
    if !port.is_empty()
        && port
            .strip_prefix(':')
            .is_none_or(|p| p.parse::<u16>().is_err())
    {
        return Err(bad("invalid port"));
    }
    // Port 80 when the URL has none.
    let addr = if port.is_empty() {
        std::borrow::Cow::Owned(format!("{authority}:80"))
    } else {
        std::borrow::Cow::Borrowed(authority)
    };
    Ok(Target {
        addr,
        authority,
        prefix,
    })
}

impl Upstream {
    pub fn new(config: &crate::config::Config) -> Upstream {
        let up = &config.upstream;
        Upstream {
            limits: PoolLimits {
                max_idle: up.pool_max_idle_per_host,
                idle_timeout: ms(up.pool_idle_timeout_ms),
            },
            connect_timeout: ms(up.connect_timeout_ms),
            auth: crate::state::bearer(config),
        }
    }

    /// This worker's pool housekeeping; runs until the worker stops.
    ///
    /// Once a second it closes idle connections that are too old or were
    /// closed by their neuron. The tick also keeps the worker's timer wheel
    /// from sleeping longer than a second: a request's timeouts (minutes
    /// away) then never become the earliest timer, which would make tokio
    /// wake its own event loop with an eventfd write on every request.
    pub async fn housekeeping(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            prune_idle(self.limits);
        }
    }

    async fn connect(&self, addr: &str) -> Result<Box<Link>, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                SendError::Connect(format!(
                    "connect to {addr} timed out after {} ms",
                    self.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| SendError::Connect(format!("connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(Box::new(Link {
            stream,
            buf: BytesMut::with_capacity(READ_SIZE),
            authority: addr.into(),
        }))
    }

    /// POSTs `body` (JSON) to `base` + `path` and waits for the response
    /// head. A pooled connection that turns out to have been closed by the
    /// neuron before it answered anything is replaced by a new one, once.
    pub async fn post(
        &self,
        base: &str,
        path: &str,
        body: Bytes,
        request_id: &HeaderValue,
        accept: Option<&HeaderValue>,
    ) -> Result<UpstreamResponse, SendError> {
        let t = target(base)?;
        let mut head = Vec::with_capacity(256 + body.len().min(MAX_INLINE_BODY));
        head.extend_from_slice(b"POST ");
        head.extend_from_slice(t.prefix.as_bytes());
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(t.authority.as_bytes());
        head.extend_from_slice(b"\r\ncontent-type: application/json\r\nx-request-id: ");
        head.extend_from_slice(request_id.as_bytes());
        if let Some(a) = accept {
            head.extend_from_slice(b"\r\naccept: ");
            head.extend_from_slice(a.as_bytes());
        }
        if let Some(auth) = &self.auth {
            head.extend_from_slice(b"\r\nauthorization: ");
            head.extend_from_slice(auth.as_bytes());
        }
        head.extend_from_slice(b"\r\ncontent-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        head.extend_from_slice(b"\r\n\r\n");
        let body = if body.len() <= MAX_INLINE_BODY {
            // One write for head and body.
            head.extend_from_slice(&body);
            Bytes::new()
        } else {
            body
        };
        let request = (head.as_slice(), &body[..]);
        if let Some(link) = checkout(&t.addr) {
            match exchange(link, request, self.limits).await {
                Ok(resp) => return Ok(resp),
                // Closed before it answered anything: the neuron did no work.
                Err((e, false)) => {
                    tracing::debug!(error = %e, "pooled connection was closed; reconnecting")
                }
                Err((e, true)) => return Err(SendError::Other(e)),
            }
        }
        let link = self.connect(&t.addr).await?;
        exchange(link, request, self.limits)
            .await
            .map_err(|(e, _)| SendError::Other(e))
    }
}

/// Bodies up to this size are copied behind the head and sent in one write.
const MAX_INLINE_BODY: usize = 64 * 1024;

/// Writes the request on `link` and reads the response head. The error
/// says whether the neuron may have seen the request (false: the
/// connection was closed before any byte of an answer came).
async fn exchange(
    mut link: Box<Link>,
    (head, body): (&[u8], &[u8]),
    limits: PoolLimits,
) -> Result<UpstreamResponse, (String, bool)> {
    let written = async {
        link.stream.write_all(head).await?;
        if !body.is_empty() {
            link.stream.write_all(body).await?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    if let Err(e) = written {
        return Err((format!("sending the request: {e}"), false));
    }
    loop {
        let (resp, used) = match parse_head(&link.buf) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                if link.buf.len() > MAX_HEAD {
                    return Err((format!("response head larger than {MAX_HEAD} bytes"), true));
                }
                h1::room(&mut link.buf, 4096, READ_SIZE);
                match link.stream.read_buf(&mut link.buf).await {
                    Ok(0) => {
                        let seen = !link.buf.is_empty();
                        return Err(("the neuron closed the connection".into(), seen));
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let seen = !link.buf.is_empty()
                            || !matches!(
                                e.kind(),
                                std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::ConnectionAborted
                                    | std::io::ErrorKind::BrokenPipe
                            );
                        return Err((format!("reading the response: {e}"), seen));
                    }
                }
            }
            Err(e) => return Err((format!("bad response head: {e}"), true)),
        };
        link.buf.advance(used);
        let Some(resp) = resp else {
            continue; // an interim 1xx response
        };
        let (head, framing, reuse) = resp;
        return Ok(UpstreamResponse {
            head,
            body: UpstreamBody::new(link, framing, reuse, limits),
        });
    }
}

type Parsed = (Option<(UpstreamHead, Framing, bool)>, usize);

/// A header value, without an allocation for the usual content types.
fn value_of(raw: &[u8]) -> Result<HeaderValue, String> {
    const COMMON: [&str; 3] = [
        "application/json",
        "text/event-stream",
        "text/event-stream; charset=utf-8",
    ];
    if let Some(c) = COMMON.iter().find(|c| c.as_bytes() == raw) {
        return Ok(HeaderValue::from_static(c));
    }
    HeaderValue::from_bytes(raw).map_err(|_| format!("invalid header value {raw:?}"))
}

/// Parses a response head from the front of `buf`: the response (or None
/// for an interim 1xx) with its body framing and whether the connection
/// may be reused, and the head's length; `Ok(None)` when incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Parsed>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    let used = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let code = r.code.unwrap_or(0);
    if (100..200).contains(&code) {
        return Ok(Some((None, used)));
    }
    let status = StatusCode::from_u16(code).map_err(|e| e.to_string())?;
    let version = r.version.unwrap_or(1);
    let fields = || r.headers.iter().map(|h| (h.name, h.value));
    let framing = if code == 204 || code == 304 {
        Framing::Empty
    } else {
        h1::framing(fields(), Framing::Close).map_err(|e| e.to_string())?
    };
    let reuse = framing != Framing::Close && h1::keep_alive(version, fields());
    // Only the fields cortex passes on or reads are kept.
    let mut head = UpstreamHead {
        status,
        content_type: None,
        retry_after: None,
        content_length: match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        },
    };
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value_of(h.value)?);
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            head.retry_after = Some(value_of(h.value)?);
        }
    }
    Ok(Some((Some((head, framing, reuse)), used)))
}

/// A neuron's response body, decoded from its connection as it is polled.
/// At its end the connection returns to this worker's pool.
pub struct UpstreamBody {
    link: Option<Box<Link>>,
    framing: Framing,
    /// Bytes left of a `Content-Length` body.
    left: u64,
    chunked: Chunked,
    reuse: bool,
    done: bool,
    limits: PoolLimits,
}

impl UpstreamBody {
    fn new(link: Box<Link>, framing: Framing, reuse: bool, limits: PoolLimits) -> UpstreamBody {
        let mut body = UpstreamBody {
            link: Some(link),
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: Chunked::new(MAX_HEAD),
            reuse,
            done: false,
            limits,
        };
        if framing == Framing::Empty {
            body.finish();
        }
        body
    }

    /// The body is complete: the connection goes back to the pool if it
    /// can carry another request.
    fn finish(&mut self) {
        self.done = true;
        if let Some(link) = self.link.take() {
            if self.reuse && link.buf.is_empty() {
                checkin(link, self.limits);
            }
        }
    }

    /// The next payload piece already in the buffer, if any.
    fn decode(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        let Some(link) = &mut self.link else {
            return Ok(None);
        };
        match self.framing {
            Framing::Empty => Ok(None),
            Framing::Close => Ok((!link.buf.is_empty()).then(|| link.buf.split().freeze())),
            Framing::Length(_) => {
                if link.buf.is_empty() {
                    return Ok(None);
                }
                let n = (link.buf.len() as u64).min(self.left);
                let data = link.buf.split_to(n as usize).freeze();
                self.left -= n;
                if self.left == 0 {
                    self.finish();
                }
                Ok(Some(data))
            }
            Framing::Chunked => {
                let step = self
                    .chunked
                    .step(&mut link.buf)
                    .map_err(std::io::Error::other)?;
                match step {
                    Step::Data(d) => {
                        // The terminator usually came in the same read: see
                        // it now so the connection is free at once.
                        if self
                            .chunked
                            .skip_framing(&mut link.buf)
                            .map_err(std::io::Error::other)?
                        {
                            self.finish();
                        }
                        Ok(Some(d))
                    }
                    Step::NeedMore => Ok(None),
                    Step::End => {
                        self.finish();
                        Ok(None)
                    }
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(e) => {
                    this.link = None;
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            let Some(link) = &mut this.link else {
                return Poll::Ready(None);
            };
            h1::room(&mut link.buf, 4096, READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut link.stream), cx, &mut link.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.link = None;
                    this.done = true;
                    if this.framing == Framing::Close {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the neuron closed the connection before the end of the body",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.link = None;
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(_) => SizeHint::with_exact(self.left),
            Framing::Empty => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neuron_urls_split_into_address_host_and_prefix() {
        let t = target("http://10.0.0.5:13131").unwrap();
        assert_eq!(
            (&*t.addr, t.authority, t.prefix),
            ("10.0.0.5:13131", "10.0.0.5:13131", "")
        );
        let t = target("http://node-a/engine/7/").unwrap();
        assert_eq!(
            (&*t.addr, t.authority, t.prefix),
            ("node-a:80", "node-a", "/engine/7")
        );
        assert!(target("https://node-a").is_err());
        assert!(target("http://").is_err());
        assert!(target("http://node-a:99999").is_err());
        let t = target("http://[::1]:13131/x").unwrap();
        assert_eq!((&*t.addr, t.prefix), ("[::1]:13131", "/x"));
        assert_eq!(&*target("http://[::1]").unwrap().addr, "[::1]:80");
    }

    #[test]
    fn response_heads_give_framing_and_reuse() {
        let (resp, used) = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nxyz",
        )
        .unwrap()
        .unwrap();
        let (head, framing, reuse) = resp.unwrap();
        assert_eq!(used, 80);
        assert_eq!((framing, reuse), (Framing::Chunked, true));
        assert!(head.is_sse() && head.content_length.is_none());
        let (resp, _) = parse_head(
            b"HTTP/1.0 503 Busy\r\ncontent-length: 2\r\nRetry-After: 7\r\ncontent-type: text/plain\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let (head, framing, reuse) = resp.unwrap();
        assert_eq!((framing, reuse), (Framing::Length(2), false));
        assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(head.content_length, Some(2));
        assert_eq!(head.retry_after.unwrap(), "7");
        assert_eq!(head.content_type.unwrap(), "text/plain");
        let (resp, _) = parse_head(b"HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        let (_, framing, reuse) = resp.unwrap();
        assert_eq!((framing, reuse), (Framing::Close, false));
        let (interim, used) = parse_head(b"HTTP/1.1 100 Continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(interim.is_none() && used == 25);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-")
            .unwrap()
            .is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
    }
}
