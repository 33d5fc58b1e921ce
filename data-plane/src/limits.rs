//! The inbound message size limit, answered the way gRPC says: RESOURCE_EXHAUSTED.
//!
//! tonic's own limit answers OUT_OF_RANGE, and only for services it decodes. The router's
//! server (`ingress::connection`) reads the 5-byte gRPC frame headers as a request body
//! streams by ([`LimitedBody`], or the scanner directly on the `ModelInfer` path) and fails the
//! call with RESOURCE_EXHAUSTED as soon as a header announces a message over the limit, before
//! any of it is buffered. It never decodes or copies the data, so it also guards the
//! pass-through.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame};
use tonic::Status;

/// Largest inbound message accepted by default. Tensors of a few megabytes are common
/// (images, long token sequences); 64 MiB admits large batches while still bounding what one
/// call can make the router hold.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Where the parser is in the gRPC framing: reading a 5-byte header, or skipping a message body.
#[derive(Debug)]
pub(crate) struct FrameScanner {
    limit: usize,
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl FrameScanner {
    /// A scanner refusing messages over `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
        }
    }

    /// Scans one chunk of the body; errors when a header announces an oversized message.
    pub(crate) fn scan(&mut self, mut chunk: &[u8]) -> Result<(), Status> {
        while !chunk.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(chunk.len());
                self.body_left -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if len > self.limit {
                    return Err(Status::resource_exhausted(format!(
                        "request message is {len} bytes, over this router's limit of {} bytes",
                        self.limit
                    )));
                }
                self.body_left = len;
            }
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with RESOURCE_EXHAUSTED when a message is over the limit.
    #[derive(Debug)]
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        scanner: FrameScanner,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`, capping each message at `limit` bytes.
    pub fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            scanner: FrameScanner::new(limit),
            failed: false,
        }
    }
}

impl<B> HttpBody for LimitedBody<B>
where
    B: HttpBody<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.scanner.scan(data.chunk())
                {
                    *this.failed = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_chunking() {
        let stream: Vec<u8> = [frame(10), frame(0), frame(100)].concat();
        for chunk in [1, 2, 3, 5, 7, 64, 1000] {
            let mut s = FrameScanner::new(100);
            for c in stream.chunks(chunk) {
                s.scan(c).unwrap();
            }
        }
    }

    #[test]
    fn an_oversized_message_is_caught_at_its_header() {
        let stream: Vec<u8> = [frame(10), frame(101)].concat();
        for chunk in [1, 4, 16, 1000] {
            let mut s = FrameScanner::new(100);
            let err = stream
                .chunks(chunk)
                .map(|c| s.scan(c))
                .find_map(Result::err)
                .expect("limit not enforced");
            assert_eq!(err.code(), tonic::Code::ResourceExhausted);
            assert!(err.message().contains("101 bytes"), "{}", err.message());
        }
    }
}
