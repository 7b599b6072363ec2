//! One connection's readiness: write what is queued, read what arrived,
//! then let the connection's state machine say what follows and apply it
//! (close, linger, resume, re-register).

use std::io::Read;
use std::net::Shutdown;

use mio::Token;

use super::{EventLoop, ReadUntil, Readiness};

use crate::net::io::attempt;
use crate::net::ready::{READ_BUDGET, WRITE_BUDGET};
use crate::protocol::Protocol;
use crate::server::connection::{Action, CloseReason, GoneOutbox, State};
use crate::server::memory::MIN_READ;
use crate::server::token::{connection_token, TokenName};
use crate::server::LINGER;

impl<P: Protocol> EventLoop<P> {
    pub(super) fn on_connection(&mut self, token: Token, mut readiness: Readiness) {
        let Some(key) = self.key_of(token) else {
            // A stale event for a connection closed earlier in this batch.
            return;
        };
        if readiness.writable {
            let before = self.conns[key].footprint();
            self.on_writable(key);
            self.recount(key, before);
            let conn = &mut self.conns[key];
            let mirrorable = P::MIRRORS_INPUT && !conn.stream.is_unix();
            if mirrorable && conn.queued() == 0 && conn.state.memory_freed() {
                // Waiting for memory with nothing queued, and its own
                // socket has room again: it can be served by mirroring,
                // which needs no memory, rather than wait its turn.
                readiness.readable = true;
                readiness.read_until = ReadUntil::WouldBlock;
            }
        }
        let conn = &mut self.conns[key];
        if readiness.write_closed && conn.state == State::Waiting {
            // Waiting for memory, so neither read nor (with nothing
            // queued) written: without this, a client gone for good would
            // hold its connection until memory frees, and a stream of
            // them while others hold the cap would fill the server. No
            // echo can reach it any more.
            log::debug!(
                "[{}] gone while waiting for memory",
                TokenName(connection_token(key, conn.generation))
            );
            conn.state.failed();
        }
        if readiness.readable {
            self.on_readable(key, readiness.read_until);
        }
        self.advance(key);
        self.deliver();
    }

    fn on_writable(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.out.is_none() {
            // Nothing queued: most writes went out from the read path.
            return;
        }
        let token = connection_token(key, conn.generation);
        match conn.flush(WRITE_BUDGET, &mut self.stats) {
            // The whole budget went out and more is queued: the socket may
            // still be writable, and no edge will say so.
            Ok(n) if n >= WRITE_BUDGET && conn.queued() > 0 => {
                log::trace!("[{}] wrote {n} bytes: budget spent", TokenName(token));
                self.push_ready(token);
            }
            // Less than the budget: the flush stopped on `WouldBlock` (or
            // emptied the queue), and the kernel raises an edge when room
            // appears.
            Ok(n) => log::trace!(
                "[{}] wrote {n} queued bytes, {} left",
                TokenName(token),
                conn.queued()
            ),
            Err(e) => {
                log::debug!("[{}] write failed: {e}", TokenName(token));
                conn.state.failed();
            }
        }
    }

    /// Reads and hands the input to the protocol. Every reply it queues
    /// is counted against `--max-memory` before the next read looks at the
    /// room left.
    fn on_readable(&mut self, key: usize, read_until: ReadUntil) {
        let mut held = self.conns[key].footprint();
        self.read_loop(key, read_until, &mut held);
        self.recount_from(key, &mut held);
    }

    fn read_loop(&mut self, key: usize, read_until: ReadUntil, held: &mut usize) {
        let mut budget = READ_BUDGET;
        loop {
            self.recount_from(key, held);
            let conn = &mut self.conns[key];
            let token = connection_token(key, conn.generation);
            if !conn.state.reads() {
                if conn.state == State::Waiting {
                    // Not reading, so a reset would go unnoticed until
                    // memory frees: look for one (the peer may be gone).
                    if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
                        log::debug!("[{}] failed while waiting: {e}", TokenName(token));
                        conn.state.failed();
                    }
                }
                // Paused, waiting, flushing or closing: the bytes stay in
                // the kernel, where they count against the client's window.
                return;
            }
            if budget == 0 {
                log::trace!("[{}] read budget spent: ready list", TokenName(token));
                return self.push_ready(token);
            }
            if conn.state.talks() && self.protocol.backlog(&conn.session) {
                // The protocol still holds input from an earlier read whose
                // output budget ran out: act on it before reading more;
                // but only once this client has read half of what it was
                // sent, or a `/who` flood from a slow reader would pass
                // `--max-buffer` by itself. Pausing gives that hysteresis.
                if conn.queued() > self.config.max_buffer / 2 {
                    log::debug!("[{}] held input waits for the reader", TokenName(token));
                    return conn.state.output_full();
                }
                let (mut outbox, session) = conn.outbox_and_session(
                    token,
                    self.config.max_buffer,
                    &mut self.broadcasts,
                    &mut self.stats,
                );
                self.protocol.resume(session, &mut outbox);
                if self.protocol.backlog(&conn.session) {
                    return self.push_ready(token);
                }
                continue;
            }
            // Back-pressure: read no more than the output queue can take,
            // so echo never queues past `--max-buffer`.
            let space = conn.space(self.config.max_buffer);
            if space == 0 {
                log::debug!("[{}] output full: reading paused", TokenName(token));
                return conn.state.output_full();
            }
            let mut want = space.min(self.scratch.len()).min(budget);
            let nothing_queued = conn.queued() == 0;
            // ... and all connections together past `--max-memory`.
            if let Some(room) = self.memory_room() {
                if room < want.max(MIN_READ) {
                    if P::MIRRORS_INPUT && nothing_queued && self.mirror(key, budget, read_until) {
                        return;
                    }
                    if room < MIN_READ {
                        return self.wait_for_memory(key);
                    }
                    want = room;
                }
            }
            let conn = &mut self.conns[key];
            let buf = &mut self.scratch[..want];
            let n = match attempt(|| (&conn.stream).read(buf)) {
                // Drained: wait for the next edge. Also what a spurious
                // wake-up looks like.
                Ok(None) => {
                    log::trace!("[{}] read: WouldBlock, drained", TokenName(token));
                    return;
                }
                // Ok(0): the peer closed its side (EOF). It may still read
                // what we owe it, so this is a half-close, not an error.
                Ok(Some(0)) => {
                    log::debug!("[{}] read: 0 bytes, eof", TokenName(token));
                    0
                }
                Ok(Some(n)) => {
                    log::trace!("[{}] read {n} bytes", TokenName(token));
                    self.stats.bytes_in += n as u64;
                    self.stats.reads += 1;
                    budget -= n;
                    conn.since = self.now;
                    n
                }
                Err(e) => {
                    log::debug!("[{}] read failed: {e}", TokenName(token));
                    return conn.state.failed();
                }
            };
            // A lingering connection's input is read and dropped.
            if !conn.state.talks() {
                self.stats.bytes_discarded += n as u64;
            } else {
                let (mut outbox, session) = conn.outbox_and_session(
                    token,
                    self.config.max_buffer,
                    &mut self.broadcasts,
                    &mut self.stats,
                );
                if n == 0 {
                    self.protocol.eof(session, &mut outbox);
                } else {
                    self.protocol.data(session, &buf[..n], &mut outbox);
                    if self.protocol.backlog(&conn.session) {
                        // This read's output budget is spent: the rest of
                        // it next turn, after the others had theirs.
                        return self.push_ready(token);
                    }
                }
            }
            if n == 0 {
                return conn.state.read_eof();
            }
            // A short read means the socket is drained for now (see
            // `ReadUntil`): the read that would only say `WouldBlock` is
            // skipped, one system call less per message. Linux only;
            // elsewhere we read on to `WouldBlock`.
            if cfg!(target_os = "linux") && read_until == ReadUntil::ShortRead && n < want {
                log::trace!("[{}] short read: drained for now", TokenName(token));
                return;
            }
        }
    }

    /// After a handler: asks the connection's state machine what follows
    /// and does it, then brings the registered interest up to date.
    pub(super) fn advance(&mut self, key: usize) {
        let resume_at = self.config.max_buffer / 2;
        let conn = &mut self.conns[key];
        let token = connection_token(key, conn.generation);
        match conn.state.advance(conn.queued(), resume_at) {
            Action::Stay => {}
            Action::Close(reason) => return self.close(key, reason),
            Action::Linger => {
                // Shut our side so the client sees the last words and EOF,
                // then read and drop what it still sends until it closes
                // or the linger time passes.
                let _ = conn.stream.shutdown(Shutdown::Write);
                conn.since = self.now;
                self.arm_deadline(key);
                self.push_ready(token);
            }
            Action::Resume => {
                log::debug!("[{}] output drained: reading again", TokenName(token));
                conn.since = self.now;
                self.push_ready(token);
            }
        }
        let conn = &mut self.conns[key];
        let Some(want) = conn.state.interest(conn.queued()) else {
            // `advance` closes every state that needs nothing.
            return self.close(key, CloseReason::Done);
        };
        if want != conn.registered {
            match self
                .poll
                .registry()
                .reregister(&mut conn.stream, token, want)
            {
                Ok(()) => {
                    log::trace!("[{}] interest now {want:?}", TokenName(token));
                    conn.registered = want;
                }
                Err(e) => {
                    log::debug!("[{}] reregister failed: {e}", TokenName(token));
                    self.close(key, CloseReason::Error);
                }
            }
        }
    }

    /// Closes and forgets a connection, and tells the protocol.
    pub(super) fn close(&mut self, key: usize, reason: CloseReason) {
        let token = connection_token(key, self.conns[key].generation);
        // Deregister before the stream is dropped and the key freed: the
        // key may be handed to the next accept at once, and epoll must not
        // keep anything of the old socket under it.
        if let Err(e) = self.poll.registry().deregister(&mut self.conns[key].stream) {
            log::debug!("[{}] deregister failed: {e}", TokenName(token));
        }
        let conn = self.conns.remove(key);
        self.memory.recount(conn.footprint(), 0);
        self.stats.count_close(reason);
        if reason == CloseReason::SlowConsumer {
            log::warn!(
                "[{}] slow consumer: output passed --max-buffer, disconnecting",
                TokenName(token)
            );
        }
        log::debug!("[{}] closed ({})", TokenName(token), reason.as_str());
        let mut outbox = GoneOutbox {
            token,
            broadcasts: &mut self.broadcasts,
        };
        self.protocol.close(conn.session, &mut outbox);
        // conn.stream drops here: close(2). A descriptor is free again.
        self.resume_accepting();
    }

    /// Puts the connection's next deadline (idle or linger) on the timers.
    pub(super) fn arm_deadline(&mut self, key: usize) {
        let conn = &self.conns[key];
        let idle = self.config.idle_timeout.map(|d| d.as_millis() as u64);
        if let Some(at) = conn
            .state
            .deadline(conn.since, self.now, idle, LINGER.as_millis() as u64)
        {
            self.timers.push(at, connection_token(key, conn.generation));
        }
    }
}
