//! The `/v1/*` client: hyper's pooled HTTP/1 client, one per serving worker.
//!
//! Each worker thread (see `server.rs`) runs its own event loop; a client
//! used only from that thread keeps its connections' tasks on the same loop,
//! so a request never wakes another thread. `reqwest` (kept for the control
//! routes) costs URL parsing and several task hand-offs per request, which
//! on the hot path was most of cortex's CPU beyond the syscalls.

use crate::config::{ms, Config};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::cell::Cell;

pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

thread_local! {
    /// Which worker this thread is (0 outside the workers).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving worker `i`.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

pub struct Upstream {
    clients: Vec<Client>,
    /// `Authorization: Bearer …` for the neurons (`[auth] token`).
    auth: Option<HeaderValue>,
}

impl Upstream {
    pub fn new(config: &Config, workers: usize) -> Upstream {
        let up = &config.upstream;
        let client = || {
            let mut conn = HttpConnector::new();
            conn.set_connect_timeout(Some(ms(up.connect_timeout_ms)));
            conn.set_nodelay(true);
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(up.pool_max_idle_per_host)
                .pool_idle_timeout(ms(up.pool_idle_timeout_ms))
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(conn)
        };
        Upstream {
            clients: (0..workers.max(1)).map(|_| client()).collect(),
            auth: crate::state::bearer(config),
        }
    }

    /// This thread's client.
    pub fn client(&self) -> &Client {
        let i = WORKER.with(Cell::get);
        &self.clients[i % self.clients.len()]
    }

    /// A JSON POST of `body` to `url`.
    pub fn post(
        &self,
        url: &str,
        body: Bytes,
        request_id: &HeaderValue,
        accept: Option<&HeaderValue>,
    ) -> Result<Request<Full<Bytes>>, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("bad upstream URL {url}: {e}"))?;
        let mut req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id.clone());
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a.clone());
        }
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        req.body(Full::new(body)).map_err(|e| e.to_string())
    }
}
