//! Server-sent-event framing for OpenAI streams.
//!
//! Only the writing side lives here: each event is `data: <json>\n\n`, the
//! stream ends with `data: [DONE]\n\n`, keep-alives are SSE comments. Reading
//! SSE is done with the `eventsource-stream` crate, never by hand.

use crate::error::ApiError;
use bytes::Bytes;
use serde::Serialize;

pub const DONE: &[u8] = b"data: [DONE]\n\n";
/// A comment line: ignored by SSE clients, keeps idle connections alive.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// `data: <json>\n\n` for any serialisable event.
pub fn data_event<T: Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, value).expect("SSE payload serialises");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub fn done_event() -> Bytes {
    Bytes::from_static(DONE)
}

pub fn keep_alive() -> Bytes {
    Bytes::from_static(KEEP_ALIVE)
}

/// The two events that end a stream which failed after its first byte:
/// the error envelope, then `[DONE]` — never a silent cut.
pub fn error_events(err: &ApiError) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(err.to_json().as_bytes());
    out.extend_from_slice(b"\n\n");
    out.extend_from_slice(DONE);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn frames() {
        let b = data_event(&serde_json::json!({"a": 1}));
        assert_eq!(&b[..], b"data: {\"a\":1}\n\n");
        let e = error_events(&ApiError::new(ErrorCode::UpstreamError, "gone"));
        let text = std::str::from_utf8(&e).unwrap();
        assert!(text.starts_with("data: {\"error\":"));
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
}
