//! cortex's client-facing HTTP/1.1 server: one per serving worker.
//!
//! It reads each request head with `httparse` and its body (length or
//! chunked, with `Expect: 100-continue`). A proxied route (`POST /v1/…`)
//! goes straight to `inference::serve` with the four header fields it reads,
//! and a relayed answer is written from a few fields with its relay polled
//! directly (no header map, URI or axum body on that path); every other
//! request goes to the axum router as an `http::Request`. Every body piece
//! that is ready is gathered into one write.
//! While a request is being answered it keeps watching the client socket:
//! when the client goes away the handler (and with it the upstream request)
//! is dropped at once.
//!
//! It replaces hyper's server connection for speed (see `h1.rs`); what it
//! supports is what OpenAI clients send: HTTP/1.0 and 1.1, keep-alive,
//! pipelining, `Content-Length` and chunked bodies. Every limit is a
//! `[gateway]` config key: `max_header_bytes`, `max_body_bytes`,
//! `client_timeout_ms` (a request's head and body must arrive within it,
//! and no write to the client may block longer), `keepalive_timeout_ms`
//! (idle time between requests).

use crate::config::ms;
use crate::h1::{self, Chunked, Framing, Step};
use crate::inference::{self, Answer, ClientFields, Route};
use crate::relay::status_str;
use crate::relay::Relay;
use crate::state::Gateway;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::FutureExt;
use helexa_api::error::{ApiError, ErrorCode};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// Most request header fields.
const MAX_HEADERS: usize = 100;
/// Output gathered before it is written even if more is ready.
const WRITE_BATCH: usize = 64 * 1024;
/// Pipelined bytes read ahead while a request is answered; past this the
/// socket is left alone until the answer is written.
const READ_AHEAD: usize = 64 * 1024;
/// After refusing a request whose body was not read, how long the rest of
/// it is read and dropped so the client sees the answer, not a reset.
const LINGER: Duration = Duration::from_secs(2);

#[derive(Clone, Copy)]
struct Limits {
    max_head: usize,
    max_body: usize,
    client_timeout: Duration,
    keepalive_timeout: Duration,
}

/// Serves `listener` until `shutdown` turns true, then waits for the open
/// connections: idle ones close at once, busy ones after their answer.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    app: Router,
    shutdown: watch::Receiver<bool>,
) {
    let g = &gw.config.gateway;
    let limits = Limits {
        max_head: g.max_header_bytes,
        max_body: g.max_body_bytes,
        client_timeout: ms(g.client_timeout_ms),
        keepalive_timeout: ms(g.keepalive_timeout_ms),
    };
    let mut conns = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = Conn {
                        gw: gw.clone(),
                        app: app.clone(),
                        stream,
                        buf: BytesMut::with_capacity(4096),
                        out: Vec::with_capacity(1024),
                        limits,
                        shutdown: shutdown.clone(),
                        last_active: Instant::now(),
                        idle_timer: None,
                    };
                    conns.spawn(conn.run());
                }
                Err(e) => {
                    // Out of file descriptors, say: back off a little.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// A request head, owned.
struct Head {
    target: Target,
    version: Version,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// Who answers a request.
enum Target {
    /// A proxied route (`POST /v1/…`), called directly with the few header
    /// fields it reads (no URI or header map is built).
    Proxy(Route, ClientFields),
    /// Everything else goes through the axum router.
    Router(Request<()>),
}

/// Why no request could be read.
enum ReadError {
    /// The connection ended or idled out, or shutdown began between
    /// requests: close without a word.
    Closed,
    /// A bad request: answer this, then close.
    Answer(Response),
}

struct Conn {
    gw: Arc<Gateway>,
    app: Router,
    stream: TcpStream,
    /// Bytes read from the client and not yet consumed.
    buf: BytesMut,
    /// The answer being gathered for one write.
    out: Vec<u8>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    /// When the client last sent something (for the keep-alive timeout).
    last_active: Instant,
    idle_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    async fn run(mut self) {
        loop {
            let head = match self.read_head().await {
                Ok(h) => h,
                Err(ReadError::Closed) => return,
                Err(ReadError::Answer(resp)) => {
                    let _ = self
                        .answer(Answer::Other(resp), None, false, Version::HTTP_11, false)
                        .await;
                    return;
                }
            };
            let body = match self.read_body(&head).await {
                Ok(b) => b,
                Err(ReadError::Closed) => return,
                Err(ReadError::Answer(resp)) => {
                    let _ = self
                        .answer(Answer::Other(resp), None, false, head.version, false)
                        .await;
                    self.linger().await;
                    return;
                }
            };
            let Head {
                target,
                version,
                keep_alive,
                ..
            } = head;
            let is_head;
            let id;
            // The proxied routes are called directly; the rest go through
            // the router (which also answers 404 and 405).
            let call = match target {
                Target::Proxy(route, mut fields) => {
                    is_head = false;
                    id = request_id(fields.request_id.take());
                    fields.request_id = Some(id.clone());
                    Either::Left(inference::serve(self.gw.clone(), route, fields, Ok(body)))
                }
                Target::Router(mut req) => {
                    is_head = req.method() == Method::HEAD;
                    id = request_id(req.headers_mut().remove("x-request-id"));
                    req.headers_mut().insert("x-request-id", id.clone());
                    let app = self.app.clone();
                    let req = req.map(|()| Body::from(body));
                    Either::Right(async move {
                        match tower::ServiceExt::oneshot(app, req).await {
                            Ok(resp) => Answer::Other(resp),
                            Err(never) => match never {},
                        }
                    })
                }
            };
            let Some(answer) = self.unless_client_leaves(call).await else {
                return; // the client went away: dropping the call cancels it
            };
            let draining = *self.shutdown.borrow();
            match self
                .answer(answer, Some(id), is_head, version, keep_alive && !draining)
                .await
            {
                Ok(true) => {}
                _ => return,
            }
        }
    }

    /// Reads the next request head. Between requests the connection may
    /// idle for `keepalive_timeout_ms` (and closes at once on shutdown);
    /// once a head has begun it must be complete within `client_timeout_ms`.
    async fn read_head(&mut self) -> Result<Head, ReadError> {
        // Set once the head has begun.
        let mut deadline: Option<Instant> = None;
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, self.limits.max_head) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err((status, message)) => {
                        return Err(ReadError::Answer(bad_head(status, message)))
                    }
                }
            }
            h1::room(&mut self.buf, 1024, 4096);
            let (stream, buf, shutdown) = (&mut self.stream, &mut self.buf, &mut self.shutdown);
            let read = if buf.is_empty() {
                if *shutdown.borrow() {
                    return Err(ReadError::Closed);
                }
                // The idle timer is made once per connection and moved only
                // when it fires (re-armed from the last activity), not
                // registered anew for every request.
                let due = self.last_active + self.limits.keepalive_timeout;
                let timer = self
                    .idle_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                let idled_out = async {
                    loop {
                        timer.as_mut().await;
                        if Instant::now() >= due {
                            return;
                        }
                        timer.as_mut().reset(due);
                    }
                };
                tokio::select! {
                    r = stream.read_buf(buf) => Ok(r),
                    () = idled_out => Err(()),
                    _ = shutdown.wait_for(|v| *v) => return Err(ReadError::Closed),
                }
            } else {
                let until =
                    *deadline.get_or_insert_with(|| Instant::now() + self.limits.client_timeout);
                tokio::time::timeout_at(until, stream.read_buf(buf))
                    .await
                    .map_err(|_| ())
            };
            match read {
                Ok(Ok(n)) if n > 0 => self.last_active = Instant::now(),
                _ => return Err(ReadError::Closed),
            }
        }
    }

    /// Reads the body `head` announces (answering `Expect: 100-continue`),
    /// refusing one over `max_body_bytes` with `413`.
    async fn read_body(&mut self, head: &Head) -> Result<Bytes, ReadError> {
        // Set when the body is not all there yet (most bodies came with
        // their head, and need no clock reading).
        let mut deadline = None;
        let max = self.limits.max_body;
        let too_large = || {
            ReadError::Answer(
                ApiError::new(
                    ErrorCode::RequestTooLarge,
                    format!("request body is larger than the limit of {max} bytes"),
                )
                .into_response(),
            )
        };
        match head.framing {
            Framing::Empty | Framing::Close => Ok(Bytes::new()),
            Framing::Length(n) => {
                if n > max as u64 {
                    self.count_refusal(413);
                    return Err(too_large());
                }
                let n = n as usize;
                if head.expect_continue && self.buf.len() < n {
                    self.continue_100().await?;
                }
                while self.buf.len() < n {
                    self.buf.reserve(n - self.buf.len());
                    self.read_more(&mut deadline).await?;
                }
                Ok(self.buf.split_to(n).freeze())
            }
            Framing::Chunked => {
                if head.expect_continue && self.buf.is_empty() {
                    self.continue_100().await?;
                }
                let mut dec = Chunked::new(self.limits.max_head);
                let mut body = BytesMut::new();
                loop {
                    match dec.step(&mut self.buf) {
                        Ok(Step::Data(d)) => {
                            if body.len() + d.len() > max {
                                self.count_refusal(413);
                                return Err(too_large());
                            }
                            body.extend_from_slice(&d);
                        }
                        Ok(Step::End) => return Ok(body.freeze()),
                        Ok(Step::NeedMore) => {
                            h1::room(&mut self.buf, 4096, 8192);
                            self.read_more(&mut deadline).await?;
                        }
                        Err(e) => {
                            return Err(ReadError::Answer(
                                ApiError::new(
                                    ErrorCode::InvalidRequest,
                                    format!("could not read the request body: {e}"),
                                )
                                .into_response(),
                            ))
                        }
                    }
                }
            }
        }
    }

    /// Reads more of the body; all of it must come within `client_timeout_ms`
    /// of the first such read.
    async fn read_more(&mut self, deadline: &mut Option<Instant>) -> Result<(), ReadError> {
        let until = *deadline.get_or_insert_with(|| Instant::now() + self.limits.client_timeout);
        match tokio::time::timeout_at(until, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(()),
            _ => Err(ReadError::Closed),
        }
    }

    async fn continue_100(&mut self) -> Result<(), ReadError> {
        self.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ReadError::Closed)
    }

    fn count_refusal(&self, status: u16) {
        self.gw
            .metrics
            .requests_total
            .with_label_values(&["-", "-", status_str(status)])
            .inc();
        tracing::warn!(status, "request refused before routing");
    }

    /// After an early refusal: stop sending, then read (and drop) what the
    /// client is still sending for a while, so it reads the answer instead
    /// of a connection reset.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let until = Instant::now() + LINGER;
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }

    /// Polls `fut` to the end unless the client closes its side first.
    /// Bytes it sends meanwhile (a pipelined request) are kept.
    async fn unless_client_leaves<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let stream = &mut self.stream;
        let buf = &mut self.buf;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            if client_left(stream, buf, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Writes `answer` (with `x-request-id: id` when given); true when the
    /// connection can carry another request.
    async fn answer(
        &mut self,
        answer: Answer,
        id: Option<HeaderValue>,
        is_head: bool,
        version: Version,
        keep_alive: bool,
    ) -> std::io::Result<bool> {
        let out = &mut self.out;
        out.clear();
        let (status, length, mut body) = match answer {
            Answer::Relayed(r) => {
                put_status(out, r.head.status);
                for (name, value) in r.fields() {
                    put_field(out, name, value);
                }
                h1::put_date(out);
                (r.head.status, r.length(), OutBody::Relay(r.body))
            }
            Answer::Other(resp) => {
                let (parts, body) = resp.into_parts();
                put_status(out, parts.status);
                for (name, value) in &parts.headers {
                    if !is_hop_by_hop(name) && (id.is_none() || name != "x-request-id") {
                        put_field(out, name.as_str(), value);
                    }
                }
                if !parts.headers.contains_key(header::DATE) {
                    h1::put_date(out);
                }
                let length = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .or_else(|| hyper::body::Body::size_hint(&body).exact());
                (parts.status, length, OutBody::Other(body))
            }
        };
        if let Some(id) = &id {
            put_field(out, "x-request-id", id);
        }
        let status = status.as_u16();
        let no_body = (100..200).contains(&status) || status == 204 || status == 304;
        let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
        // HTTP/1.0 with no known length: the end of the body is the close.
        let keep_alive = keep_alive && (no_body || length.is_some() || chunked);
        if !no_body {
            match length {
                Some(n) => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                None if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
                None => {}
            }
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if is_head || no_body {
            self.write_out().await?;
            return Ok(keep_alive);
        }
        loop {
            // Gather every piece that is ready now; write when none is.
            let piece = match std::future::poll_fn(|cx| body.poll_data(cx)).now_or_never() {
                Some(p) => p,
                None => {
                    if !self.out.is_empty() {
                        self.write_out().await?;
                        self.out.clear();
                    }
                    let next = std::future::poll_fn(|cx| body.poll_data(cx));
                    match self.unless_client_leaves(next).await {
                        Some(p) => p,
                        None => return Ok(false),
                    }
                }
            };
            match piece {
                Some(Ok(data)) => {
                    if chunked {
                        h1::put_chunk(&mut self.out, &data);
                    } else {
                        self.out.extend_from_slice(&data);
                    }
                    if self.out.len() >= WRITE_BATCH {
                        self.write_out().await?;
                        self.out.clear();
                    }
                }
                Some(Err(e)) => {
                    // Cut short: without the last chunk (or the full
                    // length) the client sees an incomplete body.
                    tracing::debug!(error = %e, "response body failed");
                    self.write_out().await?;
                    return Ok(false);
                }
                None => {
                    if chunked {
                        self.out.extend_from_slice(h1::LAST_CHUNK);
                    }
                    self.write_out().await?;
                    self.out.clear();
                    return Ok(keep_alive);
                }
            }
        }
    }
}

/// A response body being written: the relay of a neuron's answer, polled
/// directly, or any other body.
enum OutBody {
    Relay(Box<Relay>),
    Other(Body),
}

impl OutBody {
    /// The next piece of payload (trailers are not sent).
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        match self {
            OutBody::Relay(r) => futures_util::Stream::poll_next(std::pin::Pin::new(&mut **r), cx)
                .map(|p| p.map(|r| r.map_err(|e| e.to_string()))),
            OutBody::Other(b) => loop {
                match hyper::body::Body::poll_frame(std::pin::Pin::new(&mut *b), cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.to_string()))),
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            return Poll::Ready(Some(Ok(data)));
                        }
                    }
                }
            },
        }
    }
}

fn put_status(out: &mut Vec<u8>, status: http::StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn put_field(out: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

impl Conn {
    /// Writes the gathered output. A write that cannot finish at once (the
    /// client is not reading) may wait up to `client_timeout_ms`; then the
    /// connection is given up, which also frees the upstream and its slot.
    /// The timer is only set in that case.
    async fn write_out(&mut self) -> std::io::Result<()> {
        let limit = self.limits.client_timeout;
        let mut write = pin!(self.stream.write_all(&self.out));
        if let Some(done) = (&mut write).now_or_never() {
            return done;
        }
        match tokio::time::timeout(limit, write).await {
            Ok(done) => done,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = limit.as_millis() as u64,
                    "client stopped reading; closing the connection"
                );
                Err(std::io::ErrorKind::TimedOut.into())
            }
        }
    }
}

/// Reads what the client sent while its request is being answered; true
/// once it has closed (or reset) the connection.
fn client_left(stream: &mut TcpStream, buf: &mut BytesMut, cx: &mut Context<'_>) -> bool {
    loop {
        if buf.len() >= READ_AHEAD {
            return false;
        }
        h1::room(buf, 1024, 4096);
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(_)) => continue,
            Poll::Pending => return false,
        }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_LENGTH
        || name.as_str() == "keep-alive"
}

/// The client's `x-request-id` when it is sane, else a fresh one.
fn request_id(sent: Option<HeaderValue>) -> HeaderValue {
    sent.filter(|v| !v.is_empty() && v.len() <= 200)
        .unwrap_or_else(new_request_id)
}

/// A fresh request id: 32 hex digits, a random per-process half and a
/// counter, unique without a random-number syscall per request (a v4 UUID
/// each time cost a `getrandom` call on the hot path).
fn new_request_id() -> HeaderValue {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut hex = [0u8; 32];
    for (i, d) in hex.iter_mut().enumerate() {
        let word = if i < 16 { prefix } else { n };
        let nibble = (word >> (60 - 4 * (i % 16))) & 0xf;
        *d = b"0123456789abcdef"[nibble as usize];
    }
    HeaderValue::from_bytes(&hex).expect("hex is a header value")
}

/// A `400`/`431` answer for a request head cortex cannot read.
fn bad_head(status: u16, message: String) -> Response {
    let mut resp = ApiError::new(
        if status == 431 {
            ErrorCode::RequestTooLarge
        } else {
            ErrorCode::InvalidRequest
        },
        message,
    )
    .into_response();
    if let Ok(s) = http::StatusCode::from_u16(status) {
        *resp.status_mut() = s;
    }
    resp
}

/// Parses a request head from the front of `buf`: the head and its length,
/// `Ok(None)` when more bytes are needed, or the answer to a bad one.
/// A head cortex cannot read: the status (`400` or `431`) and why.
type BadHead = (u16, String);

/// Parses a request head from the front of `buf` and takes it out;
/// `Ok(None)` when more bytes are needed.
///
/// The head's bytes are frozen and the header values point into them (no
/// copy each). A request for a proxied route keeps only the four fields it
/// reads, found in the one parse; any other is parsed again into a full
/// `http::Request` for the router.
fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, BadHead> {
    let too_big = || {
        (
            431,
            format!("request head is larger than the limit of {max_head} bytes"),
        )
    };
    let bad = |why: &str| (400, format!("malformed HTTP request: {why}"));
    // Offsets (into the head) of the proxied routes' fields:
    // content-type, accept, user-agent, x-request-id.
    let mut spans = [None::<(usize, usize)>; 4];
    let (used, route, v, framing, keep_alive, expect_continue) = {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut headers);
        let used = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n > max_head => return Err(too_big()),
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(too_big()),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err((
                    431,
                    format!("request has more than {MAX_HEADERS} header fields"),
                ))
            }
            Err(e) => return Err((400, format!("malformed HTTP request: {e}"))),
        };
        let (Some(method), Some(path), Some(v)) = (r.method, r.path, r.version) else {
            return Err(bad("incomplete request line"));
        };
        let fields = || r.headers.iter().map(|h| (h.name, h.value));
        let framing = h1::framing(fields(), Framing::Empty).map_err(bad)?;
        let keep_alive = h1::keep_alive(v, fields());
        let expect_continue = v >= 1
            && r.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("expect")
                    && h.value.eq_ignore_ascii_case(b"100-continue")
            });
        let route = (method == "POST").then(|| Route::of_path(path)).flatten();
        if route.is_some() {
            let base = buf.as_ptr() as usize;
            for h in r.headers.iter() {
                let slot = match h.name.len() {
                    12 if h.name.eq_ignore_ascii_case("content-type") => 0,
                    6 if h.name.eq_ignore_ascii_case("accept") => 1,
                    10 if h.name.eq_ignore_ascii_case("user-agent") => 2,
                    12 if h.name.eq_ignore_ascii_case("x-request-id") => 3,
                    _ => continue,
                };
                if spans[slot].is_none() {
                    spans[slot] = Some((h.value.as_ptr() as usize - base, h.value.len()));
                }
            }
        }
        (used, route, v, framing, keep_alive, expect_continue)
    };
    let raw = buf.split_to(used).freeze();
    let version = if v >= 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let target = match route {
        Some(route) => {
            let mut values = spans.into_iter().map(|span| {
                span.map(|(at, n)| HeaderValue::from_maybe_shared(raw.slice(at..at + n)))
                    .transpose()
                    .map_err(|_| bad("invalid header field"))
            });
            let mut next = || values.next().expect("four fields");
            Target::Proxy(
                route,
                ClientFields {
                    content_type: next()?,
                    accept: next()?,
                    user_agent: next()?,
                    request_id: next()?,
                },
            )
        }
        None => Target::Router(router_request(&raw, version)?),
    };
    Ok(Some(Head {
        target,
        version,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// A whole `http::Request` (all header fields) from a complete head.
fn router_request(raw: &Bytes, version: Version) -> Result<Request<()>, BadHead> {
    let bad = |why: &str| Err((400, format!("malformed HTTP request: {why}")));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    if !matches!(r.parse(raw), Ok(httparse::Status::Complete(_))) {
        return bad("unreadable head");
    }
    let (Some(method), Some(path)) = (r.method, r.path) else {
        return bad("incomplete request line");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return bad("invalid method");
    };
    let Ok(uri) = Uri::from_maybe_shared(raw.slice_ref(path.as_bytes())) else {
        return bad("invalid request target");
    };
    let mut map = HeaderMap::with_capacity(r.headers.len() + 1);
    for h in r.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return bad("invalid header field");
        };
        let Ok(value) = HeaderValue::from_maybe_shared(raw.slice_ref(h.value)) else {
            return bad("invalid header field");
        };
        map.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_with_framing() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello";
        let mut buf = BytesMut::from(&raw[..]);
        let head = parse_head(&mut buf, 1024).ok().unwrap().unwrap();
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive && head.expect_continue);
        let Target::Proxy(Route::Chat, fields) = head.target else {
            panic!("a proxied route")
        };
        assert!(fields.content_type.is_none() && fields.request_id.is_none());
        let raw = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\nUser-Agent: litellm/1\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(&raw[..]), 1024)
            .ok()
            .unwrap()
            .unwrap();
        let Target::Proxy(Route::Embeddings, f) = head.target else {
            panic!("a proxied route")
        };
        assert_eq!(f.content_type.unwrap(), "application/json");
        assert_eq!(f.request_id.unwrap(), "abc");
        assert_eq!(f.user_agent.unwrap(), "litellm/1");
        assert_eq!(f.accept.unwrap(), "*/*");
        let raw = b"GET /v1/chat/completions HTTP/1.1\r\nX-Request-Id: abc\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(&raw[..]), 1024)
            .ok()
            .unwrap()
            .unwrap();
        let Target::Router(req) = head.target else {
            panic!("a GET goes to the router")
        };
        assert_eq!(req.uri().path(), "/v1/chat/completions");
        assert_eq!(req.headers()["x-request-id"], "abc");
        let raw = b"GET /health HTTP/1.0\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(&raw[..]), 1024)
            .ok()
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.framing, Framing::Empty);
        let mut partial = BytesMut::from(&b"GET /health HTTP/1.1\r\nHost"[..]);
        assert!(parse_head(&mut partial, 1024).ok().unwrap().is_none());
        assert_eq!(partial.len(), 26, "nothing taken from a partial head");
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_unique() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let text = a.to_str().unwrap();
        assert_eq!(text.len(), 32);
        assert!(text.bytes().all(|c| c.is_ascii_hexdigit()), "{text}");
        assert_eq!(
            &a.as_bytes()[..16],
            &b.as_bytes()[..16],
            "same process prefix"
        );
    }

    #[test]
    fn bad_heads_get_400_or_431() {
        let status = |raw: &[u8], max| parse_head(&mut BytesMut::from(raw), max).err().unwrap().0;
        assert_eq!(status(b"GET\x01 / HTTP/1.1\r\n\r\n", 1024), 400);
        assert_eq!(
            status(
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                1024
            ),
            400
        );
        assert_eq!(
            status(
                b"GET / HTTP/1.1\r\nX-Big: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                16
            ),
            431
        );
        let many: String = (0..120).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 1 << 20),
            431
        );
    }
}
