//! Request ids: the client's `x-request-id` when it is sane, else a new
//! one, made without a random-number syscall per request.

use http::HeaderValue;

/// The client's `x-request-id` when it is sane, else a fresh one.
pub(super) fn request_id(sent: Option<HeaderValue>) -> HeaderValue {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
