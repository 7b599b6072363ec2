//! `reactor serve --workers N --metrics HOST:PORT`: one endpoint for all
//! workers, served by the supervisor.
//!
//! Workers share nothing at run time, so each one's loop counts for
//! itself. The supervisor binds the metrics port (workers get no
//! `--metrics`) and tells every worker to write its
//! [`Snapshot`] on stdout every [`SNAPSHOT_EVERY`], as one line
//! `snapshot {json}` (the hidden `--snapshot-every-ms`; the loop's
//! `metrics.rs`). Its stdout thread parses those lines, and
//! [`WorkerMetrics`] keeps the latest per worker, which a
//! [`Standalone`] endpoint on a thread of its own renders on each scrape:
//! the sums, and each worker's series labelled `worker="I"`
//! ([`crate::metrics::render`]). A scrape therefore sees numbers at most
//! [`SNAPSHOT_EVERY`] old, and never waits for a worker's loop.
//!
//! # A worker that dies
//! Its replacement starts counting from zero, but the series for its slot
//! must not go backwards (Prometheus would read a counter reset into
//! every `rate()` of the sums). So the slot keeps what its dead
//! processes counted (`retired`) and shows `retired + latest`: counters
//! go on from the dead worker's last snapshot, and gauges (connections
//! open, queued bytes, paused, ready list) are those of the live process
//! only. The connections the dead worker held were closed by the kernel;
//! they are counted closed with `reason="worker_exited"`, so accepted =
//! closed + active still holds. What the dead worker counted after its
//! last snapshot (at most [`SNAPSHOT_EVERY`] of it) is lost.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::metrics::endpoint::Standalone;
use crate::metrics::{render, Snapshot};

/// How often a worker sends its snapshot up: a scrape's numbers are at
/// most this old. Each costs the worker one walk over its connections
/// and ~700 bytes on a pipe.
pub(crate) const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);

/// The `reason` under which a dead worker's open connections are counted
/// closed.
pub(crate) const WORKER_EXITED: &str = "worker_exited";

/// Every worker's numbers, and the endpoint that serves them.
pub(crate) struct WorkerMetrics {
    addr: SocketAddr,
    /// Stopped (and its port closed) when dropped.
    endpoint: Option<Standalone>,
    slots: Vec<Counts>,
    /// What the endpoint renders: one `(worker, retired + latest)` each.
    shown: Arc<Mutex<Vec<(usize, Snapshot)>>>,
}

/// One slot's numbers.
#[derive(Default, Clone)]
struct Counts {
    /// The live process's latest snapshot.
    latest: Snapshot,
    /// Some process in this slot has sent one.
    reported: bool,
    /// Counters of the slot's dead processes (gauges zero).
    retired: Snapshot,
}

impl Counts {
    fn shown(&self) -> Snapshot {
        let mut s = self.retired.clone();
        s.add(&self.latest);
        s
    }
}

impl WorkerMetrics {
    /// Serves `listener` for `workers` slots, all zero until they report.
    pub fn start(listener: TcpListener, workers: usize) -> io::Result<WorkerMetrics> {
        let addr = listener.local_addr()?;
        let shown = Arc::new(Mutex::new(
            (0..workers)
                .map(|i| (i, Snapshot::default()))
                .collect::<Vec<_>>(),
        ));
        let endpoint = {
            let shown = Arc::clone(&shown);
            Standalone::spawn(listener, move || {
                // Copied out, so the lock is not held while encoding.
                let now = shown.lock().unwrap_or_else(PoisonError::into_inner).clone();
                render(&now)
            })?
        };
        Ok(WorkerMetrics {
            addr,
            endpoint: Some(endpoint),
            slots: vec![Counts::default(); workers],
            shown,
        })
    }

    /// The address scrapers use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Worker `slot` sent a snapshot.
    pub fn update(&mut self, slot: usize, snapshot: Snapshot) {
        self.slots[slot].latest = snapshot;
        self.slots[slot].reported = true;
        self.publish(slot);
    }

    /// Every slot has reported at least once.
    pub fn all_reported(&self) -> bool {
        self.slots.iter().all(|c| c.reported)
    }

    /// The process in `slot` is gone: keep its counters (see the module
    /// docs) for whoever replaces it.
    pub fn exited(&mut self, slot: usize) {
        let counts = &mut self.slots[slot];
        let last = std::mem::take(&mut counts.latest);
        counts.retired.add(&retire(last));
        self.publish(slot);
    }

    /// Stops serving (shutdown): the port closes, as the single-process
    /// endpoint's does.
    pub fn stop(&mut self) {
        self.endpoint = None;
    }

    fn publish(&self, slot: usize) {
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        shown[slot].1 = self.slots[slot].shown();
    }

    /// What a scrape would see now, as `(worker, snapshot)` pairs.
    #[cfg(test)]
    fn shown(&self) -> Vec<(usize, Snapshot)> {
        self.shown.lock().unwrap().clone()
    }
}

/// A dead process's last snapshot as it should go on counting: counters
/// kept, gauges zero, its open connections closed by `worker_exited`.
fn retire(mut last: Snapshot) -> Snapshot {
    *last.closed.entry(WORKER_EXITED.to_string()).or_default() += last.connections_active;
    last.connections_active = 0;
    last.queued_bytes = 0;
    last.paused_connections = 0;
    last.ready_list = 0;
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(accepted: u64, active: u64, queued: u64) -> Snapshot {
        let mut s = Snapshot {
            connections_accepted: accepted,
            connections_active: active,
            queued_bytes: queued,
            bytes_received: accepted * 100,
            ..Snapshot::default()
        };
        s.closed.insert("done".into(), accepted - active);
        s.count_wakeup(3);
        s
    }

    fn metrics(workers: usize) -> WorkerMetrics {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        WorkerMetrics::start(l, workers).unwrap()
    }

    #[test]
    fn every_worker_is_shown_from_the_start_at_zero() {
        let m = metrics(3);
        let shown = m.shown();
        assert_eq!(shown.len(), 3);
        assert!(shown.iter().all(|(_, s)| *s == Snapshot::default()));
        assert_eq!(shown.iter().map(|(w, _)| *w).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn the_latest_snapshot_replaces_the_one_before() {
        let mut m = metrics(2);
        m.update(1, snapshot(5, 2, 10));
        m.update(1, snapshot(7, 1, 0));
        assert_eq!(m.shown()[1].1, snapshot(7, 1, 0));
        assert_eq!(m.shown()[0].1, Snapshot::default());
    }

    #[test]
    fn a_replaced_worker_counts_on_from_its_predecessor_and_its_gauges_restart() {
        let mut m = metrics(2);
        m.update(0, snapshot(10, 4, 500));
        m.exited(0);
        let gone = m.shown()[0].1.clone();
        assert_eq!(gone.connections_accepted, 10, "counters kept");
        assert_eq!(gone.bytes_received, 1000);
        assert_eq!(gone.poll_wakeups, 1);
        assert_eq!((gone.connections_active, gone.queued_bytes), (0, 0));
        assert_eq!(gone.closed[WORKER_EXITED], 4);
        assert_eq!(gone.closed_total(), gone.connections_accepted);
        // The replacement reports from zero; the slot goes on from 10.
        m.update(0, snapshot(3, 3, 7));
        let now = m.shown()[0].1.clone();
        assert_eq!(now.connections_accepted, 13);
        assert_eq!(now.bytes_received, 1300);
        assert_eq!(now.connections_active, 3, "only the live process's");
        assert_eq!(now.queued_bytes, 7);
        assert_eq!(now.closed[WORKER_EXITED], 4);
        // And a second death adds up again.
        m.exited(0);
        let twice = m.shown()[0].1.clone();
        assert_eq!(twice.connections_accepted, 13);
        assert_eq!(twice.closed[WORKER_EXITED], 7);
        assert_eq!(twice.connections_active, 0);
    }

    #[test]
    fn the_endpoint_serves_the_sum_and_each_worker() {
        let mut m = metrics(2);
        m.update(0, snapshot(5, 1, 0));
        m.update(1, snapshot(7, 2, 0));
        let mut s = std::net::TcpStream::connect(m.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let e = crate::metrics::exposition::parse(body).unwrap();
        let v = |labels: &[(&str, &str)]| e.value("reactor_connections_accepted_total", labels);
        assert_eq!(v(&[]), Some(12.0));
        assert_eq!(v(&[("worker", "0")]), Some(5.0));
        assert_eq!(v(&[("worker", "1")]), Some(7.0));
        // Stopped: the endpoint's thread has ended (and dropped its view
        // of the counts with its listener). Not checked by connecting: a
        // parallel test may bind the freed port in between.
        m.stop();
        assert_eq!(Arc::strong_count(&m.shown), 1, "the endpoint still runs");
    }
}
