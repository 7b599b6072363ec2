//! A line writer that never blocks its caller: a worker's `snapshot`
//! lines to the supervisor.
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
