//! Drives the generations of one request (one per choice, `n` of them) to
//! the client: either collected whole, or as one SSE stream with keep-alive
//! comments while the prompt prefills. A client that goes away drops the
//! `GenerationStream`s, which cancels the sequences.

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use helexa_api::chat::Usage;
use helexa_api::{sse, ApiError, ErrorCode};
use helexa_engine::{GenEvent, GenerationStream, TokenLogprob};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;

/// One finished choice.
pub struct Choice {
    pub text: String,
    pub finish_reason: &'static str,
    /// The stop string that ended the choice (vLLM's `stop_reason`).
    pub stop_reason: Option<String>,
    pub logprobs: Vec<TokenLogprob>,
}

/// A finished request: its choices in order, and usage (the prompt counted
/// once, completions summed over the choices).
pub struct Collected {
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

fn stopped() -> ApiError {
    ApiError::new(
        ErrorCode::ShuttingDown,
        "the engine stopped before the answer finished",
    )
}

/// A finished choice with its prompt, completion and cached token counts.
type Done = (Choice, usize, usize, usize);

async fn collect_one(mut gen: GenerationStream) -> Result<Done, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = gen.next().await {
        match ev {
            GenEvent::Prefilled { .. } => {}
            GenEvent::Text {
                text: t,
                logprobs: l,
                ..
            } => {
                text.push_str(&t);
                logprobs.extend(l);
            }
            GenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                stop_string,
            } => {
                let choice = Choice {
                    text,
                    finish_reason: reason.as_str(),
                    stop_reason: stop_string,
                    logprobs,
                };
                return Ok((choice, prompt_tokens, completion_tokens, cached_tokens));
            }
            GenEvent::Failed { message } => {
                return Err(ApiError::new(ErrorCode::InternalError, message))
            }
        }
    }
    Err(stopped())
}

/// Reads every event of every choice; the first failure fails the request
/// (and cancels the other choices).
pub async fn collect(gens: Vec<GenerationStream>) -> Result<Collected, ApiError> {
    let done = futures_util::future::try_join_all(gens.into_iter().map(collect_one)).await?;
    let prompt = done.first().map_or(0, |d| d.1);
    let completion: usize = done.iter().map(|d| d.2).sum();
    // The prompt is counted once; it was served from the cache as far as
    // every choice had it cached.
    let cached = done.iter().map(|d| d.3).min().unwrap_or(0);
    Ok(Collected {
        choices: done.into_iter().map(|d| d.0).collect(),
        usage: usage(prompt, completion, cached),
    })
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Usage {
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Usage::new(n(prompt), n(completion)).with_cached(n(cached))
}

/// How one API family frames its stream chunks. Stateful: a chat format
/// parses tool calls out of each choice's text as it streams.
pub trait ChunkFormat: Send + 'static {
    /// Sent before any text of `choice` (chat: the `role` delta).
    fn opening(&mut self, choice: usize) -> Option<Bytes>;
    /// New text of `choice` (possibly nothing to send yet).
    fn text(&mut self, choice: usize, text: &str, logprobs: &[TokenLogprob]) -> Option<Bytes>;
    /// The end of `choice`: anything held back, then its finish chunk
    /// (`stop`: the stop string that ended it, if one did).
    fn finish(&mut self, choice: usize, reason: &str, stop: Option<&str>) -> Bytes;
    /// The final usage chunk (`choices: []`) of `stream_options.include_usage`.
    fn usage(&self, usage: Usage) -> Bytes;
}

/// An event of one choice; `None`: its stream ended without finishing.
type Tagged = (usize, Option<GenEvent>);

fn tagged(i: usize, gen: GenerationStream) -> impl futures_util::Stream<Item = Tagged> {
    stream::unfold(Some(gen), move |state| async move {
        let mut gen = state?;
        match gen.next().await {
            Some(ev @ (GenEvent::Finished { .. } | GenEvent::Failed { .. })) => {
                Some(((i, Some(ev)), None))
            }
            Some(ev) => Some(((i, Some(ev)), Some(gen))),
            None => Some(((i, None), None)),
        }
    })
}

/// The SSE body of a request's generations. Keep-alive comments go out
/// whenever nothing else was sent for `keep_alive` (during prefill, mostly).
pub fn sse_body<F: ChunkFormat>(
    gens: Vec<GenerationStream>,
    mut format: F,
    include_usage: bool,
    keep_alive: Duration,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let n = gens.len();
    tokio::spawn(async move {
        for i in 0..n {
            if let Some(open) = format.opening(i) {
                if tx.send(Ok(open)).await.is_err() {
                    return;
                }
            }
        }
        let mut events = stream::select_all(
            gens.into_iter()
                .enumerate()
                .map(|(i, g)| tagged(i, g).boxed()),
        );
        let mut tick = tokio::time::interval(keep_alive.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let (mut finished, mut prompt, mut completion) = (0usize, 0usize, 0usize);
        let mut cached = usize::MAX;
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                // The client went away: dropping `events` cancels the sequences.
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    if tx.send(Ok(sse::keep_alive())).await.is_err() { return; }
                    continue;
                }
            };
            let out = match ev {
                Some((_, Some(GenEvent::Prefilled { .. }))) => continue,
                Some((i, Some(GenEvent::Text { text, logprobs, .. }))) => {
                    if text.is_empty() {
                        continue;
                    }
                    match format.text(i, &text, &logprobs) {
                        Some(b) => b,
                        None => continue,
                    }
                }
                Some((
                    i,
                    Some(GenEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                        stop_string,
                    }),
                )) => {
                    finished += 1;
                    prompt = prompt.max(prompt_tokens);
                    completion += completion_tokens;
                    cached = cached.min(cached_tokens);
                    let mut buf =
                        Vec::from(&format.finish(i, reason.as_str(), stop_string.as_deref())[..]);
                    if finished == n {
                        if include_usage {
                            buf.extend_from_slice(&format.usage(usage(prompt, completion, cached)));
                        }
                        buf.extend_from_slice(sse::DONE);
                        let _ = tx.send(Ok(Bytes::from(buf))).await;
                        return;
                    }
                    Bytes::from(buf)
                }
                Some((_, Some(GenEvent::Failed { message }))) => {
                    let err = ApiError::new(ErrorCode::InternalError, message);
                    let _ = tx.send(Ok(sse::error_events(&err))).await;
                    return;
                }
                Some((_, None)) | None => {
                    let _ = tx.send(Ok(sse::error_events(&stopped()))).await;
                    return;
                }
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
            tick.reset();
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Response headers of an SSE stream.
pub fn sse_response(body: Body) -> axum::response::Response {
    axum::response::Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("static response parts are valid")
}
