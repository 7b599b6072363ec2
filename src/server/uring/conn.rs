//! One client of the uring engine: its socket, its output and its state,
//! and the [`Outbox`] its protocol answers through.
//!
//! As in the readiness engine, an idle connection is small (the socket, a
//! generation, a timestamp and flag bits) and owns no buffer: receive
//! buffers belong to the ring's shared pool, and the output state
//! ([`Out`]) exists only while something is queued or in flight.

use std::os::fd::OwnedFd;
use std::rc::Rc;

use crate::net::ring::{Batch, Chunk};
use crate::protocol::{Audience, Close, Outbox};

/// Owned chunks stop growing past this, so a long backlog is sent and
/// freed in pieces.
pub(super) const OWNED_CHUNK_MAX: usize = 64 * 1024;
/// Spare buffers kept for reuse, so a busy connection does not allocate
/// per message.
const SPARES: usize = 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Receiving and sending.
    Open,
    /// The protocol asked to close (or the server is shutting down): no
    /// more input is used; close once the output is sent.
    Draining,
    /// Chat's too-long line: the reply is sent and the write side shut;
    /// input is dropped until EOF or the linger deadline.
    Lingering,
}

/// Flag bits of [`Conn::flags`].
pub mod flag {
    /// A multishot receive is armed (until its last completion arrives).
    pub const RECV_ARMED: u16 = 1;
    /// Its cancel has been asked for.
    pub const CANCELLING: u16 = 1 << 1;
    /// Output reached `--max-buffer`: receiving is stopped.
    pub const PAUSED: u16 = 1 << 2;
    /// The client sent EOF.
    pub const READ_CLOSED: u16 = 1 << 3;
    /// A receive or send failed: close at the next chance.
    pub const FAILED: u16 = 1 << 4;
    /// Output would have passed `--max-buffer` (chat: slow consumer).
    pub const OVERFLOW: u16 = 1 << 5;
    /// After draining, shut the write side and linger.
    pub const REJECT: u16 = 1 << 6;
    /// On the loop's list of connections with output to send.
    pub const DIRTY: u16 = 1 << 7;
    /// All connections together hold `--max-memory`: receiving is stopped
    /// until this one's turn comes (see `memory.rs`).
    pub const MEMORY_WAIT: u16 = 1 << 8;
    /// Has an entry in the queue of connections waiting for memory.
    pub const IN_LINE: u16 = 1 << 9;
    /// The client's EOF is still to be told to the protocol, behind input
    /// held back (stashed, or the protocol's own backlog).
    pub const EOF_OWED: u16 = 1 << 10;
}

/// Output and held input of one connection; boxed, and only while needed.
#[derive(Debug, Default)]
pub struct Out {
    /// Output not yet handed to the ring.
    pub waiting: Batch,
    /// Its length in bytes.
    pub waiting_len: usize,
    /// What `waiting`'s chunks occupy ([`Chunk::held`]: owned ones by
    /// capacity).
    pub waiting_held: usize,
    /// Bytes of the one send in flight (0: none).
    pub flying: usize,
    /// What the send in flight's chunks occupy.
    pub flying_held: usize,
    /// Input that arrived after receiving was paused (the receive was
    /// already under way), fed to the protocol once output drains.
    pub stash: Vec<u8>,
}

impl Out {
    /// Bytes queued: waiting plus in flight.
    pub fn queued(&self) -> usize {
        self.waiting_len + self.flying
    }

    /// Bytes held for this client, counted against `--max-memory`: what
    /// its output (queued or in flight) and its held input occupy. Owned
    /// buffers count by capacity, as in the readiness engine's
    /// `OutQueue::footprint`: a recycled buffer may hold 64 KiB for a
    /// 4 KiB echo, and a grown one carries slack.
    pub fn footprint(&self) -> usize {
        self.waiting_held + self.flying_held + self.stash.capacity()
    }

    /// True when nothing is queued, in flight or held.
    pub fn is_idle(&self) -> bool {
        self.queued() == 0 && self.stash.is_empty()
    }
}

/// A client connection, as stored in the engine's slab.
#[derive(Debug)]
pub struct Conn<S> {
    /// The socket.
    pub fd: OwnedFd,
    /// See [`Out`].
    pub out: Option<Box<Out>>,
    /// Milliseconds since start: last byte received (open) or end of
    /// lingering (lingering).
    pub stamp: u64,
    /// Tells this connection from earlier ones with the same slab key.
    pub generation: u32,
    /// See [`Phase`].
    pub phase: Phase,
    /// See [`flag`].
    pub flags: u16,
    /// The protocol's per-client state.
    pub session: S,
}

impl<S> Conn<S> {
    /// The outbox its protocol answers through and the protocol's session,
    /// borrowed side by side (the readiness engine's `outbox_and_session`).
    pub fn outbox_and_session<'a>(
        &'a mut self,
        tag: u64,
        limit: usize,
        broadcasts: &'a mut Vec<Broadcast>,
        dirty: &'a mut Vec<u64>,
        spare: &'a mut Spare,
    ) -> (UringOutbox<'a>, &'a mut S) {
        let outbox = UringOutbox {
            tag,
            out: &mut self.out,
            flags: &mut self.flags,
            phase: &mut self.phase,
            limit,
            broadcasts,
            dirty,
            spare,
        };
        (outbox, &mut self.session)
    }

    /// Tests flag bits.
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    /// Bytes queued or in flight.
    pub fn queued(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.queued())
    }

    /// See [`Out::footprint`].
    pub fn footprint(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.footprint())
    }
}

/// A broadcast waiting for the current handler to finish.
#[derive(Debug)]
pub struct Broadcast {
    /// The sender's tag, left out of the recipients.
    pub from: u64,
    /// The bytes, shared by every recipient.
    pub chunk: Rc<[u8]>,
}

/// Recycled allocations: output buffers and output states.
#[derive(Debug, Default)]
pub struct Spare {
    vecs: Vec<Vec<u8>>,
    // Boxed because they are handed out and taken back as boxes: the
    // point is to reuse those allocations.
    #[allow(clippy::vec_box)]
    outs: Vec<Box<Out>>,
}

impl Spare {
    /// An empty output state.
    pub fn out(&mut self) -> Box<Out> {
        self.outs.pop().unwrap_or_default()
    }

    /// Takes back an output state that is idle.
    pub fn put_out(&mut self, mut out: Box<Out>) {
        if self.outs.len() < SPARES {
            out.waiting.chunks.clear();
            out.waiting.head = 0;
            out.waiting_len = 0;
            out.waiting_held = 0;
            out.flying = 0;
            out.flying_held = 0;
            out.stash = Vec::new();
            self.outs.push(out);
        }
    }

    /// An empty byte buffer.
    pub fn vec(&mut self) -> Vec<u8> {
        self.vecs.pop().unwrap_or_default()
    }

    /// Takes back the owned buffers of a sent batch.
    pub fn put_batch(&mut self, batch: Batch) {
        for c in batch.chunks {
            if let Chunk::Owned(mut v) = c {
                if self.vecs.len() < SPARES && v.capacity() <= OWNED_CHUNK_MAX {
                    v.clear();
                    self.vecs.push(v);
                }
            }
        }
    }
}

/// Queues `chunk` behind a connection's output, unless that would pass
/// `limit` (then sets `OVERFLOW`). Returns true when the connection just
/// got output to send and is not yet on the dirty list.
pub fn queue_shared(
    out: &mut Option<Box<Out>>,
    flags: &mut u16,
    chunk: Rc<[u8]>,
    limit: usize,
    spare: &mut Spare,
) -> bool {
    let o = out.get_or_insert_with(|| spare.out());
    if o.queued() + chunk.len() > limit {
        *flags |= flag::OVERFLOW;
        return false;
    }
    o.waiting_len += chunk.len();
    o.waiting_held += chunk.len();
    o.waiting.chunks.push(Chunk::Shared(chunk));
    mark_dirty(flags)
}

fn mark_dirty(flags: &mut u16) -> bool {
    let newly = *flags & flag::DIRTY == 0;
    *flags |= flag::DIRTY;
    newly
}

/// The [`Outbox`] of the connection being handled: replies are queued on
/// it (and sent together at the end of the turn), broadcasts wait in the
/// engine's list until the handler is done.
pub struct UringOutbox<'a> {
    /// The connection's tag.
    pub tag: u64,
    /// Its output.
    pub out: &'a mut Option<Box<Out>>,
    /// Its flags.
    pub flags: &'a mut u16,
    /// Its phase.
    pub phase: &'a mut Phase,
    /// `--max-buffer`.
    pub limit: usize,
    /// The engine's broadcast list.
    pub broadcasts: &'a mut Vec<Broadcast>,
    /// The engine's list of connections with output to send.
    pub dirty: &'a mut Vec<u64>,
    /// Recycled buffers.
    pub spare: &'a mut Spare,
}

impl Outbox for UringOutbox<'_> {
    fn reply(&mut self, bytes: &[u8]) {
        if *self.flags & (flag::FAILED | flag::OVERFLOW) != 0 || bytes.is_empty() {
            return;
        }
        let o = self.out.get_or_insert_with(|| self.spare.out());
        if o.queued() + bytes.len() > self.limit {
            *self.flags |= flag::OVERFLOW;
            return;
        }
        o.waiting_len += bytes.len();
        // Replies of one turn go out in one send: append to the last owned
        // chunk while it is small.
        match o.waiting.chunks.last_mut() {
            Some(Chunk::Owned(v)) if v.len() + bytes.len() <= OWNED_CHUNK_MAX => {
                let before = v.capacity();
                v.extend_from_slice(bytes);
                o.waiting_held = o.waiting_held + v.capacity() - before;
            }
            _ => {
                let mut v = self.spare.vec();
                v.extend_from_slice(bytes);
                o.waiting_held += v.capacity();
                o.waiting.chunks.push(Chunk::Owned(v));
            }
        }
        if mark_dirty(self.flags) {
            self.dirty.push(self.tag);
        }
    }

    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience) {
        if to == Audience::Everyone {
            self.reply(&chunk);
        }
        self.broadcasts.push(Broadcast {
            from: self.tag,
            chunk,
        });
    }

    fn close(&mut self, how: Close) {
        *self.phase = Phase::Draining;
        if how == Close::Linger {
            *self.flags |= flag::REJECT;
        }
    }
}

/// The [`Outbox`] of a connection already gone: only broadcasts (chat's
/// `* NAME left`) reach anyone.
pub struct GoneOutbox<'a> {
    /// The departed connection's tag.
    pub tag: u64,
    /// The engine's broadcast list.
    pub broadcasts: &'a mut Vec<Broadcast>,
}

impl Outbox for GoneOutbox<'_> {
    fn reply(&mut self, _bytes: &[u8]) {}
    fn broadcast(&mut self, chunk: Rc<[u8]>, _to: Audience) {
        self.broadcasts.push(Broadcast {
            from: self.tag,
            chunk,
        });
    }
    fn close(&mut self, _how: Close) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_is_small() {
        // The RSS target is 64 bytes per idle connection.
        assert!(std::mem::size_of::<Conn<()>>() <= 32);
    }

    #[test]
    fn replies_of_one_turn_share_one_chunk_and_respect_the_limit() {
        let (mut out, mut flags, mut phase) = (None, 0, Phase::Open);
        let (mut b, mut dirty, mut spare) = (Vec::new(), Vec::new(), Spare::default());
        let mut ob = UringOutbox {
            tag: 7,
            out: &mut out,
            flags: &mut flags,
            phase: &mut phase,
            limit: 10,
            broadcasts: &mut b,
            dirty: &mut dirty,
            spare: &mut spare,
        };
        ob.reply(b"hello");
        ob.reply(b"world");
        ob.reply(b"!");
        assert_eq!(dirty, vec![7], "listed once");
        assert_ne!(flags & flag::OVERFLOW, 0, "the 11th byte passes the limit");
        let o = out.unwrap();
        assert_eq!(o.waiting.chunks.len(), 1);
        assert_eq!(o.waiting.chunks[0].bytes(), b"helloworld");
    }

    #[test]
    fn owned_output_counts_by_capacity() {
        let (mut out, mut flags, mut phase) = (None, 0, Phase::Open);
        let (mut b, mut dirty, mut spare) = (Vec::new(), Vec::new(), Spare::default());
        // A recycled buffer from an earlier 64 KiB send.
        spare.put_batch(Batch {
            chunks: vec![Chunk::Owned(vec![0; OWNED_CHUNK_MAX])],
            head: 0,
        });
        let mut ob = UringOutbox {
            tag: 7,
            out: &mut out,
            flags: &mut flags,
            phase: &mut phase,
            limit: 1 << 20,
            broadcasts: &mut b,
            dirty: &mut dirty,
            spare: &mut spare,
        };
        ob.reply(&[1; 4096]);
        ob.reply(&[2; 100]);
        let o = out.as_mut().unwrap();
        assert_eq!(o.queued(), 4196);
        assert_eq!(o.footprint(), OWNED_CHUNK_MAX, "the buffer it occupies");
        assert_eq!(o.waiting_held, o.waiting.held(), "running sum");
        queue_shared(
            &mut out,
            &mut flags,
            Rc::from(&b"xyz"[..]),
            1 << 20,
            &mut spare,
        );
        let o = out.as_ref().unwrap();
        assert_eq!(o.footprint(), OWNED_CHUNK_MAX + 3);
        assert_eq!(o.waiting_held, o.waiting.held(), "running sum");
    }

    #[test]
    fn a_batch_drops_sent_bytes_across_chunks() {
        let mut batch = Batch {
            chunks: vec![
                Chunk::Owned(b"abc".to_vec()),
                Chunk::Shared(Rc::from(&b"defg"[..])),
            ],
            head: 1,
        };
        assert_eq!(batch.len(), 6);
        batch.consume(3);
        assert_eq!(batch.chunks.len(), 1);
        assert_eq!(&batch.chunks[0].bytes()[batch.head..], b"efg");
    }
}
