//! Starts cortex: binds the API and metrics listeners, starts the poller,
//! serves, and drains on shutdown (stop accepting, let open requests finish
//! up to `gateway.drain_timeout_ms`, then return).

use crate::api;
use crate::config::{ms, Config};
use crate::inference::{self, Route};
use crate::state::Gateway;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Build(#[from] crate::state::BuildError),
}

/// A running cortex.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Begins the drain: stop accepting, `/ready` turns 503.
    pub fn shutdown(&self) {
        self.gateway.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }

    /// Waits until the drain is over (or its timeout passed).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The API router, shared by the binary and the tests.
pub fn app(gw: Arc<Gateway>) -> Router {
    let limit = gw.config.gateway.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(api::list_models))
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/version", get(api::version))
        .merge(crate::admin::routes(&gw))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), client_key))
        .with_state(gw)
}

/// Client keys on the router's routes (`GET /v1/models`, `/admin/…`): the
/// key found is put in the request's extensions for the handler (the
/// proxied `POST /v1/…` routes check their key in `inference::serve`).
/// `/health`, `/ready` and `/version` stay public.
async fn client_key(State(gw): Gw, mut req: Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let guarded = path.starts_with("/v1/") || path.starts_with("/admin/");
    if !guarded
        || !gw.keys.enabled()
        || req.method() == http::Method::POST && path.starts_with("/v1/")
    {
        return next.run(req).await;
    }
    let h = req.headers();
    // On /admin/ with the admin API on, `Authorization` carries the admin
    // token: the client key comes from `x-api-key` only.
    let admin = path.starts_with("/admin/") && gw.config.admin.token.is_some();
    let authorization = h.get(http::header::AUTHORIZATION).filter(|_| !admin);
    match gw.keys.get().identify(authorization, h.get("x-api-key")) {
        Ok(Some(key)) => {
            let rate = key.peek_headers();
            req.extensions_mut().insert(api::Caller(key));
            let mut resp = next.run(req).await;
            for (name, value) in rate {
                resp.headers_mut()
                    .insert(http::HeaderName::from_static(name), value);
            }
            resp
        }
        Ok(None) => next.run(req).await,
        Err(e) => {
            gw.metrics
                .key_rejections
                .with_label_values(&["-", crate::keys::Refusal::Unauthenticated.label()])
                .inc();
            tracing::warn!(path = %path, code = e.code.as_str(), "request refused: no valid API key");
            axum::response::IntoResponse::into_response(e)
        }
    }
}

type Gw = State<Arc<Gateway>>;

async fn chat(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Chat, req).await
}
async fn completions(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Completions, req).await
}
async fn responses(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Responses, req).await
}
async fn embeddings(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Embeddings, req).await
}
async fn messages(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::Messages, req).await
}
async fn count_tokens(State(gw): Gw, req: Request) -> Response {
    inference::handle(gw, Route::CountTokens, req).await
}

async fn metrics_text(State(gw): Gw) -> Response {
    let mut r = Response::new(axum::body::Body::from(gw.metrics.render()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// Turns an I/O error about a listener (`what`: the config key) into a
/// start-up error naming the address.
fn bind_error(
    addr: impl std::fmt::Display,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Bind {
        addr: addr.to_string(),
        what,
        source,
    }
}

async fn bind(addr: &str, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(bind_error(addr, what))
}

/// The serving threads for `config` (`gateway.workers`, 0 = one per core).
pub fn worker_count(config: &Config) -> usize {
    match config.gateway.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds, starts the poller and serves until [`Running::shutdown`].
///
/// The API is served by `gateway.workers` threads, each running its own
/// single-threaded event loop over a handle of the one listening socket
/// (whichever is free accepts) with its own upstream pool, as nginx's worker
/// processes do: a request is read, forwarded and answered on one thread,
/// with no cross-thread wake-ups. The poller, loader and metrics run on the
/// caller's runtime.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let api_listener = bind(&config.gateway.listen, "gateway.listen").await?;
    let metrics_listener = bind(&config.gateway.metrics_listen, "gateway.metrics_listen").await?;
    let addr = api_listener
        .local_addr()
        .map_err(bind_error(&config.gateway.listen, "gateway.listen"))?;
    let metrics_addr = metrics_listener.local_addr().map_err(bind_error(
        &config.gateway.metrics_listen,
        "gateway.metrics_listen",
    ))?;
    let workers = worker_count(&config);
    let gw = Arc::new(Gateway::new(config)?);
    let (tx, rx) = watch::channel(false);
    let poller = crate::poller::spawn(gw.clone());
    let autoscaler = crate::autoscale::spawn(gw.clone());

    let metrics_app = Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(gw.clone());
    let mut mrx = rx.clone();
    let metrics_task = tokio::spawn(async move {
        let _ = axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(async move {
                let _ = mrx.wait_for(|v| *v).await;
            })
            .await;
    });

    let api_std = api_listener
        .into_std()
        .map_err(bind_error(addr, "gateway.listen"))?;
    let mut done = Vec::with_capacity(workers);
    for i in 0..workers {
        let listener = api_std
            .try_clone()
            .map_err(bind_error(addr, "gateway.listen"))?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        done.push(done_rx);
        let gw = gw.clone();
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("cortex-worker-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(worker = i, error = %e, "cannot start a worker");
                        return;
                    }
                };
                rt.block_on(serve_worker(gw, listener, rx));
                let _ = done_tx.send(());
            })
            .map_err(bind_error(addr, "gateway.workers"))?;
    }
    drop(api_std);
    let task = tokio::spawn(async move {
        for d in done {
            let _ = d.await;
        }
        poller.abort();
        autoscaler.abort();
        metrics_task.abort();
    });
    tracing::info!(%addr, %metrics_addr, workers, neurons = gw.fleet.neurons.len(), "cortex listening");
    Ok(Running {
        addr,
        metrics_addr,
        gateway: gw,
        shutdown: tx,
        task,
    })
}

/// One worker: serves until shutdown, then drains up to the drain timeout.
async fn serve_worker(
    gw: Arc<Gateway>,
    listener: std::net::TcpListener,
    rx: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot use the listener");
            return;
        }
    };
    let house = gw.clone();
    let housekeeping = tokio::spawn(async move { house.upstream.housekeeping().await });
    let api = app(gw.clone());
    let drain = ms(gw.config.gateway.drain_timeout_ms);
    let mut drx = rx.clone();
    let serve = crate::front::serve(gw, listener, api, rx);
    tokio::pin!(serve);
    let deadline = async {
        let _ = drx.wait_for(|v| *v).await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        () = &mut serve => tracing::debug!("worker drained"),
        _ = deadline => tracing::warn!(drain_ms = drain.as_millis() as u64,
            "drain timeout passed with requests still open; stopping"),
    }
    housekeeping.abort();
}
