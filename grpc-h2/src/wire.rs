//! HTTP/2 on the wire, as Fulcrum's own client ([`crate::client`]) and server
//! ([`crate::own_server`]) write and read it: frame types, flags, error codes and settings
//! (RFC 9113), frame headers and the few frames both send, the checks of a received frame's
//! form that both apply before their own state machines see it ([`parse_frame`]), HPACK's
//! integer and literal encodings (RFC 7541; both encode without the dynamic table), and the
//! output buffer both write from.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A connection's streams by id. Hashed with `foldhash` (seeded per process, so a peer
/// cannot aim its stream ids at one bucket) rather than the standard library's SipHash: a call
/// looks its stream up some 17 times on its two connections, and SipHash of a `u32` made those
/// look-ups 4 % of the router's instructions a call (callgrind).
pub(crate) type StreamMap<V> = std::collections::HashMap<u32, V, foldhash::fast::RandomState>;

/// The client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub(crate) mod kind {
    pub(crate) const DATA: u8 = 0x0;
    pub(crate) const HEADERS: u8 = 0x1;
    pub(crate) const RST_STREAM: u8 = 0x3;
    pub(crate) const SETTINGS: u8 = 0x4;
    pub(crate) const PUSH_PROMISE: u8 = 0x5;
    pub(crate) const PING: u8 = 0x6;
    pub(crate) const GOAWAY: u8 = 0x7;
    pub(crate) const WINDOW_UPDATE: u8 = 0x8;
    pub(crate) const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub(crate) mod flag {
    pub(crate) const END_STREAM: u8 = 0x1;
    pub(crate) const ACK: u8 = 0x1;
    pub(crate) const END_HEADERS: u8 = 0x4;
    pub(crate) const PADDED: u8 = 0x8;
    pub(crate) const PRIORITY: u8 = 0x20;
}

/// HTTP/2 error codes (RFC 9113 §7).
pub mod reason {
    /// Graceful shutdown.
    pub const NO_ERROR: u32 = 0x0;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 0x1;
    /// A flow-control window was exceeded.
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    /// A frame of a size not allowed.
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: u32 = 0x7;
    /// The stream is no longer needed.
    pub const CANCEL: u32 = 0x8;
    /// A header block could not be decoded.
    pub const COMPRESSION_ERROR: u32 = 0x9;
    /// The peer generates excessive load.
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
    /// The transport's security is inadequate.
    pub const INADEQUATE_SECURITY: u32 = 0xc;
}

/// Settings identifiers (RFC 9113 §6.5.2).
pub(crate) mod setting {
    pub(crate) const ENABLE_PUSH: u16 = 0x2;
    pub(crate) const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub(crate) const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub(crate) const MAX_FRAME_SIZE: u16 = 0x5;
    pub(crate) const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// The frame size every peer accepts, and the largest Fulcrum's client and server accept
/// (neither raises SETTINGS_MAX_FRAME_SIZE: larger frames would only need larger buffers).
pub(crate) const DEFAULT_MAX_FRAME: usize = 16_384;

/// Every window's size before SETTINGS or WINDOW_UPDATE change it (RFC 9113 §6.9.2).
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;

/// Largest window RFC 9113 allows.
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A frame header (RFC 9113 §4.1).
pub(crate) fn frame_head(buf: &mut BytesMut, len: usize, ty: u8, flags: u8, stream: u32) {
    let len = len as u32;
    buf.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    buf.put_u32(stream & 0x7fff_ffff);
}

/// A whole frame, its header and `payload`: for tests that write frames by hand.
#[cfg(test)]
pub(crate) fn test_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(9 + payload.len());
    frame_head(&mut buf, payload.len(), ty, flags, stream);
    buf.put_slice(payload);
    buf.to_vec()
}

/// A WINDOW_UPDATE frame.
pub(crate) fn window_update(buf: &mut BytesMut, stream: u32, increment: u32) {
    frame_head(buf, 4, kind::WINDOW_UPDATE, 0, stream);
    buf.put_u32(increment & 0x7fff_ffff);
}

/// An RST_STREAM frame.
pub(crate) fn rst_stream(buf: &mut BytesMut, stream: u32, code: u32) {
    frame_head(buf, 4, kind::RST_STREAM, 0, stream);
    buf.put_u32(code);
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above it.
pub(crate) fn hpack_int(buf: &mut BytesMut, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        buf.put_u8(first | value as u8);
        return;
    }
    buf.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        buf.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    buf.put_u8(value as u8);
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
pub(crate) fn hpack_string(buf: &mut BytesMut, s: &[u8]) {
    hpack_int(buf, 0, 7, s.len());
    buf.put_slice(s);
}

/// A literal header field without indexing (RFC 7541 §6.2.2), its name from the static table
/// when `index` is not zero.
pub(crate) fn hpack_literal(buf: &mut BytesMut, index: usize, name: &[u8], value: &[u8]) {
    if index == 0 {
        buf.put_u8(0);
        hpack_string(buf, name);
    } else {
        hpack_int(buf, 0, 4, index);
    }
    hpack_string(buf, value);
}

/// Encodes `headers` as HPACK literals (names from the static table where they are in it),
/// leaving out connection-specific ones and the names in `skip`.
pub(crate) fn hpack_headers(buf: &mut BytesMut, headers: &http::HeaderMap, skip: &[&str]) {
    for (name, value) in headers {
        let n = name.as_str();
        if CONNECTION_SPECIFIC.contains(&n) || skip.contains(&n) {
            continue;
        }
        hpack_literal(
            buf,
            crate::hpack::static_name(n),
            n.as_bytes(),
            value.as_bytes(),
        );
    }
}

/// Ends a header block encoded in place behind a HEADERS frame header written at `start` with
/// a zero length: fills in the length, or, when the block is larger than `max_frame` (rare: big
/// metadata), cuts it into HEADERS and CONTINUATION frames; `end_stream` (a flag) stays on the
/// HEADERS frame.
pub(crate) fn finish_header_block(
    buf: &mut BytesMut,
    start: usize,
    id: u32,
    end_stream: u8,
    max_frame: usize,
) {
    let len = buf.len() - start - 9;
    if len <= max_frame {
        let l = len as u32;
        buf[start..start + 3].copy_from_slice(&[(l >> 16) as u8, (l >> 8) as u8, l as u8]);
        return;
    }
    let block = buf.split_off(start + 9);
    buf.truncate(start);
    let mut rest = &block[..];
    let mut first = true;
    while !rest.is_empty() {
        let n = rest.len().min(max_frame);
        let last = if n == rest.len() {
            flag::END_HEADERS
        } else {
            0
        };
        if first {
            frame_head(buf, n, kind::HEADERS, last | end_stream, id);
        } else {
            frame_head(buf, n, kind::CONTINUATION, last, id);
        }
        buf.put_slice(&rest[..n]);
        rest = &rest[n..];
        first = false;
    }
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2), left out of a request whatever the caller passed.
pub(crate) const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Drops a padded frame's padding (RFC 9113 §6.1).
fn unpad(payload: &mut Bytes) -> Result<(), ()> {
    if payload.is_empty() {
        return Err(());
    }
    let pad = usize::from(payload[0]);
    if pad >= payload.len() {
        return Err(());
    }
    payload.advance(1);
    payload.truncate(payload.len() - pad);
    Ok(())
}

/// A connection error (RFC 9113 §5.4.1): the code the GOAWAY carries and what was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnError {
    pub(crate) code: u32,
    pub(crate) what: &'static str,
}

const fn conn_error(code: u32, what: &'static str) -> ConnError {
    ConnError { code, what }
}

/// What a SETTINGS frame changes of the settings Fulcrum's client and server act on (the last
/// value of a setting listed twice wins, as applying the list in order would).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerSettings {
    pub(crate) max_concurrent_streams: Option<u32>,
    pub(crate) initial_window_size: Option<u32>,
    pub(crate) max_frame_size: Option<u32>,
}

/// A frame whose form is what RFC 9113 requires of its type.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParsedFrame {
    /// DATA, without its padding; `flow_len` counts the padding too (flow control does).
    Data {
        id: u32,
        end_stream: bool,
        flow_len: i64,
        payload: Bytes,
    },
    /// The first fragment of a header block, without padding and priority.
    Headers {
        id: u32,
        end_stream: bool,
        end_headers: bool,
        fragment: Bytes,
    },
    /// A further fragment of the header block being gathered.
    Continuation {
        end_headers: bool,
        fragment: Bytes,
    },
    RstStream {
        id: u32,
        code: u32,
    },
    /// The peer's settings (to acknowledge).
    Settings(PeerSettings),
    /// The peer acknowledged ours.
    SettingsAck,
    PushPromise,
    Ping {
        ack: bool,
        data: Bytes,
    },
    GoAway {
        last: u32,
        code: u32,
    },
    /// A window increment (31 bits; zero only on a stream, where it is a stream error).
    WindowUpdate {
        id: u32,
        increment: i64,
    },
    /// PRIORITY and unknown types, which are ignored (RFC 9113 §5.5).
    Ignored,
}

/// Checks frame `ty` (with `flags`, on stream `id`) for the form RFC 9113 gives its type:
/// stream 0 or not, length, padding, priority fields, setting values; and, while the header
/// block of stream `continuing` is being gathered, that it is that block's CONTINUATION. What
/// is checked here depends on the frame alone, so the client and the server share it; what
/// depends on a connection's state (its streams, windows, limits) is theirs.
pub(crate) fn parse_frame(
    ty: u8,
    flags: u8,
    id: u32,
    mut payload: Bytes,
    continuing: Option<u32>,
) -> Result<ParsedFrame, ConnError> {
    use reason::{FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, PROTOCOL_ERROR};
    match continuing {
        Some(stream) if ty != kind::CONTINUATION || id != stream => {
            return Err(conn_error(
                PROTOCOL_ERROR,
                "a header block interrupted by another frame",
            ));
        }
        None if ty == kind::CONTINUATION => {
            return Err(conn_error(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        }
        _ => {}
    }
    let end_stream = flags & flag::END_STREAM != 0;
    let frame = match ty {
        kind::DATA => {
            if id == 0 {
                return Err(conn_error(PROTOCOL_ERROR, "DATA on stream 0"));
            }
            let flow_len = payload.len() as i64;
            if flags & flag::PADDED != 0 && unpad(&mut payload).is_err() {
                return Err(conn_error(PROTOCOL_ERROR, "bad DATA padding"));
            }
            ParsedFrame::Data {
                id,
                end_stream,
                flow_len,
                payload,
            }
        }
        kind::HEADERS => {
            if id == 0 {
                return Err(conn_error(PROTOCOL_ERROR, "HEADERS on stream 0"));
            }
            if flags & flag::PADDED != 0 && unpad(&mut payload).is_err() {
                return Err(conn_error(PROTOCOL_ERROR, "bad HEADERS padding"));
            }
            if flags & flag::PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(conn_error(
                        FRAME_SIZE_ERROR,
                        "HEADERS too short for its priority",
                    ));
                }
                payload.advance(5);
            }
            ParsedFrame::Headers {
                id,
                end_stream,
                end_headers: flags & flag::END_HEADERS != 0,
                fragment: payload,
            }
        }
        kind::CONTINUATION => ParsedFrame::Continuation {
            end_headers: flags & flag::END_HEADERS != 0,
            fragment: payload,
        },
        kind::RST_STREAM => {
            if id == 0 {
                return Err(conn_error(PROTOCOL_ERROR, "RST_STREAM on stream 0"));
            }
            if payload.len() != 4 {
                return Err(conn_error(FRAME_SIZE_ERROR, "RST_STREAM of a bad length"));
            }
            ParsedFrame::RstStream {
                id,
                code: payload.get_u32(),
            }
        }
        kind::SETTINGS => {
            if id != 0 {
                return Err(conn_error(PROTOCOL_ERROR, "SETTINGS on a stream"));
            }
            if flags & flag::ACK != 0 {
                if !payload.is_empty() {
                    return Err(conn_error(
                        FRAME_SIZE_ERROR,
                        "a SETTINGS ACK with a payload",
                    ));
                }
                return Ok(ParsedFrame::SettingsAck);
            }
            if !payload.len().is_multiple_of(6) {
                return Err(conn_error(FRAME_SIZE_ERROR, "malformed SETTINGS"));
            }
            let mut settings = PeerSettings::default();
            while payload.remaining() >= 6 {
                let (key, value) = (payload.get_u16(), payload.get_u32());
                match key {
                    setting::ENABLE_PUSH if value > 1 => {
                        return Err(conn_error(
                            PROTOCOL_ERROR,
                            "SETTINGS_ENABLE_PUSH not 0 or 1",
                        ));
                    }
                    setting::MAX_CONCURRENT_STREAMS => {
                        settings.max_concurrent_streams = Some(value);
                    }
                    setting::INITIAL_WINDOW_SIZE => {
                        if i64::from(value) > MAX_WINDOW {
                            return Err(conn_error(
                                FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                            ));
                        }
                        settings.initial_window_size = Some(value);
                    }
                    setting::MAX_FRAME_SIZE => {
                        if !(16_384..=16_777_215).contains(&value) {
                            return Err(conn_error(
                                PROTOCOL_ERROR,
                                "SETTINGS_MAX_FRAME_SIZE out of range",
                            ));
                        }
                        settings.max_frame_size = Some(value);
                    }
                    // The header table size bounds an encoder's dynamic table, which neither
                    // side uses; a peer's header list limit is not approached by what they
                    // send. Unknown settings are ignored (RFC 9113 §6.5.2).
                    _ => {}
                }
            }
            ParsedFrame::Settings(settings)
        }
        kind::PUSH_PROMISE => ParsedFrame::PushPromise,
        kind::PING => {
            if id != 0 {
                return Err(conn_error(PROTOCOL_ERROR, "PING on a stream"));
            }
            if payload.len() != 8 {
                return Err(conn_error(FRAME_SIZE_ERROR, "PING of a bad length"));
            }
            ParsedFrame::Ping {
                ack: flags & flag::ACK != 0,
                data: payload,
            }
        }
        kind::GOAWAY => {
            if id != 0 {
                return Err(conn_error(PROTOCOL_ERROR, "GOAWAY on a stream"));
            }
            if payload.len() < 8 {
                return Err(conn_error(FRAME_SIZE_ERROR, "GOAWAY too short"));
            }
            ParsedFrame::GoAway {
                last: payload.get_u32() & 0x7fff_ffff,
                code: payload.get_u32(),
            }
        }
        kind::WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(conn_error(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE"));
            }
            let increment = i64::from(payload.get_u32() & 0x7fff_ffff);
            if id == 0 && increment == 0 {
                return Err(conn_error(PROTOCOL_ERROR, "a zero WINDOW_UPDATE"));
            }
            ParsedFrame::WindowUpdate { id, increment }
        }
        _ => ParsedFrame::Ignored,
    };
    Ok(frame)
}

/// Applies what the peer's SETTINGS change of this side's sending, the same for the client and
/// the server: the initial window (every open stream's send window moves by the difference,
/// RFC 9113 §6.9.2) and the largest frame; then acknowledges them into `out`.
pub(crate) fn apply_settings<'a>(
    settings: &PeerSettings,
    initial_send_window: &mut i64,
    stream_send_windows: impl Iterator<Item = &'a mut i64>,
    max_frame: &mut usize,
    out: &mut BytesMut,
) {
    if let Some(window) = settings.initial_window_size {
        let delta = i64::from(window) - *initial_send_window;
        *initial_send_window = i64::from(window);
        for w in stream_send_windows {
            *w += delta;
        }
    }
    if let Some(max) = settings.max_frame_size {
        *max_frame = max as usize;
    }
    frame_head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Adds a WINDOW_UPDATE's `increment` to the connection's send `window`, which may not exceed
/// 2^31-1 (RFC 9113 §6.9.1).
pub(crate) fn grow_connection_window(window: &mut i64, increment: i64) -> Result<(), ConnError> {
    *window += increment;
    if *window > MAX_WINDOW {
        return Err(conn_error(
            reason::FLOW_CONTROL_ERROR,
            "the connection's window above 2^31-1",
        ));
    }
    Ok(())
}

/// Bytes to write, in order: `queue` (large payloads, written from their own buffers without a
/// copy) first, then `tail` (frame headers, header blocks, small payloads: copied, so that a
/// call's frames leave in one contiguous write).
#[derive(Debug, Default)]
pub(crate) struct Out {
    pub(crate) queue: VecDeque<Bytes>,
    pub(crate) tail: BytesMut,
}

/// Payloads up to this size are copied into the output buffer (one contiguous write); larger
/// ones are written from the caller's buffer as they are, without a copy.
pub(crate) const COPY_LIMIT: usize = 4_096;

impl Out {
    /// An empty buffer with room for a few calls' frames.
    pub(crate) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            tail: BytesMut::with_capacity(16 * 1024),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.tail.is_empty()
    }

    /// Bytes waiting.
    pub(crate) fn len(&self) -> usize {
        self.queue.iter().map(Bytes::len).sum::<usize>() + self.tail.len()
    }

    /// Appends a payload: copied when small, queued as it is when large.
    pub(crate) fn payload(&mut self, chunk: Bytes) {
        if chunk.len() <= COPY_LIMIT {
            self.tail.put_slice(&chunk);
        } else {
            let head = self.tail.split().freeze();
            if !head.is_empty() {
                self.queue.push_back(head);
            }
            self.queue.push_back(chunk);
        }
    }

    /// Writes what the socket takes without waiting. `Ok(true)`: all written; `Ok(false)`: the
    /// socket is full (wait until it is writable); `Err`: the connection is gone.
    pub(crate) fn write_to(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        while !self.is_empty() {
            let mut slices = [IoSlice::new(&[]); 32];
            let mut n = 0;
            for b in self.queue.iter().take(31) {
                slices[n] = IoSlice::new(b);
                n += 1;
            }
            if self.queue.len() <= 31 {
                slices[n] = IoSlice::new(&self.tail);
                n += 1;
            }
            match tcp.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    while written > 0 {
                        if let Some(front) = self.queue.front_mut() {
                            let k = written.min(front.len());
                            front.advance(k);
                            written -= k;
                            if front.is_empty() {
                                self.queue.pop_front();
                            }
                        } else {
                            self.tail.advance(written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tail.capacity() > 256 * 1024 {
            // A large burst is over: do not keep its buffer.
            self.tail = BytesMut::with_capacity(16 * 1024);
        }
        Ok(true)
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.tail.clear();
    }
}

/// Reads what the socket has into `buf`: the bytes read, and whether the socket is drained. A
/// read shorter than the room it had means it is: its readiness is then cleared, so that the
/// caller's next `poll_read_ready` registers it for the next epoll event (no system call)
/// rather than reporting a readiness that a read would find gone (tokio's own `poll_read` does
/// the same; `try_read_buf` alone costs a failing `recvfrom` a turn).
pub(crate) fn read_once(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
    let room = buf.capacity() - buf.len();
    let mut short = None;
    let read = tcp.try_io(Interest::READABLE, || {
        let n = tcp.try_read_buf(buf)?;
        if n > 0 && n < room {
            // Reported as "would block" so that `try_io` clears the readiness.
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, short) {
        (_, Some(n)) => Ok((n, true)),
        (Ok(n), None) => Ok((n, false)),
        (Err(e), None) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(ty: u8, flags: u8, id: u32, payload: &[u8]) -> Result<ParsedFrame, ConnError> {
        parse_frame(ty, flags, id, Bytes::copy_from_slice(payload), None)
    }

    fn code(r: Result<ParsedFrame, ConnError>) -> u32 {
        r.expect_err("a connection error").code
    }

    fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for (k, v) in pairs {
            b.put_u16(*k);
            b.put_u32(*v);
        }
        b.to_vec()
    }

    #[test]
    fn a_header_block_is_gathered_without_other_frames() {
        let ping = Bytes::from_static(&[0; 8]);
        let e = parse_frame(kind::PING, 0, 0, ping, Some(1)).unwrap_err();
        assert_eq!(e.code, reason::PROTOCOL_ERROR);
        let other = parse_frame(kind::CONTINUATION, 0, 3, Bytes::new(), Some(1));
        assert_eq!(code(other), reason::PROTOCOL_ERROR);
        assert_eq!(
            code(parse(kind::CONTINUATION, flag::END_HEADERS, 1, &[0x88])),
            reason::PROTOCOL_ERROR
        );
        let ok = parse_frame(
            kind::CONTINUATION,
            flag::END_HEADERS,
            1,
            Bytes::new(),
            Some(1),
        );
        assert_eq!(
            ok,
            Ok(ParsedFrame::Continuation {
                end_headers: true,
                fragment: Bytes::new()
            })
        );
    }

    #[test]
    fn padding_is_removed_and_counted_by_flow_control() {
        let f = parse(
            kind::DATA,
            flag::PADDED | flag::END_STREAM,
            1,
            &[2, 7, 0, 0],
        );
        assert_eq!(
            f,
            Ok(ParsedFrame::Data {
                id: 1,
                end_stream: true,
                flow_len: 4,
                payload: Bytes::from_static(&[7])
            })
        );
        // Padding as long as the frame, and a padded frame with no pad length.
        assert_eq!(
            code(parse(kind::DATA, flag::PADDED, 1, &[3, 0, 0])),
            reason::PROTOCOL_ERROR
        );
        assert_eq!(
            code(parse(kind::HEADERS, flag::PADDED, 1, &[])),
            reason::PROTOCOL_ERROR
        );
        assert_eq!(code(parse(kind::DATA, 0, 0, &[1])), reason::PROTOCOL_ERROR);
    }

    #[test]
    fn headers_lose_their_priority_fields() {
        let f = parse(
            kind::HEADERS,
            flag::PRIORITY | flag::END_HEADERS,
            5,
            &[0, 0, 0, 3, 16, 0x88],
        );
        assert_eq!(
            f,
            Ok(ParsedFrame::Headers {
                id: 5,
                end_stream: false,
                end_headers: true,
                fragment: Bytes::from_static(&[0x88])
            })
        );
        assert_eq!(
            code(parse(kind::HEADERS, flag::PRIORITY, 5, &[0, 0, 0])),
            reason::FRAME_SIZE_ERROR
        );
        assert_eq!(
            code(parse(kind::HEADERS, 0, 0, &[0x88])),
            reason::PROTOCOL_ERROR
        );
    }

    #[test]
    fn settings_are_checked_and_the_last_value_wins() {
        let list = settings(&[
            (setting::INITIAL_WINDOW_SIZE, 10),
            (setting::MAX_FRAME_SIZE, 20_000),
            (setting::INITIAL_WINDOW_SIZE, 30),
            (0xabcd, 1), // unknown: ignored
        ]);
        assert_eq!(
            parse(kind::SETTINGS, 0, 0, &list),
            Ok(ParsedFrame::Settings(PeerSettings {
                max_concurrent_streams: None,
                initial_window_size: Some(30),
                max_frame_size: Some(20_000),
            }))
        );
        assert_eq!(
            parse(kind::SETTINGS, flag::ACK, 0, &[]),
            Ok(ParsedFrame::SettingsAck)
        );
        let cases = [
            (
                parse(kind::SETTINGS, flag::ACK, 0, &list),
                reason::FRAME_SIZE_ERROR,
            ),
            (parse(kind::SETTINGS, 0, 1, &[]), reason::PROTOCOL_ERROR),
            (
                parse(kind::SETTINGS, 0, 0, &list[..5]),
                reason::FRAME_SIZE_ERROR,
            ),
            (
                parse(
                    kind::SETTINGS,
                    0,
                    0,
                    &settings(&[(setting::ENABLE_PUSH, 2)]),
                ),
                reason::PROTOCOL_ERROR,
            ),
            (
                parse(
                    kind::SETTINGS,
                    0,
                    0,
                    &settings(&[(setting::INITIAL_WINDOW_SIZE, 1 << 31)]),
                ),
                reason::FLOW_CONTROL_ERROR,
            ),
            (
                parse(
                    kind::SETTINGS,
                    0,
                    0,
                    &settings(&[(setting::MAX_FRAME_SIZE, 100)]),
                ),
                reason::PROTOCOL_ERROR,
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(code(got), want, "case {i}");
        }
    }

    #[test]
    fn control_frames_of_the_wrong_form_are_connection_errors() {
        let cases = [
            (parse(kind::PING, 0, 1, &[0; 8]), reason::PROTOCOL_ERROR),
            (parse(kind::PING, 0, 0, &[0; 3]), reason::FRAME_SIZE_ERROR),
            (parse(kind::GOAWAY, 0, 1, &[0; 8]), reason::PROTOCOL_ERROR),
            (parse(kind::GOAWAY, 0, 0, &[0; 7]), reason::FRAME_SIZE_ERROR),
            (
                parse(kind::RST_STREAM, 0, 0, &[0; 4]),
                reason::PROTOCOL_ERROR,
            ),
            (
                parse(kind::RST_STREAM, 0, 1, &[0; 5]),
                reason::FRAME_SIZE_ERROR,
            ),
            (
                parse(kind::WINDOW_UPDATE, 0, 0, &[0; 4]),
                reason::PROTOCOL_ERROR,
            ),
            (
                parse(kind::WINDOW_UPDATE, 0, 1, &[0; 3]),
                reason::FRAME_SIZE_ERROR,
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(code(got), want, "case {i}");
        }
    }

    #[test]
    fn well_formed_control_frames_are_read() {
        assert_eq!(
            parse(kind::GOAWAY, 0, 0, &[0x80, 0, 0, 7, 0, 0, 0, 2, 9]),
            Ok(ParsedFrame::GoAway { last: 7, code: 2 })
        );
        assert_eq!(
            parse(kind::RST_STREAM, 0, 3, &[0, 0, 0, 8]),
            Ok(ParsedFrame::RstStream { id: 3, code: 8 })
        );
        // A zero increment on a stream is the stream's error, not the connection's.
        assert_eq!(
            parse(kind::WINDOW_UPDATE, 0, 3, &[0x80, 0, 0, 0]),
            Ok(ParsedFrame::WindowUpdate {
                id: 3,
                increment: 0
            })
        );
        assert_eq!(
            parse(kind::PING, flag::ACK, 0, &[1; 8]),
            Ok(ParsedFrame::Ping {
                ack: true,
                data: Bytes::from_static(&[1; 8])
            })
        );
        assert_eq!(
            parse(kind::PUSH_PROMISE, 0, 1, &[]),
            Ok(ParsedFrame::PushPromise)
        );
        assert_eq!(parse(0x2, 0, 1, &[0; 5]), Ok(ParsedFrame::Ignored)); // PRIORITY
        assert_eq!(parse(0xee, 0xff, 0, &[1, 2]), Ok(ParsedFrame::Ignored));
    }

    #[test]
    fn the_connection_window_stays_within_31_bits() {
        let mut window = MAX_WINDOW - 10;
        assert_eq!(grow_connection_window(&mut window, 10), Ok(()));
        let e = grow_connection_window(&mut window, 1).unwrap_err();
        assert_eq!(e.code, reason::FLOW_CONTROL_ERROR);
    }

    proptest! {
        /// Any frame parses or is refused; none panics.
        #[test]
        fn no_frame_panics(
            ty in 0u8..12,
            flags: u8,
            id in 0u32..8,
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            continuing in proptest::option::of(0u32..4),
        ) {
            let _ = parse_frame(ty, flags, id, Bytes::from(payload), continuing);
        }
    }
}
