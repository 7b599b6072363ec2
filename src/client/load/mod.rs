//! `reactor load`: a load generator for high-connection-count tests.
//!
//! Each of `--threads` loops owns its share of the connections: a mio
//! poll loop ([`worker`] for TCP and Unix streams, [`udp`] for datagrams),
//! or for echo over streams one io_uring (`worker/uring.rs`; `--engine
//! uring`, and `auto`, the default, wherever a ring can be made). Every message carries its connection id and sequence number
//! ([`message`]), and every byte that comes back is checked. Latencies go
//! into HDR histograms; the loops' tallies are merged into one
//! [`report::Report`], printed as a table or as JSON.

pub mod chat;
pub mod interval;
mod max_rate;
pub mod merge;
pub mod message;
pub mod processes;
pub mod report;
pub mod sources;
pub mod udp;
pub mod worker;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use report::{Report, Tally};
use worker::{Target, Worker};

/// What every connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Send messages and read them back, for `--duration`.
    Echo,
    /// Open every connection, hold them idle, check them all again.
    Hold,
    /// Connect, one round trip, close; over and over.
    Churn,
    /// Chat clients sending lines that every other client must receive.
    Chat,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::Hold => "hold",
            Workload::Churn => "churn",
            Workload::Chat => "chat",
        }
    }
}

/// What drives a loop's stream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A mio poll loop: readiness, a system call per read and per write.
    Reactor,
    /// An io_uring per loop (`worker/uring.rs`): a turn's sends submitted
    /// and its replies received in one system call.
    Uring,
}

/// Whether this process can run the uring loop: a small ring with a
/// provided-buffer pool can be made (io_uring enabled, not filtered, a
/// kernel with buffer rings). `--engine auto` asks this once per run.
pub fn uring_usable() -> bool {
    worker::uring_usable()
}

impl Engine {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Reactor => "reactor",
            Engine::Uring => "uring",
        }
    }
}

/// Everything a loop needs to know, shared by all of them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What to do.
    pub workload: Workload,
    /// Where to.
    pub target: Target,
    /// Connections in all.
    pub connections: u32,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection.
    pub pipeline: u32,
    /// Messages per second per connection; 0 = closed loop.
    pub rate: f64,
    /// Connects per second in all; 0 = unpaced.
    pub connect_rate: f64,
    /// Measured time (hold: holding time).
    pub duration: Duration,
    /// Unmeasured run-in.
    pub warmup: Duration,
    /// Longest wait for a connect or a reply.
    pub timeout: Duration,
    /// Local addresses to bind before connecting.
    pub source_ips: Vec<IpAddr>,
    /// Live progress every this long; zero = none.
    pub interval: Duration,
    /// What drives the stream connections (echo only for `Uring`).
    pub engine: Engine,
}

impl Plan {
    /// Open loop: echo messages sent on a schedule (`--rate`), latency
    /// counted from when each was due. Every other run is closed loop.
    pub fn open_loop(&self) -> bool {
        self.rate > 0.0 && self.workload == Workload::Echo
    }
}

/// Counters the loops bump and the progress line reads.
#[derive(Debug)]
pub struct Progress {
    /// When the run began: intervals count from here.
    pub started: Instant,
    /// Connections established so far.
    pub opened: AtomicU64,
    /// Messages completed so far, warm-up included.
    pub messages: AtomicU64,
    /// Set once the first loop starts measuring.
    pub measuring: AtomicBool,
    /// hold: loops that have opened (or given up on) all their connections.
    pub ready: AtomicU64,
    /// Loops in this process.
    pub loops: AtomicU64,
    /// hold: set when the hold may begin; every loop waits for it, so all
    /// connections of the run (of every load process) are held at once.
    pub go: AtomicBool,
    /// The go comes from outside (a parent load process), not from
    /// `ready` reaching `loops`.
    pub gated: AtomicBool,
}

impl Progress {
    /// hold: whether the hold may begin.
    pub fn may_hold(&self) -> bool {
        if self.gated.load(Ordering::Acquire) {
            self.go.load(Ordering::Acquire)
        } else {
            self.ready.load(Ordering::Acquire) >= self.loops.load(Ordering::Acquire)
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            started: Instant::now(),
            opened: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            ready: AtomicU64::new(0),
            loops: AtomicU64::new(0),
            go: AtomicBool::new(false),
            gated: AtomicBool::new(false),
        }
    }
}

/// A whole `reactor load` run: the plan every loop follows, plus what
/// only the run as a whole needs.
#[derive(Debug)]
pub struct Options {
    /// What each loop does.
    pub plan: Plan,
    /// Poll loops (threads) the connections are dealt among.
    pub threads: u32,
    /// Echo over UDP datagrams to this address instead of streams.
    pub udp: Option<SocketAddr>,
    /// One JSON object on stdout instead of the table.
    pub json: bool,
    /// Every flag's value, echoed in the report.
    pub settings: serde_json::Value,
    /// `--hdr-log`: write every interval's histogram here.
    pub hdr_log: Option<PathBuf>,
    /// `--find-max-rate`: the p99 (ms) the highest rate must keep.
    pub find_max_rate: Option<f64>,
    /// `--processes`: load processes; `None` = as many as the connections
    /// need ([`processes::count`]).
    pub processes: Option<u32>,
    /// Set in a child load process: its index among `processes`.
    pub process_index: Option<u32>,
    /// Set in a child load process: when the parent's run began, in µs
    /// since the Unix epoch (its intervals count from there).
    pub run_started_us: Option<u64>,
    /// The flags that repeat this run, for child processes (without
    /// `--processes` or `--json`).
    pub argv: Vec<String>,
}

/// Runs `reactor load`: 0 when everything came back as sent, 1 otherwise.
pub fn run(mut args: Options) -> ExitCode {
    // Each connection is a descriptor; ask for all the system allows.
    let limit = crate::net::limits::raise_fd_limit();
    let spread = sources::spread(&mut args.plan);
    if let Some(index) = args.process_index {
        // One of several load processes: the parent said all there is.
        return processes::run_child(args, index);
    }
    if let Some(note) = spread {
        eprintln!("reactor load: {note}");
    }
    if !processes::check_limits(&args, limit) {
        return ExitCode::FAILURE;
    }
    let count = processes::count(&args, limit);
    if count > 1 {
        return processes::run_parent(args, count);
    }
    if let Some(p99_ms) = args.find_max_rate {
        return max_rate::run(args, p99_ms);
    }
    let connections = args.plan.connections;
    let workload = args.plan.workload;
    let open_loop = args.plan.open_loop();
    let outcome = run_loops(
        Arc::new(args.plan),
        args.threads,
        args.udp,
        args.hdr_log.as_deref(),
    );
    let (tally, intervals, chat) = match outcome {
        Ok(done) => done,
        Err(e) => {
            eprintln!("reactor load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut extra = serde_json::Map::new();
    if let Some(c) = chat {
        extra.insert("lines_sent".into(), c.lines_sent.into());
        extra.insert("deliveries".into(), c.deliveries.into());
        let per_sec = if tally.measured_secs > 0.0 {
            tally.messages as f64 / tally.measured_secs
        } else {
            0.0
        };
        extra.insert("deliveries_per_sec".into(), per_sec.round().into());
    }
    let report = Report {
        workload: workload.name(),
        settings: args.settings,
        connections: u64::from(connections),
        udp: args.udp.is_some(),
        open_loop,
        intervals,
        extra,
        tally,
    };
    report.print(args.json)
}

/// What [`run_loops`] returns: the loops' tallies merged, the interval
/// rows, and for chat its own counts.
pub type Outcome = (Tally, Vec<interval::Row>, Option<chat::ChatCounts>);

/// Runs the loops once, with live progress, and returns what they counted.
pub fn run_loops(
    plan: Arc<Plan>,
    threads: u32,
    udp: Option<SocketAddr>,
    hdr_log: Option<&Path>,
) -> Result<Outcome, String> {
    let progress = Arc::new(Progress::default());
    run_share(plan, threads, udp, hdr_log, progress, (0, 1), None)
}

/// The ids of process `index` of `count`: every `count`-th, from `index`.
pub fn process_ids(connections: u32, (index, count): (u32, u32)) -> impl Iterator<Item = u32> {
    (index..connections).step_by(count as usize)
}

/// [`run_loops`] for process `process.0` of `process.1` (see
/// [`processes`]): its share is every `process.1`-th connection id from
/// `process.0`, dealt round-robin among its loops. With `forward` (a
/// child load process), merged intervals go there instead of to stderr.
pub fn run_share(
    plan: Arc<Plan>,
    threads: u32,
    udp: Option<SocketAddr>,
    hdr_log: Option<&Path>,
    progress: Arc<Progress>,
    process: (u32, u32),
    forward: Option<interval::Forward>,
) -> Result<Outcome, String> {
    let connections = plan.connections;
    if plan.workload == Workload::Chat {
        // Chat checks every line against every client: one loop.
        let (p, q) = (plan.clone(), progress.clone());
        let (to_collector, intervals) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("load-chat".into())
            .spawn(move || -> std::io::Result<_> {
                Ok(chat::ChatLoop::new(p, q, Some((to_collector, 0)))?.run())
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let (rows, result) = watch(&plan, &progress, hdr_log, intervals, vec![handle], forward)?;
        let (tally, counts) = result.into_iter().next().expect("one loop");
        return Ok((tally, rows, Some(counts)));
    }
    let mine = process_ids(connections, process).count() as u32;
    let threads = threads.min(mine).max(1);
    progress.loops.store(u64::from(threads), Ordering::Release);
    let (to_collector, intervals) = mpsc::channel();
    let mut handles = Vec::new();
    for t in 0..threads {
        // Deal connection ids round-robin, so each loop gets its share.
        let ids: Vec<u32> = process_ids(connections, process)
            .skip(t as usize)
            .step_by(threads as usize)
            .collect();
        let share = ids.len() as f64 / f64::from(connections);
        let (plan, progress) = (plan.clone(), progress.clone());
        let live = Some((to_collector.clone(), t as usize));
        let handle = thread::Builder::new().name(format!("load-{t}")).spawn(
            move || -> std::io::Result<Tally> {
                match udp {
                    Some(addr) => Ok(udp::UdpWorker::new(plan, progress, addr, ids, live)?.run()),
                    None => Ok(Worker::new(plan, progress, ids, share, live)?.run()),
                }
            },
        );
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => return Err(format!("cannot start a thread: {e}")),
        }
    }
    drop(to_collector);
    let (rows, tallies) = watch(&plan, &progress, hdr_log, intervals, handles, forward)?;
    let mut tally = Tally::default();
    for t in tallies {
        tally.merge(t);
    }
    Ok((tally, rows, None))
}

/// While the loops (one per handle, numbered as the handles are) run:
/// collects and prints their intervals, draws the bar; then joins them and
/// returns the rows and each loop's result.
fn watch<T>(
    plan: &Plan,
    progress: &Progress,
    hdr_log: Option<&Path>,
    intervals: mpsc::Receiver<(usize, interval::Interval, bool)>,
    handles: Vec<thread::JoinHandle<std::io::Result<T>>>,
    forward: Option<interval::Forward>,
) -> Result<(Vec<interval::Row>, Vec<T>), String> {
    let hdr_log = match hdr_log {
        Some(path) => Some(
            interval::HdrLog::create(path, SystemTime::now())
                .map_err(|e| format!("--hdr-log {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let bar = progress_bar();
    let print = interval::printer(bar.as_ref());
    let loops = if plan.interval.is_zero() {
        0
    } else {
        handles.len()
    };
    let mut collector =
        interval::Collector::new(plan.interval, loops, plan.open_loop(), hdr_log, print);
    if let Some(forward) = forward {
        collector = collector.forwarding(forward);
    }
    let mut last = (Instant::now(), 0);
    while handles.iter().any(|h| !h.is_finished()) {
        match intervals.recv_timeout(Duration::from_millis(100)) {
            Ok((from, iv, done)) => collector.add(from, iv, done),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every loop has dropped its sender: only the joins are left.
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(50)),
        }
        if let Some(bar) = &bar {
            update_bar(bar, plan, progress, &mut last);
        }
    }
    for (from, iv, done) in intervals.try_iter() {
        collector.add(from, iv, done);
    }
    let rows = collector.finish();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let mut results = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => results.push(t),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("a load thread panicked".into()),
        }
    }
    Ok((rows, results))
}

/// On a terminal, a live line while the loops run, drawn on stderr so it
/// never mixes with the report, with the interval lines printed above it;
/// nothing when stdout is not a terminal.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    Some(indicatif::ProgressBar::new_spinner())
}

fn update_bar(
    bar: &indicatif::ProgressBar,
    plan: &Plan,
    progress: &Progress,
    (at, messages_then): &mut (Instant, u64),
) {
    let secs = at.elapsed().as_secs_f64();
    if secs < 0.2 {
        return;
    }
    let opened = progress.opened.load(Ordering::Relaxed);
    let messages = progress.messages.load(Ordering::Relaxed);
    let stage = if progress.measuring.load(Ordering::Relaxed) {
        "measuring"
    } else {
        "starting"
    };
    bar.set_message(format!(
        "{} {stage}: {opened}/{} connections opened, {messages} messages ({:.0}/s)",
        plan.workload.name(),
        plan.connections,
        (messages - *messages_then) as f64 / secs,
    ));
    *at = Instant::now();
    *messages_then = messages;
    bar.tick();
}
