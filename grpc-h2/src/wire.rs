//! HTTP/2 on the wire, as Fulcrum's own client ([`crate::client`]) and server
//! ([`crate::own_server`]) write and read it: frame types, flags, error codes and settings
//! (RFC 9113), frame headers and the few frames both send, HPACK's integer and literal
//! encodings (RFC 7541; both encode without the dynamic table), and the output buffer both
//! write from.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

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

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2), left out of a request whatever the caller passed.
pub(crate) const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Drops a padded frame's padding (RFC 9113 §6.1).
pub(crate) fn unpad(payload: &mut Bytes) -> Result<(), ()> {
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
