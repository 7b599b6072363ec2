//! The `--metrics` endpoint on the uring engine: the same
//! [`Endpoint`](crate::metrics::endpoint::Endpoint) and the same series as
//! the readiness loop (`event_loop/metrics.rs`).
//!
//! The endpoint's sockets live on a small `mio::Poll` of their own; the
//! ring watches that `Poll`'s descriptor with a one-shot poll
//! ([`crate::net::ring::Ring::poll_readable`]), and when it fires the endpoint
//! is served without waiting (its accepts, reads and writes are ordinary
//! non-blocking calls: a few scrapes a second are not worth putting
//! through the ring), then the poll is armed again. Gauges are counted
//! by one walk over the connections per scrape, as in the readiness loop.

use std::io;

use super::conn::flag;
use super::{Engine, METRICS};
use crate::metrics::{render, Snapshot};
use crate::protocol::Protocol;

impl<P: Protocol> Engine<P> {
    /// The endpoint's `Poll` has events: serve its listener and clients,
    /// and watch it again.
    pub(super) fn on_metrics(&mut self) -> io::Result<()> {
        let Some(mut endpoint) = self.metrics.take() else {
            return Ok(());
        };
        endpoint.serve(self.now, &mut || render(&[(0, self.snapshot())]));
        endpoint.expire(self.now);
        // Only the ring itself or a listener failing may end the loop:
        // an endpoint that cannot be watched again is given up.
        if let Err(e) = self.ring.poll_readable(&endpoint, METRICS) {
            log::warn!("--metrics: cannot watch the endpoint again ({e}); closing it");
            // Nothing is armed on it (the one-shot poll fired, and this
            // one never reached the ring): it may close now.
            drop(endpoint);
            return Ok(());
        }
        self.metrics = Some(endpoint);
        Ok(())
    }

    /// Everything the engine can tell, now. There is no ready list (the
    /// kernel does the I/O), so its length is 0; `poll_wakeups` counts
    /// returns from `io_uring_enter`, and `events` completions.
    pub fn snapshot(&self) -> Snapshot {
        let (mut queued, mut paused) = (0u64, 0u64);
        for (_, c) in &self.conns {
            queued += c.queued() as u64;
            paused += u64::from(c.has(flag::PAUSED));
        }
        self.stats.snapshot(queued, paused, 0)
    }
}
