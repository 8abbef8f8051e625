//! Async DERP frame reading over any byte stream, on top of `warren_proto::derp`'s codec. The
//! reader checks each header against the type's limit before buffering its payload, and is
//! cancel-safe (bytes read stay in its buffer), so it can sit in a `select!`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use warren_proto::derp::{Frame, FrameError, FrameType, HEADER_LEN};

/// The reader asks the stream for up to this many bytes at once (Tailscale's server reads
/// through a 32 KiB buffer too); the buffer only grows past it for a frame that is larger.
const READ_CHUNK: usize = 32 << 10;
/// Space below which the buffer is grown before the next read.
const MIN_READ: usize = 2 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the stream (cleanly between frames, or in the middle of one).
    #[error("connection closed")]
    Closed,
    /// The bytes were not a valid frame, or it was larger than allowed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from `R`.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    limit: fn(FrameType) -> usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader whose stream already delivered `leftover` (bytes read past an HTTP head).
    pub(crate) fn with_leftover(inner: R, leftover: Vec<u8>) -> Self {
        Self {
            inner,
            buf: leftover,
            start: 0,
            limit: FrameType::max_payload_len,
        }
    }

    /// Applies a tighter per-type payload limit than the codec's.
    pub(crate) fn with_limit(mut self, limit: fn(FrameType) -> usize) -> Self {
        self.limit = limit;
        self
    }

    /// The next frame. Cancel-safe.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            let avail = &self.buf[self.start..];
            if let Some((frame_type, len)) = Frame::decode_header(avail)? {
                if len > (self.limit)(frame_type) {
                    return Err(FrameError::FrameTooLarge { frame_type, len }.into());
                }
                let end = HEADER_LEN + len;
                if let Some(payload) = avail.get(HEADER_LEN..end) {
                    let frame = Frame::decode_payload(frame_type, payload)?;
                    self.start += end;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    return Ok(frame);
                }
                // Make room for the whole frame once; its size is within the type's limit.
                self.compact();
                self.buf.reserve(end.saturating_sub(self.buf.len()));
            } else {
                self.compact();
            }
            // Read in large chunks: one syscall then brings in a burst of packets.
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Encodes `frame` and writes it (without flushing).
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(frame.encoded_len());
    frame.encode(&mut buf);
    w.write_all(&buf).await
}
