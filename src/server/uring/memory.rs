//! `--max-memory` on the uring engine: one bound on the bytes held for all
//! clients, kept with the readiness engine's bookkeeping
//! ([`MemoryCap`](crate::server::memory::MemoryCap)) and the protocol's
//! [`AtMemoryCap`].
//!
//! # What is counted
//! The engine's `memory` is the sum of every connection's
//! [`Out::footprint`](super::conn::Out::footprint): its output waiting or
//! in flight, and input held back while it was paused. Every place that
//! changes one adjusts the count ([`Engine::recount`]): a receive, a send
//! completion, a broadcast delivery, an accept (a greeting), a close.
//! Owned buffers count by capacity, as in the readiness engine (a recycled
//! buffer may hold 64 KiB for a 4 KiB echo; a grown one carries slack),
//! held input by its buffer's capacity; a chat line shared by 1,000
//! recipients counts its length once in each queue that holds it
//! (`event_loop/memory.rs` says why that is the right over-count).
//! Not counted: the receive pool (grown while receives run it dry, by at
//! most [`POOL_SHARE`](crate::net::ring::POOL_SHARE) per connection that
//! received in the last second, 32 MiB at most for echo) and the spare
//! buffers kept for reuse once a connection is done with them (at most
//! 1,024, of at most 64 KiB each: 64 MiB at worst, whatever clients do).
//!
//! # At the cap
//! - `Pause` (echo): the readiness engine checks the room *before* a read;
//!   here the receive is already armed, so the check comes after the
//!   bytes arrived: a connection whose input left less than a read's room
//!   is marked [`flag::MEMORY_WAIT`], its multishot receive is cancelled
//!   (as for `--max-buffer`) and it joins the queue. What was already
//!   received is still served: the overshoot is what the multishot
//!   receives armed before the cap brought in that wake-up, which the
//!   receive pool bounds. Once the count has fallen to three quarters of
//!   the cap, waiting connections are re-armed oldest first, as many as
//!   the room allows ([`MemoryCap::resume`]), so nobody starves. The bytes
//!   a waiting client still sends stay in the kernel, against its TCP
//!   window. Any receive armed while the room is below a read (a client
//!   accepted at the cap, or one served there) is a single receive of at
//!   most [`MIN_READ`] bytes, not a multishot one: a multishot receive
//!   re-armed at the cap would queue every completion already in the
//!   completion queue before its cancel landed, up to the whole pool.
//!   A client is still served at the cap when the protocol
//!   [mirrors its input](Protocol::MIRRORS_INPUT): it waits only until its
//!   echo is sent, then receives once more, so it has at most one
//!   [`MIN_READ`] receive's echo queued at a time (the readiness engine
//!   peeks and writes back instead; a completion has no peek), and a
//!   well-behaved client keeps its service while others hold the memory.
//! - `DropLargest` (chat): once per wake-up, after every completion taken
//!   is handled, while the count is over the cap, the client furthest
//!   behind is closed as a slow consumer. Not after each delivery, as the
//!   readiness engine does: what a connection holds counts its send in
//!   flight until the send's completion is handled, and a wake-up relays
//!   all its receives to every queue before any is sent. When a
//!   receive's re-arm was submitted ahead of the readers' sends (the
//!   talker ran the pool dry), the kernel served the receive's first
//!   completions (about 32) before those sends, so the sends' completions
//!   came behind them in the same wake-up. Judged in between, a reader
//!   that keeps up held what one that reads nothing held (the last
//!   wake-up's send, which the kernel had taken, plus the same new
//!   lines), byte for byte or nearly, and was dropped as often as not.
//!   Once the wake-up's completions are handled, a send still in flight
//!   is one the kernel has not taken; what else a reader holds is this
//!   wake-up's lines, not yet offered to anyone (which tells nothing), or
//!   what a short send left (then the kernel holds a full send buffer for
//!   it). So the kernel is asked ([`ring::unsent`]): a reader it holds nothing
//!   unsent for took all it was sent and is not dropped; of the others,
//!   the one with the most not yet taken (held here and unsent there)
//!   goes ([`MemoryCap::victim`]); if that is nobody (a first burst,
//!   relayed to all before anything was sent), nobody is dropped until a
//!   later wake-up tells them apart, but only once in a row: over the cap
//!   again with nobody behind (every reader keeping up), the biggest
//!   holder goes, so the count cannot stay over the cap. Between two
//!   judgements it may pass the cap by up to two wake-ups' input (the
//!   receive pool) per reader.

use std::os::fd::AsFd;

use super::conn::{flag, Phase};
use super::{key_of, tag_of, Engine};
use crate::net::ring;
use crate::protocol::{AtMemoryCap, Protocol};
use crate::server::memory::MIN_READ;
use crate::server::CloseReason;

#[cfg(doc)]
use crate::server::memory::MemoryCap;

impl<P: Protocol> Engine<P> {
    /// Adds what the connection at `key` holds now, less the `before` it
    /// held at the last count.
    pub(super) fn recount(&mut self, key: usize, before: usize) {
        self.memory.recount(before, self.conns[key].footprint());
    }

    /// After input was handed to the protocol: if all connections together
    /// leave less than a read's room, this one stops receiving and waits
    /// its turn (a mirroring client only until its echo is sent: see the
    /// module docs).
    pub(super) fn wait_if_no_room(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if P::AT_MEMORY_CAP != AtMemoryCap::Pause
            || conn.phase != Phase::Open
            || conn.has(flag::MEMORY_WAIT | flag::READ_CLOSED)
            || self.memory.room() >= MIN_READ
        {
            return;
        }
        log::debug!(
            "[conn {key}] --max-memory reached ({} bytes held): receiving paused",
            self.memory.used()
        );
        conn.flags |= flag::MEMORY_WAIT;
        if !conn.has(flag::IN_LINE) {
            conn.flags |= flag::IN_LINE;
            self.memory.wait(tag_of(key, conn.generation));
        }
    }

    /// Once memory has freed, re-arms waiting connections in the order they
    /// began to wait, as many as the room allows.
    pub(super) fn resume_waiting(&mut self) {
        let mut woken = std::mem::take(&mut self.woken);
        let (conns, now) = (&mut self.conns, self.now);
        self.memory.resume(|tag| {
            let (key, generation) = key_of(tag);
            let Some(conn) = conns.get_mut(key).filter(|c| c.generation == generation) else {
                return false;
            };
            conn.flags &= !flag::IN_LINE;
            if !conn.has(flag::MEMORY_WAIT) {
                // Served meanwhile with nothing queued (see `settle`).
                return false;
            }
            conn.flags &= !flag::MEMORY_WAIT;
            conn.stamp = now;
            woken.push(key);
            true
        });
        for &key in &woken {
            log::debug!("[conn {key}] memory freed: receiving again");
            self.settle(key);
        }
        woken.clear();
        self.woken = woken;
    }

    /// Drops the waiting queue's entries of connections closed (or no
    /// longer waiting) since they joined, once they could outnumber the
    /// live ones (see [`MemoryCap::tidy`]). A live connection whose entry
    /// goes is no longer [`flag::IN_LINE`]: it queues again if it waits.
    pub(super) fn tidy_waiting(&mut self) {
        let conns = &mut self.conns;
        let live = conns.len();
        let dropped = self.memory.tidy(live, |tag| {
            let (key, generation) = key_of(tag);
            let Some(conn) = conns.get_mut(key).filter(|c| c.generation == generation) else {
                return false;
            };
            if conn.has(flag::MEMORY_WAIT) {
                return true;
            }
            conn.flags &= !flag::IN_LINE;
            false
        });
        if dropped > 0 {
            log::debug!("memory: tidied {dropped} stale entries of the waiting queue");
        }
    }

    /// Chat at the cap: while the count is over it, closes the client
    /// furthest behind, by what it holds here and what the kernel holds
    /// unsent for it, and delivers its `left` line (see the module docs).
    pub(super) fn drop_over_cap(&mut self) {
        while self.drop_largest_over_cap() {
            self.deliver();
        }
    }

    /// One step of [`Engine::drop_over_cap`]; false when there is nothing
    /// to do (the count is within the cap, or nobody is behind).
    fn drop_largest_over_cap(&mut self) -> bool {
        if P::AT_MEMORY_CAP != AtMemoryCap::DropLargest {
            return false;
        }
        // The kernel is asked of readers holding output only, and only
        // over the cap (`victim` reads nothing otherwise). A descriptor it
        // cannot answer for is ranked by what it holds here.
        let held = self
            .conns
            .iter()
            .filter(|(_, c)| !c.has(flag::FAILED | flag::OVERFLOW))
            .map(|(k, c)| {
                let n = c.footprint();
                let unsent = if n > 0 {
                    ring::unsent(c.fd.as_fd()).ok()
                } else {
                    None
                };
                (k, n, unsent)
            });
        let Some((key, _)) = self.memory.victim(held, |key| format!("conn {key}")) else {
            return false;
        };
        self.close(key, CloseReason::SlowConsumer);
        true
    }

    /// Debug builds: the running count equals the sum it stands for.
    pub(super) fn check_memory_count(&self) {
        self.memory
            .check(|| self.conns.iter().map(|(_, c)| c.footprint()).sum());
    }
}
