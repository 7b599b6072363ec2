//! `--max-memory`: one bound on the output queued for all clients.
//!
//! `--max-buffer` bounds one client's queue; without a bound on the sum,
//! 19,000 clients that write and never read would each fill theirs, about
//! 19 GB. So the loop keeps one running count, [`EventLoop::memory`]
//! (a [`MemoryCap`], shared with the uring engine): the
//! sum of every connection's [`OutQueue::footprint`] (owned chunks by
//! capacity, so growth slack counts too). Every place that changes a queue
//! adjusts it: a handler (its writes and its protocol's replies), a
//! broadcast delivery, an accept (a greeting), a close.
//!
//! # Shared broadcast chunks count once per recipient
//! A chat line sent to 1,000 clients is one allocation, but the count adds
//! its length to each of the 1,000 queues that hold it. That over-counts
//! the bytes, never under-counts them, so the bound holds whatever mix of
//! sharing there is; it stays exact however far each recipient has
//! written (a chunk lives as long as its slowest holder); and each
//! recipient does pay real memory for it (a queue entry, and the chunk
//! itself once the others have moved on). Counting once per chunk would
//! need a shared table of live chunks for a saving only chat gets, and at
//! the cap chat drops its biggest reader, which is the right one to drop
//! either way.
//!
//! # At the cap
//! What a protocol wants is its [`AtMemoryCap`]:
//! - `Pause` (echo): a connection reads only while its read cannot take
//!   the count past the cap (`count + read + GROWTH_SLACK ≤ cap`). One that
//!   cannot moves to [`State::Waiting`] and joins a FIFO; once the count
//!   has fallen to three quarters of the cap, waiting connections are
//!   read again in the order they began to wait, as many as the room
//!   allows, so nobody waits behind a newer arrival. Nothing is dropped:
//!   the bytes stay in the kernel, where they count against the client's
//!   TCP window. A client with nothing queued is still served at the cap
//!   when the protocol [mirrors its input](Protocol::MIRRORS_INPUT): its
//!   input is peeked, written back and consumed only as far as the socket
//!   took it, so it queues nothing at all; a well-behaved client keeps
//!   its latency while 19,000 others hold the memory.
//! - `DropLargest` (chat): after each delivery, while the count is over
//!   the cap, the client with the biggest queue is closed as a slow
//!   consumer. The overshoot is one handler's output at most, of which
//!   broadcast chunks are allocated once.

use std::io::Read;

use super::{EventLoop, ReadUntil};
use crate::net::io::attempt;
use crate::net::ready::SCRATCH;
use crate::protocol::{AtMemoryCap, Protocol};
use crate::server::connection::{write_now, CloseReason, Lists, State};
use crate::server::token::{connection_key, connection_token, TokenName};

#[cfg(doc)]
use crate::buffer::OutQueue;
#[cfg(doc)]
use crate::server::memory::MemoryCap;

impl<P: Protocol> EventLoop<P> {
    /// How many bytes a read may take now without the count passing the
    /// cap; `None` when this protocol does not pause at the cap.
    pub(super) fn memory_room(&self) -> Option<usize> {
        (P::AT_MEMORY_CAP == AtMemoryCap::Pause).then(|| self.memory.room())
    }

    /// Adds what a connection's queue grew by (or takes off what it
    /// shrank by) since it occupied `before` bytes.
    pub(super) fn recount(&mut self, key: usize, before: usize) {
        self.memory.recount(before, self.conns[key].footprint());
    }

    /// [`EventLoop::recount`] inside a read loop: `held` is what the queue
    /// occupied at the last count, and becomes what it occupies now.
    pub(super) fn recount_from(&mut self, key: usize, held: &mut usize) {
        let now = self.conns[key].footprint();
        self.memory.recount(*held, now);
        *held = now;
    }

    /// The connection at `key` cannot read without passing the cap: it
    /// waits its turn.
    pub(super) fn wait_for_memory(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let token = connection_token(key, conn.generation);
        if conn.state == State::Open {
            log::debug!(
                "[{}] --max-memory reached ({} bytes queued): waiting",
                TokenName(token),
                self.memory.used()
            );
            conn.state.memory_full();
            // It may have an entry still: it left `Waiting` (its socket
            // took a mirrored echo) and came back before its turn.
            if conn.lists.join(Lists::MEMORY) {
                self.memory.wait(token);
            }
        }
    }

    /// Once the count has fallen to three quarters of the cap, reads from
    /// waiting connections again, oldest first, as many as the room allows
    /// (see [`MemoryCap::resume`](crate::server::memory::MemoryCap::resume)).
    pub(super) fn resume_waiting(&mut self) {
        // The buffer is kept between calls: no allocation per resume.
        let mut woken = std::mem::take(&mut self.woken);
        let (conns, now) = (&mut self.conns, self.now);
        self.memory.resume(|token| {
            // Entries of connections closed or moved on since are stale.
            let Some((key, generation)) = connection_key(token) else {
                return false;
            };
            let Some(c) = conns.get_mut(key).filter(|c| c.generation == generation) else {
                return false;
            };
            c.lists.leave(Lists::MEMORY);
            if !c.state.memory_freed() {
                return false;
            }
            c.since = now;
            woken.push(token);
            true
        });
        for &token in &woken {
            log::debug!("[{}] memory freed: reading again", TokenName(token));
            self.push_ready(token);
        }
        woken.clear();
        self.woken = woken;
    }

    /// Drops the waiting queue's entries of connections closed (or no
    /// longer waiting) since they joined, once they could outnumber the
    /// live ones (see [`MemoryCap::tidy`]).
    pub(super) fn tidy_waiting(&mut self) {
        let conns = &mut self.conns;
        let live = conns.len();
        let dropped = self.memory.tidy(live, |token| {
            let Some((key, generation)) = connection_key(token) else {
                return false;
            };
            let Some(c) = conns.get_mut(key).filter(|c| c.generation == generation) else {
                return false;
            };
            // A live connection's one entry: kept while it waits.
            if c.state != State::Waiting {
                c.lists.leave(Lists::MEMORY);
            }
            c.lists.on(Lists::MEMORY)
        });
        if dropped > 0 {
            log::debug!("memory: tidied {dropped} stale entries of the waiting queue");
        }
    }

    /// Chat at the cap: closes the client with the most queued output.
    /// Returns false when the count is within the cap (nothing to do).
    pub(super) fn drop_largest_over_cap(&mut self) -> bool {
        if P::AT_MEMORY_CAP != AtMemoryCap::DropLargest {
            return false;
        }
        let conns = &self.conns;
        let held = conns
            .iter()
            .filter(|(_, c)| !c.state.is_closing())
            // The kernel is not asked (the uring engine asks: see
            // `MemoryCap::victim`): a delivery to a reader with nothing
            // queued is written to its socket at once, so what a reader
            // holds is what its socket refused, and one that keeps up
            // holds nothing.
            .map(|(k, c)| (k, c.footprint(), None));
        let name = |&key: &usize| TokenName(connection_token(key, conns[key].generation));
        let Some((key, _)) = self.memory.victim(held, name) else {
            return false;
        };
        self.close(key, CloseReason::SlowConsumer);
        true
    }

    /// Serves a mirroring protocol's client at the cap without queueing:
    /// peeks at its input, writes it back, and consumes only what the
    /// socket took. When the socket takes less (the client does not read),
    /// the rest stays unread in the kernel and the connection waits for
    /// memory like any other. Returns false when the socket cannot peek
    /// (Unix), and the caller waits instead.
    pub(super) fn mirror(&mut self, key: usize, mut budget: usize, read_until: ReadUntil) -> bool {
        loop {
            let conn = &mut self.conns[key];
            let token = connection_token(key, conn.generation);
            if budget == 0 {
                self.push_ready(token);
                return true;
            }
            let want = SCRATCH.min(budget);
            let buf = &mut self.scratch[..want];
            if conn.stream.is_unix() {
                return false;
            }
            let peeked = attempt(|| conn.stream.peek(buf).unwrap_or(Ok(0)));
            let n = match peeked {
                Ok(None) => return true,
                // EOF: the peer closed its side; the protocol hears of it
                // as on the ordinary read path.
                Ok(Some(0)) => {
                    let (mut outbox, session) = conn.outbox_and_session(
                        token,
                        self.config.max_buffer,
                        &mut self.broadcasts,
                        &mut self.stats,
                    );
                    self.protocol.eof(session, &mut outbox);
                    conn.state.read_eof();
                    return true;
                }
                Ok(Some(n)) => n,
                Err(e) => {
                    log::debug!("[{}] peek failed: {e}", TokenName(token));
                    conn.state.failed();
                    return true;
                }
            };
            let sent = match write_now(&conn.stream, &buf[..n], &mut self.stats) {
                Ok(m) => m,
                Err(e) => {
                    log::debug!("[{}] write failed: {e}", TokenName(token));
                    conn.state.failed();
                    return true;
                }
            };
            if sent > 0 {
                // The peeked bytes are in the socket, so this read takes
                // exactly `sent` of them; anything else is a broken socket.
                match attempt(|| (&conn.stream).read(&mut buf[..sent])) {
                    Ok(Some(m)) if m == sent => {}
                    other => {
                        log::debug!("[{}] consume after peek: {other:?}", TokenName(token));
                        conn.state.failed();
                        return true;
                    }
                }
                self.stats.bytes_in += sent as u64;
                conn.since = self.now;
                budget -= sent;
            }
            log::trace!("[{}] at the cap: mirrored {sent} of {n}", TokenName(token));
            if sent < n {
                self.wait_for_memory(key);
                return true;
            }
            if cfg!(target_os = "linux") && read_until == ReadUntil::ShortRead && n < want {
                return true;
            }
        }
    }

    /// Debug builds: the running count equals the sum it stands for.
    pub(super) fn check_memory_count(&self) {
        self.memory
            .check(|| self.conns.iter().map(|(_, c)| c.footprint()).sum());
        if cfg!(debug_assertions) {
            // Every live connection on the memory list has exactly one entry
            // in the waiting queue, and no other live one has any.
            let entries = self
                .memory
                .in_line()
                .filter(|&t| self.key_of(t).is_some())
                .count();
            let marked = self
                .conns
                .iter()
                .filter(|(_, c)| c.lists.on(Lists::MEMORY))
                .count();
            assert_eq!(entries, marked, "waiting queue entries of live connections");
        }
    }
}
