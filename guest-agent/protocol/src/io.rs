//! Async helpers over tokio's `AsyncRead`/`AsyncWrite` (feature "tokio").

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Decoder, Frame, FrameError, check_len};

/// Size of one read when no large frame is pending: enough for many small
/// frames per read system call.
const READ_CHUNK: usize = 64 << 10;
/// Largest single read reservation while receiving a big frame.
const MAX_READ_CHUNK: usize = 1 << 20;

/// Reads frames with as few read calls as possible: each read takes whatever
/// the peer has sent (up to a chunk), and every complete frame in it is
/// returned without another read.
///
/// [`FrameReader::read_frame`] is cancel-safe (bytes read stay buffered), so
/// it can sit in a `select!`.
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    decoder: Decoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R) -> FrameReader<R> {
        FrameReader {
            reader,
            decoder: Decoder::new(),
        }
    }

    /// Like [`FrameReader::new`], with bytes that were already read from
    /// `reader` (e.g. past a text preamble) to be decoded first.
    pub fn with_buffered(reader: R, bytes: &[u8]) -> FrameReader<R> {
        let mut decoder = Decoder::new();
        decoder.feed(bytes);
        FrameReader { reader, decoder }
    }

    /// The next frame; `Ok(None)` on a clean end of stream (between frames).
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(frame) = self.decoder.decode()? {
                return Ok(Some(frame));
            }
            let want = self
                .decoder
                .missing()
                .unwrap_or(0)
                .clamp(READ_CHUNK, MAX_READ_CHUNK);
            let buf = self.decoder.read_buffer(want);
            if self.reader.read_buf(buf).await? == 0 {
                return match self.decoder.buffered() {
                    0 => Ok(None),
                    buffered => Err(FrameError::Truncated { buffered }),
                };
            }
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.reader
    }

    pub fn into_inner(self) -> R {
        self.reader
    }
}

/// Reads one frame with exact-size reads (no read-ahead, so nothing past the
/// frame is consumed). `Ok(None)` on a clean end of stream. Prefer
/// [`FrameReader`] on a long-lived stream: it needs fewer read calls.
///
/// The length prefix is checked before any buffer is allocated, and the body
/// buffer grows only as bytes actually arrive.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated { buffered: got }),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(prefix) as usize;
    check_len(len)?;
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    let read = (&mut *reader)
        .take(len as u64)
        .read_to_end(&mut body)
        .await?;
    if read < len {
        return Err(FrameError::Truncated { buffered: 4 + read });
    }
    Frame::decode_body(&body).map(Some)
}

/// Writes one frame with a single `write_all` (one write call for frames that
/// fit the socket buffer). To send several frames at once, encode them with
/// [`Frame::encode_into`] into one buffer and write that.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}
