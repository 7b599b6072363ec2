//! One client connection: its socket, its pending output and its state.
//!
//! The struct is kept small on purpose: an idle echo connection is the
//! socket, a generation, a timestamp and a few flag bits (about 32 bytes,
//! checked by a test), because the server is meant to hold tens of
//! thousands of them. Output storage ([`OutQueue`]) exists only while the
//! kernel's send buffer is full.

use std::io::{self, IoSlice, Write};
use std::rc::Rc;

use mio::{Interest, Token};

use super::stats::Stats;
use super::token::TokenName;
use crate::buffer::OutQueue;
use crate::net::io::write_until_blocked;
use crate::net::Stream;
use crate::protocol::{Audience, Close, Outbox};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading and writing.
    Open,
    /// The protocol asked to close: no more reading; close once the output
    /// queue is empty.
    Draining,
    /// Chat's too-long line: the reply is written and the write side shut;
    /// input is read and thrown away until EOF or the linger deadline, so
    /// the client sees the error line rather than a reset.
    Lingering,
}

/// Flag bits of [`Connection::flags`].
pub mod flag {
    /// The client sent EOF: nothing more to read.
    pub const READ_CLOSED: u8 = 1;
    /// The output queue reached `--max-buffer`: reading is suspended.
    pub const PAUSED: u8 = 1 << 1;
    /// A read or write failed: close at the next chance.
    pub const FAILED: u8 = 1 << 2;
    /// Output would have passed `--max-buffer` (chat: a slow consumer).
    pub const OVERFLOW: u8 = 1 << 3;
    /// After draining, shut the write side and linger (see [`super::Phase::Lingering`]).
    pub const REJECT: u8 = 1 << 4;
    /// The connection is on the loop's ready list already.
    pub const ON_READY_LIST: u8 = 1 << 5;
    /// Registered with `READABLE` interest.
    pub const REG_READABLE: u8 = 1 << 6;
    /// Registered with `WRITABLE` interest.
    pub const REG_WRITABLE: u8 = 1 << 7;
}

/// A client connection, as stored in the loop's slab.
#[derive(Debug)]
pub struct Connection<S> {
    /// The socket.
    pub stream: Stream,
    /// Output the kernel could not take yet; `None` while there is none.
    pub out: Option<Box<OutQueue>>,
    /// Milliseconds since the server started: when the last byte arrived
    /// (open) or when lingering ends (lingering).
    pub stamp: u64,
    /// Distinguishes this connection from earlier ones that used the same
    /// slab key; it is part of the connection's [`Token`].
    pub generation: u32,
    /// See [`Phase`].
    pub phase: Phase,
    /// See [`flag`].
    pub flags: u8,
    /// The protocol's per-client state.
    pub session: S,
}

impl<S> Connection<S> {
    /// Bytes waiting in the output queue.
    pub fn queued(&self) -> usize {
        self.out.as_ref().map_or(0, |q| q.len())
    }

    /// Tests a flag bit.
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// The interest this connection needs now, worked out from its state
    /// alone (after rustls' `tlsserver-mio`): readable while it may read,
    /// writable only while output is pending. `None` means it needs
    /// nothing more and should be closed.
    pub fn interest(&self) -> Option<Interest> {
        let readable = !self.has(flag::READ_CLOSED)
            && !self.has(flag::PAUSED)
            && self.phase != Phase::Draining;
        let writable = self.queued() > 0;
        match (readable, writable) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        }
    }

    /// The interest it is registered with now.
    pub fn registered(&self) -> Interest {
        match (self.has(flag::REG_READABLE), self.has(flag::REG_WRITABLE)) {
            (_, false) => Interest::READABLE,
            (false, true) => Interest::WRITABLE,
            (true, true) => Interest::READABLE | Interest::WRITABLE,
        }
    }

    /// Records the interest it was just registered with.
    pub fn set_registered(&mut self, i: Interest) {
        self.flags &= !(flag::REG_READABLE | flag::REG_WRITABLE);
        if i.is_readable() {
            self.flags |= flag::REG_READABLE;
        }
        if i.is_writable() {
            self.flags |= flag::REG_WRITABLE;
        }
    }

    /// Splits the connection into the outbox its protocol answers through
    /// and the protocol's session, which are used side by side.
    pub fn split<'a>(
        &'a mut self,
        token: Token,
        limit: usize,
        broadcasts: &'a mut Vec<Broadcast>,
        stats: &'a mut Stats,
    ) -> (ConnOutbox<'a>, &'a mut S) {
        let outbox = ConnOutbox {
            token,
            stream: &self.stream,
            out: &mut self.out,
            flags: &mut self.flags,
            phase: &mut self.phase,
            limit,
            broadcasts,
            stats,
        };
        (outbox, &mut self.session)
    }

    /// Writes queued output until the queue is empty, the socket would
    /// block or `budget` bytes went out; frees the queue once empty.
    pub fn flush(&mut self, budget: usize, stats: &mut Stats) -> io::Result<usize> {
        let Some(q) = self.out.as_mut() else {
            return Ok(0);
        };
        let n = q.write_to(&mut &self.stream, budget)?;
        stats.bytes_out += n as u64;
        if q.is_empty() {
            // Give the memory back: an idle connection owns no buffers.
            self.out = None;
        }
        Ok(n)
    }

    /// Sends the chunks of one broadcast batch, in order: when nothing is
    /// queued, one vectored write takes them all straight from the shared
    /// chunks (a sender's 64 KiB read of 1,000 lines costs each recipient
    /// one system call, not 1,000); whatever the socket does not take is
    /// queued by reference, so the common case allocates nothing. Sets
    /// `OVERFLOW` past `limit`.
    pub fn send_shared(&mut self, chunks: &[&Rc<[u8]>], limit: usize, stats: &mut Stats) {
        let mut skip = if self.queued() == 0 {
            match write_chunks_now(&self.stream, chunks, stats) {
                Ok(n) => n,
                Err(_) => {
                    self.flags |= flag::FAILED;
                    return;
                }
            }
        } else {
            0
        };
        for chunk in chunks {
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            let q = self
                .out
                .get_or_insert_with(|| Box::new(OutQueue::new(limit)));
            if q.push_shared((*chunk).clone(), skip).is_err() {
                self.flags |= flag::OVERFLOW;
                return;
            }
            skip = 0;
        }
    }
}

/// Writes as much of `bytes` as the socket takes now. `WouldBlock` ends
/// the attempt with the count so far (the caller queues the rest and asks
/// for `WRITABLE`); `Interrupted` is retried.
pub fn write_now(stream: &Stream, bytes: &[u8], stats: &mut Stats) -> io::Result<usize> {
    let mut w = stream;
    let done = write_until_blocked(bytes.len(), |done| w.write(&bytes[done..]))?;
    stats.bytes_out += done as u64;
    Ok(done)
}

/// Writes as much of `chunks` (in order) as the socket takes now, with
/// vectored writes of up to [`IOV_BATCH`] chunks each; otherwise like
/// [`write_now`].
fn write_chunks_now(stream: &Stream, chunks: &[&Rc<[u8]>], stats: &mut Stats) -> io::Result<usize> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut w = stream;
    let done = write_until_blocked(total, |done| {
        let mut slices = [IoSlice::new(&[]); IOV_BATCH];
        let mut count = 0;
        let mut skip = done;
        for c in chunks {
            if skip >= c.len() {
                skip -= c.len();
                continue;
            }
            slices[count] = IoSlice::new(&c[skip..]);
            skip = 0;
            count += 1;
            if count == IOV_BATCH {
                break;
            }
        }
        w.write_vectored(&slices[..count])
    })?;
    stats.bytes_out += done as u64;
    Ok(done)
}

/// Most chunks in one vectored write of a broadcast batch.
const IOV_BATCH: usize = 256;

/// A broadcast waiting to be delivered once the current handler returns.
#[derive(Debug)]
pub struct Broadcast {
    /// The sender, left out when `to` is [`Audience::Others`].
    pub from: Token,
    /// The bytes, shared by every recipient.
    pub chunk: Rc<[u8]>,
    /// Who gets it.
    pub to: Audience,
}

/// The [`Outbox`] a protocol writes to while the loop handles one
/// connection: replies go straight to that connection's socket, broadcasts
/// wait in `broadcasts` until the handler is done.
pub struct ConnOutbox<'a> {
    /// The connection's token, for broadcasts.
    pub token: Token,
    /// Its socket.
    pub stream: &'a Stream,
    /// Its output queue.
    pub out: &'a mut Option<Box<OutQueue>>,
    /// Its flags.
    pub flags: &'a mut u8,
    /// Its phase.
    pub phase: &'a mut Phase,
    /// `--max-buffer`.
    pub limit: usize,
    /// The loop's broadcast queue.
    pub broadcasts: &'a mut Vec<Broadcast>,
    /// The loop's counters.
    pub stats: &'a mut Stats,
}

impl Outbox for ConnOutbox<'_> {
    fn reply(&mut self, bytes: &[u8]) {
        if *self.flags & (flag::FAILED | flag::OVERFLOW) != 0 {
            return;
        }
        let queued = self.out.as_ref().is_some_and(|q| !q.is_empty());
        // Write straight from the caller's buffer when nothing is queued:
        // most writes never block, so most replies are never copied.
        let sent = if queued {
            0
        } else {
            match write_now(self.stream, bytes, self.stats) {
                Ok(n) => n,
                Err(_) => {
                    *self.flags |= flag::FAILED;
                    return;
                }
            }
        };
        log::trace!(
            "[{}] reply: {sent} of {} bytes written at once",
            TokenName(self.token),
            bytes.len()
        );
        if sent < bytes.len() {
            log::trace!(
                "[{}] queued {} bytes",
                TokenName(self.token),
                bytes.len() - sent
            );
            let limit = self.limit;
            let q = self
                .out
                .get_or_insert_with(|| Box::new(OutQueue::new(limit)));
            if q.push(&bytes[sent..]).is_err() {
                *self.flags |= flag::OVERFLOW;
            }
        }
    }

    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience) {
        if to == Audience::Everyone {
            // The sender's copy goes out now, in order with its replies;
            // the others get theirs when the handler returns.
            self.reply(&chunk);
        }
        self.broadcasts.push(Broadcast {
            from: self.token,
            chunk,
            to: Audience::Others,
        });
    }

    fn close(&mut self, how: Close) {
        *self.phase = Phase::Draining;
        if how == Close::Reject {
            *self.flags |= flag::REJECT;
        }
    }
}

/// The [`Outbox`] of a connection that is already gone: only its
/// broadcasts (chat's `* NAME left`) reach anyone.
pub struct GoneOutbox<'a> {
    /// The departed connection's token.
    pub token: Token,
    /// The loop's broadcast queue.
    pub broadcasts: &'a mut Vec<Broadcast>,
}

impl Outbox for GoneOutbox<'_> {
    fn reply(&mut self, _bytes: &[u8]) {}
    fn broadcast(&mut self, chunk: Rc<[u8]>, _to: Audience) {
        self.broadcasts.push(Broadcast {
            from: self.token,
            chunk,
            to: Audience::Others,
        });
    }
    fn close(&mut self, _how: Close) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_echo_connection_is_small() {
        // The RSS target is 64 bytes per idle connection, and the slab
        // entry is most of it. Debug builds of mio add a selector id to
        // every socket, so measure what we add on top of the socket: in a
        // release build the socket is 8 bytes and the whole entry 32.
        let socket = std::mem::size_of::<Stream>();
        let conn = std::mem::size_of::<Connection<()>>();
        assert!(
            conn - socket <= 24,
            "connection adds {} bytes",
            conn - socket
        );
    }
}
