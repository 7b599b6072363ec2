//! Everything else on the loop: UDP datagrams, signals and graceful
//! shutdown, and the timers (idle, linger, stats, accept retry).

use std::io;

use super::{Accepting, EventLoop, SHUTDOWN_GRACE};
use crate::protocol::Protocol;
use crate::server::connection::{flag, Phase};
use crate::server::token::UDP;
use crate::server::udp::Next;

impl<P: Protocol> EventLoop<P> {
    pub(super) fn on_udp(&mut self, readable: bool, writable: bool) -> io::Result<()> {
        let Some(udp) = self.udp.as_mut() else {
            return Ok(());
        };
        if writable {
            udp.on_writable(&mut self.stats)?;
        }
        if readable && udp.on_readable(&mut self.scratch, &mut self.stats)? == Next::MoreReady {
            self.push_ready(UDP);
        }
        let udp = self.udp.as_mut().expect("checked above");
        udp.update_interest(self.poll.registry(), UDP)
    }

    pub(super) fn on_signal(&mut self) -> io::Result<()> {
        let mut stop = false;
        for signal in self.signals.pending() {
            log::info!("signal {signal}: shutting down");
            stop = true;
        }
        if stop && self.shutdown_deadline.is_none() {
            self.begin_shutdown()?;
        }
        Ok(())
    }

    /// Graceful shutdown: close the listeners at once (new connects are
    /// refused), stop reading, and let every client's queued output drain
    /// for at most [`SHUTDOWN_GRACE`].
    pub(super) fn begin_shutdown(&mut self) -> io::Result<()> {
        self.shutdown_deadline = Some(self.now + SHUTDOWN_GRACE.as_millis() as u64);
        self.accepting = Accepting::Off;
        if let Some(mut l) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Dropping the Unix listener also removes its socket file.
        if let Some((mut l, _file)) = self.unix.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut u) = self.udp.take() {
            let _ = u.deregister(self.poll.registry());
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            conn.phase = Phase::Draining;
            conn.flags &= !flag::REJECT;
            self.settle(key);
        }
        Ok(())
    }

    pub(super) fn finish(self) -> io::Result<()> {
        if !self.conns.is_empty() {
            log::warn!(
                "shutdown: {} clients still had output queued after {:?}; closing them",
                self.conns.len(),
                SHUTDOWN_GRACE
            );
        }
        let mut stats = self.stats.clone();
        stats.closed += stats.active as u64;
        stats.active = 0;
        log::info!("final {stats}");
        Ok(())
    }

    /// Pops due timers: idle connections, lingering closes, stats, accept retry.
    pub(super) fn expire(&mut self) -> io::Result<()> {
        if let Accepting::PausedUntil(t) = self.accepting {
            if self.now >= t {
                self.resume_accepting()?;
            }
        }
        if let (Some(at), Some(every)) = (self.next_stats, self.config.stats_interval) {
            if self.now >= at {
                log::info!("{}", self.stats);
                self.next_stats = Some(self.now + every.as_millis() as u64);
            }
        }
        while let Some(token) = self.timers.pop_due(self.now) {
            let Some(key) = self.live(token) else {
                continue;
            };
            let conn = &self.conns[key];
            let due = match (conn.phase, self.config.idle_timeout) {
                (Phase::Lingering, _) => conn.stamp,
                // Waiting on the client to read is not being idle.
                (_, Some(idle)) if conn.has(flag::PAUSED) => self.now + idle.as_millis() as u64,
                (_, Some(idle)) => conn.stamp + idle.as_millis() as u64,
                (_, None) => continue,
            };
            if due <= self.now {
                let why = if conn.phase == Phase::Lingering {
                    "linger over"
                } else {
                    "idle"
                };
                self.close(key, why);
                self.deliver();
            } else {
                self.timers.push(due, token);
            }
        }
        Ok(())
    }
}
