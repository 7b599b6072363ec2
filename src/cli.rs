//! The command line: `reactor [serve] | connect | load`.
//!
//! Parsing is clap's (derive); this module turns the parsed flags into the
//! library's configurations and exit codes (0 ok, 1 failure, 2 usage).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client;
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
    Load(client::load::LoadArgs),
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
    /// `threads`: one blocking thread per client, for comparison.
    #[arg(long, value_enum, default_value_t = EngineArg::Reactor)]
    pub engine: EngineArg,
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
            idle_timeout: secs(self.idle_timeout),
            stats_interval: secs(self.stats_interval),
            udp: self.udp,
            unix: self.unix.clone(),
            engine: match self.engine {
                EngineArg::Reactor => Engine::Reactor,
                EngineArg::Threads => Engine::Threads,
            },
        }
    }
}

/// Logs go to stderr (simple_logger's `stderr` feature): stdout carries
/// only the `listening on` lines and `reactor load --json`.
pub fn init_logging(cli: &Cli) {
    let level = match &cli.command {
        None => cli.serve.log_level,
        Some(Command::Serve(s)) => s.log_level,
        Some(_) => LogLevel::Warn,
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
        .init();
}

/// Runs the parsed command and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::Connect(args)) => client::connect::run(&args),
        Some(Command::Load(args)) => client::load::run(&args),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    match server::serve(args.config()) {
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
