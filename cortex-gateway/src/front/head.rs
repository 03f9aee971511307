//! Request heads, I/O-free: parses a head from the front of the read
//! buffer into what the connection needs (the target, framing, keep-alive,
//! `Expect: 100-continue`), or names why it cannot ([`BadHead`]).
//!
//! A proxied route (`POST /v1/…`) keeps only the header fields it reads, as
//! zero-copy slices of the frozen head; every other request is parsed again
//! into a full `http::Request` for the axum router.

use crate::h1::{self, BadFraming, Framing};
use crate::inference::{ClientFields, Route};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use helexa_api::error::{ApiError, ErrorCode};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

/// Most request header fields.
pub(super) const MAX_HEADERS: usize = 100;

/// Why a request head cannot be served. The connection is closed after
/// the answer: what follows a head cortex misread cannot be trusted.
#[derive(Debug)]
pub(super) enum BadHead {
    /// Not HTTP/1.x as RFC 9112 writes it: `400`.
    Malformed(String),
    /// Head or field count over the limits: `431`.
    TooLarge(String),
    /// Framing headers refused (`400`, or `501` for a transfer coding
    /// cortex does not implement).
    Framing(BadFraming),
}

impl BadHead {
    pub(super) fn status(&self) -> u16 {
        match self {
            BadHead::Malformed(_) => 400,
            BadHead::TooLarge(_) => 431,
            BadHead::Framing(f) => f.status(),
        }
    }

    /// The answer, in the error envelope.
    pub(super) fn response(&self) -> Response {
        let (code, message) = match self {
            BadHead::Malformed(why) => (
                ErrorCode::InvalidRequest,
                format!("malformed HTTP request: {why}"),
            ),
            BadHead::TooLarge(why) => (ErrorCode::RequestTooLarge, why.clone()),
            BadHead::Framing(f) => (
                ErrorCode::InvalidRequest,
                format!("malformed HTTP request: {f}"),
            ),
        };
        let mut resp = ApiError::new(code, message).into_response();
        if let Ok(s) = http::StatusCode::from_u16(self.status()) {
            *resp.status_mut() = s;
        }
        resp
    }
}

/// A request head, owned.
pub(super) struct Head {
    pub(super) target: Target,
    pub(super) version: Version,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) expect_continue: bool,
}

/// Who answers a request.
pub(super) enum Target {
    /// A proxied route (`POST /v1/…`), called directly with the few header
    /// fields it reads (no URI or header map is built).
    Proxy(Route, ClientFields),
    /// Everything else goes through the axum router.
    Router(Request<()>),
}

/// Parses a request head from the front of `buf` and takes it out;
/// `Ok(None)` when more bytes are needed.
///
/// The head's bytes are frozen and the header values point into them (no
/// copy each). A request for a proxied route keeps only the four fields it
/// reads, found in the one parse; any other is parsed again into a full
/// `http::Request` for the router.
pub(super) fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, BadHead> {
    let too_big = || {
        BadHead::TooLarge(format!(
            "request head is larger than the limit of {max_head} bytes"
        ))
    };
    let bad = |why: &str| BadHead::Malformed(why.to_string());
    // Offsets (into the head) of the proxied routes' fields:
    // content-type, accept, user-agent, x-request-id, authorization,
    // x-api-key.
    let mut spans = [None::<(usize, usize)>; 6];
    let (used, route, v, framing, keep_alive, expect_continue) = {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut headers);
        let used = match r.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n > max_head => return Err(too_big()),
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(too_big()),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(BadHead::TooLarge(format!(
                    "request has more than {MAX_HEADERS} header fields"
                )))
            }
            Err(e) => return Err(BadHead::Malformed(e.to_string())),
        };
        let (Some(method), Some(path), Some(v)) = (r.method, r.path, r.version) else {
            return Err(bad("incomplete request line"));
        };
        let fields = || r.headers.iter().map(|h| (h.name, h.value));
        let framing = h1::request_framing(v, fields()).map_err(BadHead::Framing)?;
        let keep_alive = h1::keep_alive(v, fields());
        let expect_continue = v >= 1
            && r.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("expect")
                    && h.value.eq_ignore_ascii_case(b"100-continue")
            });
        let route = (method == "POST").then(|| Route::of_path(path)).flatten();
        if route.is_some() {
            let base = buf.as_ptr() as usize;
            for h in r.headers.iter() {
                let slot = match h.name.len() {
                    12 if h.name.eq_ignore_ascii_case("content-type") => 0,
                    6 if h.name.eq_ignore_ascii_case("accept") => 1,
                    10 if h.name.eq_ignore_ascii_case("user-agent") => 2,
                    12 if h.name.eq_ignore_ascii_case("x-request-id") => 3,
                    13 if h.name.eq_ignore_ascii_case("authorization") => 4,
                    9 if h.name.eq_ignore_ascii_case("x-api-key") => 5,
                    _ => continue,
                };
                if spans[slot].is_none() {
                    spans[slot] = Some((h.value.as_ptr() as usize - base, h.value.len()));
                }
            }
        }
        (used, route, v, framing, keep_alive, expect_continue)
    };
    let raw = buf.split_to(used).freeze();
    let version = if v >= 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let target = match route {
        Some(route) => {
            let mut values = spans.into_iter().map(|span| {
                span.map(|(at, n)| HeaderValue::from_maybe_shared(raw.slice(at..at + n)))
                    .transpose()
                    .map_err(|_| bad("invalid header field"))
            });
            let mut next = || values.next().expect("six fields");
            Target::Proxy(
                route,
                ClientFields {
                    content_type: next()?,
                    accept: next()?,
                    user_agent: next()?,
                    request_id: next()?,
                    authorization: next()?,
                    api_key: next()?,
                },
            )
        }
        None => Target::Router(router_request(&raw, version)?),
    };
    Ok(Some(Head {
        target,
        version,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// A whole `http::Request` (all header fields) from a complete head.
fn router_request(raw: &Bytes, version: Version) -> Result<Request<()>, BadHead> {
    let bad = |why: &str| Err(BadHead::Malformed(why.to_string()));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    if !matches!(r.parse(raw), Ok(httparse::Status::Complete(_))) {
        return bad("unreadable head");
    }
    let (Some(method), Some(path)) = (r.method, r.path) else {
        return bad("incomplete request line");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return bad("invalid method");
    };
    let Ok(uri) = Uri::from_maybe_shared(raw.slice_ref(path.as_bytes())) else {
        return bad("invalid request target");
    };
    let mut map = HeaderMap::with_capacity(r.headers.len() + 1);
    for h in r.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return bad("invalid header field");
        };
        let Ok(value) = HeaderValue::from_maybe_shared(raw.slice_ref(h.value)) else {
            return bad("invalid header field");
        };
        map.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_with_framing() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello";
        let mut buf = BytesMut::from(&raw[..]);
        let head = parse_head(&mut buf, 1024).ok().unwrap().unwrap();
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive && head.expect_continue);
        let Target::Proxy(Route::Chat, fields) = head.target else {
            panic!("a proxied route")
        };
        assert!(fields.content_type.is_none() && fields.request_id.is_none());
        let raw = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\nUser-Agent: litellm/1\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(&raw[..]), 1024)
            .ok()
            .unwrap()
            .unwrap();
        let Target::Proxy(Route::Embeddings, f) = head.target else {
            panic!("a proxied route")
        };
        assert_eq!(f.content_type.unwrap(), "application/json");
        assert_eq!(f.request_id.unwrap(), "abc");
        assert_eq!(f.user_agent.unwrap(), "litellm/1");
        assert_eq!(f.accept.unwrap(), "*/*");
        let raw = b"GET /v1/chat/completions HTTP/1.1\r\nX-Request-Id: abc\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(&raw[..]), 1024)
            .ok()
            .unwrap()
            .unwrap();
        let Target::Router(req) = head.target else {
            panic!("a GET goes to the router")
        };
        assert_eq!(req.uri().path(), "/v1/chat/completions");
        assert_eq!(req.headers()["x-request-id"], "abc");
        let raw = b"GET /health HTTP/1.0\r\n\r\n";
        let head = parse_head(&mut BytesMut::from(&raw[..]), 1024)
            .ok()
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.framing, Framing::Empty);
        let mut partial = BytesMut::from(&b"GET /health HTTP/1.1\r\nHost"[..]);
        assert!(parse_head(&mut partial, 1024).ok().unwrap().is_none());
        assert_eq!(partial.len(), 26, "nothing taken from a partial head");
    }

    #[test]
    fn bad_heads_get_400_or_431() {
        let status = |raw: &[u8], max| {
            parse_head(&mut BytesMut::from(raw), max)
                .err()
                .unwrap()
                .status()
        };
        assert_eq!(status(b"GET\x01 / HTTP/1.1\r\n\r\n", 1024), 400);
        assert_eq!(
            status(
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                1024
            ),
            400
        );
        assert_eq!(
            status(
                b"GET / HTTP/1.1\r\nX-Big: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                16
            ),
            431
        );
        let many: String = (0..120).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 1 << 20),
            431
        );
        // Strict framing (h1.rs has the cases): 400, or 501 for a coding
        // cortex does not implement.
        assert_eq!(
            status(
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                1024
            ),
            400
        );
        assert_eq!(
            status(
                b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                1024
            ),
            400
        );
        assert_eq!(
            status(
                b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                1024
            ),
            501
        );
    }
}
