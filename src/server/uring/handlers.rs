//! One connection's completions: bytes received, bytes sent; settling
//! its state afterwards (pause, resume, re-arm, close); delivering
//! broadcasts; and handing each turn's output to the ring.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;

use super::conn::{flag, queue_shared, Conn, GoneOutbox, Phase};
use super::{tag_of, Engine, LINGER};
use crate::net::ring::{Batch, RecvBuf};
use crate::protocol::{AtMemoryCap, Protocol};
use crate::server::memory::MIN_READ;
use crate::server::CloseReason;

impl<P: Protocol> Engine<P> {
    pub(super) fn on_received(
        &mut self,
        tag: u64,
        result: io::Result<Option<RecvBuf>>,
        more: bool,
    ) {
        let Some(key) = self.live(tag) else {
            // A late completion for a closed connection: give the buffer back.
            if let Ok(Some(buf)) = result {
                self.ring.recycle(buf);
            }
            return;
        };
        if !more {
            // The multishot receive is over (EOF, error, ENOBUFS, cancel);
            // `settle` re-arms it if the connection still wants input.
            self.conns[key].flags &= !(flag::RECV_ARMED | flag::CANCELLING);
        }
        let before = self.conns[key].footprint();
        match result {
            Ok(Some(buf)) => {
                self.on_bytes(key, &buf);
                self.ring.recycle(buf);
                self.recount(key, before);
                self.wait_if_no_room(key);
                return self.settle(key);
            }
            // Ok(None): EOF, the peer closed its side. It may still read
            // what we owe it: a half-close, not an error.
            Ok(None) => {
                let conn = &mut self.conns[key];
                conn.flags |= flag::READ_CLOSED | flag::EOF_OWED;
                log::debug!("[conn {key}] eof");
                self.eof_if_due(key);
            }
            // Out of pool buffers: provide more (at most once per batch of
            // completions); `settle` re-arms.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                log::trace!("[conn {key}] receive: no buffer, re-arming");
                let (conns, now) = (&self.conns, self.now);
                self.ring.grow_pool(|| receiving(conns, now));
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            Err(e) => {
                log::debug!("[conn {key}] receive failed: {e}");
                self.conns[key].flags |= flag::FAILED;
            }
        }
        self.recount(key, before);
        self.settle(key);
    }

    /// Bytes arrived: to the protocol as far as the output queue has room
    /// (back-pressure, as the readiness engine reads no more than that),
    /// the rest held until it drains.
    fn on_bytes(&mut self, key: usize, buf: &RecvBuf) {
        self.stats.bytes_in += buf.len() as u64;
        self.stats.reads += 1;
        let conn = &mut self.conns[key];
        conn.stamp = self.now;
        if conn.phase != Phase::Open {
            // Draining or lingering: input is read and dropped.
            self.stats.bytes_discarded += buf.len() as u64;
            return;
        }
        let bytes = self.ring.bytes(buf);
        let held = conn.out.as_ref().is_some_and(|o| !o.stash.is_empty());
        let space = self.config.max_buffer.saturating_sub(conn.queued());
        let n = if held || conn.has(flag::PAUSED) {
            0
        } else {
            space.min(bytes.len())
        };
        if n > 0 {
            let tag = tag_of(key, conn.generation);
            let (mut outbox, session) = conn.outbox_and_session(
                tag,
                self.config.max_buffer,
                &mut self.broadcasts,
                &mut self.dirty,
                &mut self.spare,
            );
            self.protocol.data(session, &bytes[..n], &mut outbox);
            if self.protocol.backlog(&conn.session) {
                // See `pause_for_backlog`; the rest of this buffer is
                // stashed below, in order.
                log::debug!("[conn {key}] input held by the protocol: receiving paused");
                conn.flags |= flag::PAUSED;
            }
        }
        if n < bytes.len() {
            // The receive was already under way when the queue filled:
            // hold the rest (at most what one wake-up received) and stop
            // receiving until the client reads.
            let o = conn.out.get_or_insert_with(|| self.spare.out());
            o.stash.extend_from_slice(&bytes[n..]);
            if !conn.has(flag::PAUSED) {
                log::debug!("[conn {key}] output full: receiving paused");
            }
            conn.flags |= flag::PAUSED;
        }
    }

    fn protocol_eof(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let (mut outbox, session) = conn.outbox_and_session(
            tag_of(key, conn.generation),
            self.config.max_buffer,
            &mut self.broadcasts,
            &mut self.dirty,
            &mut self.spare,
        );
        self.protocol.eof(session, &mut outbox);
    }

    /// The protocol held input back because one input's output budget ran
    /// out (chat's `/who` flood): stop receiving, as the readiness engine
    /// stops reading, until [`Engine::resume`] has worked through it.
    fn pause_for_backlog(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if self.protocol.backlog(&conn.session) {
            log::debug!("[conn {key}] input held by the protocol: receiving paused");
            conn.flags |= flag::PAUSED;
        }
    }

    /// Tells the protocol of the client's EOF once no input is held back
    /// before it.
    fn eof_if_due(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.has(flag::EOF_OWED) {
            return;
        }
        if conn.phase != Phase::Open {
            conn.flags &= !flag::EOF_OWED;
            return;
        }
        let stashed = conn.out.as_ref().is_some_and(|o| !o.stash.is_empty());
        if !stashed && !self.protocol.backlog(&conn.session) {
            conn.flags &= !flag::EOF_OWED;
            self.protocol_eof(key);
        }
    }

    /// Once the output queue has drained below half: works on input the
    /// protocol holds back (one output budget's worth per call, so others
    /// are served in between), then feeds input held here, then the EOF.
    fn resume(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.flags &= !flag::PAUSED;
        conn.stamp = self.now;
        if conn.phase == Phase::Open && self.protocol.backlog(&conn.session) {
            let (mut outbox, session) = conn.outbox_and_session(
                tag_of(key, conn.generation),
                self.config.max_buffer,
                &mut self.broadcasts,
                &mut self.dirty,
                &mut self.spare,
            );
            self.protocol.resume(session, &mut outbox);
            if self.protocol.backlog(&conn.session) {
                conn.flags |= flag::PAUSED;
                return;
            }
        }
        self.feed_held(key);
        self.eof_if_due(key);
    }

    /// Feeds input stashed while paused, as far as the queue has room.
    fn feed_held(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Some(o) = conn.out.as_mut() else { return };
        if o.stash.is_empty() {
            return;
        }
        let stash = std::mem::take(&mut o.stash);
        let space = self.config.max_buffer.saturating_sub(o.queued());
        let n = space.min(stash.len());
        if conn.phase == Phase::Open && n > 0 {
            let tag = tag_of(key, conn.generation);
            let (mut outbox, session) = conn.outbox_and_session(
                tag,
                self.config.max_buffer,
                &mut self.broadcasts,
                &mut self.dirty,
                &mut self.spare,
            );
            self.protocol.data(session, &stash[..n], &mut outbox);
            self.pause_for_backlog(key);
        }
        let conn = &mut self.conns[key];
        if n < stash.len() && conn.phase == Phase::Open {
            // What the protocol held back or the queue had no room for
            // waits for the next drain; the stash keeps its order.
            let o = conn.out.get_or_insert_with(|| self.spare.out());
            o.stash.extend_from_slice(&stash[n..]);
            conn.flags |= flag::PAUSED;
        }
    }

    /// Shutdown: hands held input to the protocol whatever the limit (it
    /// was read, so its echo is owed; it is at most one wake-up's worth).
    pub(super) fn feed_stash(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Some(o) = conn.out.as_mut() else { return };
        if o.stash.is_empty() || conn.phase != Phase::Open {
            return;
        }
        let before = o.footprint();
        let stash = std::mem::take(&mut o.stash);
        let (mut outbox, session) = conn.outbox_and_session(
            tag_of(key, conn.generation),
            self.config.max_buffer + stash.len(),
            &mut self.broadcasts,
            &mut self.dirty,
            &mut self.spare,
        );
        self.protocol.data(session, &stash, &mut outbox);
        conn.flags &= !flag::PAUSED;
        self.recount(key, before);
    }

    pub(super) fn on_sent(&mut self, tag: u64, result: io::Result<usize>, mut batch: Batch) {
        let Some(key) = self.live(tag) else {
            self.spare.put_batch(batch);
            return;
        };
        let conn = &mut self.conns[key];
        let Some(o) = conn.out.as_mut() else {
            self.spare.put_batch(batch);
            return;
        };
        let before = o.footprint();
        o.flying = 0;
        o.flying_held = 0;
        match result {
            Ok(n) => {
                self.stats.bytes_out += n as u64;
                if n < batch.len() {
                    // A short send: what is left goes out first next time,
                    // ahead of what was queued meanwhile.
                    log::trace!("[conn {key}] sent {n} of {} bytes", batch.len());
                    batch.consume(n);
                    let later = std::mem::take(&mut o.waiting);
                    o.waiting_len += batch.len();
                    o.waiting_held += batch.held();
                    batch.chunks.extend(later.chunks);
                    o.waiting = std::mem::take(&mut batch);
                }
                if conn.flags & flag::DIRTY == 0 && o.waiting_len > 0 {
                    conn.flags |= flag::DIRTY;
                    self.dirty.push(tag);
                }
            }
            Err(e) => {
                log::debug!("[conn {key}] send failed: {e}");
                conn.flags |= flag::FAILED;
            }
        }
        self.spare.put_batch(batch);
        self.recount(key, before);
        self.settle(key);
    }

    /// After a completion: close the connection if it is finished, move it
    /// between phases, resume it, and arm or cancel its receive.
    pub(super) fn settle(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.has(flag::FAILED) {
            return self.close(key, CloseReason::Error);
        }
        if conn.has(flag::OVERFLOW) {
            log::warn!("[conn {key}] slow consumer: output passed --max-buffer, disconnecting");
            return self.close(key, CloseReason::SlowConsumer);
        }
        if conn.has(flag::PAUSED) && conn.queued() <= self.config.max_buffer / 2 {
            let before = conn.footprint();
            self.resume(key);
            self.recount(key, before);
        }
        let conn = &mut self.conns[key];
        if conn.has(flag::MEMORY_WAIT) && P::MIRRORS_INPUT && conn.queued() == 0 {
            // Waiting for memory with its echo sent: served one receive
            // of a read's worth at a time meanwhile (see `memory.rs`); its
            // place in the line is kept.
            log::trace!("[conn {key}] nothing queued: receiving at the memory cap");
            conn.flags &= !flag::MEMORY_WAIT;
        }
        let conn = &mut self.conns[key];
        if conn.phase == Phase::Draining && conn.queued() == 0 {
            if !conn.has(flag::REJECT) {
                return self.close(key, CloseReason::Done);
            }
            // Shut our side so the client sees the error line and EOF,
            // then drop what it still sends until it closes or the linger
            // time passes.
            let _ = socket2::SockRef::from(&conn.fd).shutdown(Shutdown::Write);
            conn.flags &= !flag::REJECT;
            conn.phase = Phase::Lingering;
            conn.stamp = self.now + LINGER.as_millis() as u64;
            self.timers.push(
                conn.stamp,
                mio::Token(tag_of(key, conn.generation) as usize),
            );
        }
        let conn = &mut self.conns[key];
        let wants_input = !conn.has(flag::READ_CLOSED | flag::PAUSED | flag::MEMORY_WAIT)
            && conn.phase != Phase::Draining;
        // Waiting for memory is waiting for input, even with nothing queued.
        let waits_for_memory = conn.has(flag::MEMORY_WAIT)
            && conn.phase == Phase::Open
            && !conn.has(flag::READ_CLOSED);
        if !wants_input && !waits_for_memory && conn.queued() == 0 && !conn.has(flag::RECV_ARMED) {
            let reason = if conn.phase == Phase::Lingering {
                CloseReason::PeerClosed
            } else {
                CloseReason::Done
            };
            return self.close(key, reason);
        }
        let tag = tag_of(key, conn.generation);
        if wants_input && !conn.has(flag::RECV_ARMED) {
            // At the cap (a client with nothing queued, or one accepted
            // meanwhile): one receive of a read's worth, not a multishot
            // one, whose completions already in the queue would all be
            // served before a cancel lands (see `memory.rs`).
            let armed = if P::AT_MEMORY_CAP == AtMemoryCap::Pause && self.memory.room() < MIN_READ {
                self.ring.recv_once(conn.fd.as_fd(), tag, MIN_READ as u32)
            } else {
                self.ring.recv_multi(conn.fd.as_fd(), tag)
            };
            if let Err(e) = armed {
                log::warn!("[conn {key}] cannot arm a receive: {e}");
                return self.close(key, CloseReason::Error);
            }
            conn.flags |= flag::RECV_ARMED;
        } else if !wants_input && conn.has(flag::RECV_ARMED) && !conn.has(flag::CANCELLING) {
            // Paused (by its own queue or all of them) or draining: stop
            // the multishot receive; its last completion clears RECV_ARMED.
            if self.ring.cancel_recv(tag).is_ok() {
                conn.flags |= flag::CANCELLING;
            }
        }
        if conn.out.as_ref().is_some_and(|o| o.is_idle()) && !conn.has(flag::DIRTY) {
            // Give the memory back: an idle connection owns no buffers.
            let o = conn.out.take().expect("checked");
            self.spare.put_out(o);
        }
    }

    /// Closes and forgets a connection, and tells the protocol.
    pub(super) fn close(&mut self, key: usize, reason: CloseReason) {
        let conn = self.conns.remove(key);
        self.memory.recount(conn.footprint(), 0);
        let tag = tag_of(key, conn.generation);
        // The ring holds its own reference to the socket while an
        // operation is armed on it, so close(2) alone would not close the
        // connection: cancel them first. The descriptor is closed once the
        // cancel is submitted (see `run`).
        if conn.has(flag::RECV_ARMED) || conn.queued() > 0 {
            if let Err(e) = self.ring.cancel_fd(conn.fd.as_fd()) {
                log::warn!("[conn {key}] cannot cancel: {e}");
            }
        }
        self.closing.push(conn.fd);
        if let Some(o) = conn.out {
            self.spare.put_out(o);
        }
        self.stats.count_close(reason);
        log::debug!("[conn {key}] closed ({})", reason.as_str());
        let mut outbox = GoneOutbox {
            tag,
            broadcasts: &mut self.broadcasts,
        };
        self.protocol.close(conn.session, &mut outbox);
        // Accepting resumes once the descriptor is closed (`run`).
    }

    /// Delivers queued broadcasts, closing recipients that cannot take
    /// them; their departure may broadcast more. (Chat at `--max-memory`
    /// drops its slow consumers once per wake-up, not here: see
    /// [`Engine::drop_over_cap`].)
    pub(super) fn deliver(&mut self) {
        let mut doomed = Vec::new();
        while !self.broadcasts.is_empty() {
            let batch = std::mem::take(&mut self.broadcasts);
            if self.shutdown_deadline.is_some() {
                continue;
            }
            for (key, conn) in self.conns.iter_mut() {
                let tag = tag_of(key, conn.generation);
                if conn.phase != Phase::Open || conn.has(flag::FAILED | flag::OVERFLOW) {
                    continue;
                }
                let before = conn.footprint();
                for b in batch.iter().filter(|b| b.from != tag) {
                    if queue_shared(
                        &mut conn.out,
                        &mut conn.flags,
                        b.chunk.clone(),
                        self.config.max_buffer,
                        &mut self.spare,
                    ) {
                        self.dirty.push(tag);
                    }
                    if conn.has(flag::OVERFLOW) {
                        doomed.push(key);
                        break;
                    }
                }
                self.memory.recount(before, conn.footprint());
            }
            for key in doomed.drain(..) {
                self.settle(key);
            }
        }
    }

    /// Hands every connection's waiting output to the ring: one send per
    /// connection (one chunk: `send`; several: `sendmsg`), all submitted
    /// together by the next wait. A connection with a send in flight waits
    /// for its completion, so bytes never overtake each other.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &tag in &dirty {
            let Some(key) = self.live(tag) else { continue };
            let conn = &mut self.conns[key];
            conn.flags &= !flag::DIRTY;
            let Some(o) = conn.out.as_mut() else { continue };
            if o.flying > 0 || o.waiting_len == 0 {
                continue;
            }
            let batch = std::mem::take(&mut o.waiting);
            o.flying = o.waiting_len;
            o.flying_held = o.waiting_held;
            o.waiting_len = 0;
            o.waiting_held = 0;
            self.ring.send(conn.fd.as_fd(), batch, tag)?;
        }
        dirty.clear();
        self.dirty = dirty;
        Ok(())
    }
}

/// How recently (ms) a connection must have received, or been resumed or
/// opened, to count as receiving.
const RECENT: u64 = 1000;

/// Connections that received within [`RECENT`]: the ones the receive pool
/// may grow for. Idle clients, however many, do not let one client sending
/// flat out take the whole pool.
fn receiving<S>(conns: &slab::Slab<Conn<S>>, now: u64) -> usize {
    conns
        .iter()
        .filter(|(_, c)| c.stamp + RECENT >= now)
        .count()
}
