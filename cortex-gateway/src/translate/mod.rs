//! `/v1/responses` (OpenAI Responses) and `/v1/messages` (Anthropic
//! Messages), served as translations to and from chat completions.
//!
//! Every engine speaks chat completions, so cortex rewrites these requests
//! into chat requests that then take the normal path (aliases, client keys,
//! pre-validation, routing, retries, metrics), and rewrites the answers: a
//! whole answer at once, a stream event by event as each chat chunk
//! arrives (never buffered). The mapping is docs/protocol.md §4.1 and §4.2.
//!
//! Files: `chat.rs` reads chat answers as events; `responses.rs` and
//! `messages.rs` each hold one API's request translation and its answer
//! state machine; this one wires them into the request path.

pub mod chat;
pub mod count;
#[cfg(test)]
mod fixtures;
pub mod messages;
pub mod responses;
#[cfg(test)]
mod testutil;

use crate::inference::Answer;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chat::{ChatEvent, ChatReader, StreamError};
use futures_util::{Stream, StreamExt};
use helexa_api::error::{ApiError, ErrorCode};
use http::{header, HeaderValue};
use serde_json::Value;

/// The translated APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Responses,
    Messages,
}

/// What the answer's translation needs to know about the request.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Boxed: it holds the echoed request fields.
    Responses(Box<responses::Plan>),
    Messages(messages::Plan),
}

/// Turns a chat answer, as events, into one API's answer: SSE events as
/// they come, and the whole object at the end.
pub trait Machine: Send {
    /// One chat event; SSE bytes for the client go to `out`.
    fn on(&mut self, ev: ChatEvent, out: &mut Vec<u8>);
    /// The chat stream ended: after `Done` nothing more is said; before it,
    /// the answer is cut short and ends with this API's error event.
    fn end(&mut self, out: &mut Vec<u8>);
    /// The whole answer, once every event has been given (non-streamed
    /// requests).
    fn object(&self) -> Result<Value, ApiError>;
}

impl Plan {
    /// The machine for a stream.
    pub fn machine(&self) -> Box<dyn Machine> {
        match self {
            Plan::Responses(p) => Box::new(responses::Machine::new((**p).clone())),
            Plan::Messages(p) => Box::new(messages::Machine::new(p.clone())),
        }
    }

    /// The machine for a whole answer (it may skip building stream events).
    pub fn whole_machine(&self) -> Box<dyn Machine> {
        match self {
            Plan::Responses(p) => Box::new(responses::Machine::whole((**p).clone())),
            Plan::Messages(p) => Box::new(messages::Machine::new(p.clone())),
        }
    }
}

/// Rewrites a request body of `api` into a chat completions body.
pub fn translate(api: Api, body: &[u8]) -> Result<(Bytes, Plan), ApiError> {
    let v: Value = helexa_api::extract::parse_json(body)?;
    let Value::Object(obj) = v else {
        return Err(ApiError::invalid_request(
            "the request body must be a JSON object",
            "body",
        ));
    };
    let (chat, plan) = match api {
        Api::Responses => {
            let (c, p) = responses::translate(obj)?;
            (c, Plan::Responses(Box::new(p)))
        }
        Api::Messages => {
            let (c, p) = messages::translate(obj)?;
            (c, Plan::Messages(p))
        }
    };
    let bytes = serde_json::to_vec(&chat).expect("json serialises");
    Ok((Bytes::from(bytes), plan))
}

/// `prefix` + 32 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends one named SSE event.
pub fn put_event(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut *out, data).expect("json serialises");
    out.extend_from_slice(b"\n\n");
}

/// An error cortex answers itself on a route of `api`, in its shape.
pub fn error_response(api: Api, e: ApiError) -> Response {
    match api {
        Api::Responses => e.into_response(),
        Api::Messages => messages::error_response(&e),
    }
}

/// The chat answer `answer` (whatever the pipeline produced for the
/// translated request: a relayed answer, a held stream, or an error) as
/// `api`'s answer. `plan` is `None` when the request was refused before it
/// could be translated; `error_limit` bounds an error body read to reshape
/// it (`upstream.max_refusal_body_bytes`); `event_limit` bounds one event
/// of a chat stream (`translate.max_event_bytes`).
pub async fn finish(
    api: Api,
    plan: Option<Plan>,
    answer: Answer,
    error_limit: usize,
    event_limit: usize,
) -> Answer {
    let resp = match answer {
        Answer::Other(r) => r,
        relayed => relayed.into_response(),
    };
    let (mut parts, body) = resp.into_parts();
    let Some(plan) = plan.filter(|_| parts.status.is_success()) else {
        // A refusal: cortex's own or a neuron's, in the §2 envelope.
        return Answer::Other(match api {
            Api::Responses => Response::from_parts(parts, body),
            Api::Messages => messages::reshape_error(parts, body, error_limit).await,
        });
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if sse {
        let stream = translate_stream(body.into_data_stream(), plan.machine(), event_limit);
        return Answer::Other(Response::from_parts(parts, Body::from_stream(stream)));
    }
    // A whole answer is one JSON object: it has to be read to be rewritten.
    let whole = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            let e = ApiError::new(
                ErrorCode::UpstreamError,
                format!("the engine's answer broke off: {e}"),
            );
            return Answer::Other(with_fields(error_response(api, e), &parts.headers));
        }
    };
    let object = chat::whole_events(&whole).and_then(|events| {
        let mut m = plan.whole_machine();
        let mut sink = Vec::new();
        for ev in events {
            m.on(ev, &mut sink);
        }
        m.object()
    });
    match object {
        Ok(v) => {
            let text = serde_json::to_vec(&v).expect("json serialises");
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Answer::Other(Response::from_parts(parts, Body::from(text)))
        }
        Err(e) => {
            tracing::warn!(code = e.code.as_str(), error = %e.message, "cannot translate the engine's answer");
            Answer::Other(with_fields(error_response(api, e), &parts.headers))
        }
    }
}

/// `resp` with the relayed answer's informational fields kept (node, rate
/// limits).
fn with_fields(mut resp: Response, from: &http::HeaderMap) -> Response {
    for (name, value) in from {
        let n = name.as_str();
        if n == "x-helexa-node" || n.starts_with("x-ratelimit-") {
            resp.headers_mut().insert(name.clone(), value.clone());
        }
    }
    resp
}

/// The chat SSE stream `upstream` translated by `machine`, piece by piece;
/// an event over `event_limit` bytes ends it with an error.
pub fn translate_stream<S, E>(
    upstream: S,
    machine: Box<dyn Machine>,
    event_limit: usize,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    struct State<S> {
        up: S,
        reader: ChatReader,
        machine: Box<dyn Machine>,
        ended: bool,
    }
    let state = State {
        up: upstream,
        reader: ChatReader::with_limit(event_limit),
        machine,
        ended: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            let mut out = Vec::new();
            let mut events = Vec::new();
            match st.up.next().await {
                Some(Ok(chunk)) => {
                    if st.reader.comment_only(&chunk) {
                        return Some((Ok(chunk), st));
                    }
                    st.reader.feed(&chunk, &mut events);
                    for ev in events {
                        st.machine.on(ev, &mut out);
                    }
                    if out.is_empty() {
                        continue;
                    }
                }
                Some(Err(e)) => {
                    st.machine.on(
                        ChatEvent::Error(StreamError {
                            code: "upstream_error".into(),
                            kind: "api_error".into(),
                            message: format!("the upstream stream broke off: {e}"),
                        }),
                        &mut out,
                    );
                    st.machine.end(&mut out);
                    st.ended = true;
                }
                None => {
                    st.reader.finish(&mut events);
                    for ev in events {
                        st.machine.on(ev, &mut out);
                    }
                    st.machine.end(&mut out);
                    st.ended = true;
                    if out.is_empty() {
                        return None;
                    }
                }
            }
            return Some((Ok(Bytes::from(out)), st));
        }
    })
}

/// Shared request checks.
pub(crate) mod check {
    use helexa_api::ApiError;
    use serde_json::{Map, Value};

    pub fn bad(param: &str, why: impl std::fmt::Display) -> ApiError {
        ApiError::invalid_request(format!("`{param}` {why}"), param)
    }

    /// Refuses a field this translation does not implement.
    pub fn unsupported(param: &str) -> ApiError {
        bad(
            param,
            "is not supported by this server (helexa translates this API to chat completions; see docs/protocol.md §4)",
        )
    }

    /// Refuses the first key of `obj` not in `known` (a `null` value
    /// counts as absent everywhere, so it is never refused).
    pub fn known_keys(obj: &Map<String, Value>, known: &[&str], at: &str) -> Result<(), ApiError> {
        match obj
            .iter()
            .find(|(k, v)| !v.is_null() && !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(unsupported(&join(at, k))),
            None => Ok(()),
        }
    }

    pub fn join(at: &str, key: &str) -> String {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    }

    /// The field, `None` when absent or `null`.
    pub fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
        obj.get(key).filter(|v| !v.is_null())
    }

    pub fn string(
        obj: &Map<String, Value>,
        key: &str,
        at: &str,
    ) -> Result<Option<String>, ApiError> {
        match get(obj, key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(&join(at, key), "must be a string")),
        }
    }

    pub fn boolean(
        obj: &Map<String, Value>,
        key: &str,
        at: &str,
    ) -> Result<Option<bool>, ApiError> {
        match get(obj, key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(&join(at, key), "must be a boolean")),
        }
    }

    pub fn number(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<f64>, ApiError> {
        match get(obj, key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err(bad(&join(at, key), "must be a number")),
        }
    }

    /// A positive whole number.
    pub fn count(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<u64>, ApiError> {
        match get(obj, key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(n)),
                _ => Err(bad(&join(at, key), "must be a whole number of at least 1")),
            },
        }
    }

    pub fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, ApiError> {
        v.as_object().ok_or_else(|| bad(at, "must be an object"))
    }

    /// A model id: present and not empty, else `400 missing_model`.
    pub fn model(obj: &Map<String, Value>) -> Result<String, ApiError> {
        match get(obj, "model") {
            None => Err(ApiError::missing_model()),
            Some(Value::String(s)) if s.is_empty() => Err(ApiError::missing_model()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad("model", "must be a string")),
        }
    }
}
