//! gRPC messages on `h2`: how they are sent ([`GrpcFrame`]), how a body is gathered as it
//! arrives ([`Received`]) and cut into messages ([`Deframer`]), and `h2`'s errors as statuses.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tonic::Status;

/// The status of a call that `h2` failed (the stream or the connection broke), with the error
/// as its source: tonic's mapping of HTTP/2 errors.
pub fn h2_status(e: h2::Error) -> Status {
    Status::from_error(Box::new(e))
}

/// One gRPC message as sent: the 5-byte prefix (not compressed, length) and the message, as
/// one buffer without copying the message (written with the frame headers in one `writev`).
#[derive(Debug, Clone)]
pub struct GrpcFrame {
    prefix: [u8; 5],
    /// How much of `prefix` was consumed.
    at: usize,
    message: Bytes,
}

impl GrpcFrame {
    /// `message` behind its prefix (`len` is its length).
    #[inline]
    pub fn new(len: u32, message: Bytes) -> Self {
        let l = len.to_be_bytes();
        Self {
            prefix: [0, l[0], l[1], l[2], l[3]],
            at: 0,
            message,
        }
    }

    /// Bytes sent as they are (already framed, or part of a body relayed as it streams).
    #[inline]
    pub fn raw(bytes: Bytes) -> Self {
        Self {
            prefix: [0; 5],
            at: 5,
            message: bytes,
        }
    }
}

impl Buf for GrpcFrame {
    #[inline]
    fn remaining(&self) -> usize {
        self.prefix.len() - self.at + self.message.len()
    }

    #[inline]
    fn chunk(&self) -> &[u8] {
        if self.at < self.prefix.len() {
            &self.prefix[self.at..]
        } else {
            &self.message
        }
    }

    #[inline]
    fn advance(&mut self, mut cnt: usize) {
        let in_prefix = (self.prefix.len() - self.at).min(cnt);
        self.at += in_prefix;
        cnt -= in_prefix;
        self.message.advance(cnt);
    }

    #[inline]
    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        if self.at < self.prefix.len() && n < dst.len() {
            dst[n] = IoSlice::new(&self.prefix[self.at..]);
            n += 1;
        }
        if !self.message.is_empty() && n < dst.len() {
            dst[n] = IoSlice::new(&self.message);
            n += 1;
        }
        n
    }
}

/// A gRPC body as it arrives (a node's answer, a client's request): usually one chunk (kept as
/// it is, no copy), else gathered.
#[derive(Debug, Default)]
pub enum Received {
    /// Nothing yet.
    #[default]
    Nothing,
    /// One chunk, as `h2` handed it over.
    One(Bytes),
    /// Several chunks, copied together.
    Many(BytesMut),
}

impl Received {
    /// Adds a chunk.
    #[inline]
    pub fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::take(self) {
            Received::Nothing => Received::One(chunk),
            Received::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + chunk.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                Received::Many(all)
            }
            Received::Many(mut all) => {
                all.extend_from_slice(&chunk);
                Received::Many(all)
            }
        };
    }

    /// What has arrived so far.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        match self {
            Received::Nothing => &[],
            Received::One(b) => b,
            Received::Many(b) => b,
        }
    }

    /// Everything received, as one buffer (empty if nothing was).
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        match self {
            Received::Nothing => Bytes::new(),
            Received::One(b) => b,
            Received::Many(b) => b.freeze(),
        }
    }
}

/// Checks a message's compression flag (its first byte): 0, since nothing here negotiates
/// compression. Tonic's statuses for 1 (compressed without `grpc-encoding`) and for any other
/// value, whose message ends with `context` (where the message was read, as tonic says it).
pub fn uncompressed(flag: u8, context: impl std::fmt::Display) -> Result<(), Status> {
    match flag {
        0 => Ok(()),
        1 => Err(Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was \
             specified",
        )),
        f => Err(Status::internal(format!(
            "protocol error: received message with invalid compression flag: {f} (valid flags \
             are 0 and 1){context}"
        ))),
    }
}

/// Cuts a streaming request body into its messages as the chunks arrive, refusing a message
/// over a size limit as soon as its prefix shows it, and a compressed one (nothing here
/// negotiates compression), with the statuses tonic's decoder gives.
#[derive(Debug)]
pub struct Deframer {
    buffer: BytesMut,
    max: usize,
}

impl Deframer {
    /// A deframer refusing messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max,
        }
    }

    /// Adds a chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next whole message (without its prefix), if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        let b = &self.buffer;
        if b.len() < 5 {
            return Ok(None);
        }
        uncompressed(b[0], "")?;
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > self.max {
            return Err(Status::resource_exhausted(format!(
                "a {len} byte message is over the limit of {} bytes",
                self.max
            )));
        }
        if b.len() < 5 + len {
            return Ok(None);
        }
        let mut frame = self.buffer.split_to(5 + len);
        frame.advance(5);
        Ok(Some(frame.freeze()))
    }

    /// Whether part of a message is waiting for the rest (at the end of a body: a truncated
    /// message).
    pub fn is_partial(&self) -> bool {
        !self.buffer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(&(message.len() as u32).to_be_bytes());
        b.extend_from_slice(message);
        b
    }

    #[test]
    fn a_frame_is_its_prefix_then_its_message() {
        let mut f = GrpcFrame::new(3, Bytes::from_static(b"abc"));
        assert_eq!(f.remaining(), 8);
        let mut out = Vec::new();
        while f.has_remaining() {
            let c = f.chunk().to_vec();
            out.extend_from_slice(&c[..c.len().min(2)]);
            f.advance(c.len().min(2));
        }
        assert_eq!(out, framed(b"abc"));
        let raw = GrpcFrame::raw(Bytes::from_static(b"xyz"));
        assert_eq!(raw.chunk(), b"xyz");
        assert_eq!(raw.remaining(), 3);
    }

    #[test]
    fn received_keeps_one_chunk_and_gathers_several() {
        let mut r = Received::default();
        assert!(r.bytes().is_empty());
        r.push(Bytes::from_static(b"ab"));
        assert!(matches!(r, Received::One(_)));
        r.push(Bytes::from_static(b"cd"));
        r.push(Bytes::from_static(b"e"));
        assert_eq!(r.into_bytes(), Bytes::from_static(b"abcde"));
    }

    #[test]
    fn the_deframer_cuts_messages_across_chunks() {
        let mut all = framed(b"first");
        all.extend(framed(b""));
        all.extend(framed(b"third one"));
        let mut d = Deframer::new(1024);
        let mut got = Vec::new();
        // One byte at a time: every split point.
        for b in &all {
            d.push(&[*b]);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, [&b"first"[..], b"", b"third one"]);
        assert!(!d.is_partial());
        d.push(&framed(b"cut")[..6]);
        assert_eq!(d.next_message().unwrap(), None);
        assert!(d.is_partial());
    }

    #[test]
    fn the_deframer_refuses_compressed_and_oversized_messages_from_their_prefix() {
        let mut d = Deframer::new(4);
        d.push(&[1, 0, 0, 0, 1]);
        assert_eq!(d.next_message().unwrap_err().code(), Code::Internal);
        let mut d = Deframer::new(4);
        d.push(&[7, 0, 0, 0, 1]);
        assert_eq!(d.next_message().unwrap_err().code(), Code::Internal);
        let mut d = Deframer::new(4);
        // The prefix alone is enough to refuse it.
        d.push(&[0, 0, 0, 0, 5]);
        let e = d.next_message().unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("5 byte"), "{}", e.message());
    }
}
