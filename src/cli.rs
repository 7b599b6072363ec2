//! The command line: `reactor [serve] | connect | load | top`.
//!
//! Every clap definition lives here, and only here: parsing is clap's
//! (derive), and this module turns the parsed flags into the plain
//! configurations the library runs with ([`server::Config`],
//! [`connect::Target`], [`load::Options`]) and into exit codes (0 ok,
//! 1 failure, 2 usage). The library itself never sees clap, so tests and
//! other programs can drive it without a command line.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use serde_json::json;

use crate::client::load::{
    self, chat, message, udp, worker::Target, Engine as LoadEngine, Options, Plan, Workload,
};
use crate::client::{connect, top};
use crate::server::{self, Config, Engine, Mode, ServeError};

/// A single-threaded mio event-loop server (echo, chat), with an nc-like
/// client and a load generator.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; `serve` when left out.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve`'s flags, usable without the word `serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Talk to a server: standard input out, what it sends to standard output.
    Connect(ConnectArgs),
    /// Load-test a server with many connections, verifying every byte.
    Load(LoadArgs),
    /// Watch a running server live, from its `--metrics` endpoint.
    Top(TopArgs),
}

/// Protocol, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// RFC 862 echo.
    Echo,
    /// Line-based broadcast chat.
    Chat,
}

/// Engine, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// One thread, one poll loop.
    Reactor,
    /// One blocking thread per client.
    Threads,
    /// One thread, one io_uring (completion-based I/O, Linux).
    Uring,
}

/// `reactor load --engine`, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadEngineArg {
    /// `uring` for the echo workload over streams where this kernel gives
    /// the process an io_uring, `reactor` otherwise.
    Auto,
    /// One mio poll loop per thread (readiness: a system call per read and
    /// per write).
    #[value(alias = "mio")]
    Reactor,
    /// One io_uring per thread (completion: a turn's sends and receives in
    /// one system call; Linux, echo over streams).
    Uring,
}

/// Load workload, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    /// Send messages and read them back, for `--duration`.
    Echo,
    /// Open every connection, hold them idle, check them all again.
    Hold,
    /// Connect, one round trip, close; over and over.
    Churn,
    /// Chat clients each sending --rate lines per second (default 1); every
    /// line must reach every other client once, in order per sender.
    Chat,
}

/// Log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Lifecycle and stats.
    Info,
    /// Every connection open and close.
    Debug,
    /// Every readiness event.
    Trace,
}

/// `reactor serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:5050")]
    pub addr: SocketAddr,
    /// Protocol served.
    #[arg(long, value_enum, default_value_t = ModeArg::Echo)]
    pub mode: ModeArg,
    /// Connections held at once [default: open-file limit minus a reserve].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<NonZeroUsize>,
    /// Chat: longest line accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value = "4096")]
    pub max_line: NonZeroUsize,
    /// Most bytes queued for one connection.
    #[arg(long, value_name = "BYTES", default_value = "1048576")]
    pub max_buffer: NonZeroUsize,
    /// Most bytes queued across all connections of one worker: at the cap
    /// echo stops reading from clients that would queue more, chat drops
    /// the client with the most queued output.
    #[arg(long, value_name = "BYTES", default_value = "268435456")]
    pub max_memory: NonZeroUsize,
    /// Close connections that sent nothing for SECS; 0 = never.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub idle_timeout: u64,
    /// Log a stats line every SECS; 0 = never.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub stats_interval: u64,
    /// Log level (`trace` logs every readiness event).
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Also serve echo over UDP here (echo mode only).
    #[arg(long, value_name = "HOST:PORT")]
    pub udp: Option<SocketAddr>,
    /// Also listen on a Unix-domain stream socket here.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// `threads`: one blocking thread per client, for comparison; `uring`:
    /// one thread around one io_uring (completion-based I/O, Linux).
    #[arg(long, value_enum, default_value_t = EngineArg::Reactor)]
    pub engine: EngineArg,
    /// Worker processes, each one event loop, sharing the port (SO_REUSEPORT).
    #[arg(long, value_name = "N", default_value = "1")]
    pub workers: NonZeroUsize,
    /// Set by the supervisor: run as its worker I.
    #[arg(long, value_name = "I", hide = true)]
    pub worker_index: Option<usize>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics from the same loop.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Set by the supervisor: write a `snapshot {json}` line on stdout every MS.
    #[arg(long, value_name = "MS", hide = true)]
    pub snapshot_every_ms: Option<NonZeroU64>,
}

/// `reactor top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The server's metrics endpoint (what it was given as `--metrics`).
    #[arg(default_value = "127.0.0.1:9898")]
    pub addr: SocketAddr,
    /// Seconds between scrapes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = seconds)]
    pub interval: f64,
    /// Print one screen as text (two scrapes, one interval apart) and exit.
    #[arg(long)]
    pub once: bool,
}

impl TopArgs {
    /// The options these flags describe.
    pub fn options(&self) -> top::Options {
        top::Options {
            addr: self.addr,
            // Scraping more often than every 50 ms shows only noise.
            interval: Duration::from_secs_f64(self.interval.max(0.05)),
            once: self.once,
        }
    }
}

/// `reactor connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Server address.
    #[arg(default_value = "127.0.0.1:5050")]
    pub addr: SocketAddr,
    /// Connect to a Unix-domain socket instead.
    #[arg(long, value_name = "PATH", conflicts_with = "udp")]
    pub unix: Option<PathBuf>,
    /// Send each line of standard input as one UDP datagram here.
    #[arg(long, value_name = "HOST:PORT")]
    pub udp: Option<SocketAddr>,
}

/// `reactor load`'s flags.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadArgs {
    /// `merge`, or nothing to run a load.
    #[command(subcommand)]
    pub action: Option<LoadAction>,
    /// Server address.
    #[arg(default_value = "127.0.0.1:5050")]
    pub addr: SocketAddr,
    /// What every connection does.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Echo)]
    pub workload: WorkloadArg,
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
    /// One progress line on stderr every SECS (elapsed, open connections,
    /// msgs/s, p50/p99/p99.9 of the interval, errors so far); 0 = none.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = seconds)]
    pub interval: f64,
    /// Write every interval's latency histogram to FILE as an HdrHistogram
    /// interval log.
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,
    /// Echo: step the open-loop rate up, then bisect, and report the
    /// highest total rate whose p99 stayed at most P99_MS.
    #[arg(long, value_name = "P99_MS", value_parser = positive)]
    pub find_max_rate: Option<f64>,
    /// Load processes [default: as many as the connections need, each
    /// holding at most its open-file limit less a reserve].
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub processes: Option<u32>,
    /// What drives each loop's streams: `reactor` (mio, readiness),
    /// `uring` (one io_uring per loop; echo over TCP or Unix streams), or
    /// `auto`: uring where it can run, else reactor.
    #[arg(long, value_enum, default_value_t = LoadEngineArg::Auto)]
    pub engine: LoadEngineArg,
    /// Set by a parent load process: run as its child I.
    #[arg(long, value_name = "I", hide = true, requires = "processes")]
    pub process_index: Option<u32>,
    /// Set by a parent load process: when its run began (µs since the
    /// Unix epoch); the child's intervals count from there.
    #[arg(long, value_name = "US", hide = true, requires = "process_index")]
    pub run_started_us: Option<u64>,
}

/// `reactor load` subcommands.
#[derive(Debug, Subcommand)]
pub enum LoadAction {
    /// Add up `reactor load --json` reports (several hosts or runs) into
    /// one, exactly: counts summed, latency histograms merged.
    Merge(MergeArgs),
}

/// `reactor load merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Reports written by `reactor load --json`.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a number above 0")),
    }
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

impl ServeArgs {
    /// The server configuration these flags describe.
    pub fn config(&self) -> Config {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Config {
            addr: self.addr,
            mode: match self.mode {
                ModeArg::Echo => Mode::Echo,
                ModeArg::Chat => Mode::Chat,
            },
            max_connections: self.max_connections.map(NonZeroUsize::get),
            max_line: self.max_line.get(),
            max_buffer: self.max_buffer.get(),
            max_memory: self.max_memory.get(),
            idle_timeout: secs(self.idle_timeout),
            stats_interval: secs(self.stats_interval),
            udp: self.udp,
            unix: self.unix.clone(),
            metrics: self.metrics,
            engine: match self.engine {
                EngineArg::Reactor => Engine::Reactor,
                EngineArg::Threads => Engine::Threads,
                EngineArg::Uring => Engine::Uring,
            },
            workers: self.workers.get(),
            worker: self.worker_index,
            snapshot_every: self
                .snapshot_every_ms
                .map(|ms| Duration::from_millis(ms.get())),
        }
    }
}

impl LoadArgs {
    /// Checks combinations clap cannot, returning the complaint.
    fn validate(&self) -> Result<(), String> {
        let one_process = self.find_max_rate.is_some() || self.workload == WorkloadArg::Chat;
        if one_process && self.processes.is_some_and(|p| p > 1) {
            return Err(
                "--find-max-rate and --workload chat run in one load process; \
                 leave out --processes"
                    .into(),
            );
        }
        if self.udp.is_some() && self.workload != WorkloadArg::Echo {
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
        if self.workload == WorkloadArg::Chat && self.udp.is_some() {
            return Err("--workload chat runs over streams only".into());
        }
        if self.workload == WorkloadArg::Chat && self.connections > chat::MAX_CLIENTS {
            return Err(format!(
                "--workload chat checks every line at every client; at most {} clients",
                chat::MAX_CLIENTS
            ));
        }
        if self.find_max_rate.is_some()
            && (self.workload != WorkloadArg::Echo || self.udp.is_some())
        {
            return Err("--find-max-rate runs the echo workload over streams only".into());
        }
        if self.engine == LoadEngineArg::Uring
            && (self.workload != WorkloadArg::Echo || self.udp.is_some())
        {
            return Err("--engine uring runs the echo workload over streams only".into());
        }
        if self.hdr_log.is_some() && self.interval == 0.0 {
            return Err("--hdr-log writes one histogram per --interval; it cannot be 0".into());
        }
        Ok(())
    }

    fn settings(&self, engine: LoadEngine) -> serde_json::Value {
        json!({
            "addr": self.addr.to_string(),
            "workload": self.workload().name(),
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
            "interval": self.interval,
            "hdr_log": self.hdr_log.as_ref().map(|p| p.display().to_string()),
            "find_max_rate": self.find_max_rate,
            "processes": self.processes,
            "engine": engine.name(),
        })
    }

    fn workload(&self) -> Workload {
        match self.workload {
            WorkloadArg::Echo => Workload::Echo,
            WorkloadArg::Hold => Workload::Hold,
            WorkloadArg::Churn => Workload::Churn,
            WorkloadArg::Chat => Workload::Chat,
        }
    }

    /// The engine that runs, `auto` decided (by making a small ring).
    fn engine(&self) -> LoadEngine {
        match self.engine {
            LoadEngineArg::Reactor => LoadEngine::Reactor,
            LoadEngineArg::Uring => LoadEngine::Uring,
            LoadEngineArg::Auto => {
                let streams_echo = self.workload == WorkloadArg::Echo && self.udp.is_none();
                if streams_echo && crate::client::load::uring_usable() {
                    LoadEngine::Uring
                } else {
                    LoadEngine::Reactor
                }
            }
        }
    }

    /// The run these flags describe, or what is wrong with them.
    pub fn options(&self) -> Result<Options, String> {
        self.validate()?;
        // Decided once: the report and every child load process name the
        // engine that runs (`auto` probes the kernel).
        let engine = self.engine();
        Ok(Options {
            plan: self.plan(engine),
            threads: self.threads,
            udp: self.udp,
            json: self.json,
            settings: self.settings(engine),
            hdr_log: self.hdr_log.clone(),
            find_max_rate: self.find_max_rate,
            processes: self.processes,
            process_index: self.process_index,
            run_started_us: self.run_started_us,
            argv: self.child_args(engine),
        })
    }

    /// The flags that repeat this run in a child load process: every flag
    /// but `--processes`, `--process-index` and `--json`, which the parent
    /// sets itself, and `--hdr-log` and `--find-max-rate`, which are the
    /// parent's alone. Children get `--interval` but do not print: they
    /// send each interval to the parent, which merges and prints them.
    fn child_args(&self, engine: LoadEngine) -> Vec<String> {
        let mut a = vec![self.addr.to_string()];
        let mut flag = |k: &str, v: String| {
            a.push(format!("--{k}"));
            a.push(v);
        };
        flag("workload", self.workload().name().into());
        flag("connections", self.connections.to_string());
        flag("size", self.size.to_string());
        flag("duration", self.duration.to_string());
        flag("warmup", self.warmup.to_string());
        flag("pipeline", self.pipeline.to_string());
        flag("rate", self.rate.to_string());
        flag("connect-rate", self.connect_rate.to_string());
        flag("threads", self.threads.to_string());
        flag("timeout", self.timeout.to_string());
        flag("interval", self.interval.to_string());
        flag("engine", engine.name().into());
        if !self.source_ip.is_empty() {
            let ips: Vec<String> = self.source_ip.iter().map(|ip| ip.to_string()).collect();
            flag("source-ip", ips.join(","));
        }
        if let Some(p) = &self.unix {
            flag("unix", p.display().to_string());
        }
        if let Some(u) = self.udp {
            flag("udp", u.to_string());
        }
        a
    }

    fn plan(&self, engine: LoadEngine) -> Plan {
        Plan {
            workload: self.workload(),
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
            interval: Duration::from_secs_f64(self.interval),
            engine,
        }
    }
}

impl ConnectArgs {
    /// Where these flags say to connect.
    pub fn target(&self) -> connect::Target {
        match (&self.unix, self.udp) {
            (Some(path), _) => connect::Target::Unix(path.clone()),
            (None, Some(addr)) => connect::Target::Udp(addr),
            (None, None) => connect::Target::Tcp(self.addr),
        }
    }
}

/// Logs go to stderr (simple_logger's `stderr` feature): stdout carries
/// only the `listening on` lines and `reactor load --json`.
pub fn init_logging(cli: &Cli) {
    let (level, worker) = match &cli.command {
        None => (cli.serve.log_level, cli.serve.worker_index),
        Some(Command::Serve(s)) => (s.log_level, s.worker_index),
        Some(_) => (LogLevel::Warn, None),
    };
    let filter = match level {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    };
    // mio logs its own internals at trace; keep those out of the way.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(filter)
        .with_module_level("mio", log::LevelFilter::Warn)
        // A worker's lines name it: its loop runs on thread `worker-I`.
        .with_threads(worker.is_some())
        .init();
}

/// Runs the parsed command and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::Connect(args)) => connect::run(&args.target()),
        Some(Command::Load(LoadArgs {
            action: Some(LoadAction::Merge(m)),
            ..
        })) => load::merge::run(&m.files, m.json),
        Some(Command::Top(args)) => top::run(&args.options()),
        Some(Command::Load(args)) => match args.options() {
            Ok(options) => load::run(options),
            Err(e) => {
                eprintln!("reactor load: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = args.config();
    let result = match config.worker {
        Some(_) => server::supervisor::run_worker(config),
        None => server::serve(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reactor: {e}");
            match e {
                ServeError::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
