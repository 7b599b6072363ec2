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
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::ValueEnum;
use serde_json::json;

use report::{Report, Tally};
use worker::{Target, Worker};

/// What every connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Send messages and read them back, for `--duration`.
    Echo,
    /// Open every connection, hold them idle, check them all again.
    Hold,
    /// Connect, one round trip, close; over and over.
    Churn,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::Hold => "hold",
            Workload::Churn => "churn",
        }
    }
}

/// `reactor load`'s flags.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Server address.
    #[arg(default_value = "127.0.0.1:5050")]
    pub addr: SocketAddr,
    /// What every connection does.
    #[arg(long, value_enum, default_value_t = Workload::Echo)]
    pub workload: Workload,
    /// Connections (churn: connections kept going at once).
    #[arg(short = 'c', long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Message size in bytes.
    #[arg(short = 's', long, value_name = "BYTES", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub size: u32,
    /// Measured time in seconds (hold: how long to hold).
    #[arg(short = 'd', long, value_name = "SECS", default_value_t = 10.0, value_parser = seconds)]
    pub duration: f64,
    /// Seconds run before measuring, not counted.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = seconds)]
    pub warmup: f64,
    /// Messages in flight per connection (1 = ping-pong).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub pipeline: u32,
    /// Messages per second per connection, open loop; 0 = closed loop.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = rate)]
    pub rate: f64,
    /// New connections per second; 0 = as fast as possible.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = rate)]
    pub connect_rate: f64,
    /// Poll loops (threads); connections are dealt among them.
    #[arg(long, value_name = "T", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// Local addresses to connect from, in turn (127.0.0.0/8).
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub source_ip: Vec<IpAddr>,
    /// Longest wait in seconds for one connect or one reply.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = seconds)]
    pub timeout: f64,
    /// Connect to a Unix-domain stream socket instead of TCP.
    #[arg(long, value_name = "PATH", conflicts_with = "udp")]
    pub unix: Option<PathBuf>,
    /// Echo over UDP datagrams to this address (loss counted).
    #[arg(long, value_name = "HOST:PORT")]
    pub udp: Option<SocketAddr>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=1e6).contains(&x) => Ok(x),
        _ => Err(format!("`{s}` is not a number of seconds")),
    }
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a rate (a number, 0 or more)")),
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

impl LoadArgs {
    /// Checks combinations clap cannot, returning the complaint.
    fn validate(&self) -> Result<(), String> {
        if self.udp.is_some() && self.workload != Workload::Echo {
            return Err("--udp runs the echo workload only".into());
        }
        if self.udp.is_some()
            && !(message::HEADER..=udp::MAX_DATAGRAM).contains(&(self.size as usize))
        {
            return Err(format!(
                "--udp needs --size between {} and {} bytes (a datagram carries its own id)",
                message::HEADER,
                udp::MAX_DATAGRAM
            ));
        }
        if let Some(ip) = self.source_ip.iter().find(|ip| !ip.is_loopback()) {
            return Err(format!(
                "--source-ip {ip}: only loopback addresses (127.0.0.0/8, ::1) are allowed"
            ));
        }
        if let Some(ip) = self
            .source_ip
            .iter()
            .find(|ip| ip.is_ipv4() != self.addr.is_ipv4())
        {
            return Err(format!(
                "--source-ip {ip} is not of the same family as {}",
                self.addr
            ));
        }
        if self.timeout <= 0.0 {
            return Err("--timeout must be more than 0".into());
        }
        Ok(())
    }

    fn settings(&self) -> serde_json::Value {
        json!({
            "addr": self.addr.to_string(),
            "workload": self.workload.name(),
            "connections": self.connections,
            "size": self.size,
            "duration": self.duration,
            "warmup": self.warmup,
            "pipeline": self.pipeline,
            "rate": self.rate,
            "connect_rate": self.connect_rate,
            "threads": self.threads,
            "source_ip": self.source_ip.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            "timeout": self.timeout,
            "unix": self.unix.as_ref().map(|p| p.display().to_string()),
            "udp": self.udp.map(|a| a.to_string()),
            "json": self.json,
        })
    }

    fn plan(&self) -> Plan {
        Plan {
            workload: self.workload,
            target: match &self.unix {
                Some(path) => Target::Unix(path.clone()),
                None => Target::Tcp(self.udp.unwrap_or(self.addr)),
            },
            connections: self.connections,
            size: self.size as usize,
            pipeline: self.pipeline,
            rate: self.rate,
            connect_rate: self.connect_rate,
            duration: Duration::from_secs_f64(self.duration),
            // hold measures nothing before the hold itself.
            warmup: Duration::from_secs_f64(self.warmup),
            timeout: Duration::from_secs_f64(self.timeout),
            source_ips: self.source_ip.clone(),
        }
    }
}

/// Runs `reactor load`: 0 when everything came back as sent, 1 otherwise,
/// 2 for flags that do not go together.
pub fn run(args: &LoadArgs) -> ExitCode {
    if let Err(e) = args.validate() {
        eprintln!("reactor load: {e}");
        return ExitCode::from(2);
    }
    // Each connection is a descriptor; ask for all the system allows.
    let limit = crate::server::raise_fd_limit();
    let needed = u64::from(args.connections) + 16;
    if args.udp.is_none() && needed > limit {
        eprintln!(
            "reactor load: warning: {} connections need about {needed} descriptors, but this \
             process may open only {limit} (RLIMIT_NOFILE); expect to stop near {}",
            args.connections,
            limit.saturating_sub(16)
        );
    }
    let plan = Arc::new(args.plan());
    let progress = Arc::new(Progress::default());
    let threads = args.threads.min(args.connections);
    let mut handles = Vec::new();
    for t in 0..threads {
        // Deal connection ids round-robin, so each loop gets its share.
        let ids: Vec<u32> = (t..args.connections).step_by(threads as usize).collect();
        let share = ids.len() as f64 / f64::from(args.connections);
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
    let bar = progress_bar(args, &progress, &handles);
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
        workload: args.workload.name(),
        settings: args.settings(),
        connections: u64::from(args.connections),
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
    args: &LoadArgs,
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
            args.workload.name(),
            args.connections,
            (messages - last) as f64 / 0.2,
        ));
        last = messages;
        bar.tick();
        thread::sleep(Duration::from_millis(200));
    }
    Some(bar)
}
