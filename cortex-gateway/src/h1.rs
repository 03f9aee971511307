//! HTTP/1.1 pieces shared by cortex's client-facing server (`front.rs`) and
//! its neuron client (`upstream.rs`): message framing, the chunked
//! transfer-coding decoder, and the `Date` header.
//!
//! Heads are parsed with `httparse` (the parser hyper itself uses) and
//! chunk-size lines with `httparse::parse_chunk_size`; this module only
//! keeps the state between reads. cortex speaks HTTP/1 on its hot path
//! itself rather than through hyper's connection machinery because that
//! machinery (body channels, per-frame dispatch, header maps rebuilt on
//! each hop) was two thirds of cortex's CPU per proxied request, and the
//! gateway must cost no more CPU than nginx (docs/benchmarks.md).

use bytes::{Buf, Bytes, BytesMut};
use std::cell::RefCell;
use std::time::{Duration, SystemTime};

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("trailer section larger than {0} bytes")]
    Trailers(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// One step of [`Chunked::step`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Payload bytes (a whole chunk, or the part of it read so far).
    Data(Bytes),
    /// The buffer holds no complete next piece: read more.
    NeedMore,
    /// The last chunk and the trailers are consumed.
    End,
}

/// Decoder state for a `Transfer-Encoding: chunked` body. It takes bytes
/// from the front of the caller's read buffer, so what follows the body
/// (a pipelined request, say) stays there.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: ChunkState,
    max_trailers: usize,
}

impl Chunked {
    pub fn new(max_trailers: usize) -> Chunked {
        Chunked {
            state: ChunkState::Size,
            max_trailers,
        }
    }

    /// Consumes framing from `buf` and returns the next payload piece.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, FramingError> {
        loop {
            if let ChunkState::Data(left) = self.state {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = (buf.len() as u64).min(left);
                let data = buf.split_to(n as usize).freeze();
                self.state = if n == left {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left - n)
                };
                return Ok(Step::Data(data));
            }
            match self.framing_step(buf)? {
                Some(Step::End) => return Ok(Step::End),
                Some(_) => return Ok(Step::NeedMore),
                None => {}
            }
        }
    }

    /// Consumes the complete framing at the front of `buf` (chunk ends,
    /// size lines, the last chunk and trailers) but no payload; true once
    /// the body has ended. Lets a reader see the end of a body that came in
    /// the same read as its last data.
    pub fn skip_framing(&mut self, buf: &mut BytesMut) -> Result<bool, FramingError> {
        loop {
            if let ChunkState::Data(_) = self.state {
                return Ok(false);
            }
            match self.framing_step(buf)? {
                Some(Step::End) => return Ok(true),
                Some(_) => return Ok(false),
                None => {}
            }
        }
    }

    /// One framing transition: `None` when it moved on, else `NeedMore` or
    /// `End`. Not for the `Data` state.
    fn framing_step(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, FramingError> {
        match self.state {
            ChunkState::Data(_) => Ok(None),
            ChunkState::Size => match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    buf.advance(used);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                    Ok(None)
                }
                // A size line is a few bytes; a long one is garbage.
                Ok(httparse::Status::Partial) if buf.len() > 1024 => Err(FramingError::ChunkSize),
                Ok(httparse::Status::Partial) => Ok(Some(Step::NeedMore)),
                Err(_) => Err(FramingError::ChunkSize),
            },
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Some(Step::NeedMore));
                }
                if &buf[..2] != b"\r\n" {
                    return Err(FramingError::ChunkEnd);
                }
                buf.advance(2);
                self.state = ChunkState::Size;
                Ok(None)
            }
            ChunkState::Trailers => {
                // Trailer fields are dropped; find the empty line.
                let end = if buf.starts_with(b"\r\n") {
                    Some(2)
                } else {
                    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
                };
                match end {
                    Some(n) => {
                        buf.advance(n);
                        self.state = ChunkState::Done;
                        Ok(Some(Step::End))
                    }
                    None if buf.len() > self.max_trailers => {
                        Err(FramingError::Trailers(self.max_trailers))
                    }
                    None => Ok(Some(Step::NeedMore)),
                }
            }
            ChunkState::Done => Ok(Some(Step::End)),
        }
    }
}

/// Makes room to read into `buf`: at least `min` bytes free, growing by
/// `grow` when there are fewer. Not growing when there is room matters:
/// while a piece split off the buffer is still alive, growing allocates.
pub fn room(buf: &mut BytesMut, min: usize, grow: usize) {
    if buf.capacity() - buf.len() < min {
        buf.reserve(grow.max(min));
    }
}

/// Appends `data` as one chunk of a chunked body.
pub fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return; // an empty chunk would end the body
    }
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// The message's framing from its `Content-Length` / `Transfer-Encoding`
/// headers (RFC 9112 §6.3): a `Transfer-Encoding` whose last coding is
/// `chunked` wins; conflicting or malformed lengths are errors.
pub fn framing<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    otherwise: Framing,
) -> Result<Framing, &'static str> {
    let mut length: Option<u64> = None;
    let mut te: Option<bool> = None; // Some(last coding is chunked)
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting Content-Length headers");
            }
            length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value
                .rsplit(|b| *b == b',')
                .next()
                .map(|s| s.trim_ascii())
                .unwrap_or_default();
            te = Some(last.eq_ignore_ascii_case(b"chunked"));
        }
    }
    match (te, length) {
        (Some(_), Some(_)) => Err("both Transfer-Encoding and Content-Length"),
        (Some(true), None) => Ok(Framing::Chunked),
        (Some(false), None) => Err("unsupported Transfer-Encoding"),
        (None, Some(0)) => Ok(Framing::Empty),
        (None, Some(n)) => Ok(Framing::Length(n)),
        (None, None) => Ok(otherwise),
    }
}

/// Whether the connection stays open after this message: HTTP/1.1 unless
/// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
pub fn keep_alive<'a>(version: u8, headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> bool {
    let mut close = false;
    let mut keep = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|b| *b == b',') {
                let t = token.trim_ascii();
                close |= t.eq_ignore_ascii_case(b"close");
                keep |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    if version >= 1 {
        !close
    } else {
        keep && !close
    }
}

thread_local! {
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

/// Appends `date: <IMF-fixdate>\r\n`, formatted at most once a second per
/// thread.
pub fn put_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                d.1.copy_from_slice(text.as_bytes());
                d.0 = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&d.1);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> (Vec<u8>, bool, Vec<u8>) {
        let mut dec = Chunked::new(1024);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut ended = false;
        for piece in input.chunks(split) {
            buf.extend_from_slice(piece);
            loop {
                match dec.step(&mut buf).unwrap() {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::NeedMore => break,
                    Step::End => {
                        ended = true;
                        break;
                    }
                }
            }
            if ended {
                break;
            }
        }
        (out, ended, buf.to_vec())
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 1..body.len() {
            let (out, ended, rest) = decode_all(body, split);
            assert_eq!(out, b"hello, world", "split {split}");
            assert!(ended, "split {split}");
            // What follows the body is left for the next message.
            assert!(b"NEXT".starts_with(&rest), "split {split}: {rest:?}");
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let mut dec = Chunked::new(1024);
        let mut buf = BytesMut::from(&b"zz\r\nhello\r\n"[..]);
        assert!(dec.step(&mut buf).is_err());
        let mut dec = Chunked::new(1024);
        let mut buf = BytesMut::from(&b"2\r\nhelloXX"[..]);
        assert_eq!(
            dec.step(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"he"))
        );
        assert!(dec.step(&mut buf).is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |v: &[(&'static str, &'static [u8])]| framing(v.iter().copied(), Framing::Empty);
        assert_eq!(h(&[("Content-Length", b"12")]), Ok(Framing::Length(12)));
        assert_eq!(h(&[("content-length", b"0")]), Ok(Framing::Empty));
        assert_eq!(
            h(&[("Transfer-Encoding", b"gzip, chunked")]),
            Ok(Framing::Chunked)
        );
        assert!(h(&[("Transfer-Encoding", b"chunked"), ("Content-Length", b"3")]).is_err());
        assert!(h(&[("Content-Length", b"3"), ("Content-Length", b"4")]).is_err());
        assert!(h(&[("Content-Length", b"-1")]).is_err());
        assert!(h(&[("Transfer-Encoding", b"gzip")]).is_err());
        assert_eq!(h(&[]), Ok(Framing::Empty));
    }

    #[test]
    fn keep_alive_defaults_by_version() {
        let none: [(&str, &[u8]); 0] = [];
        assert!(keep_alive(1, none.iter().copied()));
        assert!(!keep_alive(0, none.iter().copied()));
        assert!(!keep_alive(1, [("Connection", &b"close"[..])].into_iter()));
        assert!(keep_alive(
            0,
            [("connection", &b"Keep-Alive"[..])].into_iter()
        ));
    }

    #[test]
    fn chunks_are_written_with_hex_sizes() {
        let mut out = Vec::new();
        put_chunk(&mut out, &[b'a'; 26]);
        put_chunk(&mut out, b"");
        assert_eq!(&out[..4], b"1a\r\n");
        assert_eq!(out.len(), 4 + 26 + 2);
        let mut date = Vec::new();
        put_date(&mut date);
        assert!(
            date.starts_with(b"date: ") && date.ends_with(b" GMT\r\n"),
            "{date:?}"
        );
    }
}
