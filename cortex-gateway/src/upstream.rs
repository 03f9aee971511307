//! The `/v1/*` client: HTTP/1 keep-alive connections to the neurons, driven
//! inside the request's own task.
//!
//! Each serving worker (see `server.rs`) is one thread with its own event
//! loop and its own pool of idle connections here. A request checks out a
//! connection (or opens one), and the future that waits for the response,
//! and then the relay that streams its body, poll hyper's connection state
//! machine themselves: a chunk read from the neuron is decoded and written
//! to the client in the same poll, with no hand-off to a connection task
//! and back per chunk (that hand-off, plus reqwest's URL handling, was most
//! of cortex's CPU beyond the syscalls; see docs/benchmarks.md).
//!
//! A connection goes back to the pool when its response body has been read
//! to the end; a relay dropped early (the client went away) drops it, which
//! closes it, so the neuron sees the cancellation at once.

use crate::config::ms;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

type Conn = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One HTTP/1 connection: the request side and the state machine that must
/// be polled for anything to move.
struct Link {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: Conn,
    authority: Box<str>,
}

/// Idle connections by `host:port`, newest last, with when each went idle.
type Idle = HashMap<Box<str>, Vec<(Box<Link>, Instant)>>;

thread_local! {
    /// This worker's idle connections.
    static IDLE: RefCell<Idle> = RefCell::new(HashMap::new());
}

/// Polls `conn` once without waiting; true when it has ended (closed by
/// the neuron, or failed).
fn ended(conn: &mut Conn) -> bool {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    Pin::new(conn).poll(&mut cx).is_ready()
}

#[derive(Clone, Copy)]
struct PoolLimits {
    max_idle: usize,
    idle_timeout: Duration,
}

fn checkout(authority: &str, limits: PoolLimits) -> Option<Box<Link>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(authority)?;
        while let Some((mut link, since)) = list.pop() {
            if since.elapsed() < limits.idle_timeout
                && !ended(&mut link.conn)
                && link.sender.is_ready()
            {
                return Some(link);
            }
        }
        None
    })
}

fn checkin(mut link: Box<Link>, limits: PoolLimits) {
    // One more turn lets the connection settle into keep-alive idle.
    if ended(&mut link.conn) || !link.sender.is_ready() {
        return;
    }
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
            list.retain_mut(|(link, since)| {
                since.elapsed() < limits.idle_timeout && !ended(&mut link.conn)
            });
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

/// An error with its causes, since hyper's own message alone says little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

pub struct Upstream {
    limits: PoolLimits,
    connect_timeout: Duration,
    /// `Authorization: Bearer …` for the neurons (`[auth] token`).
    auth: Option<HeaderValue>,
}

/// A response head from a neuron; its body drives the connection.
pub type UpstreamResponse = Response<UpstreamBody>;

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

    async fn connect(&self, authority: &str) -> Result<Box<Link>, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| {
                SendError::Connect(format!(
                    "connect to {authority} timed out after {} ms",
                    self.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| SendError::Connect(format!("connect to {authority}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(error_chain(&e)))?;
        // Boxed: the connection state is large and moves between the pool,
        // the request future and the relay.
        Ok(Box::new(Link {
            sender,
            conn,
            authority: authority.into(),
        }))
    }

    /// POSTs `body` (JSON) to `base` + `path` and waits for the response
    /// head. A pooled connection that turns out to have been closed by the
    /// neuron before it read the request is replaced by a new one, once.
    pub async fn post(
        &self,
        base: &str,
        path: &str,
        body: Bytes,
        request_id: &HeaderValue,
        accept: Option<&HeaderValue>,
    ) -> Result<UpstreamResponse, SendError> {
        let base_uri: Uri = base
            .parse()
            .map_err(|e| SendError::Connect(format!("bad neuron URL {base}: {e}")))?;
        if base_uri.scheme_str().is_some_and(|s| s != "http") {
            return Err(SendError::Connect(format!(
                "{base}: only http:// neuron endpoints are supported"
            )));
        }
        let auth = base_uri
            .authority()
            .ok_or_else(|| SendError::Connect(format!("bad neuron URL {base}: no host")))?;
        let authority = auth.as_str();
        // Where to connect (and the pool key): `host:port`, port 80 when the
        // URL has none.
        let with_port;
        let addr = if auth.port().is_some() {
            authority
        } else {
            with_port = format!("{}:80", auth.host());
            with_port.as_str()
        };
        let prefix = base_uri.path().trim_end_matches('/');
        let target = if prefix.is_empty() {
            path.to_string()
        } else {
            format!("{prefix}{path}")
        };
        let build = || {
            let mut req = Request::post(target.as_str())
                .header(header::HOST, authority)
                .header(header::CONTENT_TYPE, "application/json")
                .header("x-request-id", request_id.clone());
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a.clone());
            }
            if let Some(auth) = &self.auth {
                req = req.header(header::AUTHORIZATION, auth.clone());
            }
            req.body(Full::new(body.clone()))
                .map_err(|e| SendError::Connect(e.to_string()))
        };
        if let Some(link) = checkout(addr, self.limits) {
            match send(link, build()?, self.limits).await {
                Ok(resp) => return Ok(resp),
                // Closed before it read anything: the neuron did no work.
                Err((e, false)) => {
                    tracing::debug!(error = %e, "pooled connection was closed; reconnecting")
                }
                Err((e, true)) => return Err(SendError::Other(e)),
            }
        }
        let link = self.connect(addr).await?;
        send(link, build()?, self.limits)
            .await
            .map_err(|(e, _)| SendError::Other(e))
    }
}

/// Sends `req` on `link`, polling the connection until the head arrives.
/// The error says whether the neuron may have seen the request.
async fn send(
    mut link: Box<Link>,
    req: Request<Full<Bytes>>,
    limits: PoolLimits,
) -> Result<UpstreamResponse, (String, bool)> {
    let mut head = std::pin::pin!(link.sender.send_request(req));
    let mut conn_done = false;
    let res = std::future::poll_fn(|cx| {
        if !conn_done {
            if let Poll::Ready(r) = Pin::new(&mut link.conn).poll(cx) {
                conn_done = true;
                if let Err(e) = r {
                    // The head future reports it too (as the same error).
                    tracing::trace!(error = %e, "upstream connection ended");
                }
            }
        }
        head.as_mut().poll(cx)
    })
    .await;
    match res {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let link = (!conn_done).then_some(link);
            Ok(Response::from_parts(
                parts,
                UpstreamBody { body, link, limits },
            ))
        }
        Err(e) => {
            let seen = !(e.is_canceled() || e.is_incomplete_message());
            Err((error_chain(&e), seen))
        }
    }
}

/// A neuron's response body. Polling it also drives the connection it
/// arrives on; at its end the connection returns to this worker's pool.
pub struct UpstreamBody {
    body: Incoming,
    link: Option<Box<Link>>,
    limits: PoolLimits,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(link) = self.link.take() {
            checkin(link, self.limits);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(link) = &mut this.link {
            if Pin::new(&mut link.conn).poll(cx).is_ready() {
                // Ended (closed or failed): dropping it lets the body see
                // the end or the error.
                this.link = None;
            }
        }
        let res = Pin::new(&mut this.body).poll_frame(cx);
        match &res {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
