//! Time on the loop: how long `poll` may sleep, and what is due when it
//! wakes (idle and linger deadlines, stats lines, the accept retry).
//! There is no timer thread: deadlines shorten the poll timeout.

use std::time::Duration;

use super::{Accepting, EventLoop};
use crate::protocol::Protocol;
use crate::server::connection::{CloseReason, State};
use crate::server::snapshots::SnapshotOut;
use crate::server::token::connection_key;
use crate::server::{until_nearest, LINGER};

impl<P: Protocol> EventLoop<P> {
    /// How long `poll` may sleep: not at all while the ready list has
    /// work, else until the nearest deadline.
    pub(super) fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        until_nearest(
            self.started,
            [
                self.timers.next(),
                self.next_stats,
                self.accepting.retry_at(),
                self.shutdown_deadline,
                self.metrics.as_ref().and_then(|m| m.next_deadline()),
                self.snapshots.as_ref().and_then(SnapshotOut::next_deadline),
            ],
        )
    }

    /// Handles everything due: the accept retry, the stats line, and idle
    /// or lingering connections.
    pub(super) fn expire(&mut self) {
        if let Accepting::PausedUntil(t) = self.accepting {
            if self.now >= t {
                self.resume_accepting();
            }
        }
        if let (Some(at), Some(every)) = (self.next_stats, self.config.stats_interval) {
            if self.now >= at {
                log::info!("{}", self.stats);
                self.next_stats = Some(self.now + every.as_millis() as u64);
            }
        }
        self.serve_metrics_if_due();
        if let Some(mut out) = self.snapshots.take() {
            out.send_if_due(self.now, || self.snapshot());
            self.snapshots = Some(out);
        }
        // Entries of closed connections are skipped when due; tidy them
        // away before they pile up (a closed connection costs nothing).
        let conns = &self.conns;
        let dropped = self.timers.tidy(conns.len(), |token| {
            connection_key(token).is_some_and(|(key, generation)| {
                conns.get(key).is_some_and(|c| c.generation == generation)
            })
        });
        if dropped > 0 {
            log::debug!("timers: tidied {dropped} entries of closed connections");
        }
        self.tidy_waiting();
        let idle = self.config.idle_timeout.map(|d| d.as_millis() as u64);
        let linger = LINGER.as_millis() as u64;
        while let Some(token) = self.timers.pop_due(self.now) {
            // Entries are lazy: one may belong to a connection closed
            // since, or be older than the connection's real deadline (it
            // read since, or started lingering).
            let Some(key) = self.key_of(token) else {
                continue;
            };
            let conn = &self.conns[key];
            let Some(due) = conn.state.deadline(conn.since, self.now, idle, linger) else {
                continue;
            };
            if due > self.now {
                self.timers.push(due, token);
                continue;
            }
            let reason = if conn.state == State::Lingering {
                CloseReason::LingerOver
            } else {
                CloseReason::Idle
            };
            self.close(key, reason);
            self.deliver();
        }
    }
}
