//! A worker's `snapshot {json}` lines to its supervisor (`--workers` with
//! `--metrics`), for either engine: [`SnapshotOut`] says when one is due,
//! and [`LatestLine`] writes it without ever blocking the loop.
//!
//! A worker's stdout is a pipe to its supervisor. A blocking write from
//! the event loop would stop every client of the worker as soon as that
//! pipe (64 KiB, about 90 snapshots) is full: a supervisor stopped
//! (`SIGSTOP`, a debugger) or starved for ~20 s would freeze the worker.
//! So the loop hands each line to a writer thread and goes on. Only the
//! newest line waits: a snapshot is a whole picture of the loop, so a
//! newer one makes an unsent one worthless, and memory stays one line
//! however long the reader stalls.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use crate::metrics::Snapshot;

#[derive(Default)]
struct Slot {
    /// The line waiting to be written, if any.
    line: Option<String>,
    /// Why the writer stopped (the reader has gone), once it has.
    failed: Option<String>,
    /// The sending side has been dropped: the thread ends.
    closed: bool,
}

type Shared = Arc<(Mutex<Slot>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, Slot> {
    // The writer thread holds the lock only to take or set a field, so a
    // poisoned lock (a panic elsewhere) still holds a usable slot.
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The loop's side: [`LatestLine::send`] returns at once.
pub struct LatestLine {
    shared: Shared,
}

impl LatestLine {
    /// Starts a thread (`name`) that writes the lines sent to `out`.
    pub fn spawn<W: Write + Send + 'static>(name: &str, out: W) -> std::io::Result<LatestLine> {
        let shared: Shared = Arc::default();
        let theirs = shared.clone();
        thread::Builder::new()
            .name(name.into())
            .spawn(move || write_lines(&theirs, out))?;
        Ok(LatestLine { shared })
    }

    /// Queues `line` (with its newline) in place of any line not yet
    /// written. Err once the writer has failed (the reader has gone): the
    /// reason, and nothing more will be written.
    pub fn send(&self, line: String) -> Result<(), String> {
        let mut slot = lock(&self.shared);
        if let Some(why) = &slot.failed {
            return Err(why.clone());
        }
        slot.line = Some(line);
        drop(slot);
        self.shared.1.notify_one();
        Ok(())
    }
}

impl Drop for LatestLine {
    fn drop(&mut self) {
        // The thread writes what is waiting, then ends. Not joined: it may
        // be blocked on a reader that never reads again.
        lock(&self.shared).closed = true;
        self.shared.1.notify_one();
    }
}

fn write_lines(shared: &Shared, mut out: impl Write) {
    loop {
        let line = {
            let mut slot = lock(shared);
            loop {
                if let Some(line) = slot.line.take() {
                    break line;
                }
                if slot.closed {
                    return;
                }
                slot = shared.1.wait(slot).unwrap_or_else(|p| p.into_inner());
            }
        };
        // Blocks while the reader does not read: only this thread waits.
        // A line shorter than PIPE_BUF (4 KiB) goes into a pipe whole.
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            lock(shared).failed = Some(e.to_string());
            return;
        }
    }
}

/// When a worker's snapshots are due, and where they go: the first at
/// once (the supervisor prints the `listening on` lines only once every
/// worker has sent one), then every `every` of loop time.
pub(crate) struct SnapshotOut {
    every: Duration,
    /// Loop time (ms) of the next one; `None` once the writer failed.
    next: Option<u64>,
    out: Option<LatestLine>,
}

impl SnapshotOut {
    /// Snapshots every `every`, if set (`Config::snapshot_every`).
    pub(crate) fn new(every: Option<Duration>) -> Option<SnapshotOut> {
        every.map(|every| SnapshotOut {
            every,
            next: Some(0),
            out: None,
        })
    }

    /// Loop time (ms) the loop must wake by.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.next
    }

    /// Writes `snapshot {json}` on stdout if one is due at `now`. If the
    /// supervisor is gone (EPIPE), no more are sent.
    pub(crate) fn send_if_due(&mut self, now: u64, snapshot: impl FnOnce() -> Snapshot) {
        if !self.next.is_some_and(|at| now >= at) {
            return;
        }
        if self.out.is_none() {
            match LatestLine::spawn("snapshot-out", std::io::stdout()) {
                Ok(out) => self.out = Some(out),
                Err(e) => {
                    log::warn!("cannot start the snapshot writer: {e}; no snapshots will be sent");
                    self.next = None;
                    return;
                }
            }
        }
        let line = format!("snapshot {}\n", snapshot().to_json_line());
        let out = self.out.as_ref().expect("set above");
        match out.send(line) {
            Ok(()) => self.next = Some(now + self.every.as_millis() as u64),
            Err(e) => {
                log::warn!("cannot send a snapshot to the supervisor: {e}; no more will be sent");
                self.next = None;
                self.out = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    #[test]
    fn sending_never_blocks_while_the_reader_does_not_read() {
        // A socket pair stands in for the pipe: nobody reads `theirs`
        // until thousands of lines (several MB, far past any socket
        // buffer) have been sent.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let out = LatestLine::spawn("test-writer", ours).unwrap();
        let line = format!("snapshot {}\n", "x".repeat(1000));
        let started = Instant::now();
        for _ in 0..5_000 {
            out.send(line.clone()).unwrap();
        }
        out.send("snapshot last\n".into()).unwrap();
        // A blocking writer would still be stuck in the first ~200 lines.
        assert!(started.elapsed() < Duration::from_secs(10));
        // Once the reader reads, the newest line arrives (older unsent
        // ones were replaced, not queued).
        theirs
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut lines = BufReader::new(theirs).lines();
        let last = lines
            .find(|l| l.as_deref().map_or(true, |l| l == "snapshot last"))
            .expect("the last line comes")
            .unwrap();
        assert_eq!(last, "snapshot last");
    }

    #[test]
    fn a_reader_that_has_gone_is_reported() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let out = LatestLine::spawn("test-writer", ours).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let why = loop {
            match out.send("snapshot {}\n".into()) {
                Err(why) => break why,
                Ok(()) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(()) => panic!("no error from a closed reader"),
            }
        };
        assert!(why.to_lowercase().contains("pipe"), "{why}");
    }
}
