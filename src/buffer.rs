//! The bounded output queue a connection keeps while the kernel cannot take
//! more bytes.
//!
//! Most writes never block: the loop writes straight from its read buffer
//! and only when the kernel's send buffer is full does anything land here.
//! So an [`OutQueue`] is created on the first short write and dropped again
//! once it drains, which keeps an idle connection free of buffers.
//!
//! Two kinds of chunk share one queue:
//! - owned bytes (echo replies, one client's own messages), appended to the
//!   last owned chunk so a trickle of small writes does not make a chunk each;
//! - shared chunks (`Rc<[u8]>`), one allocation referenced from every
//!   recipient of a chat broadcast instead of a copy per recipient.
//!
//! The queue never holds more than its `limit` bytes: [`OutQueue::push`]
//! refuses data that would pass it, and the caller decides what that means
//! (echo stops reading; chat drops the slow consumer).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

/// Most chunks handed to one vectored write (Linux allows 1024; a few
/// dozen already fill any socket buffer).
const MAX_IOVECS: usize = 64;

/// Owned chunks stop growing past this, so that a drained prefix is freed
/// in pieces rather than holding the whole backlog until the end.
const OWNED_CHUNK_MAX: usize = 64 * 1024;

/// Most that one push may add to [`OutQueue::footprint`] beyond the bytes
/// pushed: appending to an owned chunk may double its capacity, and owned
/// chunks stop growing at `OWNED_CHUNK_MAX`.
pub const GROWTH_SLACK: usize = 2 * OWNED_CHUNK_MAX;

/// One piece of pending output.
#[derive(Debug)]
enum Chunk {
    Owned(Vec<u8>),
    Shared(Rc<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(r) => r,
        }
    }
}

/// Returned by [`OutQueue::push`] when the bytes would take the queue past
/// its limit. Nothing was queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// A FIFO of bytes waiting for the socket, bounded by `limit` bytes.
#[derive(Debug)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    head: usize,
    /// Bytes queued and not yet written.
    len: usize,
    /// Bytes the chunks occupy: owned chunks' capacity, shared chunks'
    /// whole length (see [`OutQueue::footprint`]).
    held: usize,
    limit: usize,
}

impl OutQueue {
    /// An empty queue that holds at most `limit` bytes.
    ///
    /// ```
    /// use std::rc::Rc;
    /// use reactor::buffer::OutQueue;
    ///
    /// let mut q = OutQueue::new(16);
    /// q.push(b"hello ").unwrap();
    /// // A broadcast chunk is queued by reference, not copied.
    /// let shared: Rc<[u8]> = Rc::from(&b"world"[..]);
    /// q.push_shared(shared.clone(), 0).unwrap();
    /// assert_eq!(Rc::strong_count(&shared), 2);
    /// // Past the limit, a push is refused whole.
    /// assert!(q.push(b"way too much text").is_err());
    /// // Any `Write` will do as the socket; a Vec takes everything.
    /// let mut socket = Vec::new();
    /// q.write_to(&mut socket, usize::MAX).unwrap();
    /// assert_eq!(socket, b"hello world");
    /// assert!(q.is_empty());
    /// ```
    pub fn new(limit: usize) -> Self {
        OutQueue {
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
            held: 0,
            limit,
        }
    }

    /// Bytes of memory the queued chunks occupy, at least [`OutQueue::len`]:
    /// an owned chunk counts its capacity (growth slack, and a written
    /// prefix not yet freed), a shared chunk its whole length, once in each
    /// queue that holds it. This is what `--max-memory` counts.
    pub fn footprint(&self) -> usize {
        self.held
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many more bytes fit under the limit.
    pub fn space(&self) -> usize {
        self.limit.saturating_sub(self.len)
    }

    /// Queues a copy of `bytes`, or refuses all of them with [`Full`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), Full> {
        if bytes.len() > self.space() {
            return Err(Full);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // The front chunk may be partly written; appending to it is still
        // fine because `head` counts from its start.
        if let Some(Chunk::Owned(last)) = self.chunks.back_mut() {
            if last.len() + bytes.len() <= OWNED_CHUNK_MAX {
                let before = last.capacity();
                last.extend_from_slice(bytes);
                self.held += last.capacity() - before;
                self.len += bytes.len();
                return Ok(());
            }
        }
        let chunk = bytes.to_vec();
        self.held += chunk.capacity();
        self.chunks.push_back(Chunk::Owned(chunk));
        self.len += bytes.len();
        Ok(())
    }

    /// Queues a shared chunk from byte `from` on, without copying it, or
    /// refuses it with [`Full`].
    pub fn push_shared(&mut self, chunk: Rc<[u8]>, from: usize) -> Result<(), Full> {
        let n = chunk.len().saturating_sub(from);
        if n > self.space() {
            return Err(Full);
        }
        if n == 0 {
            return Ok(());
        }
        if from > 0 {
            // Only a chunk that was partly written straight to the socket
            // arrives with an offset, and that happens only on an empty
            // queue, so it becomes the front chunk.
            debug_assert!(self.chunks.is_empty());
            self.head = from;
        }
        self.held += chunk.len();
        self.chunks.push_back(Chunk::Shared(chunk));
        self.len += n;
        Ok(())
    }

    /// Writes queued bytes to `w` until the queue is empty, `w` would block
    /// or `budget` bytes went out. Returns the number of bytes written.
    ///
    /// `WouldBlock` is not an error here: it ends the flush with `Ok`, and
    /// the caller keeps `WRITABLE` interest while the queue is non-empty.
    /// `Interrupted` is retried.
    pub fn write_to<W: Write>(&mut self, w: &mut W, budget: usize) -> io::Result<usize> {
        let mut written = 0;
        while !self.is_empty() && written < budget {
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                let mut skip = self.head;
                for chunk in self.chunks.iter().take(MAX_IOVECS) {
                    slices[count] = IoSlice::new(&chunk.bytes()[skip..]);
                    skip = 0;
                    count += 1;
                }
                match w.write_vectored(&slices[..count]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            };
            self.consume(n);
            written += n;
        }
        Ok(written)
    }

    /// Drops `n` written bytes from the front.
    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let front_left = self.chunks[0].bytes().len() - self.head;
            if n < front_left {
                self.head += n;
                return;
            }
            n -= front_left;
            self.head = 0;
            if let Some(done) = self.chunks.pop_front() {
                self.held -= match done {
                    Chunk::Owned(v) => v.capacity(),
                    Chunk::Shared(r) => r.len(),
                };
            }
        }
        if self.chunks.is_empty() {
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call and then blocks
    /// after `calls` calls.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let n = buf.len().min(self.cap);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn trickle(cap: usize, calls: usize) -> Trickle {
        Trickle {
            got: Vec::new(),
            cap,
            calls,
        }
    }

    mod footprint {
        use super::*;

        #[test]
        fn counts_what_is_held_and_returns_to_zero_when_drained() {
            let mut q = OutQueue::new(1 << 20);
            for _ in 0..100 {
                q.push(&[1; 1000]).unwrap();
            }
            let shared: Rc<[u8]> = Rc::from(&[2u8; 5000][..]);
            q.push_shared(shared, 0).unwrap();
            assert!(q.footprint() >= q.len(), "{} < {}", q.footprint(), q.len());
            assert!(q.footprint() <= 2 * q.len());
            let mut w = trickle(777, 40);
            q.write_to(&mut w, usize::MAX).unwrap();
            assert!(q.footprint() >= q.len());
            let mut w = trickle(usize::MAX, 1000);
            q.write_to(&mut w, usize::MAX).unwrap();
            assert!(q.is_empty());
            assert_eq!(q.footprint(), 0);
        }
    }

    mod empty {
        use super::*;

        #[test]
        fn new_queue_is_empty_with_full_space() {
            let q = OutQueue::new(10);
            assert!(q.is_empty());
            assert_eq!(q.space(), 10);
        }

        #[test]
        fn flushing_an_empty_queue_writes_nothing() {
            let mut q = OutQueue::new(10);
            let mut w = trickle(100, 10);
            assert_eq!(q.write_to(&mut w, usize::MAX).unwrap(), 0);
            assert_eq!(w.calls, 10, "no write call was made");
        }
    }

    mod bounded {
        use super::*;

        #[test]
        fn push_up_to_the_limit_is_accepted() {
            let mut q = OutQueue::new(10);
            q.push(&[1; 6]).unwrap();
            q.push(&[2; 4]).unwrap();
            assert_eq!(q.len(), 10);
            assert_eq!(q.space(), 0);
        }

        #[test]
        fn push_past_the_limit_is_refused_whole() {
            let mut q = OutQueue::new(10);
            q.push(&[1; 6]).unwrap();
            assert_eq!(q.push(&[2; 5]), Err(Full));
            assert_eq!(q.len(), 6, "nothing of the refused push was kept");
        }

        #[test]
        fn shared_chunk_past_the_limit_is_refused() {
            let mut q = OutQueue::new(4);
            let chunk: Rc<[u8]> = Rc::from(&b"hello"[..]);
            assert_eq!(q.push_shared(chunk.clone(), 0), Err(Full));
            q.push_shared(chunk, 1).unwrap();
            assert_eq!(q.len(), 4);
        }

        #[test]
        fn writing_frees_space_again() {
            let mut q = OutQueue::new(10);
            q.push(&[7; 10]).unwrap();
            let mut w = trickle(4, 1);
            q.write_to(&mut w, usize::MAX).unwrap();
            assert_eq!(q.space(), 4);
            q.push(&[8; 4]).unwrap();
        }
    }

    mod partial_writes {
        use super::*;

        #[test]
        fn bytes_come_out_in_order_across_short_writes() {
            let mut q = OutQueue::new(1 << 20);
            let shared: Rc<[u8]> = Rc::from(&b"-shared-"[..]);
            q.push(b"abc").unwrap();
            q.push_shared(shared.clone(), 0).unwrap();
            q.push(b"def").unwrap();
            let mut w = trickle(3, 1000);
            let n = q.write_to(&mut w, usize::MAX).unwrap();
            assert_eq!(n, 3 + 8 + 3);
            assert_eq!(w.got, b"abc-shared-def");
            assert!(q.is_empty());
        }

        #[test]
        fn a_partly_sent_shared_chunk_starts_at_its_offset() {
            let mut q = OutQueue::new(100);
            q.push_shared(Rc::from(&b"-shared-"[..]), 3).unwrap();
            q.push(b"!").unwrap();
            let mut w = trickle(2, 1000);
            q.write_to(&mut w, usize::MAX).unwrap();
            assert_eq!(w.got, b"ared-!");
        }

        #[test]
        fn would_block_stops_the_flush_and_keeps_the_rest() {
            let mut q = OutQueue::new(100);
            q.push(b"0123456789").unwrap();
            let mut w = trickle(4, 1);
            assert_eq!(q.write_to(&mut w, usize::MAX).unwrap(), 4);
            assert_eq!(q.len(), 6);
            let mut w2 = trickle(100, 1);
            q.write_to(&mut w2, usize::MAX).unwrap();
            assert_eq!(w2.got, b"456789");
        }

        #[test]
        fn budget_limits_one_flush() {
            let mut q = OutQueue::new(100);
            q.push(&[1; 50]).unwrap();
            let mut w = trickle(10, 100);
            assert_eq!(q.write_to(&mut w, 20).unwrap(), 20);
            assert_eq!(q.len(), 30);
        }

        #[test]
        fn appending_after_a_partial_write_keeps_order() {
            let mut q = OutQueue::new(100);
            q.push(b"hello ").unwrap();
            let mut w = trickle(2, 1);
            q.write_to(&mut w, usize::MAX).unwrap();
            q.push(b"world").unwrap();
            let mut w2 = trickle(100, 10);
            q.write_to(&mut w2, usize::MAX).unwrap();
            assert_eq!(w2.got, b"llo world");
        }

        #[test]
        fn large_backlogs_are_split_into_bounded_chunks() {
            let mut q = OutQueue::new(1 << 20);
            for _ in 0..300 {
                q.push(&[5; 1000]).unwrap();
            }
            assert!(q.chunks.len() >= 300_000 / OWNED_CHUNK_MAX);
            assert!(q.chunks.iter().all(|c| c.bytes().len() <= OWNED_CHUNK_MAX));
        }
    }

    mod errors {
        use super::*;

        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        #[test]
        fn a_real_error_is_returned() {
            let mut q = OutQueue::new(10);
            q.push(b"x").unwrap();
            let err = q.write_to(&mut Broken, usize::MAX).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
            assert_eq!(q.len(), 1);
        }
    }
}
