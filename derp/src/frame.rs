//! Async DERP frame reading over any byte stream, on top of `warren_proto::derp`'s codec. The
//! reader checks each header against the type's limit before buffering its payload, and is
//! cancel-safe (bytes read stay in its buffer, a skip in progress is remembered), so it can sit
//! in a `select!`.
//!
//! Frames the reader's owner would ignore (unknown types, and whatever else its skip rule
//! names) are read and discarded in chunks, never buffered whole; and a buffer grown for a
//! large frame is given back once that frame is decoded, so an idle connection holds at most
//! [`KEEP_CAPACITY`] bytes.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::trace;
use warren_proto::derp::{Frame, FrameError, FrameType, HEADER_LEN};

/// The reader asks the stream for up to this many bytes at once (Tailscale's server reads
/// through a 32 KiB buffer too); the buffer only grows past it for a frame that is larger.
const READ_CHUNK: usize = 32 << 10;
/// Space below which the buffer is grown before the next read.
const MIN_READ: usize = 2 << 10;
/// The most buffer a reader keeps between frames: room for a full-size packet frame plus a
/// read chunk. Above it (after a large `ClientInfo` or `ServerInfo`) the buffer shrinks back.
pub(crate) const KEEP_CAPACITY: usize = 128 << 10;

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
    /// Which frames to discard unread.
    skip: fn(FrameType) -> bool,
    /// Payload bytes of a skipped frame still to discard.
    skipping: usize,
}

/// Frame types this codec does not know: every reader skips them (as Tailscale's do).
pub(crate) fn is_unknown(frame_type: FrameType) -> bool {
    frame_type.name().is_none()
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader whose stream already delivered `leftover` (bytes read past an HTTP head).
    pub(crate) fn with_leftover(inner: R, leftover: Vec<u8>) -> Self {
        Self {
            inner,
            buf: leftover,
            start: 0,
            limit: FrameType::max_payload_len,
            skip: is_unknown,
            skipping: 0,
        }
    }

    /// From now on, discards the frames `skip` names (it should name the unknown ones too)
    /// instead of returning them.
    pub(crate) fn set_skip(&mut self, skip: fn(FrameType) -> bool) {
        self.skip = skip;
    }

    /// The buffer's capacity, for tests of what a connection holds.
    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Applies a tighter per-type payload limit than the codec's.
    pub(crate) fn with_limit(mut self, limit: fn(FrameType) -> usize) -> Self {
        self.limit = limit;
        self
    }

    /// The next frame that is not skipped. Cancel-safe.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if self.skipping > 0 {
                let n = (self.buf.len() - self.start).min(self.skipping);
                self.start += n;
                self.skipping -= n;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
            }
            let avail = &self.buf[self.start..];
            if self.skipping == 0
                && let Some((frame_type, len)) = Frame::decode_header(avail)?
            {
                if len > (self.limit)(frame_type) {
                    return Err(FrameError::FrameTooLarge { frame_type, len }.into());
                }
                if (self.skip)(frame_type) {
                    trace!(%frame_type, len, "skipping frame");
                    self.start += HEADER_LEN;
                    self.skipping = len;
                    continue;
                }
                let end = HEADER_LEN + len;
                if let Some(payload) = avail.get(HEADER_LEN..end) {
                    let frame = Frame::decode_payload(frame_type, payload)?;
                    self.start += end;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    self.release_if_oversized();
                    return Ok(frame);
                }
                // Make room for the whole frame once; its size is within the type's limit.
                self.compact();
                self.buf.reserve_exact(end.saturating_sub(self.buf.len()));
            } else {
                self.compact();
            }
            // Read in large chunks: one syscall then brings in a burst of packets. (While
            // skipping, the buffer is empty: the skipped bytes pass through one chunk.)
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve_exact(READ_CHUNK);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Gives back a buffer grown past [`KEEP_CAPACITY`] for a large frame.
    fn release_if_oversized(&mut self) {
        if self.buf.capacity() > KEEP_CAPACITY {
            self.compact();
            self.buf.shrink_to(READ_CHUNK);
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

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::NodePublicKey;
    use warren_proto::derp::MAX_INFO_LEN;

    /// Writes `bytes` into a pipe from a task (the pipe holds less than a large frame).
    fn feed(bytes: Vec<u8>) -> FrameReader<tokio::io::DuplexStream> {
        let (mut ours, theirs) = tokio::io::duplex(16 << 10);
        tokio::spawn(async move {
            for chunk in bytes.chunks(7_000) {
                if ours.write_all(chunk).await.is_err() {
                    return;
                }
            }
            // Keep the pipe open so the reader waits rather than sees an end.
            std::future::pending::<()>().await;
        });
        FrameReader::with_leftover(theirs, Vec::new())
    }

    fn encode(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        out
    }

    fn packet(len: usize) -> Frame {
        Frame::SendPacket {
            dst: NodePublicKey::from_bytes([1; 32]),
            packet: vec![0xab; len],
        }
    }

    #[tokio::test]
    async fn unknown_frames_are_skipped_without_being_buffered() {
        let unknown = Frame::Unknown {
            frame_type: FrameType(0x7f),
            payload: vec![0x55; MAX_INFO_LEN],
        };
        let mut reader = feed(encode(&[
            unknown.clone(),
            packet(100),
            unknown,
            Frame::Ping { data: [3; 8] },
        ]));
        assert_eq!(reader.read_frame().await.expect("frame"), packet(100));
        assert!(
            reader.buffer_capacity() <= KEEP_CAPACITY,
            "{}",
            reader.buffer_capacity()
        );
        assert_eq!(
            reader.read_frame().await.expect("frame"),
            Frame::Ping { data: [3; 8] }
        );
        assert!(
            reader.buffer_capacity() <= KEEP_CAPACITY,
            "{}",
            reader.buffer_capacity()
        );
    }

    #[tokio::test]
    async fn a_large_frame_gives_its_buffer_back() {
        let big = Frame::Health {
            problem: "x".repeat(MAX_INFO_LEN),
        };
        let mut reader = feed(encode(&[big.clone(), packet(64 << 10), packet(10)]));
        assert_eq!(reader.read_frame().await.expect("frame"), big);
        assert!(
            reader.buffer_capacity() <= KEEP_CAPACITY,
            "{}",
            reader.buffer_capacity()
        );
        // Full-size packets fit in what is kept: no shrinking and growing per packet.
        assert_eq!(reader.read_frame().await.expect("frame"), packet(64 << 10));
        assert_eq!(reader.read_frame().await.expect("frame"), packet(10));
        assert!(
            reader.buffer_capacity() <= KEEP_CAPACITY,
            "{}",
            reader.buffer_capacity()
        );
    }

    #[tokio::test]
    async fn a_skip_rule_drops_known_types_too_and_limits_still_apply() {
        let health = Frame::Health {
            problem: "y".repeat(300 << 10),
        };
        let mut reader = feed(encode(&[health, Frame::Ping { data: [1; 8] }]));
        reader.set_skip(|t| is_unknown(t) || t == FrameType::HEALTH);
        assert_eq!(
            reader.read_frame().await.expect("frame"),
            Frame::Ping { data: [1; 8] }
        );
        assert!(reader.buffer_capacity() <= KEEP_CAPACITY);
        // A skipped type is still refused past its limit, before anything is read of it.
        let mut header = vec![0x7f];
        header.extend_from_slice(&u32::try_from(MAX_INFO_LEN + 1).expect("fits").to_be_bytes());
        let mut reader = feed(header);
        assert!(matches!(
            reader.read_frame().await,
            Err(ReadError::Frame(FrameError::FrameTooLarge {
                frame_type: FrameType(0x7f),
                ..
            }))
        ));
    }
}
