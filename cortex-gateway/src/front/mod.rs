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
//! pipelining, `Content-Length` and chunked bodies, with strict framing
//! (`h1.rs`; differential-fuzzed against hyper, `fuzz/`). Every limit is a
//! `[gateway]` config key: `max_connections`, `max_header_bytes`,
//! `max_body_bytes`, `client_timeout_ms` (a request's head and body must
//! arrive within it, and no write to the client may block longer),
//! `keepalive_timeout_ms` (idle time between requests).
//!
//! Files, by concern: this one accepts connections and runs each one's
//! request loop (and watches the client while it is answered); `head.rs`
//! parses request heads (I/O-free); `body.rs` reads bodies; `respond.rs`
//! writes answers; `request_id.rs` makes request ids.

use crate::config::ms;
use crate::h1;
use crate::inference::{self, Answer};
use crate::state::Gateway;
use axum::body::Body;
use axum::response::Response;
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use http::{Method, Version};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

mod body;
mod head;
mod request_id;
mod respond;

pub use body::{BodyError, BodyReader};
use head::{parse_head, Head, Target};
use request_id::request_id;

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

/// How a client connection ended (`cortex_connections_closed_total{end}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Between requests: the client closed it, it idled out, or cortex
    /// closed it after an answer (`Connection: close`, shutdown).
    Clean,
    /// In the middle of a request or answer: the client went away, a read
    /// or write failed, or the answer broke off.
    Cut,
    /// A request's head or body, or a write, did not finish within
    /// `gateway.client_timeout_ms`.
    TimedOut,
    /// A request cortex could not read was answered (400/413/431/501) and
    /// the connection closed.
    Refused,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Clean => "clean",
            End::Cut => "cut",
            End::TimedOut => "timeout",
            End::Refused => "refused",
        }
    }
}

/// Serves `listener` until `shutdown` turns true, then waits for the open
/// connections: idle ones close at once, busy ones after their answer.
///
/// At most `gateway.max_connections` client connections are open at once
/// across every worker: at the cap no more are accepted (they wait in the
/// kernel's backlog) until one closes.
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
    let mut warned_full = false;
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => break,
            p = gw.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        if gw.connections.available_permits() == 0 && !warned_full {
            warned_full = true;
            tracing::warn!(
                max_connections = gw.config.gateway.max_connections,
                "client connections at gateway.max_connections; new ones wait in the backlog"
            );
        }
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
                    let gw = gw.clone();
                    conns.spawn(async move {
                        let open = &gw.metrics.connections_open;
                        open.inc();
                        let end = conn.run().await;
                        open.dec();
                        gw.metrics.connections_closed.with_label_values(&[end.label()]).inc();
                        match end {
                            End::Clean => {}
                            End::Refused => tracing::debug!("connection closed after a refused request"),
                            End::Cut | End::TimedOut => tracing::debug!(end = end.label(), "connection cut off"),
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    drop(permit);
                    // Out of file descriptors, say: back off a little.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if gw.connections.available_permits() > 0 {
            warned_full = false;
        }
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Why no request could be read.
enum ReadError {
    /// The connection ended (how), or shutdown began between requests:
    /// close without a word.
    Closed(End),
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
    /// Serves requests until the connection ends; says how it ended.
    async fn run(mut self) -> End {
        loop {
            let head = match self.read_head().await {
                Ok(h) => h,
                Err(ReadError::Closed(end)) => return end,
                Err(ReadError::Answer(resp)) => {
                    let _ = self
                        .answer(Answer::Other(resp), None, false, Version::HTTP_11, false)
                        .await;
                    return End::Refused;
                }
            };
            let body = match self.read_body(head.framing, head.expect_continue).await {
                Ok(b) => b,
                Err(ReadError::Closed(end)) => return end,
                Err(ReadError::Answer(resp)) => {
                    let _ = self
                        .answer(Answer::Other(resp), None, false, head.version, false)
                        .await;
                    self.linger().await;
                    return End::Refused;
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
                return End::Cut; // the client went away: dropping the call cancels it
            };
            let draining = *self.shutdown.borrow();
            match self
                .answer(answer, Some(id), is_head, version, keep_alive && !draining)
                .await
            {
                Ok(true) => {}
                Ok(false) => return End::Clean,
                Err(end) => return end,
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
                    Err(bad) => {
                        self.count_refusal(bad.status());
                        return Err(ReadError::Answer(bad.response()));
                    }
                }
            }
            h1::room(&mut self.buf, 1024, 4096);
            let (stream, buf, shutdown) = (&mut self.stream, &mut self.buf, &mut self.shutdown);
            let between = buf.is_empty();
            let read = if between {
                if *shutdown.borrow() {
                    return Err(ReadError::Closed(End::Clean));
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
                    _ = shutdown.wait_for(|v| *v) => return Err(ReadError::Closed(End::Clean)),
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
                // Idle between requests, or closed there: a clean end.
                _ if between => return Err(ReadError::Closed(End::Clean)),
                Err(()) => return Err(ReadError::Closed(End::TimedOut)),
                _ => return Err(ReadError::Closed(End::Cut)),
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
}

/// One request message as cortex's front end reads it: for the fuzz
/// target and tests, which compare it with hyper's reading of the same
/// bytes. Uses exactly the head parser and body reader that serve.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub method: String,
    pub path: String,
    pub http_1_1: bool,
    pub keep_alive: bool,
    pub body: Bytes,
    /// Bytes of `input` the message took (head and body).
    pub used: usize,
}

/// Reads the first request of `input` with the serving limits
/// `max_head`/`max_body`: the message, `Ok(None)` when `input` ends before
/// it does, or the status cortex refuses it with.
pub fn read_message(
    input: &[u8],
    max_head: usize,
    max_body: usize,
) -> Result<Option<Message>, u16> {
    let mut buf = BytesMut::from(input);
    let head = match parse_head(&mut buf, max_head) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(bad) => return Err(bad.status()),
    };
    let mut reader = BodyReader::new(head.framing, max_body, max_head).map_err(|e| e.status())?;
    let Some(body) = reader.advance(&mut buf).map_err(|e| e.status())? else {
        return Ok(None);
    };
    let (method, path) = match &head.target {
        Target::Proxy(route, _) => ("POST".to_string(), route.path().to_string()),
        Target::Router(req) => (
            req.method().to_string(),
            req.uri()
                .path_and_query()
                .map_or_else(|| req.uri().to_string(), |p| p.to_string()),
        ),
    };
    Ok(Some(Message {
        method,
        path,
        http_1_1: head.version == Version::HTTP_11,
        keep_alive: head.keep_alive,
        body,
        used: input.len() - buf.len(),
    }))
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
