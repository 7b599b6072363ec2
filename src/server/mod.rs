//! The server: configuration, binding, and the choice of engine.
//!
//! [`Config`] is what `reactor serve` was asked for. [`serve`] binds every
//! listener, prints the `listening on ...` lines and runs the engine until
//! a signal ends it:
//! - [`event_loop`]: one thread, one `mio::Poll`, every socket (the point
//!   of the project);
//! - [`threads`]: one blocking thread per client, the tutorial's design,
//!   kept for comparison.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod connection;
pub mod event_loop;
pub mod listen;
pub mod stats;
pub mod threads;
pub mod timer;
pub mod token;
pub mod udp;

use crate::protocol::{Chat, Echo};

/// Which protocol the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// RFC 862 echo.
    Echo,
    /// Line-based broadcast chat.
    Chat,
}

impl Mode {
    /// The name used on the command line and in the listening line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Chat => "chat",
        }
    }
}

/// How clients are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// One thread and one poll loop for everything.
    Reactor,
    /// One blocking thread per client.
    Threads,
}

/// Descriptors kept back from `--max-connections`' default for the
/// server's own use: epoll, listeners, signal pipe, stdio, log.
pub const FD_RESERVE: usize = 32;

/// Everything `reactor serve` can be told.
#[derive(Clone, Debug)]
pub struct Config {
    /// TCP listening address.
    pub addr: SocketAddr,
    /// Protocol.
    pub mode: Mode,
    /// Connections held at once; `None` = open-file limit minus [`FD_RESERVE`].
    pub max_connections: Option<usize>,
    /// Chat: longest line, in bytes.
    pub max_line: usize,
    /// Most bytes queued for one connection.
    pub max_buffer: usize,
    /// Close connections idle this long; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Log stats this often; `None` = never.
    pub stats_interval: Option<Duration>,
    /// Also serve UDP echo here.
    pub udp: Option<SocketAddr>,
    /// Also listen on this Unix-domain socket.
    pub unix: Option<PathBuf>,
    /// Engine.
    pub engine: Engine,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 5050)),
            mode: Mode::Echo,
            max_connections: None,
            max_line: 4096,
            max_buffer: 1 << 20,
            idle_timeout: None,
            stats_interval: None,
            udp: None,
            unix: None,
            engine: Engine::Reactor,
        }
    }
}

/// Why the server could not run.
#[derive(Debug)]
pub enum ServeError {
    /// The settings do not go together (exit 2).
    Usage(String),
    /// A listener could not be set up (exit 1).
    Bind(String),
    /// The poll loop itself failed (exit 1).
    Io(io::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Usage(m) | ServeError::Bind(m) => f.write_str(m),
            ServeError::Io(e) => write!(f, "event loop failed: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// Binds the listeners `config` asks for, prints one `listening on` line
/// per listener on stdout, and serves until SIGINT or SIGTERM.
pub fn serve(config: Config) -> Result<(), ServeError> {
    if config.udp.is_some() && config.mode == Mode::Chat {
        return Err(ServeError::Usage(
            "--udp serves echo only; it cannot be used with --mode chat".into(),
        ));
    }
    let limit = crate::net::limits::raise_fd_limit();
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| (limit as usize).saturating_sub(FD_RESERVE).max(1));
    let listeners = listen::Listeners::bind(&config)?;
    let lines = listening_lines(&config, &listeners).map_err(ServeError::Io)?;
    log::info!("open-file limit {limit}; holding at most {max_connections} connections");
    // The `listening on` lines tell a supervisor the server is ready, so
    // they are printed only once SIGTERM is handled by the loop: a signal
    // sent the moment the line appears must shut down gracefully, not kill.
    let announce = move || print_lines(&lines);
    match (config.engine, config.mode) {
        (Engine::Reactor, Mode::Echo) => {
            let event_loop = event_loop::EventLoop::new(config, max_connections, listeners, Echo)?;
            announce().map_err(ServeError::Io)?;
            event_loop.run()
        }
        (Engine::Reactor, Mode::Chat) => {
            let chat = Chat::new(config.max_line);
            let event_loop = event_loop::EventLoop::new(config, max_connections, listeners, chat)?;
            announce().map_err(ServeError::Io)?;
            event_loop.run()
        }
        (Engine::Threads, mode) => {
            threads::run(config, mode, max_connections, listeners, Box::new(announce))
        }
    }
    .map_err(ServeError::Io)
}

/// One `listening on` line per listener, TCP first.
fn listening_lines(config: &Config, l: &listen::Listeners) -> io::Result<Vec<String>> {
    let mut lines = vec![format!(
        "listening on {} (mode {})",
        l.tcp_addr()?,
        config.mode.name()
    )];
    if let Some(addr) = l.udp_addr()? {
        lines.push(format!("listening on udp {addr}"));
    }
    if let Some(path) = &config.unix {
        lines.push(format!("listening on unix {}", path.display()));
    }
    Ok(lines)
}

fn print_lines(lines: &[String]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}
