//! The `/v1/*` POST handlers: parse once, resolve, pre-validate, route,
//! try replicas in order until one accepts, and relay its answer.
//!
//! Holding a request while a model loads on demand lives here too, because
//! it wraps the same dispatch in a keep-alive SSE stream.

use crate::advice;
use crate::config::ms;
use crate::keys::{Key, Permit, RateHeaders, Refusal as KeyRefusal};
use crate::prevalidate::{self, RequestHead};
use crate::proxy::{self, Outcome, Refusal};
use crate::relay::{status_str, Accounting, InFlight, Relay};
use crate::router::{self, Candidate};
use crate::state::Gateway;
use crate::tokens::{Counter, ModelTokenizer};
use crate::translate::{self, Api, Plan};
use crate::upstream::UpstreamHead;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use helexa_api::error::{ApiError, ErrorCode, ErrorEnvelope};
use helexa_api::extract::{check_content_type_value, parse_json, read_body};
use http::{header, HeaderValue};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The `POST /v1/…` endpoints: proxied to a neuron, translated to chat and
/// proxied, or (the token count) answered by cortex alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
    /// OpenAI Responses, translated to chat (`translate`).
    Responses,
    Embeddings,
    /// Anthropic Messages, translated to chat (`translate`).
    Messages,
    /// Anthropic's token count, answered by cortex (`translate::count`).
    CountTokens,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Responses => "/v1/responses",
            Route::Embeddings => "/v1/embeddings",
            Route::Messages => "/v1/messages",
            Route::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// The API this route is translated from, if it is.
    pub fn translated(self) -> Option<Api> {
        match self {
            Route::Responses => Some(Api::Responses),
            Route::Messages => Some(Api::Messages),
            _ => None,
        }
    }

    /// The route the neuron is asked: chat for translated routes.
    fn upstream(self) -> Route {
        if self.translated().is_some() {
            Route::Chat
        } else {
            self
        }
    }

    /// Streams of these end with `data: [DONE]`.
    fn expects_done(self) -> bool {
        matches!(self.upstream(), Route::Chat | Route::Completions)
    }

    /// The capability (docs/protocol.md §3 `/models`) a model needs for
    /// this route; `None`: not checked.
    fn capability(self) -> Option<&'static str> {
        match self {
            // Responses and Messages are translated to chat completions.
            Route::Chat | Route::Responses | Route::Messages => Some("chat"),
            Route::Completions => Some("completions"),
            Route::Embeddings => Some("embeddings"),
            Route::CountTokens => None,
        }
    }
}

/// `400` naming the capability when every candidate replica reports its
/// capabilities and none has the one `route` needs (an embeddings request
/// to a chat model, say), so no neuron is bothered with it. A replica that
/// reports none (an older neuron) is given the benefit of the doubt.
fn check_capability(
    route: Route,
    snap: &crate::fleet::Snapshot,
    candidates: &[Candidate],
    model: &str,
) -> Result<(), ApiError> {
    let Some(need) = route.capability() else {
        return Ok(());
    };
    let mut have: Vec<&str> = Vec::new();
    for c in candidates {
        let Some(info) = snap.nodes.get(c.node).and_then(|v| v.models.get(model)) else {
            return Ok(());
        };
        if info.capabilities.is_empty() || info.capabilities.iter().any(|x| x == need) {
            return Ok(());
        }
        have.extend(info.capabilities.iter().map(String::as_str));
    }
    if have.is_empty() {
        return Ok(());
    }
    have.sort_unstable();
    have.dedup();
    Err(ApiError::invalid_request(
        format!(
            "The model `{model}` does not have the `{need}` capability needed by {}: its capabilities are {}",
            route.path(),
            have.join(", ")
        ),
        "model",
    )
    .with_extra("capabilities", have))
}

/// Per-request facts the later steps need.
struct Ctx {
    gw: Arc<Gateway>,
    route: Route,
    model: String,
    request_id: HeaderValue,
    accept: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    started: Instant,
    /// The client key, when the request presented a configured one.
    key: Option<Arc<Key>>,
    /// The key's admission, until a relay takes it to settle at the end
    /// (dropped unsettled, it gives the prompt estimate back).
    permit: Mutex<Option<Permit>>,
    /// cortex asked the neuron for a stream's `usage` (for a `tpm` key) that
    /// the client did not ask for: the relay drops that event.
    strip_usage: bool,
}

/// The request header fields the proxied routes read. The front server
/// fills it straight from the request head (no header map is built).
#[derive(Debug, Clone, Default)]
pub struct ClientFields {
    pub content_type: Option<HeaderValue>,
    pub accept: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    /// `Authorization` and `x-api-key`, for client keys.
    pub authorization: Option<HeaderValue>,
    pub api_key: Option<HeaderValue>,
}

impl ClientFields {
    pub fn from_headers(h: &http::HeaderMap) -> Self {
        ClientFields {
            content_type: h.get(header::CONTENT_TYPE).cloned(),
            accept: h.get(header::ACCEPT).cloned(),
            user_agent: h.get(header::USER_AGENT).cloned(),
            request_id: h.get("x-request-id").cloned(),
            authorization: h.get(header::AUTHORIZATION).cloned(),
            api_key: h.get("x-api-key").cloned(),
        }
    }
}

/// What [`serve`] answers with.
pub enum Answer {
    /// A neuron's response, relayed: the front server writes its head from
    /// these fields without building a header map.
    Relayed(Relayed),
    /// Anything else (errors, refusals, a held stream).
    Other(Response),
}

/// A neuron's response on its way to the client.
pub struct Relayed {
    /// The neuron's status and the header fields passed on.
    pub head: UpstreamHead,
    /// `x-helexa-node`.
    pub node: HeaderValue,
    /// Boxed: a relay is several hundred bytes.
    pub body: Box<Relay>,
    /// `x-ratelimit-*` for a keyed request.
    pub rate: RateHeaders,
}

impl Relayed {
    /// The length to announce: a plain body's, when the neuron sent one (it
    /// is kept, so no chunked framing); a stream goes out chunked.
    pub fn length(&self) -> Option<u64> {
        plain_length(&self.head)
    }

    /// The header fields to send (besides framing, date and request id).
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        static NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
        static NO: HeaderValue = HeaderValue::from_static("no");
        let sse = self
            .head
            .is_sse()
            .then_some([("cache-control", &NO_CACHE), ("x-accel-buffering", &NO)]);
        [
            self.head.content_type.as_ref().map(|v| ("content-type", v)),
            self.head.retry_after.as_ref().map(|v| ("retry-after", v)),
        ]
        .into_iter()
        .flatten()
        .chain(sse.into_iter().flatten())
        .chain(std::iter::once(("x-helexa-node", &self.node)))
        .chain(self.rate.iter().map(|(n, v)| (*n, v)))
    }
}

impl Answer {
    /// Adds `x-ratelimit-*` header fields to the answer.
    pub fn with_rate(mut self, rate: RateHeaders) -> Answer {
        if rate.is_empty() {
            return self;
        }
        match &mut self {
            Answer::Relayed(r) => r.rate = rate,
            Answer::Other(resp) => {
                for (name, value) in rate {
                    resp.headers_mut()
                        .insert(http::HeaderName::from_static(name), value);
                }
            }
        }
        self
    }
}

fn plain_length(head: &UpstreamHead) -> Option<u64> {
    head.content_length.filter(|n| !head.is_sse() && *n > 0)
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Other(r) => r,
            Answer::Relayed(r) => {
                // The same fields the front server writes, as a header map.
                let mut h = http::HeaderMap::new();
                for (name, value) in r.fields() {
                    h.insert(http::HeaderName::from_static(name), value.clone());
                }
                if let Some(n) = r.length() {
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                let mut out = Response::new(Body::from_stream(*r.body));
                *out.status_mut() = r.head.status;
                *out.headers_mut() = h;
                out
            }
        }
    }
}

impl Route {
    /// The route a `POST` to `path` is for.
    pub fn of_path(path: &str) -> Option<Route> {
        [
            Route::Chat,
            Route::Completions,
            Route::Responses,
            Route::Embeddings,
            Route::Messages,
            Route::CountTokens,
        ]
        .into_iter()
        .find(|r| r.path() == path)
    }
}

/// The axum handler: reads the body, then [`serve`].
pub async fn handle(gw: Arc<Gateway>, route: Route, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let limit = gw.config.gateway.max_body_bytes;
    let read = read_body(Request::from_parts(parts.clone(), body), Some(limit)).await;
    serve(gw, route, ClientFields::from_headers(&parts.headers), read)
        .await
        .into_response()
}

/// Answers one `/v1/*` request whose body has been read (or failed to be).
pub async fn serve(
    gw: Arc<Gateway>,
    route: Route,
    fields: ClientFields,
    body: Result<Bytes, ApiError>,
) -> Answer {
    if route == Route::CountTokens {
        return Answer::Other(translate::count::serve(gw, fields, body).await);
    }
    let Some(api) = route.translated() else {
        return serve_plain(gw, route, fields, body, &mut None).await;
    };
    // A translated route is served as chat; its answer (or refusal) is
    // translated back.
    let mut plan = None;
    let limit = gw.config.upstream.max_refusal_body_bytes;
    let event_limit = gw.config.translate.max_event_bytes;
    let answer = serve_plain(gw, route, fields, body, &mut plan).await;
    translate::finish(api, plan, answer, limit, event_limit).await
}

/// [`serve`] up to the chat answer; `plan` receives a translated request's
/// plan once its body has been translated.
async fn serve_plain(
    gw: Arc<Gateway>,
    route: Route,
    fields: ClientFields,
    body: Result<Bytes, ApiError>,
    plan: &mut Option<Plan>,
) -> Answer {
    let started = Instant::now();
    let request_id = fields
        .request_id
        .clone()
        .unwrap_or(HeaderValue::from_static("-"));
    let key = if gw.keys.enabled() {
        match gw
            .keys
            .get()
            .identify(fields.authorization.as_ref(), fields.api_key.as_ref())
        {
            Ok(k) => k,
            Err(e) => {
                gw.metrics
                    .key_rejections
                    .with_label_values(&["-", KeyRefusal::Unauthenticated.label()])
                    .inc();
                let ctx = Ctx::new(gw, route, request_id, &fields, started, None);
                return ctx.reject(e);
            }
        }
    } else {
        None
    };
    // Every answer to a keyed request carries its rate headers: as of now,
    // then as of its admission.
    let mut rate = key.as_ref().map(|k| k.peek_headers()).unwrap_or_default();
    let ctx = Ctx::new(gw, route, request_id, &fields, started, key);
    serve_as(ctx, fields, body, &mut rate, plan)
        .await
        .with_rate(rate)
}

impl Ctx {
    fn new(
        gw: Arc<Gateway>,
        route: Route,
        request_id: HeaderValue,
        fields: &ClientFields,
        started: Instant,
        key: Option<Arc<Key>>,
    ) -> Ctx {
        Ctx {
            gw,
            route,
            model: String::new(),
            request_id,
            accept: fields.accept.clone(),
            user_agent: fields.user_agent.clone(),
            started,
            key,
            permit: Mutex::new(None),
            strip_usage: false,
        }
    }

    fn key_label(&self) -> &str {
        self.key.as_ref().map_or("-", |k| k.name.as_str())
    }

    /// A refusal for the client key: counted by reason, then as any other.
    fn reject_key(&self, why: KeyRefusal, e: ApiError) -> Answer {
        self.gw
            .metrics
            .key_rejections
            .with_label_values(&[self.key_label(), why.label()])
            .inc();
        self.reject(e)
    }
}

/// [`serve`] once the client key (if any) is known; `rate` is updated on
/// admission.
async fn serve_as(
    mut ctx: Ctx,
    fields: ClientFields,
    body: Result<Bytes, ApiError>,
    rate: &mut RateHeaders,
    plan: &mut Option<Plan>,
) -> Answer {
    if let Err(e) = check_content_type_value(fields.content_type.as_ref()) {
        return ctx.reject(e);
    }
    let mut body = match body {
        Ok(b) => b,
        Err(e) => return ctx.reject(e),
    };
    if let Some(api) = ctx.route.translated() {
        match translate::translate(api, &body) {
            Ok((chat, p)) => {
                body = chat;
                *plan = Some(p);
            }
            Err(e) => return ctx.reject(e),
        }
    }
    // Borrows from `body`; `forward` is what goes to the neuron.
    let head: RequestHead<'_> = match parse_json(&body) {
        Ok(h) => h,
        Err(e) => return ctx.reject(e),
    };
    if head.model.is_empty() {
        return ctx.reject(ApiError::missing_model());
    }
    let policy = ctx.gw.policy();
    let resolved = router::resolve_alias(&policy.aliases, &head.model);
    if let Some(key) = &ctx.key {
        if !key.allows(&head.model, resolved) {
            ctx.model = resolved.to_string();
            return ctx.reject_key(KeyRefusal::Model, key.not_allowed(&head.model));
        }
        // Admission against the key's limits, with a cheap prompt
        // estimate (bytes / 4) that the answer's usage settles later.
        let cfg = &ctx.gw.config.prevalidation;
        let estimate = prevalidate::count_prompt(&head, &Counter::Bytes { per_token: 4 }, cfg);
        match key.admit(estimate) {
            Ok(permit) => {
                *rate = permit.headers.clone();
                *ctx.permit.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
            }
            Err(refused) => {
                let refused = *refused;
                *rate = refused.headers;
                ctx.model = resolved.to_string();
                return ctx.reject_key(refused.why, refused.error);
            }
        }
    }
    // A stream of a `tpm` key must end with `usage` to settle: ask for it
    // when the client did not, and keep it from the client.
    let want_usage = head.stream
        && matches!(ctx.route.upstream(), Route::Chat | Route::Completions)
        && ctx.key.as_ref().is_some_and(|k| k.limits_tokens())
        && !head
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    ctx.strip_usage = want_usage;
    let forward = if resolved != head.model || want_usage {
        match rewrite_body(&body, resolved, want_usage) {
            Ok(b) => b,
            Err(e) => return ctx.reject(e),
        }
    } else {
        body.clone()
    };
    ctx.model = resolved.to_string();

    let snap = ctx.gw.fleet.snapshot();
    let candidates = router::rank(&ctx.gw.fleet, &snap, &ctx.model);
    if candidates.is_empty() {
        let gw = &ctx.gw;
        let loadable =
            gw.config.loading.enabled && snap.nodes.iter().any(|v| v.can_load(&ctx.model));
        if loadable {
            return Answer::Other(hold_for_load(ctx, head.stream, forward).await);
        }
        let err = if router::known_anywhere(&snap, &ctx.model) {
            ApiError::new(
                ErrorCode::NoCapacity,
                format!("no healthy neuron can serve `{}` now", ctx.model),
            )
            .with_retry_after(2)
        } else {
            ApiError::model_not_found(&ctx.model)
        };
        return ctx.reject(err);
    }
    if let Err(e) = check_capability(ctx.route, &snap, &candidates, &ctx.model) {
        return ctx.reject(e);
    }
    let context = ctx.context_limit(&snap);
    drop(snap);
    if let Err(resp) = ctx.prevalidate(&head, &body, context).await {
        return Answer::Other(resp);
    }
    match ctx.dispatch(candidates, forward).await {
        Ok(r) => r,
        Err(Failure::Api(e)) => ctx.reject(e),
        Err(Failure::Refused(r)) => ctx.all_refused(&r),
    }
}

/// The body with `model` set (an alias resolved) and, when `usage`,
/// `stream_options.include_usage` turned on.
fn rewrite_body(body: &Bytes, model: &str, usage: bool) -> Result<Bytes, ApiError> {
    let mut v: serde_json::Value = parse_json(body)?;
    v["model"] = serde_json::Value::String(model.to_string());
    if usage {
        if !v["stream_options"].is_object() {
            v["stream_options"] = serde_json::json!({});
        }
        v["stream_options"]["include_usage"] = serde_json::Value::Bool(true);
    }
    Ok(Bytes::from(
        serde_json::to_vec(&v).expect("json re-serialises"),
    ))
}

enum Failure {
    Api(ApiError),
    Refused(Refusal),
}

impl Ctx {
    fn model_label(&self) -> &str {
        if self.model.is_empty() {
            "-"
        } else {
            &self.model
        }
    }

    /// An error answered by cortex itself: logged once, counted, enveloped.
    fn reject(&self, e: ApiError) -> Answer {
        Answer::Other(self.reject_response(e))
    }

    fn reject_response(&self, e: ApiError) -> Response {
        self.count_local(e.status().as_u16());
        tracing::warn!(request_id = ?self.request_id, model = %self.model_label(),
            key = %self.key_label(), code = e.code.as_str(), error = %e.message, "request refused");
        e.into_response()
    }

    fn count_local(&self, status: u16) {
        let m = &self.gw.metrics;
        m.requests_total
            .with_label_values(&[
                self.model_label(),
                "-",
                status_str(status),
                self.key_label(),
            ])
            .inc();
        m.request_duration
            .with_label_values(&[self.model_label()])
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Smallest known context window over the replicas in `snap`; 0 = unknown.
    fn context_limit(&self, snap: &crate::fleet::Snapshot) -> u64 {
        snap.nodes
            .iter()
            .filter(|v| v.healthy)
            .filter_map(|v| v.models.get(&self.model))
            .map(|m| m.limit.context as u64)
            .filter(|c| *c > 0)
            .min()
            .unwrap_or(0)
    }

    /// The model's tokenizer, fetched (once) on the main runtime.
    async fn tokenizer(&self) -> Option<Arc<ModelTokenizer>> {
        if let Some(cached) = self.gw.tokenizers.cached(&self.model) {
            return cached;
        }
        let gw = self.gw.clone();
        let model = self.model.clone();
        self.gw
            .on_main(async move { gw.tokenizers.get(&gw, &model).await })
            .await
    }

    /// Pre-validation against `context` (from [`Self::context_limit`]).
    ///
    /// With the model's tokenizer the count is exact, but cheap bounds come
    /// first: a prompt whose byte count (an upper bound on its tokens)
    /// fits is let through uncounted, and one whose lower bound (its
    /// non-whitespace characters over the longest token, halved for what a
    /// normalizer may drop) cannot fit is refused uncounted. Only between
    /// the two is the prompt tokenized, off the API worker (a blocking
    /// thread, at most one per core at a time), so a huge prompt never
    /// stalls the other connections of its worker.
    async fn check_prompt(
        &self,
        head: &RequestHead<'_>,
        body: &Bytes,
        context: u64,
    ) -> Result<(), ApiError> {
        let cfg = &self.gw.config.prevalidation;
        if !cfg.enabled || self.route == Route::Embeddings || context == 0 {
            return Ok(());
        }
        let tokenizer = if cfg.fetch_tokenizer {
            self.tokenizer().await
        } else {
            None
        };
        let res = match tokenizer {
            None => {
                let counter = Counter::Estimate {
                    chars_per_token: cfg.chars_per_token,
                };
                prevalidate::check(head, context, &counter, cfg)
            }
            Some(t) => self.check_exact(head, body, context, t).await,
        };
        if res.is_err() {
            self.gw
                .metrics
                .prevalidation_rejections
                .with_label_values(&[self.model.as_str()])
                .inc();
        }
        res
    }

    async fn check_exact(
        &self,
        head: &RequestHead<'_>,
        body: &Bytes,
        context: u64,
        t: Arc<ModelTokenizer>,
    ) -> Result<(), ApiError> {
        let cfg = &self.gw.config.prevalidation;
        let output = head.requested_output();
        let upper = prevalidate::count_prompt(head, &Counter::Bytes { per_token: 1 }, cfg);
        if upper.saturating_add(output) <= context {
            return Ok(());
        }
        let lower = prevalidate::count_prompt(
            head,
            &Counter::AtLeast {
                max_token_chars: t.max_token_chars,
            },
            cfg,
        ) / 2;
        if lower > context {
            return prevalidate::decide(lower, output, context);
        }
        let _slot = self.gw.counting.acquire().await;
        let body = body.clone();
        let cfg = cfg.clone();
        let counted = tokio::task::spawn_blocking(move || {
            let head: RequestHead<'_> = parse_json(&body)?;
            let n = prevalidate::count_prompt(&head, &Counter::Exact(&t.tokenizer), &cfg);
            Ok::<u64, ApiError>(n)
        })
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::InternalError,
                format!("token counting failed: {e}"),
            )
        })??;
        prevalidate::decide(counted, output, context)
    }

    async fn prevalidate(
        &self,
        head: &RequestHead<'_>,
        body: &Bytes,
        context: u64,
    ) -> Result<(), Response> {
        match self.check_prompt(head, body, context).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let max = e.extras.get("max").and_then(|v| v.as_u64()).unwrap_or(0);
                let mut resp = self.reject_response(e);
                let ua = self.user_agent.as_ref().and_then(|v| v.to_str().ok());
                if let Some(text) = advice::for_context_refusal(ua, max) {
                    if let Ok(v) = HeaderValue::from_str(&text) {
                        resp.headers_mut().insert(advice::HEADER, v);
                    }
                }
                Err(resp)
            }
        }
    }

    /// Tries the candidates best first; the first that does not refuse wins.
    async fn dispatch(&self, candidates: Vec<Candidate>, body: Bytes) -> Result<Answer, Failure> {
        let gw = &self.gw;
        let mut last: Option<Refusal> = None;
        for (i, c) in candidates.iter().enumerate() {
            if i > 0 {
                gw.metrics.upstream_retries.inc();
            }
            let neuron = &gw.fleet.neurons[c.node];
            let in_flight = InFlight::new(neuron.replica(&self.model));
            // The LRU clock of eviction and the idle clock of autoscaling.
            in_flight.replica().touch();
            let outcome = proxy::attempt(
                gw,
                c.node,
                in_flight.replica(),
                self.route.upstream().path(),
                body.clone(),
                &self.request_id,
                self.accept.as_ref(),
            )
            .await;
            match outcome {
                Outcome::Response(resp) => return Ok(self.relay(resp, c.node, in_flight)),
                Outcome::Refused(r) => {
                    tracing::info!(request_id = ?self.request_id, model = %self.model,
                        node = %neuron.name, reason = %r.reason, "replica refused; trying the next");
                    last = Some(r);
                }
                Outcome::Failed(e) => return Err(Failure::Api(e)),
            }
        }
        Err(match last {
            Some(r) => Failure::Refused(r),
            None => Failure::Api(ApiError::new(
                ErrorCode::NoCapacity,
                format!("no replica of `{}` is available", self.model),
            )),
        })
    }

    fn all_refused(&self, r: &Refusal) -> Answer {
        let status = r.status.map(|s| s.as_u16()).unwrap_or(502);
        self.count_local(status);
        tracing::warn!(request_id = ?self.request_id, model = %self.model,
            status, reason = %r.reason, "every replica refused");
        Answer::Other(proxy::refusal_response(r, &self.model))
    }

    fn relay(&self, resp: proxy::UpstreamResponse, node: usize, in_flight: InFlight) -> Answer {
        let gw = &self.gw;
        let head = resp.head;
        let acct = Accounting {
            gw: gw.clone(),
            in_flight,
            node,
            status: head.status.as_u16(),
            started: self.started,
            request_id: self.request_id.clone(),
            permit: self.permit.lock().unwrap_or_else(|e| e.into_inner()).take(),
        };
        let relay = Relay::new(
            resp.body,
            head.is_sse(),
            self.route.expects_done(),
            ms(gw.config.upstream.idle_timeout_ms),
            acct,
        )
        .stripping_usage(self.strip_usage && head.is_sse());
        // A plain body's length also tells the relay when the answer is
        // complete (its last byte is out).
        let length = plain_length(&head);
        Answer::Relayed(Relayed {
            head,
            node: gw.fleet.neurons[node].header.clone(),
            body: Box::new(relay.with_length(length)),
            rate: Vec::new(),
        })
    }

    /// After a load: re-rank (falling back to the neuron that loaded it),
    /// pre-validate with the now-known limit, dispatch.
    async fn after_load(&self, idx: usize, body: Bytes) -> Result<Answer, Failure> {
        // Read again: the body was parsed before the wait, and owns the text.
        let head: RequestHead<'_> = parse_json(&body).map_err(Failure::Api)?;
        let snap = self.gw.fleet.snapshot();
        let mut candidates = router::rank(&self.gw.fleet, &snap, &self.model);
        if candidates.is_empty() {
            candidates.push(Candidate {
                node: idx,
                score: 0,
            });
        }
        let context = self.context_limit(&snap);
        drop(snap);
        self.check_prompt(&head, &body, context)
            .await
            .map_err(Failure::Api)?;
        self.dispatch(candidates, body.clone()).await
    }
}

/// No replica is loaded but one can be: load it and hold the request. A
/// streaming request gets its SSE head at once and keep-alive comments
/// while it waits; a plain one just waits (up to `loading.timeout_ms`).
async fn hold_for_load(ctx: Ctx, stream: bool, body: Bytes) -> Response {
    if !stream {
        let res = match load_on_main(&ctx).await {
            Ok(idx) => ctx.after_load(idx, body).await,
            Err(e) => Err(Failure::Api(e)),
        };
        return match res {
            Ok(r) => r,
            Err(Failure::Api(e)) => ctx.reject(e),
            Err(Failure::Refused(r)) => ctx.all_refused(&r),
        }
        .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let keepalive = ms(ctx.gw.config.loading.keepalive_interval_ms.max(1));
    tokio::spawn(async move {
        let load = load_on_main(&ctx);
        tokio::pin!(load);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        let loaded = loop {
            tokio::select! {
                r = &mut load => break r,
                _ = tick.tick() => {
                    if tx.send(Ok(helexa_api::sse::keep_alive())).await.is_err() {
                        return; // the client went away
                    }
                }
            }
        };
        let res = match loaded {
            Ok(idx) => ctx.after_load(idx, body).await,
            Err(e) => Err(Failure::Api(e)),
        };
        let resp = match res {
            Ok(r) => r.into_response(),
            Err(Failure::Api(e)) => {
                ctx.count_local(e.status().as_u16());
                tracing::warn!(request_id = ?ctx.request_id, model = %ctx.model,
                    code = e.code.as_str(), error = %e.message, "held request failed");
                let _ = tx.send(Ok(helexa_api::sse::error_events(&e))).await;
                return;
            }
            Err(Failure::Refused(r)) => {
                ctx.count_local(r.status.map(|s| s.as_u16()).unwrap_or(502));
                let e = refusal_error(&r, &ctx.model);
                let _ = tx.send(Ok(helexa_api::sse::error_events(&e))).await;
                return;
            }
        };
        let ok = resp.status().is_success();
        let mut stream = resp.into_body().into_data_stream();
        if !ok {
            // The head is already sent: the upstream error becomes an event.
            let mut text = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                text.extend_from_slice(&chunk);
            }
            let e = match serde_json::from_slice::<ErrorEnvelope>(&text) {
                Ok(env) => ApiError::new(ErrorCode::UpstreamError, env.error.message),
                Err(_) => ApiError::new(
                    ErrorCode::UpstreamError,
                    String::from_utf8_lossy(&text).into_owned(),
                ),
            };
            let _ = tx.send(Ok(helexa_api::sse::error_events(&e))).await;
            return;
        }
        while let Some(item) = stream.next().await {
            let item = item.map_err(std::io::Error::other);
            if tx.send(item).await.is_err() {
                return; // the client went away; dropping `stream` drops upstream
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Loads the request's model through the loader, on the main runtime.
async fn load_on_main(ctx: &Ctx) -> Result<usize, ApiError> {
    let gw = ctx.gw.clone();
    let model = ctx.model.clone();
    ctx.gw
        .on_main(async move { gw.loader.hold(&gw, &model).await })
        .await
}

fn refusal_error(r: &Refusal, model: &str) -> ApiError {
    let msg = serde_json::from_slice::<ErrorEnvelope>(&r.body)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| format!("every replica of `{model}` refused: {}", r.reason));
    let code = match r.status.map(|s| s.as_u16()) {
        Some(429) => ErrorCode::RateLimitExceeded,
        Some(_) => ErrorCode::ModelBusy,
        None => ErrorCode::UpstreamError,
    };
    ApiError::new(code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{NodeView, Snapshot};
    use helexa_protocol::ModelInfo;

    fn snap(caps: &[&[&str]]) -> (Snapshot, Vec<Candidate>) {
        let nodes = caps
            .iter()
            .map(|c| {
                let mut v = NodeView {
                    healthy: true,
                    ..NodeView::default()
                };
                let info = ModelInfo {
                    id: "m".into(),
                    capabilities: c.iter().map(|s| s.to_string()).collect(),
                    ..ModelInfo::default()
                };
                v.models.insert("m".into(), info);
                v
            })
            .collect();
        let cands = (0..caps.len())
            .map(|node| Candidate { node, score: 0 })
            .collect();
        (Snapshot::new(nodes), cands)
    }

    #[test]
    fn a_route_needs_its_capability_on_some_replica() {
        let (s, c) = snap(&[&["embeddings"]]);
        let e = check_capability(Route::Chat, &s, &c, "m").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("`chat` capability"), "{}", e.message);
        assert!(e.message.contains("embeddings"), "{}", e.message);
        assert!(check_capability(Route::Embeddings, &s, &c, "m").is_ok());

        let (s, c) = snap(&[&["chat", "completions"]]);
        let e = check_capability(Route::Embeddings, &s, &c, "m").unwrap_err();
        assert!(
            e.message.contains("`embeddings` capability"),
            "{}",
            e.message
        );
        assert!(check_capability(Route::Completions, &s, &c, "m").is_ok());
        // The Responses API is not checked.
        assert!(check_capability(Route::Responses, &s, &c, "m").is_ok());

        // One replica that has it, or one that reports nothing (an older
        // neuron), is enough.
        let (s, c) = snap(&[&["chat"], &["embeddings"]]);
        assert!(check_capability(Route::Embeddings, &s, &c, "m").is_ok());
        let (s, c) = snap(&[&["chat"], &[]]);
        assert!(check_capability(Route::Embeddings, &s, &c, "m").is_ok());
    }
}
