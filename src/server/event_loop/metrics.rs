//! The `--metrics` endpoint on the loop: serve
//! [`Endpoint`](crate::metrics::endpoint::Endpoint), and take a
//! [`Snapshot`] of the loop when (and only when) a scrape asks for one.
//!
//! The endpoint's sockets live on a `Poll` of their own, registered here
//! as one socket-like source (`METRICS`). Why not register them directly:
//! epoll hands out ready sockets in the order they became ready, so under
//! load a scrape would queue behind every busy client (19,000 of them,
//! 1,024 per wake-up: tens of milliseconds). Instead the loop also looks
//! at the endpoint's own `Poll` once per millisecond of loop time
//! ([`EventLoop::serve_metrics_if_due`]): one `epoll_wait` with a zero
//! timeout at most 1,000 times a second. Not only between turns: one turn
//! under load is up to 1,024 events plus the ready list, over 10 ms at
//! 19,000 busy connections, so the loop also reads the clock every
//! `METRICS_CHECK_EVERY` (64) events of a turn
//! ([`EventLoop::serve_metrics_mid_turn`]). A scrape then waits for about
//! a millisecond and 64 events, not for the rest of the turn. Fairness
//! among clients is unchanged: they are served in the same order, and the
//! endpoint's own work is bounded (16 clients, 32 system calls each).
//!
//! In a worker of `reactor serve --workers N --metrics ...` there is no
//! endpoint here: the supervisor serves one for all workers, and this
//! loop writes its snapshot on stdout, a pipe to the supervisor, every
//! `Config::snapshot_every` ([`SnapshotOut`](crate::server::snapshots::SnapshotOut)),
//! through a writer thread so a stalled supervisor never blocks the loop.
//!
//! The loop's hot path only bumps integers in [`Stats`](super::Stats);
//! gauges that would need bookkeeping on every write (queued bytes,
//! paused connections) are counted here instead, by one walk over the
//! connections per scrape (about 20 µs at 20,000 connections).

use super::EventLoop;
use crate::metrics::{render, Snapshot};
use crate::protocol::Protocol;
use crate::server::connection::State;

impl<P: Protocol> EventLoop<P> {
    /// The endpoint's `Poll` has events (or it is time to look): serve
    /// its listener and clients.
    pub(super) fn on_metrics(&mut self) {
        // Taken out for the call, so the render closure can borrow the
        // rest of the loop.
        let Some(mut endpoint) = self.metrics.take() else {
            return;
        };
        self.metrics_served = self.now;
        endpoint.serve(self.now, &mut || render(&[(0, self.snapshot())]));
        endpoint.expire(self.now);
        self.metrics = Some(endpoint);
    }

    /// In the middle of a turn (see the module docs): reads the clock
    /// and serves the endpoint if it was not served this millisecond.
    /// Without `--metrics`, nothing but one branch.
    pub(super) fn serve_metrics_mid_turn(&mut self) {
        if self.metrics.is_some() {
            // The loop's clock only moves forward: deadlines set later in
            // this turn are a little more exact, none is missed.
            self.now = self.started.elapsed().as_millis() as u64;
            self.serve_metrics_if_due();
        }
    }

    /// Serves the endpoint if it was not served during this millisecond
    /// (see the module docs for why the loop does not only wait for its
    /// event).
    pub(super) fn serve_metrics_if_due(&mut self) {
        if self.metrics.is_some() && self.now != self.metrics_served {
            self.on_metrics();
        }
    }

    /// Everything the loop can tell, now.
    pub fn snapshot(&self) -> Snapshot {
        let (mut queued, mut paused) = (0u64, 0u64);
        for (_, c) in &self.conns {
            queued += c.queued() as u64;
            paused += u64::from(c.state == State::Paused);
        }
        self.stats.snapshot(queued, paused, self.ready.len() as u64)
    }
}
