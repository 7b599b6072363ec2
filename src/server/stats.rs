//! Counters the loop keeps, and the line it logs them as.

use std::fmt;

use super::connection::CloseReason;
use crate::metrics::Snapshot;

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
    /// Stream reads that returned data (one per message in ping-pong echo).
    pub reads: u64,
    /// Times `poll` returned.
    pub poll_wakeups: u64,
    /// Events over all wake-ups.
    pub events: u64,
    /// Wake-ups by events brought, by [`EVENT_BUCKETS`](crate::metrics::snapshot::EVENT_BUCKETS).
    pub events_per_wakeup: [u64; 12],
    /// Nanoseconds from `poll` returning to the next `poll` call.
    pub busy_nanos: u64,
}

impl Stats {
    /// Counts one wake-up that brought `events` events: three adds and a
    /// bucket index, nothing the loop would notice.
    #[inline]
    pub fn count_wakeup(&mut self, events: usize) {
        self.poll_wakeups += 1;
        self.events += events as u64;
        self.events_per_wakeup[crate::metrics::snapshot::event_bucket(events)] += 1;
    }

    /// Counts one closed connection.
    pub fn count_close(&mut self, reason: CloseReason) {
        self.active -= 1;
        self.closed += 1;
        self.closed_by[reason as usize] += 1;
        if reason == CloseReason::SlowConsumer {
            self.dropped_slow += 1;
        }
    }

    /// The `--metrics` snapshot of these counters, with the gauges an
    /// engine counts by walking its connections when a scrape asks
    /// (either engine: the series are the same).
    pub fn snapshot(&self, queued_bytes: u64, paused: u64, ready_list: u64) -> Snapshot {
        Snapshot {
            connections_active: self.active as u64,
            connections_accepted: self.accepted,
            closed: CloseReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.closed_by[*r as usize]))
                .chain([("rejected".to_string(), self.rejected)])
                .collect(),
            bytes_received: self.bytes_in,
            bytes_sent: self.bytes_out,
            reads: self.reads + self.udp_in,
            queued_bytes,
            paused_connections: paused,
            ready_list,
            poll_wakeups: self.poll_wakeups,
            events_per_wakeup: self.events_per_wakeup,
            events: self.events,
            busy_nanos: self.busy_nanos,
            accept_paused: self.accept_paused,
            slow_consumers_dropped: self.dropped_slow,
            udp_received: self.udp_in,
            udp_sent: self.udp_out,
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stats: active={} accepted={} (unix {}) rejected={} closed={} slow_dropped={} \
             bytes_in={} bytes_discarded={} bytes_out={} udp_in={} udp_out={} udp_dropped={}",
            self.active,
            self.accepted,
            self.accepted_unix,
            self.rejected,
            self.closed,
            self.dropped_slow,
            self.bytes_in,
            self.bytes_discarded,
            self.bytes_out,
            self.udp_in,
            self.udp_out,
            self.udp_dropped
        )
    }
}

impl Stats {
    /// Adds another worker's counters to these.
    pub fn add(&mut self, o: &Stats) {
        self.active += o.active;
        self.accepted += o.accepted;
        self.accepted_unix += o.accepted_unix;
        self.rejected += o.rejected;
        self.closed += o.closed;
        for (a, b) in self.closed_by.iter_mut().zip(o.closed_by) {
            *a += b;
        }
        self.dropped_slow += o.dropped_slow;
        self.accept_paused += o.accept_paused;
        self.bytes_discarded += o.bytes_discarded;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.udp_in += o.udp_in;
        self.udp_out += o.udp_out;
        self.udp_dropped += o.udp_dropped;
    }

    /// Reads back a logged stats line (the [`Display`](fmt::Display) form,
    /// anywhere in `line`): the supervisor learns its workers' counters
    /// from their log. Counters the line does not show stay 0. `Some((true, stats))` for the final line a worker
    /// logs at exit. Unknown keys are skipped.
    pub fn parse_log_line(line: &str) -> Option<(bool, Stats)> {
        let (last, rest) = if let Some(i) = line.find("] final stats: ") {
            (true, &line[i + "] final stats: ".len()..])
        } else {
            let i = line.find("] stats: ")?;
            (false, &line[i + "] stats: ".len()..])
        };
        let mut s = Stats::default();
        let mut words = rest.split_whitespace().peekable();
        while let Some(word) = words.next() {
            // `accepted=5 (unix 1)`: the Unix share follows in brackets.
            if word == "(unix" {
                let n = words.next()?.trim_end_matches(')');
                s.accepted_unix = n.parse().ok()?;
                continue;
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let n: u64 = value.parse().ok()?;
            match key {
                "active" => s.active = n as usize,
                "accepted" => s.accepted = n,
                "rejected" => s.rejected = n,
                "closed" => s.closed = n,
                "slow_dropped" => s.dropped_slow = n,
                "bytes_in" => s.bytes_in = n,
                "bytes_discarded" => s.bytes_discarded = n,
                "bytes_out" => s.bytes_out = n,
                "udp_in" => s.udp_in = n,
                "udp_out" => s.udp_out = n,
                "udp_dropped" => s.udp_dropped = n,
                _ => {}
            }
        }
        Some((last, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(k: u64) -> Stats {
        Stats {
            active: k as usize,
            accepted: 2 * k,
            accepted_unix: 3 * k,
            rejected: 4 * k,
            closed: 5 * k,
            dropped_slow: 6 * k,
            bytes_in: 7 * k,
            bytes_out: 8 * k,
            udp_in: 9 * k,
            udp_out: 10 * k,
            udp_dropped: 11 * k,
            ..Stats::default()
        }
    }

    #[test]
    fn a_logged_line_reads_back_as_the_same_counters() {
        let line = format!(
            "2026-01-01T00:00:00Z INFO  [reactor::x@worker-1] {}",
            sample(3)
        );
        let (last, s) = Stats::parse_log_line(&line).unwrap();
        assert!(!last);
        assert_eq!(s.to_string(), sample(3).to_string());
        let line = format!("... [reactor::x@worker-0] final {}", sample(2));
        let (last, s) = Stats::parse_log_line(&line).unwrap();
        assert!(last);
        assert_eq!(s.to_string(), sample(2).to_string());
    }

    #[test]
    fn other_log_lines_are_not_stats() {
        assert!(Stats::parse_log_line("INFO [reactor::x] listening, stats: later").is_none());
        assert!(Stats::parse_log_line("INFO [reactor::x] stats: active=x").is_none());
    }

    #[test]
    fn added_counters_are_summed_field_by_field() {
        let mut s = sample(1);
        s.add(&sample(2));
        assert_eq!(s.to_string(), sample(3).to_string());
    }
}
