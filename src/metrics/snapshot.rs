//! What the loop counts: one plain struct of integers.
//!
//! The event loop bumps these fields directly on its hot path (an add to
//! a field it already has in cache; no atomics, no locks, no maps), and
//! nothing is formatted until a scrape asks for it. A [`Snapshot`] is also
//! what a worker process sends its supervisor: snapshots [`add`] up, and
//! one travels as one line of JSON ([`Snapshot::to_json_line`]).
//!
//! [`add`]: Snapshot::add

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upper bounds (`le`) of the events-per-wake-up histogram: 0, then powers
/// of two up to 1024 (the most events one `poll` returns). The `+Inf`
/// bucket is implicit: it is the count.
pub const EVENT_BUCKETS: [u64; 12] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// The bucket (index into [`EVENT_BUCKETS`]) that `n` events fall in.
/// Branch-light, so it costs nothing per wake-up: 0 → 0, 1 → 1, and
/// otherwise one past the number of bits in `n - 1`.
#[inline]
pub fn event_bucket(n: usize) -> usize {
    let i = match n {
        0 => 0,
        n => 1 + (usize::BITS - (n - 1).leading_zeros()) as usize,
    };
    i.min(EVENT_BUCKETS.len() - 1)
}

/// The loop's counters and gauges. Counters only grow; gauges are set
/// from the loop's state when the snapshot is taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Gauge: connections open now.
    pub connections_active: u64,
    /// Connections accepted (rejected ones included).
    pub connections_accepted: u64,
    /// Connections closed, by reason (the `reason` label): the server's
    /// close reasons, and `rejected` for those turned away at
    /// `--max-connections`. A map, so this module needs no knowledge of
    /// the server's reasons and snapshots of different builds still add.
    pub closed: BTreeMap<String, u64>,
    /// Bytes read from clients (TCP, Unix and UDP).
    pub bytes_received: u64,
    /// Bytes written to clients.
    pub bytes_sent: u64,
    /// Reads (and datagrams) that returned data: in ping-pong echo, one
    /// per message, so `reactor top` shows it as msgs/s.
    pub reads: u64,
    /// Gauge: bytes waiting in the server's output queues.
    pub queued_bytes: u64,
    /// Gauge: connections not read from because their output is full.
    pub paused_connections: u64,
    /// Gauge: sockets on the ready list (budget spent, more to do).
    pub ready_list: u64,
    /// `poll` calls that returned (events, timeout, or an interruption).
    pub poll_wakeups: u64,
    /// Wake-ups by number of events, bucketed by [`EVENT_BUCKETS`]
    /// (each wake-up counted in its own bucket only, not cumulatively).
    pub events_per_wakeup: [u64; 12],
    /// Sum of events over all wake-ups.
    pub events: u64,
    /// Nanoseconds spent between `poll` returning and the next `poll`.
    pub busy_nanos: u64,
    /// Times accepting paused because descriptors ran out (EMFILE/ENFILE).
    pub accept_paused: u64,
    /// Chat clients dropped for not reading.
    pub slow_consumers_dropped: u64,
    /// UDP datagrams received.
    pub udp_received: u64,
    /// UDP datagrams sent.
    pub udp_sent: u64,
}

impl Snapshot {
    /// Counts one wake-up that brought `events` events.
    #[inline]
    pub fn count_wakeup(&mut self, events: usize) {
        self.poll_wakeups += 1;
        self.events += events as u64;
        self.events_per_wakeup[event_bucket(events)] += 1;
    }

    /// Connections closed for any reason, rejected ones included.
    pub fn closed_total(&self) -> u64 {
        self.closed.values().sum()
    }

    /// Adds `other` into `self`: counters, gauges and buckets alike, which
    /// is what summing workers means for every series here.
    pub fn add(&mut self, other: &Self) {
        fn each<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.connections_active += other.connections_active;
        self.connections_accepted += other.connections_accepted;
        for (reason, n) in &other.closed {
            *self.closed.entry(reason.clone()).or_default() += n;
        }
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
        self.reads += other.reads;
        self.queued_bytes += other.queued_bytes;
        self.paused_connections += other.paused_connections;
        self.ready_list += other.ready_list;
        self.poll_wakeups += other.poll_wakeups;
        each(&mut self.events_per_wakeup, &other.events_per_wakeup);
        self.events += other.events;
        self.busy_nanos += other.busy_nanos;
        self.accept_paused += other.accept_paused;
        self.slow_consumers_dropped += other.slow_consumers_dropped;
        self.udp_received += other.udp_received;
        self.udp_sent += other.udp_sent;
    }

    /// One line of JSON, no newline inside, for a worker to send up a pipe.
    pub fn to_json_line(&self) -> String {
        // Serializing plain integers and arrays cannot fail.
        serde_json::to_string(self).expect("a snapshot is plain integers")
    }

    /// The inverse of [`Snapshot::to_json_line`] (a trailing newline is fine).
    pub fn from_json_line(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_count_lands_in_the_smallest_bucket_that_holds_it() {
        for n in 0..=2048usize {
            let i = event_bucket(n);
            let bound = EVENT_BUCKETS[i];
            if n as u64 <= *EVENT_BUCKETS.last().unwrap() {
                assert!(n as u64 <= bound, "{n} in le={bound}");
                assert!(
                    i == 0 || n as u64 > EVENT_BUCKETS[i - 1],
                    "{n} not in le={bound}"
                );
            } else {
                assert_eq!(i, EVENT_BUCKETS.len() - 1, "overflow clamps to the last");
            }
        }
    }

    #[test]
    fn snapshots_add_field_by_field() {
        let mut a = Snapshot::default();
        a.count_wakeup(3);
        a.closed.insert("idle".into(), 1);
        a.closed.insert("rejected".into(), 1);
        a.bytes_sent = 10;
        a.connections_active = 2;
        let mut b = a.clone();
        b.count_wakeup(0);
        b.udp_received = 7;
        a.add(&b);
        assert_eq!(a.poll_wakeups, 3);
        assert_eq!(a.events, 6);
        assert_eq!(a.events_per_wakeup[event_bucket(3)], 2);
        assert_eq!(a.events_per_wakeup[0], 1);
        assert_eq!(a.closed["idle"], 2);
        assert_eq!(a.closed_total(), 4);
        assert_eq!(
            (a.bytes_sent, a.connections_active, a.udp_received),
            (20, 4, 7)
        );
    }

    #[test]
    fn a_snapshot_survives_one_json_line() {
        let mut s = Snapshot::default();
        s.count_wakeup(1000);
        s.closed.insert("linger_over".into(), 3);
        s.busy_nanos = u64::MAX;
        let line = s.to_json_line();
        assert!(!line.contains('\n'));
        assert_eq!(Snapshot::from_json_line(&format!("{line}\n")).unwrap(), s);
        assert!(Snapshot::from_json_line("{\"nope\":1}").is_err());
    }
}
