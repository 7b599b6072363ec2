//! The server: configuration, binding, and the choice of engine.
//!
//! [`Config`] is what `reactor serve` was asked for. [`serve`] binds every
//! listener, prints the `listening on ...` lines and runs the engine until
//! a signal ends it:
//! - `event_loop`: one thread, one `mio::Poll`, every socket (the point of
//!   the project), with `connection` (one client's state machine),
//!   `token` (which token is which socket), `timer`, `udp` and `listen`;
//! - `threads`: one blocking thread per client, the tutorial's design,
//!   kept for comparison;
//! - `uring`: one thread, one io_uring: completion-based I/O, the same
//!   protocols (`docs/readiness-vs-completion.md`).
//!
//! [`Server`] runs the event loop in-process (tests, embedding): bind,
//! read the address, run on a thread, stop through a [`StopHandle`].

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub(crate) mod connection;
pub(crate) mod event_loop;
pub(crate) mod listen;
pub(crate) mod memory;
mod snapshots;
pub mod stats;
pub mod supervisor;
mod supervisor_metrics;
pub(crate) mod threads;
pub(crate) mod timer;
pub(crate) mod token;
pub(crate) mod udp;
pub(crate) mod uring;

pub use connection::CloseReason;
pub use event_loop::StopHandle;
pub use stats::Stats;

use crate::protocol::{Chat, Echo, Protocol};

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
    /// One thread and one io_uring (Linux).
    Uring,
}

/// Descriptors kept back from `--max-connections`' default for the
/// server's own use: epoll, listeners, signal pipe, stdio, log.
pub const FD_RESERVE: usize = 32;

/// How long a connection that said its last words (chat's `* error: line
/// too long`) reads and drops input before the close, so the client sees
/// those words rather than a reset. Both engines use it.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// After `EMFILE` (or another shortage), try accepting again at the
/// latest this much later. Both engines.
pub(crate) const ACCEPT_RETRY: Duration = Duration::from_millis(250);

/// How long shutdown waits for queued output to drain. Both engines.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Whether an engine accepts: on, paused after running out of
/// descriptors, or over (shutting down).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Accepting {
    On,
    /// `EMFILE`/`ENFILE` (or out of memory, or an accept error nobody
    /// expects): listeners left alone until a connection closes or this
    /// time (ms) passes, so a full process does not spin on a listener it
    /// cannot accept from.
    PausedUntil(u64),
    /// Shutting down: listeners are closed.
    Off,
}

impl Accepting {
    /// Paused at `now` (ms): accepting is tried again [`ACCEPT_RETRY`]
    /// later, or when a connection closes.
    pub(crate) fn paused(now: u64) -> Accepting {
        Accepting::PausedUntil(now + ACCEPT_RETRY.as_millis() as u64)
    }

    /// When to try accepting again, if paused: a deadline for the loop.
    pub(crate) fn retry_at(self) -> Option<u64> {
        match self {
            Accepting::PausedUntil(t) => Some(t),
            _ => None,
        }
    }
}

/// How long a loop may sleep: until the nearest of `deadlines`
/// (milliseconds since `started`), or for ever when there is none. Rounded
/// up, so that it does not wake a millisecond early and spin. Shared by
/// the readiness and uring engines.
pub(crate) fn until_nearest(
    started: Instant,
    deadlines: impl IntoIterator<Item = Option<u64>>,
) -> Option<Duration> {
    deadlines.into_iter().flatten().min().map(|at| {
        let now = started.elapsed().as_millis() as u64;
        Duration::from_millis(at.saturating_sub(now) + 1)
    })
}

/// Accepting paused (out of descriptors, out of socket memory, or an
/// error that would repeat at once): the one warning of an episode, in
/// the same words for every engine.
pub(crate) fn warn_accept_paused(e: &io::Error, held: usize) {
    let what = match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "open-file limit reached",
        Some(libc::ENOBUFS | libc::ENOMEM) => "out of memory for sockets",
        _ => "unexpected error",
    };
    log::warn!(
        "accept: {e} ({what} with {held} clients); serving them and accepting \
         again once resources free up"
    );
}

/// The end of a graceful shutdown, for every engine: warns about clients
/// still open after `grace` (they are closed as the engine drops them),
/// logs the final stats line and returns those counters.
pub(crate) fn final_stats(stats: &Stats, still_open: usize, grace: Duration) -> Stats {
    if still_open > 0 {
        log::warn!(
            "shutdown: {still_open} clients still had output queued after {grace:?}; closing them"
        );
    }
    let mut stats = stats.clone();
    stats.closed += stats.active as u64;
    stats.active = 0;
    log::info!("final {stats}");
    stats
}

/// A client accepted past `--max-connections`: count it, log it, and
/// return what to send it before the close (chat: `* error: server
/// full`). The engines write the line each their own way.
pub(crate) fn turn_away<P: Protocol>(
    protocol: &mut P,
    stats: &mut Stats,
    held: usize,
) -> &'static [u8] {
    stats.rejected += 1;
    log::debug!("rejected a client: {held} connections held");
    protocol.reject()
}

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
    /// Most bytes queued across all connections (see `INTERFACE.md`,
    /// "Memory", and [`event_loop`]'s "Memory").
    pub max_memory: usize,
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
    /// Worker processes sharing the port (see [`supervisor`]); 1 = none.
    pub workers: usize,
    /// Set in a worker process: its index. Its listeners then join the
    /// port's `SO_REUSEPORT` group instead of owning the port.
    pub worker: Option<usize>,
    /// Serve Prometheus metrics here (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// Set in a worker of a supervisor that serves `--metrics`: write the
    /// loop's [`crate::metrics::Snapshot`] on stdout this often, as one
    /// `snapshot {json}` line (see [`supervisor`], "Metrics").
    pub snapshot_every: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 5050)),
            mode: Mode::Echo,
            max_connections: None,
            max_line: 4096,
            max_buffer: 1 << 20,
            max_memory: 256 << 20,
            idle_timeout: None,
            stats_interval: None,
            udp: None,
            unix: None,
            engine: Engine::Reactor,
            workers: 1,
            worker: None,
            metrics: None,
            snapshot_every: None,
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
    /// The engine cannot run here: io_uring refused (exit 1).
    Unavailable(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Usage(m) | ServeError::Bind(m) | ServeError::Unavailable(m) => {
                f.write_str(m)
            }
            ServeError::Io(e) => write!(f, "event loop failed: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// The event loop of either protocol, bound and ready to run.
enum Reactor {
    Echo(event_loop::EventLoop<Echo>),
    Chat(event_loop::EventLoop<Chat>),
}

/// A server bound and ready, running in this process: the reactor engine,
/// for tests and programs that embed it. `reactor serve` is [`serve`].
///
/// The loop is single-threaded and its state is not `Send`, so it is
/// built on the thread that runs it; [`Server::spawn`] does both and hands
/// back the address and a stop handle.
///
/// ```
/// use std::io::{Read, Write};
/// use reactor::server::{Config, Server};
///
/// let config = Config {
///     addr: "127.0.0.1:0".parse().unwrap(),
///     ..Config::default()
/// };
/// let server = Server::spawn(config).unwrap();
/// let mut client = std::net::TcpStream::connect(server.addr).unwrap();
/// client.write_all(b"hello").unwrap();
/// let mut echo = [0; 5];
/// client.read_exact(&mut echo).unwrap();
/// assert_eq!(&echo, b"hello");
/// drop(client);
/// let stats = server.stop().unwrap();
/// assert_eq!(stats.accepted, 1);
/// ```
pub struct Server {
    reactor: Reactor,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    lines: Vec<String>,
}

impl Server {
    /// Binds every listener `config` asks for and sets up the event loop
    /// (signals included: SIGINT and SIGTERM stop it as they stop
    /// `reactor serve`).
    pub fn bind(config: Config) -> Result<Server, ServeError> {
        check(&config)?;
        let listeners = listen::Listeners::bind(&config)?;
        let max_connections = max_connections(&config);
        let addr = listeners.tcp_addr().map_err(ServeError::Io)?;
        let metrics_addr = listeners.metrics_addr().map_err(ServeError::Io)?;
        let lines = listening_lines(&config, &listeners).map_err(ServeError::Io)?;
        let reactor = match config.mode {
            Mode::Echo => Reactor::Echo(event_loop::EventLoop::new(
                config,
                max_connections,
                listeners,
                Echo,
            )?),
            Mode::Chat => {
                let chat = Chat::new(config.max_line);
                Reactor::Chat(event_loop::EventLoop::new(
                    config,
                    max_connections,
                    listeners,
                    chat,
                )?)
            }
        };
        Ok(Server {
            reactor,
            addr,
            metrics_addr,
            lines,
        })
    }

    /// The TCP address it listens on (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics endpoint's address, with `--metrics`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A handle that stops the server gracefully from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        match &self.reactor {
            Reactor::Echo(l) => l.stop_handle(),
            Reactor::Chat(l) => l.stop_handle(),
        }
    }

    /// Serves until stopped (a signal or the stop handle) and the graceful
    /// shutdown is over; returns the final counters.
    pub fn run(self) -> Result<Stats, ServeError> {
        match self.reactor {
            Reactor::Echo(l) => l.run(),
            Reactor::Chat(l) => l.run(),
        }
        .map_err(ServeError::Io)
    }
}

/// A [`Server`] running on a thread of its own.
#[derive(Debug)]
pub struct Spawned {
    /// The TCP address it listens on.
    pub addr: SocketAddr,
    /// The metrics endpoint's address, with `--metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Stops it gracefully.
    pub stop_handle: StopHandle,
    thread: std::thread::JoinHandle<Result<Stats, ServeError>>,
}

impl Spawned {
    /// Stops the server gracefully and waits for it; its final counters.
    pub fn stop(self) -> Result<Stats, ServeError> {
        self.stop_handle.stop();
        self.wait()
    }

    /// Waits for the server to end (a signal, or a stop handle elsewhere).
    pub fn wait(self) -> Result<Stats, ServeError> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(ServeError::Io(io::Error::other("server thread panicked"))))
    }
}

impl Server {
    /// Binds and runs a server on a new thread.
    pub fn spawn(config: Config) -> Result<Spawned, ServeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("reactor".into())
            .spawn(move || {
                let server = match Server::bind(config) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return Ok(Stats::default());
                    }
                };
                let _ = tx.send(Ok((
                    server.local_addr(),
                    server.metrics_addr(),
                    server.stop_handle(),
                )));
                server.run()
            })
            .map_err(ServeError::Io)?;
        let (addr, metrics_addr, stop_handle) = rx
            .recv()
            .map_err(|_| ServeError::Io(io::Error::other("server thread ended early")))??;
        Ok(Spawned {
            addr,
            metrics_addr,
            stop_handle,
            thread,
        })
    }
}

/// Settings that do not go together, whatever the engine.
fn check(config: &Config) -> Result<(), ServeError> {
    if config.udp.is_some() && config.mode == Mode::Chat {
        return Err(ServeError::Usage(
            "--udp serves echo only; it cannot be used with --mode chat".into(),
        ));
    }
    Ok(())
}

/// Raises the open-file limit and works out how many connections to hold:
/// `--max-connections`, or what the limit leaves after [`FD_RESERVE`].
fn max_connections(config: &Config) -> usize {
    let limit = crate::net::limits::raise_fd_limit();
    let max = config
        .max_connections
        .unwrap_or_else(|| (limit as usize).saturating_sub(FD_RESERVE).max(1));
    log::info!("open-file limit {limit}; holding at most {max} connections");
    max
}

/// Binds the listeners `config` asks for, prints one `listening on` line
/// per listener on stdout, and serves until SIGINT or SIGTERM.
pub fn serve(config: Config) -> Result<(), ServeError> {
    if config.metrics.is_some() && config.engine == Engine::Threads {
        return Err(ServeError::Usage(
            "--metrics is served by the event loop; it cannot be used with --engine threads".into(),
        ));
    }
    if config.workers > 1 && config.worker.is_none() {
        return supervisor::run(config);
    }
    if config.worker.is_none() {
        supervisor::warn_limits(&config);
    }
    match config.engine {
        Engine::Reactor => {
            let server = Server::bind(config)?;
            // The `listening on` lines tell a supervisor the server is
            // ready, so they are printed only once SIGTERM is handled by
            // the loop: a signal sent the moment the line appears must
            // shut down gracefully, not kill.
            print_lines(&server.lines).map_err(ServeError::Io)?;
            server.run().map(|_| ())
        }
        Engine::Threads => {
            check(&config)?;
            let listeners = listen::Listeners::bind(&config)?;
            let max_connections = max_connections(&config);
            let lines = listening_lines(&config, &listeners).map_err(ServeError::Io)?;
            let mode = config.mode;
            let announce = move || print_lines(&lines);
            threads::run(config, mode, max_connections, listeners, Box::new(announce))
                .map_err(ServeError::Io)
        }
        Engine::Uring => {
            check(&config)?;
            let listeners = listen::Listeners::bind(&config)?;
            let max_connections = max_connections(&config);
            let lines = listening_lines(&config, &listeners).map_err(ServeError::Io)?;
            // As above: the lines go out once the signal pipe is armed.
            match config.mode {
                Mode::Echo => {
                    let engine = uring::new_engine(config, max_connections, listeners, Echo)?;
                    print_lines(&lines).map_err(ServeError::Io)?;
                    engine.run()
                }
                Mode::Chat => {
                    let chat = Chat::new(config.max_line);
                    let engine = uring::new_engine(config, max_connections, listeners, chat)?;
                    print_lines(&lines).map_err(ServeError::Io)?;
                    engine.run()
                }
            }
            .map_err(ServeError::Io)
        }
    }
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
    if let Some(addr) = l.metrics_addr()? {
        lines.push(format!("listening on metrics {addr}"));
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
