//! Drives one generation to the client: either collected whole, or as an SSE
//! stream with keep-alive comments while the prompt prefills. A client that
//! goes away drops the `GenerationStream`, which cancels the sequence.

use axum::body::Body;
use bytes::Bytes;
use helexa_api::chat::Usage;
use helexa_api::{sse, ApiError, ErrorCode};
use helexa_engine::{GenEvent, GenerationStream};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;

/// A finished generation.
pub struct Collected {
    pub text: String,
    pub finish_reason: &'static str,
    pub usage: Usage,
}

/// Reads every event; the text and usage of the whole answer.
pub async fn collect(mut gen: GenerationStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    while let Some(ev) = gen.next().await {
        match ev {
            GenEvent::Prefilled { .. } => {}
            GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    text,
                    finish_reason: reason.as_str(),
                    usage: Usage::new(prompt_tokens as u32, completion_tokens as u32),
                })
            }
            GenEvent::Failed { message } => {
                return Err(ApiError::new(ErrorCode::InternalError, message))
            }
        }
    }
    Err(ApiError::new(
        ErrorCode::ShuttingDown,
        "the engine stopped before the answer finished",
    ))
}

/// How one API family frames its stream chunks.
pub trait ChunkFormat: Send + 'static {
    /// Sent before any text (chat: the `role` delta).
    fn opening(&self) -> Option<Bytes>;
    fn text(&self, text: &str) -> Bytes;
    fn finish(&self, reason: &str) -> Bytes;
    /// The final usage chunk (`choices: []`) of `stream_options.include_usage`.
    fn usage(&self, usage: Usage) -> Bytes;
}

/// The SSE body of one generation. Keep-alive comments go out whenever
/// nothing else was sent for `keep_alive` (during prefill, mostly).
pub fn sse_body<F: ChunkFormat>(
    mut gen: GenerationStream,
    format: F,
    include_usage: bool,
    keep_alive: Duration,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        if let Some(open) = format.opening() {
            if tx.send(Ok(open)).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(keep_alive.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            let ev = tokio::select! {
                ev = gen.next() => ev,
                // The client went away: dropping `gen` cancels the sequence.
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    if tx.send(Ok(sse::keep_alive())).await.is_err() { return; }
                    continue;
                }
            };
            let out = match ev {
                Some(GenEvent::Prefilled { .. }) => continue,
                Some(GenEvent::Text { text, .. }) => {
                    if text.is_empty() {
                        continue;
                    }
                    format.text(&text)
                }
                Some(GenEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let mut buf = Vec::from(&format.finish(reason.as_str())[..]);
                    if include_usage {
                        buf.extend_from_slice(
                            &format
                                .usage(Usage::new(prompt_tokens as u32, completion_tokens as u32)),
                        );
                    }
                    buf.extend_from_slice(sse::DONE);
                    let _ = tx.send(Ok(Bytes::from(buf))).await;
                    return;
                }
                Some(GenEvent::Failed { message }) => {
                    let err = ApiError::new(ErrorCode::InternalError, message);
                    let _ = tx.send(Ok(sse::error_events(&err))).await;
                    return;
                }
                None => {
                    let err = ApiError::new(
                        ErrorCode::ShuttingDown,
                        "the engine stopped before the answer finished",
                    );
                    let _ = tx.send(Ok(sse::error_events(&err))).await;
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
