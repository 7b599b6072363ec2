//! One client connection: its socket, its pending output and its state.
//!
//! - [`state`]: the connection's life as a pure state machine (open,
//!   paused, flushing, lingering, closing), unit-tested state by state;
//! - [`outbox`]: how a protocol's replies and broadcasts reach sockets;
//! - this file: the [`Connection`] the loop keeps in its slab, and its
//!   writes.
//!
//! The struct is kept small on purpose: an idle echo connection is the
//! socket, a generation, a timestamp and two bytes of state (checked by a
//! test), because the server is meant to hold tens of thousands of them.
//! Output storage ([`OutQueue`]) exists only while the kernel's send
//! buffer is full.

use std::io;
use std::rc::Rc;

use mio::{Interest, Token};

use super::stats::Stats;
use crate::buffer::OutQueue;
use crate::net::Stream;

pub(crate) mod outbox;
pub(crate) mod state;

pub(crate) use outbox::{write_now, Broadcast, ConnOutbox, GoneOutbox};
pub use state::CloseReason;
pub(crate) use state::{Action, State};

/// A client connection, as stored in the loop's slab.
#[derive(Debug)]
pub(crate) struct Connection<S> {
    pub stream: Stream,
    /// Output the kernel could not take yet; `None` while there is none.
    pub out: Option<Box<OutQueue>>,
    /// Milliseconds since the server started when the state's clock
    /// started: the last byte read (open, paused, flushing), or the start
    /// of lingering. [`State::deadline`] adds the timeout that applies.
    pub since: u64,
    /// Distinguishes this connection from earlier ones that used the same
    /// slab key; it is part of the connection's [`Token`].
    pub generation: u32,
    pub state: State,
    /// Loop bookkeeping: the interest registered with `Poll` now.
    pub registered: Interest,
    /// Loop bookkeeping: the loop's lists the connection is on.
    pub lists: Lists,
    /// The protocol's per-client state.
    pub session: S,
}

/// The loop's lists a connection is on, each at most once: one byte, so
/// the slab entry stays small (see the test below).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lists(u8);

impl Lists {
    /// The ready list: served again next turn.
    pub const READY: Lists = Lists(1);
    /// The queue of connections waiting for memory. A connection keeps
    /// its one entry even if it leaves `Waiting` (its own socket took a
    /// mirrored echo) and waits again before that entry comes up.
    pub const MEMORY: Lists = Lists(2);

    /// Marks `list`; false when it was marked already.
    pub fn join(&mut self, list: Lists) -> bool {
        let was = self.on(list);
        self.0 |= list.0;
        !was
    }

    pub fn leave(&mut self, list: Lists) {
        self.0 &= !list.0;
    }

    pub fn on(self, list: Lists) -> bool {
        self.0 & list.0 != 0
    }
}

impl<S> Connection<S> {
    /// Bytes waiting in the output queue.
    pub fn queued(&self) -> usize {
        self.out.as_ref().map_or(0, |q| q.len())
    }

    /// Memory its output queue occupies (see [`OutQueue::footprint`]).
    pub fn footprint(&self) -> usize {
        self.out.as_ref().map_or(0, |q| q.footprint())
    }

    /// Room left under the queue's limit of `limit` bytes.
    pub fn space(&self, limit: usize) -> usize {
        self.out.as_ref().map_or(limit, |q| q.space())
    }

    /// The outbox its protocol answers through and the protocol's session,
    /// borrowed side by side.
    pub fn outbox_and_session<'a>(
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
            state: &mut self.state,
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
    /// queued by reference, so the common case allocates nothing. A
    /// recipient whose queue would pass `limit` is a slow consumer.
    pub fn send_shared(&mut self, chunks: &[&Rc<[u8]>], limit: usize, stats: &mut Stats) {
        let mut skip = if self.queued() == 0 {
            match outbox::write_chunks_now(&self.stream, chunks, stats) {
                Ok(n) => n,
                Err(_) => return self.state.failed(),
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
                return self.state.overflowed();
            }
            skip = 0;
        }
    }
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
