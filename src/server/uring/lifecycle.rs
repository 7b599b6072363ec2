//! Accepting (and pausing it when descriptors run out), graceful shutdown,
//! and the timers (idle, linger, stats, accept retry).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::conn::{flag, Conn, Phase, UringOutbox};
use super::{tag_of, Accepting, Engine, ACCEPT_RETRY, SHUTDOWN_GRACE, TCP, UNIX};
use crate::protocol::Protocol;
use crate::server::event_loop::concerns_one_connection;
use crate::server::{final_stats, turn_away, warn_accept_paused, CloseReason};

impl<P: Protocol> Engine<P> {
    /// Arms a multishot accept on each listener that has none.
    pub(super) fn arm_accepts(&mut self) -> io::Result<()> {
        if let Some(l) = &self.tcp {
            if !self.accept_armed[TCP as usize] {
                self.ring.accept_multi(l.as_fd(), TCP)?;
                self.accept_armed[TCP as usize] = true;
            }
        }
        if let Some((l, _)) = &self.unix {
            if !self.accept_armed[UNIX as usize] {
                self.ring.accept_multi(l.as_fd(), UNIX)?;
                self.accept_armed[UNIX as usize] = true;
            }
        }
        Ok(())
    }

    pub(super) fn on_accepted(&mut self, tag: u64, result: io::Result<OwnedFd>, more: bool) {
        if !more {
            // The multishot accept ended (an error, or our cancel).
            self.accept_armed[tag as usize] = false;
        }
        match result {
            // Accepted while shutting down: dropped, so closed at once.
            Ok(fd) if self.accepting == Accepting::Off => drop(fd),
            Ok(fd) => self.open(fd, tag == UNIX),
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            // Shutting down: an accept that failed on its way out must not
            // turn `Off` back into a pause that would accept again.
            Err(e) if self.accepting == Accepting::Off => log::debug!("accept failed: {e}"),
            // ECONNABORTED and friends concern that one connection, which
            // has left the backlog: accepting on cannot spin.
            Err(e) if concerns_one_connection(&e) => log::debug!("accept failed: {e}"),
            // Out of descriptors or memory, or an error we do not expect:
            // it would fail again at once, so pause rather than spin.
            Err(e) => return self.pause_accepting(e),
        }
        if self.accepting == Accepting::On {
            self.rearm_accepts();
        }
    }

    /// Out of descriptors: no accept is armed until a connection closes
    /// or [`ACCEPT_RETRY`] passes, so a full process does not spin on
    /// accepts that fail at once. Pending connects wait in the backlog.
    fn pause_accepting(&mut self, e: io::Error) {
        if self.emfile_at.is_none() {
            warn_accept_paused(&e, self.conns.len());
            self.emfile_at = Some(self.conns.len());
        }
        log::debug!("accepting paused ({e}) until a connection closes or {ACCEPT_RETRY:?} pass");
        self.stats.accept_paused += 1;
        self.accepting = Accepting::paused(self.now);
        for (tag, armed) in [TCP, UNIX].into_iter().zip(self.accept_armed) {
            // Paused either way: an accept the cancel missed may still
            // bring a client, who is served, and is not armed again.
            if armed {
                if let Err(e) = self.ring.cancel_accept(tag) {
                    log::warn!("cannot cancel an accept while pausing: {e}");
                }
            }
        }
    }

    /// Arms the accepts; if the ring refuses (its queue full and the
    /// kernel busy), tries again after [`ACCEPT_RETRY`] rather than stay
    /// `On` with nothing armed or end the server, as the readiness engine
    /// does when it cannot watch the listeners again.
    fn rearm_accepts(&mut self) {
        if let Err(e) = self.arm_accepts() {
            log::warn!("cannot arm accepting: {e}; retrying");
            self.stats.accept_paused += 1;
            self.accepting = Accepting::paused(self.now);
        }
    }

    /// Called once a closed connection's descriptor is really closed (so
    /// the accept has a descriptor to take: armed before that, it would
    /// fail with `EMFILE` at once and wait out [`ACCEPT_RETRY`]) and when
    /// the retry is due.
    pub(super) fn resume_accepting(&mut self) {
        if !matches!(self.accepting, Accepting::PausedUntil(_)) {
            return;
        }
        self.accepting = Accepting::On;
        // While clients still wait, each close lets one more in and the
        // limit is hit again at once: one episode, logged once. It is over
        // when half the connections held then have gone.
        if self.emfile_at.is_some_and(|n| self.conns.len() < n / 2) {
            self.emfile_at = None;
        }
        self.rearm_accepts();
    }

    fn open(&mut self, fd: OwnedFd, unix: bool) {
        self.stats.accepted += 1;
        if unix {
            self.stats.accepted_unix += 1;
        }
        let sock = socket2::SockRef::from(&fd);
        if self.conns.len() >= self.max_connections {
            // Accept and close at once: leaving it in the backlog would
            // keep the client waiting on a server that has no room. The
            // socket is blocking (io_uring needs no O_NONBLOCK), so the
            // one line is sent with MSG_DONTWAIT.
            let line = turn_away(&mut self.protocol, &mut self.stats, self.conns.len());
            if !line.is_empty() {
                if let Ok(n) = sock.send_with_flags(line, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                    self.stats.bytes_out += n as u64;
                }
                // Closing with unread input sends a reset, which can
                // destroy the line before the client reads it: shut our
                // side, and take what the client already sent (a little; a
                // full server cannot linger for everyone it turns away), as
                // the readiness engine does.
                let _ = sock.shutdown(std::net::Shutdown::Write);
                let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
                for _ in 0..16 {
                    match sock.recv_with_flags(&mut sink, libc::MSG_DONTWAIT) {
                        Ok(n) if n > 0 => self.stats.bytes_discarded += n as u64,
                        _ => break,
                    }
                }
            }
            return;
        }
        if !unix {
            // Echo and chat answer at once; Nagle would hold replies back.
            let _ = sock.set_tcp_nodelay(true);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let generation = self.next_generation;
        self.next_generation = super::next_generation(generation);
        let tag = tag_of(key, generation);
        let (mut out, mut flags, mut phase) = (None, 0, Phase::Open);
        let session = self.protocol.open(&mut UringOutbox {
            tag,
            out: &mut out,
            flags: &mut flags,
            phase: &mut phase,
            limit: self.config.max_buffer,
            broadcasts: &mut self.broadcasts,
            dirty: &mut self.dirty,
            spare: &mut self.spare,
        });
        entry.insert(Conn {
            fd,
            out,
            stamp: self.now,
            generation,
            phase,
            flags,
            session,
        });
        self.stats.active += 1;
        self.recount(key, 0);
        log::debug!("[conn {key}] open ({} held)", self.conns.len());
        if let Some(idle) = self.config.idle_timeout {
            self.timers
                .push(self.now + idle.as_millis() as u64, mio::Token(tag as usize));
        }
        self.settle(key);
    }

    /// Graceful shutdown: stop accepting and close the listeners at once,
    /// stop receiving, and let queued output drain for at most
    /// [`SHUTDOWN_GRACE`].
    pub(super) fn begin_shutdown(&mut self) -> io::Result<()> {
        self.shutdown_deadline = Some(self.now + SHUTDOWN_GRACE.as_millis() as u64);
        self.accepting = Accepting::Off;
        // As with connections, the armed accept holds the listener open:
        // cancel it, then close the descriptor once that is submitted.
        if let Some(l) = self.tcp.take() {
            self.ring.cancel_fd(l.as_fd())?;
            self.closing.push(l.into());
        }
        // The endpoint's poll holds its `Poll` open until cancelled; its
        // clients and listener close now. The `Poll`'s own descriptor stays
        // open until the cancel is submitted (see `run`): a poll re-armed
        // earlier in this batch names it by number, and the kernel takes
        // its own reference only at submission.
        if let Some(mut m) = self.metrics.take() {
            self.ring.cancel_poll(super::METRICS)?;
            m.close_all();
            self.retired = Some(m);
        }
        self.close_udp()?;
        // Dropping the socket file (after the listener) removes it.
        if let Some((l, file)) = self.unix.take() {
            self.ring.cancel_fd(l.as_fd())?;
            self.closing.push(l.into());
            drop(file);
        }
        // Every client gets what was read from it; then, as for chat's
        // too-long line, the write side is shut and input dropped until
        // EOF or the linger time: closing with the client's input unread
        // would send a reset that destroys output it has not read yet.
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.feed_stash(key);
            let conn = &mut self.conns[key];
            if conn.phase != Phase::Lingering {
                conn.phase = Phase::Draining;
                conn.flags |= flag::REJECT;
            }
            self.settle(key);
        }
        Ok(())
    }

    pub(super) fn finish(self) -> io::Result<()> {
        final_stats(&self.stats, self.conns.len(), SHUTDOWN_GRACE);
        Ok(())
    }

    /// Pops due timers: idle connections, lingering closes, stats, accept retry.
    pub(super) fn expire(&mut self) -> io::Result<()> {
        if let Accepting::PausedUntil(t) = self.accepting {
            // With a close under way, `run` resumes once its descriptor
            // is free; an accept armed before that would fail again.
            if self.now >= t && self.closing.is_empty() {
                self.resume_accepting();
            }
        }
        if let (Some(at), Some(every)) = (self.next_stats, self.config.stats_interval) {
            if self.now >= at {
                log::info!("{}", self.stats);
                self.next_stats = Some(self.now + every.as_millis() as u64);
            }
        }
        if let Some(m) = &mut self.metrics {
            // Clients past their request deadline.
            m.expire(self.now);
        }
        if let Some(mut out) = self.snapshots.take() {
            out.send_if_due(self.now, || self.snapshot());
            self.snapshots = Some(out);
        }
        self.tidy_waiting();
        while let Some(token) = self.timers.pop_due(self.now) {
            let Some(key) = self.live(token.0 as u64) else {
                continue;
            };
            let conn = &self.conns[key];
            let due = match (conn.phase, self.config.idle_timeout) {
                (Phase::Lingering, _) => conn.stamp,
                // Waiting on the client to read, or for memory others
                // hold, is not being idle.
                (_, Some(idle)) if conn.has(flag::PAUSED | flag::MEMORY_WAIT) => {
                    self.now + idle.as_millis() as u64
                }
                (_, Some(idle)) => conn.stamp + idle.as_millis() as u64,
                (_, None) => continue,
            };
            if due <= self.now {
                let reason = if conn.phase == Phase::Lingering {
                    CloseReason::LingerOver
                } else {
                    CloseReason::Idle
                };
                self.close(key, reason);
                self.deliver();
            } else {
                self.timers.push(due, token);
            }
        }
        Ok(())
    }
}
