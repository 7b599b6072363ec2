//! Counters the loop keeps, and the line it logs them as.

use std::fmt;

use super::connection::CloseReason;

/// What the server has done since it started.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Connections open now.
    pub active: usize,
    /// Connections accepted (rejected ones included).
    pub accepted: u64,
    /// Of those, Unix-domain ones.
    pub accepted_unix: u64,
    /// Connections turned away at once because `--max-connections` was reached.
    pub rejected: u64,
    /// Connections closed.
    pub closed: u64,
    /// Of those, by reason, in the order of [`CloseReason::ALL`].
    pub closed_by: [u64; CloseReason::ALL.len()],
    /// Slow chat consumers dropped for passing `--max-buffer`.
    pub dropped_slow: u64,
    /// Times accepting paused because descriptors (or socket memory) ran out.
    pub accept_paused: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Of those, bytes read while lingering and thrown away unheard.
    pub bytes_discarded: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// UDP datagrams received.
    pub udp_in: u64,
    /// UDP datagrams sent back.
    pub udp_out: u64,
    /// UDP datagrams dropped because the send queue was full.
    pub udp_dropped: u64,
}

impl Stats {
    /// Counts one closed connection.
    pub fn count_close(&mut self, reason: CloseReason) {
        self.active -= 1;
        self.closed += 1;
        self.closed_by[reason as usize] += 1;
        if reason == CloseReason::SlowConsumer {
            self.dropped_slow += 1;
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stats: active={} accepted={} (unix {}) rejected={} closed={} slow_dropped={} \
             bytes_in={} bytes_out={} udp_in={} udp_out={} udp_dropped={}",
            self.active,
            self.accepted,
            self.accepted_unix,
            self.rejected,
            self.closed,
            self.dropped_slow,
            self.bytes_in,
            self.bytes_out,
            self.udp_in,
            self.udp_out,
            self.udp_dropped
        )
    }
}
