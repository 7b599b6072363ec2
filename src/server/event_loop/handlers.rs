//! One connection's readiness: read, write, settle its interest, close
//! it; and deliver the broadcasts its protocol queued.

use std::io::{self, Read};
use std::net::Shutdown;
use std::rc::Rc;

use mio::Token;

use super::{Drain, EventLoop, LINGER, READ_BUDGET, WRITE_BUDGET};
use crate::protocol::{Audience, Protocol};
use crate::server::connection::{flag, GoneOutbox, Phase};
use crate::server::token::{connection_token, TokenName};

impl<P: Protocol> EventLoop<P> {
    pub(super) fn on_connection(
        &mut self,
        token: Token,
        readable: bool,
        writable: bool,
        drain: Drain,
    ) {
        let Some(key) = self.live(token) else {
            // A stale event for a connection closed earlier in this batch.
            return;
        };
        if writable {
            self.on_writable(key);
        }
        if readable {
            self.on_readable(key, drain);
        }
        self.settle(key);
        self.deliver();
    }

    pub(super) fn on_writable(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.out.is_none() {
            // Nothing queued: most writes went out from the read path.
            return;
        }
        match conn.flush(WRITE_BUDGET, &mut self.stats) {
            // Less than the budget went out: the flush stopped on
            // `WouldBlock` (or emptied the queue), and the kernel raises
            // an edge when room appears. The whole budget went out: the
            // socket may still be writable and no edge will say so.
            Ok(n) if n >= WRITE_BUDGET && conn.queued() > 0 => {
                let token = connection_token(key, conn.generation);
                log::trace!(
                    "[{}] wrote {n} bytes: budget spent, ready list",
                    TokenName(token)
                );
                self.push_ready(token);
            }
            Ok(n) => log::trace!(
                "[{}] wrote {n} queued bytes, {} left",
                TokenName(connection_token(key, conn.generation)),
                conn.queued()
            ),
            Err(e) => {
                log::debug!(
                    "[{}] write failed: {e}",
                    TokenName(connection_token(key, conn.generation))
                );
                conn.flags |= flag::FAILED;
            }
        }
    }

    pub(super) fn on_readable(&mut self, key: usize, drain: Drain) {
        let mut budget = READ_BUDGET;
        loop {
            let conn = &mut self.conns[key];
            let token = connection_token(key, conn.generation);
            if conn.has(flag::READ_CLOSED | flag::FAILED | flag::OVERFLOW)
                || conn.phase == Phase::Draining
            {
                return;
            }
            if budget == 0 {
                log::trace!("[{}] read budget spent: ready list", TokenName(token));
                self.push_ready(token);
                return;
            }
            // Back-pressure: read no more than the output queue can take,
            // so echo never queues past `--max-buffer`.
            let space = conn
                .out
                .as_ref()
                .map_or(self.config.max_buffer, |q| q.space());
            if space == 0 {
                if !conn.has(flag::PAUSED) {
                    log::debug!("[{}] output full: reading paused", TokenName(token));
                }
                conn.flags |= flag::PAUSED;
                return;
            }
            let want = space.min(self.scratch.len()).min(budget);
            let buf = &mut self.scratch[..want];
            let n = match (&conn.stream).read(buf) {
                // Ok(0): the peer closed its side (EOF). It may still read
                // what we owe it, so this is a half-close, not an error.
                Ok(0) => {
                    conn.flags |= flag::READ_CLOSED;
                    log::debug!("[{}] read: 0 bytes, eof", TokenName(token));
                    0
                }
                Ok(n) => {
                    log::trace!("[{}] read {n} bytes", TokenName(token));
                    self.stats.bytes_in += n as u64;
                    budget -= n;
                    conn.stamp = self.now;
                    n
                }
                // Drained: wait for the next edge. Also what a spurious
                // wake-up looks like.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::trace!("[{}] read: WouldBlock, drained", TokenName(token));
                    return;
                }
                // A signal interrupted the call; nothing happened, retry.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("[{}] read failed: {e}", TokenName(token));
                    conn.flags |= flag::FAILED;
                    return;
                }
            };
            // A lingering connection's input is read and dropped.
            if conn.phase == Phase::Open {
                let (mut outbox, session) = conn.split(
                    token,
                    self.config.max_buffer,
                    &mut self.broadcasts,
                    &mut self.stats,
                );
                if n == 0 {
                    self.protocol.eof(session, &mut outbox);
                } else {
                    self.protocol.data(session, &buf[..n], &mut outbox);
                }
            }
            if n == 0 {
                return;
            }
            // A short read means the socket is drained for now: a stream
            // socket hands over everything it holds, up to the buffer, and
            // bytes that arrive after this read raise a new edge. So the
            // read that would only say `WouldBlock` is skipped: one system
            // call less per message. (Linux; elsewhere we read on to
            // WouldBlock.) Not when the event said the peer has closed:
            // then the FIN is queued behind these bytes and no new edge
            // will come for it (see `Drain`).
            if cfg!(target_os = "linux") && drain == Drain::UntilShortRead && n < want {
                log::trace!("[{}] short read: drained for now", TokenName(token));
                return;
            }
        }
    }

    /// After a handler: close the connection if it is finished, move it
    /// between phases, and bring its registered interest up to date.
    pub(super) fn settle(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let token = connection_token(key, conn.generation);
        if conn.has(flag::FAILED) {
            return self.close(key, "error");
        }
        if conn.has(flag::OVERFLOW) {
            self.stats.dropped_slow += 1;
            log::warn!(
                "[{}] slow consumer: output passed --max-buffer, disconnecting",
                TokenName(token)
            );
            return self.close(key, "slow consumer");
        }
        if conn.phase == Phase::Draining && conn.queued() == 0 {
            if !conn.has(flag::REJECT) {
                return self.close(key, "done");
            }
            // Shut our side so the client sees the error line and EOF,
            // then read and drop what it still sends until it closes or
            // the linger time passes.
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.flags &= !flag::REJECT;
            conn.phase = Phase::Lingering;
            conn.stamp = self.now + LINGER.as_millis() as u64;
            self.timers.push(conn.stamp, token);
            // Input may already be waiting and its edge consumed.
            self.push_ready(token);
        }
        let conn = &mut self.conns[key];
        if conn.has(flag::PAUSED) && conn.queued() <= self.config.max_buffer / 2 {
            // Drained enough: resume reading. The edge for bytes that
            // arrived while paused is long gone, so look for them on the
            // next turn rather than waiting for an event that won't come.
            conn.flags &= !flag::PAUSED;
            conn.stamp = self.now;
            self.push_ready(token);
        }
        let conn = &mut self.conns[key];
        match conn.interest() {
            None => self.close(key, "finished"),
            Some(want) if want != conn.registered() => {
                match self
                    .poll
                    .registry()
                    .reregister(&mut conn.stream, token, want)
                {
                    Ok(()) => {
                        log::trace!("[{}] interest now {want:?}", TokenName(token));
                        conn.set_registered(want);
                    }
                    Err(e) => {
                        log::debug!("[{}] reregister failed: {e}", TokenName(token));
                        self.close(key, "error");
                    }
                }
            }
            Some(_) => {}
        }
    }

    /// Closes and forgets a connection, and tells the protocol.
    pub(super) fn close(&mut self, key: usize, why: &str) {
        let token = connection_token(key, self.conns[key].generation);
        // Deregister before the stream is dropped and the key freed: the
        // key may be handed to the next accept at once, and epoll must not
        // keep anything of the old socket under it.
        if let Err(e) = self.poll.registry().deregister(&mut self.conns[key].stream) {
            log::debug!("[{}] deregister failed: {e}", TokenName(token));
        }
        let conn = self.conns.remove(key);
        self.stats.active -= 1;
        self.stats.closed += 1;
        log::debug!("[{}] closed ({why})", TokenName(token));
        let mut outbox = GoneOutbox {
            token,
            broadcasts: &mut self.broadcasts,
        };
        self.protocol.close(conn.session, &mut outbox);
        // conn.stream drops here: close(2).
        if let Err(e) = self.resume_accepting() {
            log::warn!("cannot re-register a listener: {e}");
        }
    }

    /// Delivers queued broadcasts to their recipients, closing the ones
    /// that cannot take them; their departure may broadcast more.
    pub(super) fn deliver(&mut self) {
        while !self.broadcasts.is_empty() {
            let batch = std::mem::take(&mut self.broadcasts);
            if self.shutdown_deadline.is_some() {
                // Shutting down: flush what was already queued, start
                // nothing new.
                continue;
            }
            // Recipient by recipient, every chunk of the batch meant for
            // it in one go: one vectored write each, not one per line.
            let mut mine: Vec<&Rc<[u8]>> = Vec::with_capacity(batch.len());
            for (key, conn) in self.conns.iter_mut() {
                let token = connection_token(key, conn.generation);
                if conn.phase != Phase::Open || conn.has(flag::FAILED | flag::OVERFLOW) {
                    continue;
                }
                mine.clear();
                mine.extend(
                    batch
                        .iter()
                        .filter(|b| !(b.to == Audience::Others && token == b.from))
                        .map(|b| &b.chunk),
                );
                if mine.is_empty() {
                    continue;
                }
                let before = conn.queued();
                conn.send_shared(&mine, self.config.max_buffer, &mut self.stats);
                if conn.has(flag::FAILED | flag::OVERFLOW) {
                    self.doomed.push(token);
                } else if before == 0 && conn.queued() > 0 {
                    self.touched.push(token);
                }
            }
            // Closing a doomed client broadcasts its `left` line, which
            // the next turn of this loop delivers.
            let mut touched = std::mem::take(&mut self.touched);
            touched.append(&mut self.doomed);
            for &token in &touched {
                if let Some(key) = self.live(token) {
                    self.settle(key);
                }
            }
            touched.clear();
            self.touched = touched;
        }
    }
}
