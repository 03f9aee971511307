//! Writing answers: a relayed neuron answer from its few fields with its
//! relay polled directly, or any other `Response`; every body piece that is
//! ready is gathered into one write, chunked on HTTP/1.1 when no length is
//! known, close-delimited on HTTP/1.0.

use super::{Conn, End, WRITE_BATCH};
use crate::h1;
use crate::inference::Answer;
use crate::relay::Relay;
use axum::body::Body;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderName, HeaderValue, Version};
use std::pin::pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;

impl Conn {
    /// Writes `answer` (with `x-request-id: id` when given); true when the
    /// connection can carry another request.
    pub(super) async fn answer(
        &mut self,
        answer: Answer,
        id: Option<HeaderValue>,
        is_head: bool,
        version: Version,
        keep_alive: bool,
    ) -> Result<bool, End> {
        let out = &mut self.out;
        out.clear();
        let (status, length, mut body) = match answer {
            Answer::Relayed(r) => {
                put_status(out, r.head.status);
                for (name, value) in r.fields() {
                    put_field(out, name, value);
                }
                h1::put_date(out);
                (r.head.status, r.length(), OutBody::Relay(r.body))
            }
            Answer::Other(resp) => {
                let (parts, body) = resp.into_parts();
                put_status(out, parts.status);
                for (name, value) in &parts.headers {
                    if !is_hop_by_hop(name) && (id.is_none() || name != "x-request-id") {
                        put_field(out, name.as_str(), value);
                    }
                }
                if !parts.headers.contains_key(header::DATE) {
                    h1::put_date(out);
                }
                let length = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .or_else(|| hyper::body::Body::size_hint(&body).exact());
                (parts.status, length, OutBody::Other(body))
            }
        };
        if let Some(id) = &id {
            put_field(out, "x-request-id", id);
        }
        let status = status.as_u16();
        let no_body = (100..200).contains(&status) || status == 204 || status == 304;
        let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
        // HTTP/1.0 with no known length: the end of the body is the close.
        let keep_alive = keep_alive && (no_body || length.is_some() || chunked);
        if !no_body {
            match length {
                Some(n) => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                None if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
                None => {}
            }
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if is_head || no_body {
            self.write_out().await?;
            return Ok(keep_alive);
        }
        loop {
            // Gather every piece that is ready now; write when none is.
            let piece = match std::future::poll_fn(|cx| body.poll_data(cx)).now_or_never() {
                Some(p) => p,
                None => {
                    if !self.out.is_empty() {
                        self.write_out().await?;
                        self.out.clear();
                    }
                    let next = std::future::poll_fn(|cx| body.poll_data(cx));
                    match self.unless_client_leaves(next).await {
                        Some(p) => p,
                        None => return Err(End::Cut),
                    }
                }
            };
            match piece {
                Some(Ok(data)) => {
                    if chunked {
                        h1::put_chunk(&mut self.out, &data);
                    } else {
                        self.out.extend_from_slice(&data);
                    }
                    if self.out.len() >= WRITE_BATCH {
                        self.write_out().await?;
                        self.out.clear();
                    }
                }
                Some(Err(e)) => {
                    // Cut short: without the last chunk (or the full
                    // length) the client sees an incomplete body.
                    tracing::debug!(error = %e, "response body failed");
                    self.write_out().await?;
                    return Err(End::Cut);
                }
                None => {
                    if chunked {
                        self.out.extend_from_slice(h1::LAST_CHUNK);
                    }
                    self.write_out().await?;
                    self.out.clear();
                    return Ok(keep_alive);
                }
            }
        }
    }
}

/// A response body being written: the relay of a neuron's answer, polled
/// directly, or any other body.
enum OutBody {
    Relay(Box<Relay>),
    Other(Body),
}

impl OutBody {
    /// The next piece of payload (trailers are not sent).
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        match self {
            OutBody::Relay(r) => futures_util::Stream::poll_next(std::pin::Pin::new(&mut **r), cx)
                .map(|p| p.map(|r| r.map_err(|e| e.to_string()))),
            OutBody::Other(b) => loop {
                match hyper::body::Body::poll_frame(std::pin::Pin::new(&mut *b), cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.to_string()))),
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            return Poll::Ready(Some(Ok(data)));
                        }
                    }
                }
            },
        }
    }
}

fn put_status(out: &mut Vec<u8>, status: http::StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn put_field(out: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

impl Conn {
    /// Writes the gathered output. A write that cannot finish at once (the
    /// client is not reading) may wait up to `client_timeout_ms`; then the
    /// connection is given up, which also frees the upstream and its slot.
    /// The timer is only set in that case.
    async fn write_out(&mut self) -> Result<(), End> {
        let limit = self.limits.client_timeout;
        let mut write = pin!(self.stream.write_all(&self.out));
        if let Some(done) = (&mut write).now_or_never() {
            return done.map_err(|_| End::Cut);
        }
        match tokio::time::timeout(limit, write).await {
            Ok(done) => done.map_err(|_| End::Cut),
            Err(_) => {
                tracing::warn!(
                    timeout_ms = limit.as_millis() as u64,
                    "client stopped reading; closing the connection"
                );
                Err(End::TimedOut)
            }
        }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_LENGTH
        || name.as_str() == "keep-alive"
}
