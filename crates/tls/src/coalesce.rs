//! Fewer, fuller TLS records on HTTP/2 connections.
//!
//! An HTTP/2 connection task writes and flushes whatever frames are queued each time it
//! is polled. A unary gRPC answer is queued in steps (headers and message, then trailers)
//! by the call's own task, often on the other worker thread, so the connection task
//! woken by the first step used to send the answer as two TLS records and two `writev`s,
//! and the peer had to read and decrypt two records. Likewise, calls relayed at the same
//! moment left one record each. [`Coalesced`] holds the bytes written until a flush and,
//! the first time that flush finds bytes waiting, puts the task back at the end of its
//! worker's queue once: the steps and calls queued meanwhile leave in the same record.
//! The figures are in BENCHMARKS.md (sixth round).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes through without waiting for the flush: a bound on
/// memory per connection when a large answer is being written.
const MAX_PENDING: usize = 64 * 1024;
/// Buffer capacity kept between flushes; a connection that once wrote a large answer
/// gives the rest back.
const KEEP_CAPACITY: usize = 16 * 1024;

/// A stream whose writes leave at the next flush, after the flushing task has yielded
/// once (see the module documentation).
#[derive(Debug)]
pub struct Coalesced<S> {
    inner: S,
    pending: Vec<u8>,
    /// The flush of the current `pending` bytes has already yielded once.
    yielded: bool,
}

impl<S> Coalesced<S> {
    /// Wraps a stream.
    pub fn new(inner: S) -> Self {
        Coalesced {
            inner,
            pending: Vec::new(),
            yielded: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Writes every held byte to the inner stream.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = 0;
        let result = loop {
            if written == self.pending.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending[written..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                other => break other.map_ok(|_| ()),
            }
        };
        self.pending.drain(..written);
        if self.pending.is_empty() {
            self.yielded = false;
            if self.pending.capacity() > KEEP_CAPACITY {
                self.pending.shrink_to(KEEP_CAPACITY);
            }
        }
        result
    }

    /// Makes room for `len` more bytes: past [`MAX_PENDING`], what is held goes first.
    fn make_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() && self.pending.len() + len > MAX_PENDING {
            ready!(self.drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.make_room(cx, buf.len()))?;
        if buf.len() >= MAX_PENDING {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        ready!(self.make_room(cx, len))?;
        if len >= MAX_PENDING {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            self.pending.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            if !self.yielded {
                // Back of the queue once: whatever the tasks ahead queue on this
                // connection leaves with these bytes.
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(self.drain(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// How many polls a flush took to complete.
    async fn polls_to_flush<S: AsyncWrite + Unpin>(s: &mut Coalesced<S>) -> usize {
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            Pin::new(&mut *s).poll_flush(cx)
        })
        .await
        .unwrap();
        polls
    }

    #[tokio::test]
    async fn writes_leave_together_at_the_second_flush_poll() {
        let (near, mut far) = duplex(1 << 20);
        let mut s = Coalesced::new(near);
        s.write_all(b"headers+message").await.unwrap();
        s.write_all(b"|trailers").await.unwrap();
        let mut buf = [0u8; 64];
        // Nothing has left before a flush.
        let nothing_yet = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut far).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(nothing_yet);

        // The first poll of the flush yields and asks to be polled again.
        assert_eq!(polls_to_flush(&mut s).await, 2);
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"headers+message|trailers");

        // A flush with nothing held does not yield.
        assert_eq!(polls_to_flush(&mut s).await, 1);
    }

    #[tokio::test]
    async fn a_large_answer_goes_through_in_bounded_pieces_and_whole() {
        let (near, mut far) = duplex(1 << 22);
        let mut s = Coalesced::new(near);
        let answer: Vec<u8> = (0..3 * MAX_PENDING + 123).map(|i| i as u8).collect();
        for chunk in answer.chunks(16 * 1024 + 9) {
            s.write_all(chunk).await.unwrap();
            assert!(s.pending.len() <= MAX_PENDING);
        }
        s.flush().await.unwrap();
        assert!(s.pending.capacity() <= KEEP_CAPACITY);
        let mut got = vec![0u8; answer.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, answer);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held_first() {
        let (near, mut far) = duplex(1024);
        let mut s = Coalesced::new(near);
        s.write_all(b"goaway").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goaway");
    }
}
