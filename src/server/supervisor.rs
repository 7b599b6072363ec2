//! `reactor serve --workers N`: one supervisor, N worker processes.
//!
//! One process may hold at most `RLIMIT_NOFILE` descriptors (20,000 here,
//! and the hard limit cannot be raised), so one event loop tops out near
//! 20,000 connections. Threads would not help: descriptors are counted per
//! process. So, like nginx, the process that was started becomes a
//! supervisor and starts N copies of itself (`std::env::current_exe`, with
//! a hidden `--worker-index I`). Each worker is the same single-threaded
//! reactor as ever, with its own open-file limit, its own slab and its own
//! listener; they share nothing at run time.
//!
//! # One port, N listeners
//! Every worker binds the same address with `SO_REUSEPORT`, and the kernel
//! spreads new connections over the listening sockets by a hash of each
//! connection's addresses and ports. Port 0 is resolved once, here: the
//! supervisor binds a socket with `SO_REUSEPORT` to the address and never
//! listens on it (`listen::claim_port`). A socket that does not listen
//! is never handed a connection, but it holds the port for as long as the
//! supervisor lives, so a dying worker's port cannot be taken by anyone
//! else before its replacement binds it.
//!
//! # The pipes
//! - A worker's **stdout** carries only its `listening on` lines: once
//!   every worker has printed its own, the supervisor prints one set.
//! - A worker's **stderr** is its log. Its lines name the worker (the
//!   event loop runs on a thread called `worker-I`, and the logger prints
//!   thread names in workers) and are copied to the supervisor's stderr.
//!   Its stats lines ([`Stats`]'s display form) are read back: the
//!   supervisor logs their sum every `--stats-interval` instead, and the
//!   sum of the workers' final lines at exit.
//! - A worker's **stdin** is its leash. A thread in the worker reads it;
//!   at end-of-file the worker raises SIGTERM on itself and shuts down
//!   gracefully. The supervisor forwards SIGINT/SIGTERM by closing every
//!   worker's stdin, and if the supervisor dies, even by SIGKILL, the
//!   kernel closes the pipes and the workers follow. No signal is ever sent
//!   to another process, so no `unsafe` `kill(2)` is needed.
//!
//! With `--metrics`, a worker's stdout also carries a `snapshot {json}`
//! line every few hundred milliseconds, and the supervisor serves one
//! endpoint for all of them (`supervisor_metrics.rs`).
//!
//! A worker that exits while no shutdown was asked for is logged at `warn`
//! and started again (after a second if it lived less than one, so a
//! worker that cannot start does not spin); the other workers and their
//! clients never notice.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

use super::stats::Stats;
use super::supervisor_metrics::{WorkerMetrics, SNAPSHOT_EVERY};
use super::{listen, Config, Engine, Mode, ServeError};
use crate::metrics::Snapshot;

/// A worker that lived less than this is restarted only after this long.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// What the supervisor's threads tell its loop.
enum Event {
    /// A line on a worker's stdout.
    Stdout { slot: usize, gen: u64, line: String },
    /// A `snapshot {json}` line on a worker's stdout (`--metrics`).
    Snapshot {
        slot: usize,
        gen: u64,
        snapshot: Box<Snapshot>,
    },
    /// A stats line on a worker's stderr.
    /// (Boxed: `Stats` carries the loop's histogram and is the largest.)
    Stats {
        slot: usize,
        gen: u64,
        stats: Box<Stats>,
    },
    /// A worker exited.
    Exited {
        slot: usize,
        gen: u64,
        status: io::Result<ExitStatus>,
    },
    /// SIGINT or SIGTERM reached the supervisor.
    Signal(i32),
}

/// One worker position; a replacement takes over the same slot and name.
struct Slot {
    /// Bumped for every process started in this slot, so late messages
    /// from a dead one are ignored.
    gen: u64,
    pid: u32,
    /// Closing it asks the worker to shut down.
    stdin: Option<ChildStdin>,
    started: Instant,
    lines: Vec<String>,
    running: bool,
    /// The latest counters it logged.
    stats: Stats,
    /// Start a replacement at this time.
    restart_at: Option<Instant>,
}

/// Settings that make `--workers` above 1 impossible, as a usage error.
pub fn check(config: &Config) -> Result<(), ServeError> {
    if config.mode == Mode::Chat {
        return Err(ServeError::Usage(
            "--workers above 1 cannot serve --mode chat: a chat room lives in one process".into(),
        ));
    }
    if config.unix.is_some() {
        return Err(ServeError::Usage(
            "--workers above 1 cannot be used with --unix: a Unix socket path has one listener"
                .into(),
        ));
    }
    Ok(())
}

/// The share of `total` connections worker `i` of `n` may hold: the total
/// divided evenly, the remainder going to the first workers.
pub fn share(total: usize, n: usize, i: usize) -> usize {
    (total / n + usize::from(i < total % n)).max(1)
}

/// Says on stderr (at `warn`) which limit will stop the server from
/// holding what it was asked to, which setting, and what to do, before the
/// first client comes: descriptors per worker, `fs.file-max`, kernel
/// memory for the sockets, `somaxconn`.
pub fn warn_limits(config: &Config) {
    use crate::net::limits;
    let workers = config.workers.max(1) as u64;
    let reserve = super::FD_RESERVE as u64;
    let per_process = limits::fd_hard_limit().saturating_sub(reserve);
    let total = config
        .max_connections
        .map_or(per_process * workers, |n| n as u64);
    let share = total.div_ceil(workers);
    if share > per_process {
        log::warn!(
            "--max-connections {total} over {workers} worker(s) is {share} each, but one process \
             may open only {} files (hard RLIMIT_NOFILE); the rest would wait in the backlog: \
             use --workers {} or more",
            per_process + reserve,
            total.div_ceil(per_process.max(1))
        );
    }
    let verdict = limits::check(&limits::Need {
        connections: total,
        processes: workers,
        per_process_fds: share.min(per_process) + reserve,
        sockets_per_connection: 1,
        per_source: 0,
        listen_backlog: 65535,
    });
    for line in verdict.errors.iter().chain(&verdict.warnings) {
        log::warn!("{line}");
    }
}

/// Runs the supervisor: starts `config.workers` workers, prints the
/// `listening on` lines once all listen, and returns after a signal once
/// every worker has shut down.
pub fn run(config: Config) -> Result<(), ServeError> {
    check(&config)?;
    warn_limits(&config);
    let bind_err =
        |a: SocketAddr, e: io::Error| ServeError::Bind(format!("cannot listen on {a}: {e}"));
    let (claim, addr) =
        listen::claim_port(config.addr, false).map_err(|e| bind_err(config.addr, e))?;
    let udp = match config.udp {
        Some(a) => {
            let (claim, bound) = listen::claim_port(a, true)
                .map_err(|e| ServeError::Bind(format!("cannot bind udp {a}: {e}")))?;
            drop(claim); // a bound UDP socket would take its share of datagrams
            Some(bound)
        }
        None => None,
    };
    // The supervisor serves the one endpoint; workers get no --metrics.
    let metrics = match config.metrics {
        Some(a) => {
            let listener = listen::bind_tcp(a, false)
                .map_err(|e| ServeError::Bind(format!("cannot listen on metrics {a}: {e}")))?;
            Some(WorkerMetrics::start(listener, config.workers).map_err(ServeError::Io)?)
        }
        None => None,
    };
    let worker = Config {
        addr,
        udp,
        ..config
    };
    let exe = std::env::current_exe().map_err(ServeError::Io)?;
    let (tx, rx) = mpsc::channel();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(ServeError::Io)?;
    let sig_tx = tx.clone();
    thread::spawn(move || {
        for sig in signals.forever() {
            if sig_tx.send(Event::Signal(sig)).is_err() {
                return;
            }
        }
    });
    let mut sup = Supervisor {
        exe,
        config: worker,
        tx,
        slots: Vec::new(),
        retired: Stats::default(),
        metrics,
        expected_lines: 1 + usize::from(udp.is_some()),
        announced: false,
        stopping: false,
        failure: None,
    };
    for i in 0..sup.config.workers {
        sup.slots.push(Slot {
            gen: 0,
            pid: 0,
            stdin: None,
            started: Instant::now(),
            lines: Vec::new(),
            running: false,
            stats: Stats::default(),
            restart_at: None,
        });
        if let Err(e) = sup.start(i) {
            sup.failure = Some(format!("cannot start worker-{i}: {e}"));
            sup.stop();
            break;
        }
    }
    // The workers log theirs every interval from their start; summing a
    // little later means their lines for the interval are in.
    let lag = Duration::from_millis(200);
    let mut next_stats = sup.config.stats_interval.map(|d| Instant::now() + d + lag);
    loop {
        if sup.stopping && sup.slots.iter().all(|s| !s.running) {
            break;
        }
        let now = Instant::now();
        let wake = sup
            .slots
            .iter()
            .filter_map(|s| s.restart_at)
            .chain(next_stats)
            .min();
        let event = match wake {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(e) => sup.handle(e),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        for i in 0..sup.slots.len() {
            if sup.slots[i].restart_at.is_some_and(|t| t <= now) {
                sup.slots[i].restart_at = None;
                if let Err(e) = sup.start(i) {
                    log::error!("cannot start a replacement for worker-{i}: {e}");
                    sup.slots[i].restart_at = Some(now + RESTART_DELAY);
                }
            }
        }
        if let (Some(at), Some(every)) = (next_stats, sup.config.stats_interval) {
            if now >= at {
                log::info!("{}", sup.total());
                next_stats = Some(now + every);
            }
        }
    }
    drop(claim);
    let mut total = sup.total();
    total.closed += total.active as u64;
    total.active = 0;
    log::info!("final {total} ({} workers)", sup.slots.len());
    match sup.failure {
        None => Ok(()),
        Some(why) => Err(ServeError::Bind(why)),
    }
}

struct Supervisor {
    exe: std::path::PathBuf,
    config: Config,
    tx: Sender<Event>,
    slots: Vec<Slot>,
    /// Counters of workers that died and were replaced.
    retired: Stats,
    /// With `--metrics`: every worker's latest snapshot, and the endpoint.
    metrics: Option<WorkerMetrics>,
    /// `listening on` lines each worker prints.
    expected_lines: usize,
    announced: bool,
    stopping: bool,
    /// Why the run failed, if it did (exit 1).
    failure: Option<String>,
}

impl Supervisor {
    /// The command line for worker `i`: every serve setting, with the
    /// resolved ports and this worker's share of `--max-connections`.
    fn worker_args(&self, i: usize) -> Vec<String> {
        let c = &self.config;
        let mut a: Vec<String> = vec!["serve".into()];
        let mut flag = |k: &str, v: String| {
            a.push(format!("--{k}"));
            a.push(v);
        };
        flag("addr", c.addr.to_string());
        flag("mode", c.mode.name().into());
        if let Some(total) = c.max_connections {
            flag("max-connections", share(total, c.workers, i).to_string());
        }
        flag("max-line", c.max_line.to_string());
        flag("max-buffer", c.max_buffer.to_string());
        // The memory cap is per worker (INTERFACE.md, "Memory").
        flag("max-memory", c.max_memory.to_string());
        let secs = |d: Option<Duration>| d.map_or(0, |d| d.as_secs()).to_string();
        flag("idle-timeout", secs(c.idle_timeout));
        flag("stats-interval", secs(c.stats_interval));
        flag("log-level", log::max_level().to_string().to_lowercase());
        if let Some(u) = c.udp {
            flag("udp", u.to_string());
        }
        let engine = match c.engine {
            Engine::Reactor => "reactor",
            Engine::Threads => "threads",
            Engine::Uring => "uring",
        };
        flag("engine", engine.into());
        flag("worker-index", i.to_string());
        if c.metrics.is_some() {
            flag("snapshot-every-ms", SNAPSHOT_EVERY.as_millis().to_string());
        }
        a
    }

    /// Starts (or restarts) the worker in slot `i`.
    fn start(&mut self, i: usize) -> io::Result<()> {
        let mut child = Command::new(&self.exe)
            .args(self.worker_args(i))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let slot = &mut self.slots[i];
        slot.gen += 1;
        slot.pid = child.id();
        slot.stdin = child.stdin.take();
        slot.started = Instant::now();
        slot.lines.clear();
        slot.running = true;
        slot.stats = Stats::default();
        let gen = slot.gen;
        log::info!("worker-{i} started (pid {})", slot.pid);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let tx = self.tx.clone();
        let log = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed = Stats::parse_log_line(&line);
                // Interval lines are summed by the supervisor; a worker's
                // final line is shown as well as the sum.
                if !matches!(parsed, Some((false, _))) {
                    let _ = writeln!(io::stderr().lock(), "{line}");
                }
                if let Some((_, stats)) = parsed {
                    let _ = tx.send(Event::Stats {
                        slot: i,
                        gen,
                        stats: Box::new(stats),
                    });
                }
            }
        });
        let tx = self.tx.clone();
        // The stdout thread owns the child: at end-of-file it reaps it, and
        // reports the exit only once the stderr thread has relayed the
        // last log line too. (Reported at once, a worker's final stats
        // line could still be in its pipe when the supervisor, all workers
        // gone, summed them and exited: the line and its share of the sum
        // were lost; seen in a CI rehearsal under load.)
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = match line.strip_prefix("snapshot ") {
                    Some(json) => match Snapshot::from_json_line(json) {
                        Ok(s) => Event::Snapshot {
                            slot: i,
                            gen,
                            snapshot: Box::new(s),
                        },
                        Err(e) => {
                            log::warn!("worker-{i} sent a bad snapshot line: {e}");
                            continue;
                        }
                    },
                    None => Event::Stdout { slot: i, gen, line },
                };
                let _ = tx.send(event);
            }
            let status = child.wait();
            let _ = log.join();
            let _ = tx.send(Event::Exited {
                slot: i,
                gen,
                status,
            });
        });
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal(sig) if !self.stopping => {
                log::info!("signal {sig}: shutting down {} workers", self.slots.len());
                self.stop();
            }
            Event::Stdout { slot, gen, line } if self.slots[slot].gen == gen => {
                self.slots[slot].lines.push(line);
                self.announce_if_ready();
            }
            Event::Stats { slot, gen, stats } if self.slots[slot].gen == gen => {
                self.slots[slot].stats = *stats
            }
            Event::Snapshot {
                slot,
                gen,
                snapshot,
            } if self.slots[slot].gen == gen => {
                if let Some(m) = &mut self.metrics {
                    m.update(slot, *snapshot);
                }
                self.announce_if_ready();
            }
            Event::Exited { slot, gen, status } if self.slots[slot].gen == gen => {
                self.exited(slot, status)
            }
            _ => {} // from a worker that was replaced already
        }
    }

    /// Prints the `listening on` lines once every worker listens (and,
    /// with `--metrics`, has sent its first snapshot, so that the first
    /// scrape already shows every series of every worker).
    fn announce_if_ready(&mut self) {
        let listening = self
            .slots
            .iter()
            .all(|s| s.lines.len() >= self.expected_lines);
        let reported = self.metrics.as_ref().map_or(true, |m| m.all_reported());
        if self.announced || self.stopping || !listening || !reported {
            return;
        }
        self.announced = true;
        let mut lines = self.slots[0].lines.clone();
        if let Some(m) = &self.metrics {
            lines.push(format!("listening on metrics {}", m.addr()));
        }
        if let Err(e) = print_lines(&lines) {
            log::error!("cannot print the listening lines: {e}");
        }
        log::info!("{} workers listening", self.slots.len());
    }

    fn exited(&mut self, i: usize, status: io::Result<ExitStatus>) {
        if let Some(m) = &mut self.metrics {
            // Its counters go on in its slot (supervisor_metrics.rs).
            m.exited(i);
        }
        let slot = &mut self.slots[i];
        slot.running = false;
        slot.stdin = None;
        let pid = slot.pid;
        let what = match &status {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown status: {e}"),
        };
        let clean = status.as_ref().is_ok_and(|s| s.success());
        if self.stopping {
            if !clean {
                log::warn!("worker-{i} (pid {pid}) did not shut down cleanly: {what}");
                self.failure
                    .get_or_insert_with(|| format!("worker-{i} did not shut down cleanly: {what}"));
            }
            return;
        }
        if !self.announced {
            // A worker that cannot start (bind failed, bad setting) would
            // fail again: give up, and say why (its own error line is on
            // stderr already).
            log::error!("worker-{i} (pid {pid}) exited during start-up: {what}");
            self.failure = Some(format!("worker-{i} exited during start-up: {what}"));
            self.stop();
            return;
        }
        log::warn!("worker-{i} (pid {pid}) exited unexpectedly ({what}); starting a replacement");
        // Its connections died with it: count them closed.
        let mut gone = std::mem::take(&mut slot.stats);
        gone.closed += gone.active as u64;
        gone.active = 0;
        self.retired.add(&gone);
        slot.restart_at = Some(if slot.started.elapsed() < RESTART_DELAY {
            Instant::now() + RESTART_DELAY
        } else {
            Instant::now()
        });
    }

    /// Asks every worker to shut down gracefully: closes their stdin.
    fn stop(&mut self) {
        self.stopping = true;
        if let Some(m) = &mut self.metrics {
            m.stop();
        }
        for slot in &mut self.slots {
            slot.stdin = None;
            slot.restart_at = None;
        }
    }

    /// Every worker's latest counters plus those of replaced ones.
    fn total(&self) -> Stats {
        let mut t = self.retired.clone();
        for s in &self.slots {
            t.add(&s.stats);
        }
        t
    }
}

fn print_lines(lines: &[String]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

/// Runs one worker: the ordinary server, on a thread named `worker-I` so
/// its log lines name it, plus a thread that shuts it down gracefully when
/// its stdin closes (the supervisor asked, or died).
pub fn run_worker(config: Config) -> Result<(), ServeError> {
    let index = config.worker.unwrap_or(0);
    thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
            // Our own event loop turns this into a graceful shutdown.
            let _ = signal_hook::low_level::raise(SIGTERM);
        })
        .map_err(ServeError::Io)?;
    let server = thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || super::serve(config))
        .map_err(ServeError::Io)?;
    server
        .join()
        .unwrap_or_else(|_| Err(ServeError::Io(io::Error::other("the event loop panicked"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        for (total, n) in [(10, 3), (1_000_000, 51), (7, 7), (2400, 3)] {
            let sum: usize = (0..n).map(|i| share(total, n, i)).sum();
            assert_eq!(sum, total, "{total} over {n}");
            let (lo, hi) = (share(total, n, n - 1), share(total, n, 0));
            assert!(hi - lo <= 1, "{total} over {n}: {lo}..{hi}");
        }
    }

    #[test]
    fn chat_and_unix_refuse_workers() {
        let chat = Config {
            mode: Mode::Chat,
            workers: 2,
            ..Config::default()
        };
        assert!(matches!(check(&chat), Err(ServeError::Usage(_))));
        let unix = Config {
            unix: Some("/tmp/x.sock".into()),
            workers: 2,
            ..Config::default()
        };
        assert!(matches!(check(&unix), Err(ServeError::Usage(_))));
        let echo = Config {
            workers: 2,
            ..Config::default()
        };
        assert!(check(&echo).is_ok());
    }
}
