//! `reactor load`: a load generator for high-connection-count tests.
//!
//! Each of `--threads` loops is a mio poll loop that owns its share of
//! the connections ([`worker`] for TCP and Unix streams, [`udp`] for
//! datagrams). Every message carries its connection id and sequence number
//! ([`message`]), and every byte that comes back is checked. Latencies go
//! into HDR histograms; the loops' tallies are merged into one
//! [`report::Report`], printed as a table or as JSON.

pub mod message;
pub mod report;
pub mod udp;
pub mod worker;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

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
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::Hold => "hold",
            Workload::Churn => "churn",
        }
    }
}

/// Everything a loop needs to know, shared by all of them.
#[derive(Debug)]
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
}

/// Counters the loops bump and the progress line reads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Connections established so far.
    pub opened: AtomicU64,
    /// Messages completed so far, warm-up included.
    pub messages: AtomicU64,
    /// Set once the first loop starts measuring.
    pub measuring: AtomicBool,
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
}

/// Runs `reactor load`: 0 when everything came back as sent, 1 otherwise.
pub fn run(args: Options) -> ExitCode {
    // Each connection is a descriptor; ask for all the system allows.
    let limit = crate::net::limits::raise_fd_limit();
    let needed = u64::from(args.plan.connections) + 16;
    if args.udp.is_none() && needed > limit {
        eprintln!(
            "reactor load: warning: {} connections need about {needed} descriptors, but this \
             process may open only {limit} (RLIMIT_NOFILE); expect to stop near {}",
            args.plan.connections,
            limit.saturating_sub(16)
        );
    }
    let connections = args.plan.connections;
    let workload = args.plan.workload;
    let plan = Arc::new(args.plan);
    let progress = Arc::new(Progress::default());
    let threads = args.threads.min(connections);
    let mut handles = Vec::new();
    for t in 0..threads {
        // Deal connection ids round-robin, so each loop gets its share.
        let ids: Vec<u32> = (t..connections).step_by(threads as usize).collect();
        let share = ids.len() as f64 / f64::from(connections);
        let (plan, progress) = (plan.clone(), progress.clone());
        let udp = args.udp;
        let handle = thread::Builder::new().name(format!("load-{t}")).spawn(
            move || -> std::io::Result<Tally> {
                match udp {
                    Some(addr) => Ok(udp::UdpWorker::new(plan, progress, addr, ids)?.run()),
                    None => Ok(Worker::new(plan, progress, ids, share)?.run()),
                }
            },
        );
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("reactor load: cannot start a thread: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let bar = progress_bar(&plan, &progress, &handles);
    let mut tally = Tally::default();
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => tally.merge(t),
            Ok(Err(e)) => {
                eprintln!("reactor load: {e}");
                return ExitCode::FAILURE;
            }
            Err(_) => {
                eprintln!("reactor load: a load thread panicked");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = Report {
        workload: workload.name(),
        settings: args.settings,
        connections: u64::from(connections),
        udp: args.udp.is_some(),
        tally,
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// On a terminal, a live line while the loops run (drawn on stderr so it
/// never mixes with the report); nothing when stdout is not a terminal.
fn progress_bar<T>(
    plan: &Plan,
    progress: &Progress,
    handles: &[thread::JoinHandle<T>],
) -> Option<indicatif::ProgressBar> {
    if !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let mut last = 0;
    while handles.iter().any(|h| !h.is_finished()) {
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
            (messages - last) as f64 / 0.2,
        ));
        last = messages;
        bar.tick();
        thread::sleep(Duration::from_millis(200));
    }
    Some(bar)
}
