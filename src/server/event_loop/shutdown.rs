//! Ending the loop: SIGINT/SIGTERM (or the stop handle) begin a graceful
//! shutdown; [`EventLoop::finish`] reports once every client is flushed or
//! the grace period is over.

use super::{Accepting, EventLoop, SHUTDOWN_GRACE};
use crate::protocol::Protocol;
use crate::server::final_stats;
use crate::server::stats::Stats;

impl<P: Protocol> EventLoop<P> {
    pub(super) fn on_signal(&mut self) {
        let mut stop = false;
        for signal in self.signals.pending() {
            log::info!("signal {signal}: shutting down");
            stop = true;
        }
        if stop {
            self.begin_shutdown();
        }
    }

    pub(super) fn on_stop(&mut self) {
        log::info!("stop requested: shutting down");
        self.begin_shutdown();
    }

    /// Graceful shutdown: close the listeners at once (new connects are
    /// refused), stop reading, and let every client's queued output drain
    /// for at most [`SHUTDOWN_GRACE`].
    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
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
        if let Some(mut m) = self.metrics.take() {
            let _ = m.deregister(self.poll.registry());
            m.close_all();
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.conns[key].state.shutdown();
            self.advance(key);
        }
    }

    /// The final stats line; what is still open is closed as the loop
    /// (and every socket it owns) is dropped.
    pub(super) fn finish(self) -> Stats {
        final_stats(&self.stats, self.conns.len(), SHUTDOWN_GRACE)
    }
}
