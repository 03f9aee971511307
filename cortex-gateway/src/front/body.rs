//! Request bodies: an I/O-free reader ([`BodyReader`]) that takes a body
//! announced by `Content-Length` or chunked coding off the front of the
//! read buffer, and the connection's side of it (reading more, answering
//! `Expect: 100-continue`, lingering after an early refusal).
//!
//! The reader is the one the fuzz target drives too (`read_message`), so
//! what is fuzzed is what serves.

use super::{Conn, End, ReadError, LINGER};
use crate::h1::{self, Chunked, Framing, FramingError, Step};
use crate::relay::status_str;
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use helexa_api::error::{ApiError, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Why a body cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over `gateway.max_body_bytes`: `413`.
    TooLarge(usize),
    /// Bad chunked framing: `400`.
    Framing(FramingError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(max) => {
                write!(f, "request body is larger than the limit of {max} bytes")
            }
            BodyError::Framing(e) => write!(f, "could not read the request body: {e}"),
        }
    }
}

impl BodyError {
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge(_) => 413,
            BodyError::Framing(_) => 400,
        }
    }
}

/// Takes one request body off the front of a read buffer, across as many
/// reads as it needs; what follows the body (a pipelined request) stays.
pub struct BodyReader {
    kind: Kind,
    max: usize,
}

enum Kind {
    Empty,
    Length(usize),
    Chunked(Chunked, BytesMut),
}

impl BodyReader {
    /// A reader for a body of `framing`, refusing one over `max` bytes.
    /// A declared length over the limit is refused at once, before any of
    /// the body is read.
    pub fn new(framing: Framing, max: usize, max_trailers: usize) -> Result<Self, BodyError> {
        let kind = match framing {
            Framing::Empty | Framing::Close => Kind::Empty,
            Framing::Length(n) if n > max as u64 => return Err(BodyError::TooLarge(max)),
            Framing::Length(n) => Kind::Length(n as usize),
            Framing::Chunked => Kind::Chunked(Chunked::new(max_trailers), BytesMut::new()),
        };
        Ok(BodyReader { kind, max })
    }

    /// Bytes still wanted for a length-delimited body (to reserve room).
    fn wanted(&self, buf: &BytesMut) -> usize {
        match self.kind {
            Kind::Length(n) => n.saturating_sub(buf.len()),
            _ => 0,
        }
    }

    /// Whether nothing of the body has arrived yet (for `100-continue`).
    fn nothing_read(&self, buf: &BytesMut) -> bool {
        match &self.kind {
            Kind::Empty => false,
            Kind::Length(n) => buf.len() < *n,
            Kind::Chunked(_, body) => body.is_empty() && buf.is_empty(),
        }
    }

    /// The whole body once it is in `buf` (taken out), `Ok(None)` when more
    /// must be read.
    pub fn advance(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
        match &mut self.kind {
            Kind::Empty => Ok(Some(Bytes::new())),
            Kind::Length(n) => Ok((buf.len() >= *n).then(|| buf.split_to(*n).freeze())),
            Kind::Chunked(dec, body) => loop {
                match dec.step(buf).map_err(BodyError::Framing)? {
                    Step::Data(d) => {
                        if body.len().saturating_add(d.len()) > self.max {
                            return Err(BodyError::TooLarge(self.max));
                        }
                        body.extend_from_slice(&d);
                    }
                    Step::End => return Ok(Some(std::mem::take(body).freeze())),
                    Step::NeedMore => return Ok(None),
                }
            },
        }
    }
}

impl Conn {
    /// Reads the body `framing` announces (answering `Expect:
    /// 100-continue`), refusing one over `max_body_bytes` with `413`.
    pub(super) async fn read_body(
        &mut self,
        framing: Framing,
        expect_continue: bool,
    ) -> Result<Bytes, ReadError> {
        let refuse = |conn: &Conn, e: BodyError| {
            conn.count_refusal(e.status());
            let code = match e {
                BodyError::TooLarge(_) => ErrorCode::RequestTooLarge,
                BodyError::Framing(_) => ErrorCode::InvalidRequest,
            };
            ReadError::Answer(ApiError::new(code, e.to_string()).into_response())
        };
        let mut reader = match BodyReader::new(framing, self.limits.max_body, self.limits.max_head)
        {
            Ok(r) => r,
            Err(e) => return Err(refuse(self, e)),
        };
        if expect_continue && reader.nothing_read(&self.buf) {
            self.continue_100().await?;
        }
        // Set when the body is not all there yet (most bodies came with
        // their head, and need no clock reading).
        let mut deadline = None;
        loop {
            match reader.advance(&mut self.buf) {
                Ok(Some(body)) => return Ok(body),
                Ok(None) => {
                    let want = reader.wanted(&self.buf);
                    if want > 0 {
                        self.buf.reserve(want);
                    } else {
                        h1::room(&mut self.buf, 4096, 8192);
                    }
                    self.read_more(&mut deadline).await?;
                }
                Err(e) => return Err(refuse(self, e)),
            }
        }
    }

    /// Reads more of the body; all of it must come within `client_timeout_ms`
    /// of the first such read. A body cut off is a cut connection.
    async fn read_more(&mut self, deadline: &mut Option<Instant>) -> Result<(), ReadError> {
        let until = *deadline.get_or_insert_with(|| Instant::now() + self.limits.client_timeout);
        match tokio::time::timeout_at(until, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(()),
            Ok(_) => Err(ReadError::Closed(End::Cut)),
            Err(_) => Err(ReadError::Closed(End::TimedOut)),
        }
    }

    async fn continue_100(&mut self) -> Result<(), ReadError> {
        self.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ReadError::Closed(End::Cut))
    }

    pub(super) fn count_refusal(&self, status: u16) {
        self.gw
            .metrics
            .requests_total
            .with_label_values(&["-", "-", status_str(status), "-"])
            .inc();
        tracing::warn!(status, "request refused before routing");
    }

    /// After an early refusal: stop sending, then read (and drop) what the
    /// client is still sending for a while, so it reads the answer instead
    /// of a connection reset.
    pub(super) async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let until = Instant::now() + LINGER;
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_bodies_wait_for_every_byte_and_leave_the_rest() {
        let mut r = BodyReader::new(Framing::Length(5), 10, 1024).unwrap();
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(r.advance(&mut buf), Ok(None));
        buf.extend_from_slice(b"loNEXT");
        assert_eq!(r.advance(&mut buf), Ok(Some(Bytes::from_static(b"hello"))));
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn the_body_limit_holds_for_both_framings() {
        assert_eq!(
            BodyReader::new(Framing::Length(11), 10, 1024).err(),
            Some(BodyError::TooLarge(10))
        );
        assert!(BodyReader::new(Framing::Length(10), 10, 1024).is_ok());
        let mut r = BodyReader::new(Framing::Chunked, 10, 1024).unwrap();
        let mut buf = BytesMut::from(&b"6\r\nabcdef\r\n5\r\nghijk\r\n0\r\n\r\n"[..]);
        assert_eq!(r.advance(&mut buf), Err(BodyError::TooLarge(10)));
        let mut r = BodyReader::new(Framing::Chunked, 10, 1024).unwrap();
        let mut buf = BytesMut::from(&b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n"[..]);
        assert_eq!(
            r.advance(&mut buf),
            Ok(Some(Bytes::from_static(b"abcdefghij")))
        );
    }

    #[test]
    fn a_chunk_size_line_without_digits_is_not_the_last_chunk() {
        let mut r = BodyReader::new(Framing::Chunked, 100, 1024).unwrap();
        let mut buf = BytesMut::from(&b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(r.advance(&mut buf), Err(BodyError::Framing(_))));
        let mut r = BodyReader::new(Framing::Chunked, 100, 1024).unwrap();
        let mut buf = BytesMut::from(&b";x\r\n\r\n"[..]);
        assert!(matches!(r.advance(&mut buf), Err(BodyError::Framing(_))));
    }
}
