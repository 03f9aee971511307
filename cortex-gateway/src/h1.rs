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
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("trailer section malformed or larger than {0} bytes")]
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
            ChunkState::Size => match parse_chunk_size(buf)? {
                Some((used, size)) => {
                    buf.advance(used);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                    Ok(None)
                }
                None => Ok(Some(Step::NeedMore)),
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
                        // The trailer fields must be well-formed fields
                        // (they are then dropped).
                        let mut fields = [httparse::EMPTY_HEADER; 64];
                        if !matches!(
                            httparse::parse_headers(&buf[..n], &mut fields),
                            Ok(httparse::Status::Complete((used, _))) if used == n
                        ) {
                            return Err(FramingError::Trailers(self.max_trailers));
                        }
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

/// Why a message's framing headers were refused. Every case is a known
/// request-smuggling pattern when two HTTP hops read one message apart, so
/// each is refused (and the connection closed) rather than guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadFraming {
    /// Malformed or conflicting framing: `400`.
    #[error("{0}")]
    Invalid(&'static str),
    /// A transfer coding cortex does not implement (anything but a single
    /// `chunked`): `501` (RFC 9112 §6.1).
    #[error("{0}")]
    Unsupported(&'static str),
}

impl BadFraming {
    pub fn status(self) -> u16 {
        match self {
            BadFraming::Invalid(_) => 400,
            BadFraming::Unsupported(_) => 501,
        }
    }
}

/// A `Content-Length` value: `1*DIGIT` (RFC 9110 §8.6) with only SP/HTAB
/// around it, fitting a u64. No sign, no other whitespace, no list.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii_start();
    let v = trim_ows_end(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    trim_ows_end(&v[start..])
}

fn trim_ows_end(v: &[u8]) -> &[u8] {
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    &v[..end]
}

/// The message's framing from its `Content-Length` / `Transfer-Encoding`
/// headers (RFC 9112 §6.3), strictly:
/// - `Content-Length` is digits only; repeated ones must agree;
/// - `Transfer-Encoding` must be exactly one `chunked` (across all its
///   fields); any other coding is [`BadFraming::Unsupported`];
/// - both together are refused;
/// - in a request (`request_version` given), `Transfer-Encoding` on
///   HTTP/1.0 is refused (RFC 9112 §6.1: it must be treated as faulty).
pub fn framing<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    otherwise: Framing,
) -> Result<Framing, BadFraming> {
    framing_of(headers, otherwise, None)
}

/// [`framing`] for a request of HTTP/1.`minor`.
pub fn request_framing<'a>(
    minor: u8,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<Framing, BadFraming> {
    framing_of(headers, Framing::Empty, Some(minor))
}

fn framing_of<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    otherwise: Framing,
    request_version: Option<u8>,
) -> Result<Framing, BadFraming> {
    use BadFraming::{Invalid, Unsupported};
    let mut length: Option<u64> = None;
    // Codings seen across every Transfer-Encoding field, in order.
    let mut codings = 0usize;
    let mut chunked_last = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let v = content_length(value).ok_or(Invalid("invalid Content-Length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(Invalid("conflicting Content-Length headers"));
            }
            length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in value.split(|b| *b == b',') {
                let c = trim_ows(coding);
                if c.is_empty() {
                    continue; // empty list elements are allowed (RFC 9110 §5.6.1)
                }
                codings += 1;
                chunked_last = c.eq_ignore_ascii_case(b"chunked");
                if !chunked_last {
                    return Err(Unsupported(
                        "unsupported Transfer-Encoding (only chunked is)",
                    ));
                }
            }
            if value.split(|b| *b == b',').all(|c| trim_ows(c).is_empty()) {
                return Err(Invalid("empty Transfer-Encoding"));
            }
        }
    }
    if codings > 0 && request_version == Some(0) {
        return Err(Invalid("Transfer-Encoding in an HTTP/1.0 request"));
    }
    match (codings, length) {
        (0, Some(0)) => Ok(Framing::Empty),
        (0, Some(n)) => Ok(Framing::Length(n)),
        (0, None) => Ok(otherwise),
        (_, Some(_)) => Err(Invalid("both Transfer-Encoding and Content-Length")),
        (1, None) if chunked_last => Ok(Framing::Chunked),
        _ => Err(Invalid("chunked applied more than once")),
    }
}

/// Longest chunk-size line (size, extensions and CRLF) accepted.
pub const MAX_CHUNK_LINE: usize = 1024;

/// Parses a chunk-size line at the front of `buf` (RFC 9112 §7.1):
/// `1*HEXDIG [ BWS ";" ext ] CRLF`, the size fitting a u64, extensions of
/// visible characters, SP and HTAB only (no bare CR or LF). `Ok(None)`:
/// incomplete. Returns the bytes used and the size.
pub fn parse_chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, FramingError> {
    let mut size: u64 = 0;
    let mut i = 0;
    while i < buf.len() && buf[i].is_ascii_hexdigit() {
        let d = (buf[i] as char).to_digit(16).expect("hex digit") as u64;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(FramingError::ChunkSize)?;
        i += 1;
    }
    if i == buf.len() {
        return incomplete(buf, None);
    }
    if i == 0 {
        return Err(FramingError::ChunkSize);
    }
    // Whitespace is allowed only before an extension.
    let mut j = i;
    while j < buf.len() && (buf[j] == b' ' || buf[j] == b'\t') {
        j += 1;
    }
    if j == buf.len() {
        return incomplete(buf, None);
    }
    if buf[j] == b';' {
        while j < buf.len() && buf[j] != b'\r' {
            let b = buf[j];
            if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                return Err(FramingError::ChunkSize);
            }
            j += 1;
        }
        if j == buf.len() {
            return incomplete(buf, None);
        }
    }
    // At CR: it must be CRLF.
    if buf[j] != b'\r' {
        return Err(FramingError::ChunkSize);
    }
    match buf.get(j + 1) {
        None => incomplete(buf, None),
        Some(b'\n') => Ok(Some((j + 2, size))),
        Some(_) => Err(FramingError::ChunkSize),
    }
}

/// Incomplete, unless the line is already longer than any we accept.
fn incomplete(buf: &[u8], n: Option<(usize, u64)>) -> Result<Option<(usize, u64)>, FramingError> {
    if buf.len() >= MAX_CHUNK_LINE {
        Err(FramingError::ChunkSize)
    } else {
        Ok(n)
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
        assert_eq!(h(&[("Content-Length", b" 12\t")]), Ok(Framing::Length(12)));
        assert_eq!(h(&[("content-length", b"0")]), Ok(Framing::Empty));
        assert_eq!(
            h(&[("Content-Length", b"7"), ("Content-Length", b"7")]),
            Ok(Framing::Length(7))
        );
        assert_eq!(
            h(&[("Transfer-Encoding", b"chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            h(&[("Transfer-Encoding", b"CHUNKED , ")]),
            Ok(Framing::Chunked)
        );
        assert!(h(&[("Transfer-Encoding", b"chunked"), ("Content-Length", b"3")]).is_err());
        assert!(h(&[("Content-Length", b"3"), ("Content-Length", b"4")]).is_err());
        assert_eq!(h(&[]), Ok(Framing::Empty));
    }

    #[test]
    fn content_length_is_digits_only() {
        let h = |v: &'static [u8]| framing([("Content-Length", v)].into_iter(), Framing::Empty);
        for bad in [
            &b"+5"[..],
            b"-1",
            b"5 5",
            b"5,5",
            b"0x5",
            b"",
            b" ",
            b"5\xc2\xa0",     // trailing NO-BREAK SPACE
            b"\xe3\x80\x805", // leading IDEOGRAPHIC SPACE
            b"99999999999999999999",
            b"5\x0b",
        ] {
            assert_eq!(
                h(bad),
                Err(BadFraming::Invalid("invalid Content-Length")),
                "{bad:?}"
            );
        }
        assert_eq!(h(b"18446744073709551615"), Ok(Framing::Length(u64::MAX)));
        assert_eq!(content_length(b"007"), Some(7));
    }

    #[test]
    fn only_a_single_final_chunked_coding_is_accepted() {
        let h = |v: &'static [u8]| framing([("Transfer-Encoding", v)].into_iter(), Framing::Empty);
        for unsupported in [
            &b"gzip, chunked"[..],
            b"gzip",
            b"identity",
            b"chunked, gzip",
            b"x",
        ] {
            assert!(
                matches!(h(unsupported), Err(BadFraming::Unsupported(_))),
                "{unsupported:?}"
            );
        }
        assert_eq!(h(b"gzip").unwrap_err().status(), 501);
        for invalid in [&b"chunked, chunked"[..], b"", b" , "] {
            assert!(
                matches!(h(invalid), Err(BadFraming::Invalid(_))),
                "{invalid:?}"
            );
        }
        // Split over two fields counts the same.
        let two = [
            ("Transfer-Encoding", &b"chunked"[..]),
            ("Transfer-Encoding", &b"chunked"[..]),
        ];
        assert!(framing(two.into_iter(), Framing::Empty).is_err());
    }

    #[test]
    fn transfer_encoding_on_http_1_0_requests_is_refused() {
        let te = [("Transfer-Encoding", &b"chunked"[..])];
        assert_eq!(
            request_framing(0, te.into_iter()),
            Err(BadFraming::Invalid(
                "Transfer-Encoding in an HTTP/1.0 request"
            ))
        );
        assert_eq!(request_framing(1, te.into_iter()), Ok(Framing::Chunked));
        let cl = [("Content-Length", &b"3"[..])];
        assert_eq!(request_framing(0, cl.into_iter()), Ok(Framing::Length(3)));
    }

    #[test]
    fn chunk_size_lines_are_strict() {
        let p = |s: &[u8]| parse_chunk_size(s);
        assert_eq!(p(b"5\r\n").unwrap(), Some((3, 5)));
        assert_eq!(p(b"1aF\r\nx").unwrap(), Some((5, 0x1af)));
        assert_eq!(p(b"5;name=value\r\n").unwrap(), Some((14, 5)));
        assert_eq!(p(b"5 ;ext\r\n").unwrap(), Some((8, 5)));
        assert_eq!(p(b"5 \r\n").unwrap(), Some((4, 5)));
        assert_eq!(p(b"000000000000000000005\r\n").unwrap(), Some((23, 5)));
        assert_eq!(p(b"ffffffffffffffff\r\n").unwrap(), Some((18, u64::MAX)));
        for partial in [&b""[..], b"5", b"5;ext", b"5\r", b"5 "] {
            assert_eq!(p(partial).unwrap(), None, "{partial:?}");
        }
        for bad in [
            &b"\r\n"[..],             // no digits
            b";x\r\n",                // no digits
            b"5\n",                   // bare LF
            b"5;x\ny\r\n",            // bare LF in an extension
            b"5;x\ry\r\n",            // bare CR in an extension
            b"5;\x01\r\n",            // control character
            b"5x\r\n",                // junk after the size
            b"5 5\r\n",               // whitespace inside the size
            b"10000000000000000\r\n", // over u64
            b"+5\r\n",
            b"0x5\r\n",
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        let long = [b'0'; MAX_CHUNK_LINE];
        assert!(p(&long).is_err(), "a size line longer than the limit");
    }

    #[test]
    fn malformed_trailers_are_errors() {
        let mut dec = Chunked::new(1024);
        let mut buf = BytesMut::from(&b"0\r\nbad trailer\r\n\r\n"[..]);
        assert!(dec.step(&mut buf).is_err());
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
