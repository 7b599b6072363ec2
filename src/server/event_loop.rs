//! The reactor: one thread, one `mio::Poll`, every socket.
//!
//! ```text
//!            ┌──────────────── EventLoop::run ────────────────┐
//!            │ poll.poll(events, timeout)   (epoll_wait)      │
//!            │   for each event: dispatch(token)              │
//!            │      LISTENER_TCP/UNIX → accept until WouldBlock│
//!            │      UDP               → recv/send datagrams   │
//!            │      SIGNALS           → begin shutdown        │
//!            │      connection token  → on_writable/on_readable│
//!            │   serve the ready list (budgets left over)     │
//!            │   expire timers (idle, linger, stats)          │
//!            └────────────────────────────────────────────────┘
//! ```
//!
//! The loop only dispatches. What a connection does lives in
//! [`super::connection`]; what it says lives in [`crate::protocol`].
//!
//! # Tokens
//! A connection's token carries its slab key in the low 32 bits and a
//! generation in the high bits (see `conn_token`). A connection closed
//! while handling one event of a batch frees its key, and an accept later
//! in the same batch may reuse it; a later event of the batch still
//! carries the old generation, so `EventLoop::live` ignores it instead
//! of handing it to the new connection. The same check makes stale ready
//! list entries and timer entries harmless.
//!
//! # Fairness
//! mio's readiness is edge-triggered: an event means "something changed",
//! and no new event comes until we have drained the socket to
//! `WouldBlock`. Draining one very busy client to the end could starve all
//! the others, so each handler has a budget (bytes per event, accepts per
//! wake-up). A socket whose budget runs out is still ready, and no event
//! will say so again, so it goes on the ready list and is served again on
//! the next turn, after the others had theirs (redis does the same with
//! `NET_MAX_WRITES_PER_EVENT`).

use std::io::{self, Read};
use std::net::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::connection::{flag, write_now, Broadcast, ConnOutbox, Connection, GoneOutbox, Phase};
use super::listen::{Listeners, SocketFile};
use super::stats::Stats;
use super::stream::Stream;
use super::timer::Timers;
use super::udp::{Next, UdpEcho};
use super::Config;
use crate::protocol::{Audience, Protocol};

/// The TCP listener.
pub const LISTENER_TCP: Token = Token(0);
/// The Unix-domain listener.
pub const LISTENER_UNIX: Token = Token(1);
/// The UDP echo socket.
pub const UDP: Token = Token(2);
/// SIGINT and SIGTERM, delivered through a self-pipe by signal-hook-mio.
pub const SIGNALS: Token = Token(3);
/// Tokens below this belong to the sockets above; connection tokens start here.
const FIRST_CONN: usize = 16;

/// Size of the one read buffer all connections share. An idle connection
/// owns no read buffer at all: it reads here, and the bytes are handed on
/// (echoed, or split into lines) before the next connection reads.
const SCRATCH: usize = 64 * 1024;
/// Most bytes read from one connection per event before others get a turn.
const READ_BUDGET: usize = 4 * SCRATCH;
/// Most bytes written to one connection per event.
const WRITE_BUDGET: usize = 4 * SCRATCH;
/// Most connections accepted per wake-up before clients get a turn.
const ACCEPT_BUDGET: usize = 256;
/// Events fetched per `poll` call.
const EVENTS: usize = 1024;
/// After `EMFILE`, try accepting again at the latest this much later.
const ACCEPT_RETRY: Duration = Duration::from_millis(250);
/// How long a rejected chat client's input is discarded before the close.
const LINGER: Duration = Duration::from_secs(1);
/// How long shutdown waits for queued output to drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The token of the connection at slab `key` with `generation`.
/// The one place where keys become tokens; [`conn_key`] is its inverse.
fn conn_token(key: usize, generation: u32) -> Token {
    Token(((generation as usize) << 32) | (key + FIRST_CONN))
}

/// The slab key and generation in a connection token.
fn conn_key(token: Token) -> (usize, u32) {
    ((token.0 & 0xffff_ffff) - FIRST_CONN, (token.0 >> 32) as u32)
}

/// A token as the logs show it: `conn 3#17` is slab key 3, generation 17.
pub struct Show(pub Token);

impl std::fmt::Display for Show {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            LISTENER_TCP => f.write_str("tcp listener"),
            LISTENER_UNIX => f.write_str("unix listener"),
            UDP => f.write_str("udp socket"),
            SIGNALS => f.write_str("signals"),
            t => {
                let (key, generation) = conn_key(t);
                write!(f, "conn {key}#{generation}")
            }
        }
    }
}

/// Whether accepting is on, or paused after running out of descriptors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Accepting {
    On,
    /// `EMFILE`/`ENFILE`: listeners deregistered until a connection closes
    /// or this time (ms) passes, so a full process does not spin on a
    /// listener it cannot accept from.
    PausedUntil(u64),
    /// Shutting down: listeners are closed.
    Off,
}

/// How far a readable connection is read.
///
/// Edge-triggered readiness reports each *arrival* once. When the event
/// carried no hang-up, a read that returns less than asked for means the
/// socket is empty for now, and anything arriving later (data or FIN)
/// raises a new edge. When the event already says the peer closed
/// (`EPOLLRDHUP`), or when the read is a ready-list retry with no fresh
/// edge behind it, only reading until `WouldBlock` or EOF is safe.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Drain {
    UntilShortRead,
    ToEnd,
}

/// The event loop, generic over the protocol it serves.
pub struct EventLoop<P: Protocol> {
    poll: Poll,
    tcp: Option<mio::net::TcpListener>,
    unix: Option<(mio::net::UnixListener, SocketFile)>,
    udp: Option<UdpEcho>,
    signals: Signals,
    conns: Slab<Connection<P::Session>>,
    protocol: P,
    /// The shared read buffer.
    scratch: Box<[u8]>,
    /// Sockets with readiness left over after their budget ran out.
    ready: Vec<Token>,
    /// Swapped with `ready` each turn, so neither is reallocated.
    ready_spare: Vec<Token>,
    /// Broadcasts waiting for the current handler to finish.
    broadcasts: Vec<Broadcast>,
    /// Connections to close after a broadcast (slow consumers, failures).
    doomed: Vec<Token>,
    /// Connections whose interest may have changed during a broadcast.
    touched: Vec<Token>,
    timers: Timers,
    stats: Stats,
    config: Config,
    max_connections: usize,
    accepting: Accepting,
    /// The episode of descriptor exhaustion was already logged.
    emfile_logged: bool,
    /// Listener tokens already on the ready list.
    listener_ready: [bool; 3],
    started: Instant,
    /// Milliseconds since `started`, read once per wake-up.
    now: u64,
    next_generation: u32,
    next_stats: Option<u64>,
    /// When shutdown must end, once it began.
    shutdown_deadline: Option<u64>,
}

impl<P: Protocol> EventLoop<P> {
    /// Registers every listener and the signal pipe with a new `Poll`.
    pub fn new(
        config: Config,
        max_connections: usize,
        listeners: Listeners,
        protocol: P,
    ) -> Result<Self, super::ServeError> {
        let io = super::ServeError::Io;
        let poll = Poll::new().map_err(io)?;
        let registry = poll.registry();
        let Listeners { tcp, unix, udp } = listeners;
        // mio wants non-blocking sockets: a blocking accept or read would
        // stall every client behind it.
        tcp.set_nonblocking(true).map_err(io)?;
        let mut tcp = mio::net::TcpListener::from_std(tcp);
        registry
            .register(&mut tcp, LISTENER_TCP, Interest::READABLE)
            .map_err(io)?;
        let unix = match unix {
            Some(u) => {
                u.listener.set_nonblocking(true).map_err(io)?;
                let mut l = mio::net::UnixListener::from_std(u.listener);
                registry
                    .register(&mut l, LISTENER_UNIX, Interest::READABLE)
                    .map_err(io)?;
                Some((l, u.file))
            }
            None => None,
        };
        let udp = match udp {
            Some(s) => {
                s.set_nonblocking(true).map_err(io)?;
                let mut u = UdpEcho::new(mio::net::UdpSocket::from_std(s), config.max_buffer);
                u.register(registry, UDP).map_err(io)?;
                Some(u)
            }
            None => None,
        };
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(io)?;
        registry
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io)?;
        let next_stats = config.stats_interval.map(|d| d.as_millis() as u64);
        Ok(EventLoop {
            poll,
            tcp: Some(tcp),
            unix,
            udp,
            signals,
            conns: Slab::new(),
            protocol,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            ready: Vec::new(),
            ready_spare: Vec::new(),
            broadcasts: Vec::new(),
            doomed: Vec::new(),
            touched: Vec::new(),
            timers: Timers::default(),
            stats: Stats::default(),
            config,
            max_connections,
            accepting: Accepting::On,
            emfile_logged: false,
            listener_ready: [false; 3],
            started: Instant::now(),
            now: 0,
            next_generation: 1,
            next_stats,
            shutdown_deadline: None,
        })
    }

    /// Runs until a signal's graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                // A signal arriving during epoll_wait interrupts it; that
                // is not a failure, the signal's own event follows.
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = self.started.elapsed().as_millis() as u64;
            // Entries pushed while handling this batch wait for the next
            // turn, so everything else runs before a socket gets more.
            let mut pending = std::mem::take(&mut self.ready_spare);
            std::mem::swap(&mut pending, &mut self.ready);
            log::trace!(
                "poll: {} event(s), {} on the ready list",
                events.iter().count(),
                pending.len()
            );
            for event in events.iter() {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                log::trace!(
                    "[{}] event:{}{}{}{}",
                    Show(event.token()),
                    if readable { " readable" } else { "" },
                    if writable { " writable" } else { "" },
                    if event.is_read_closed() {
                        " read-closed"
                    } else {
                        ""
                    },
                    if event.is_error() { " error" } else { "" },
                );
                // If the peer's FIN is already queued behind the data, a
                // short read would hide it: its edge was this very event.
                let drain = if event.is_read_closed() || event.is_error() {
                    Drain::ToEnd
                } else {
                    Drain::UntilShortRead
                };
                self.dispatch(event.token(), readable, writable, drain)?;
            }
            for &token in &pending {
                self.serve_again(token)?;
            }
            pending.clear();
            self.ready_spare = pending;
            self.expire()?;
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now >= deadline {
                    return self.finish();
                }
            }
        }
    }

    /// How long `poll` may sleep: not at all while the ready list has
    /// work, else until the nearest deadline.
    fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let accept_retry = match self.accepting {
            Accepting::PausedUntil(t) => Some(t),
            _ => None,
        };
        [
            self.timers.next(),
            self.next_stats,
            accept_retry,
            self.shutdown_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| {
            let now = self.started.elapsed().as_millis() as u64;
            // Round up, so we do not wake a millisecond early and spin.
            Duration::from_millis(at.saturating_sub(now) + 1)
        })
    }

    fn dispatch(
        &mut self,
        token: Token,
        readable: bool,
        writable: bool,
        drain: Drain,
    ) -> io::Result<()> {
        match token {
            LISTENER_TCP | LISTENER_UNIX => self.accept(token),
            UDP => self.on_udp(readable, writable),
            SIGNALS => self.on_signal(),
            _ => {
                self.on_connection(token, readable, writable, drain);
                Ok(())
            }
        }
    }

    /// A ready-list entry: the socket had more to do when its budget ran out.
    fn serve_again(&mut self, token: Token) -> io::Result<()> {
        match token {
            LISTENER_TCP | LISTENER_UNIX | UDP => {
                self.listener_ready[token.0] = false;
                self.dispatch(token, true, false, Drain::ToEnd)
            }
            _ => {
                if let Some(key) = self.live(token) {
                    self.conns[key].flags &= !flag::ON_READY_LIST;
                    // No fresh edge stands behind a ready-list entry, so
                    // a short read proves nothing here: read to the end.
                    self.on_connection(token, true, true, Drain::ToEnd);
                }
                Ok(())
            }
        }
    }

    fn push_ready(&mut self, token: Token) {
        if token.0 < FIRST_CONN {
            if !std::mem::replace(&mut self.listener_ready[token.0], true) {
                self.ready.push(token);
            }
        } else if let Some(key) = self.live(token) {
            let conn = &mut self.conns[key];
            if !conn.has(flag::ON_READY_LIST) {
                conn.flags |= flag::ON_READY_LIST;
                self.ready.push(token);
            }
        }
    }

    /// The slab key of `token` if that connection is still the one the
    /// token was made for; `None` for a stale token (see the module docs).
    fn live(&self, token: Token) -> Option<usize> {
        let (key, generation) = conn_key(token);
        match self.conns.get(key) {
            Some(c) if c.generation == generation => Some(key),
            _ => None,
        }
    }

    // ----- accepting -------------------------------------------------------

    fn accept(&mut self, token: Token) -> io::Result<()> {
        if self.accepting != Accepting::On {
            return Ok(());
        }
        for _ in 0..ACCEPT_BUDGET {
            let accepted = match token {
                LISTENER_TCP => match &self.tcp {
                    Some(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                    None => return Ok(()),
                },
                _ => match &self.unix {
                    Some((l, _)) => l.accept().map(|(s, _)| Stream::Unix(s)),
                    None => return Ok(()),
                },
            };
            match accepted {
                Ok(stream) => {
                    self.emfile_logged = false;
                    self.open(stream)?;
                }
                // Drained: the next connection raises a new edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::trace!("[{}] accept: WouldBlock, drained", Show(token));
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_out_of_fds(&e) => return self.pause_accepting(e),
                // ECONNABORTED and friends concern that one connection,
                // which the client gave up on before we took it.
                Err(e) => log::debug!("accept failed: {e}"),
            }
        }
        // Budget spent, maybe with more connections waiting in the backlog.
        self.push_ready(token);
        Ok(())
    }

    /// Out of descriptors: stop watching the listeners (an edge-triggered
    /// listener would wake us for every new SYN and fail again: a busy
    /// loop) and look again when a connection closes or after
    /// [`ACCEPT_RETRY`]. Pending connects wait in the backlog meanwhile.
    fn pause_accepting(&mut self, e: io::Error) -> io::Result<()> {
        if !self.emfile_logged {
            log::warn!(
                "accept: {e} (open-file limit reached with {} clients); \
                 serving them and accepting again once descriptors free up",
                self.conns.len()
            );
            self.emfile_logged = true;
        }
        self.accepting = Accepting::PausedUntil(self.now + ACCEPT_RETRY.as_millis() as u64);
        let registry = self.poll.registry();
        if let Some(l) = self.tcp.as_mut() {
            registry.deregister(l)?;
        }
        if let Some((l, _)) = self.unix.as_mut() {
            registry.deregister(l)?;
        }
        Ok(())
    }

    fn resume_accepting(&mut self) -> io::Result<()> {
        if !matches!(self.accepting, Accepting::PausedUntil(_)) {
            return Ok(());
        }
        self.accepting = Accepting::On;
        // Connections that queued while we were not looking raised their
        // edges long ago; the ready list makes us accept them now.
        if let Some(l) = self.tcp.as_mut() {
            self.poll
                .registry()
                .register(l, LISTENER_TCP, Interest::READABLE)?;
            self.push_ready(LISTENER_TCP);
        }
        if let Some((l, _)) = self.unix.as_mut() {
            self.poll
                .registry()
                .register(l, LISTENER_UNIX, Interest::READABLE)?;
            self.push_ready(LISTENER_UNIX);
        }
        Ok(())
    }

    fn open(&mut self, mut stream: Stream) -> io::Result<()> {
        self.stats.accepted += 1;
        if stream.is_unix() {
            self.stats.accepted_unix += 1;
        }
        if self.conns.len() >= self.max_connections {
            // Accept and close at once: leaving it in the backlog would
            // keep the client waiting on a server that has no room.
            self.stats.rejected += 1;
            let line = self.protocol.reject();
            if !line.is_empty() {
                let _ = write_now(&stream, line, &mut self.stats);
            }
            log::debug!("rejected a client: {} connections held", self.conns.len());
            return Ok(());
        }
        if let Stream::Tcp(s) = &stream {
            set_nodelay(s);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let generation = self.next_generation;
        // 31 bits: the token's top half must never reach the listener tokens.
        self.next_generation = (self.next_generation + 1) & 0x7fff_ffff;
        let token = conn_token(key, generation);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
        {
            log::warn!("cannot register a new client: {e}");
            return Ok(());
        }
        // The welcome (chat) goes out through the same outbox as every
        // later reply, before the connection is stored.
        let (mut out, mut flags, mut phase) = (None, flag::REG_READABLE, Phase::Open);
        let session = self.protocol.open(&mut ConnOutbox {
            token,
            stream: &stream,
            out: &mut out,
            flags: &mut flags,
            phase: &mut phase,
            limit: self.config.max_buffer,
            broadcasts: &mut self.broadcasts,
            stats: &mut self.stats,
        });
        entry.insert(Connection {
            stream,
            out,
            stamp: self.now,
            generation,
            phase,
            flags,
            session,
        });
        self.stats.active += 1;
        log::debug!("[{}] open ({} held)", Show(token), self.conns.len());
        if let Some(idle) = self.config.idle_timeout {
            self.timers.push(self.now + idle.as_millis() as u64, token);
        }
        self.settle(key);
        self.deliver();
        Ok(())
    }

    // ----- one connection --------------------------------------------------

    fn on_connection(&mut self, token: Token, readable: bool, writable: bool, drain: Drain) {
        let Some(key) = self.live(token) else {
            // A stale event for a connection closed earlier in this batch.
            return;
        };
        if writable {
            self.on_writable(key);
        }
        if readable {
            self.on_readable(key, drain);
        }
        self.settle(key);
        self.deliver();
    }

    fn on_writable(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.out.is_none() {
            // Nothing queued: most writes went out from the read path.
            return;
        }
        match conn.flush(WRITE_BUDGET, &mut self.stats) {
            // Less than the budget went out: the flush stopped on
            // `WouldBlock` (or emptied the queue), and the kernel raises
            // an edge when room appears. The whole budget went out: the
            // socket may still be writable and no edge will say so.
            Ok(n) if n >= WRITE_BUDGET && conn.queued() > 0 => {
                let token = conn_token(key, conn.generation);
                log::trace!(
                    "[{}] wrote {n} bytes: budget spent, ready list",
                    Show(token)
                );
                self.push_ready(token);
            }
            Ok(n) => log::trace!(
                "[{}] wrote {n} queued bytes, {} left",
                Show(conn_token(key, conn.generation)),
                conn.queued()
            ),
            Err(e) => {
                log::debug!(
                    "[{}] write failed: {e}",
                    Show(conn_token(key, conn.generation))
                );
                conn.flags |= flag::FAILED;
            }
        }
    }

    fn on_readable(&mut self, key: usize, drain: Drain) {
        let mut budget = READ_BUDGET;
        loop {
            let conn = &mut self.conns[key];
            let token = conn_token(key, conn.generation);
            if conn.has(flag::READ_CLOSED | flag::FAILED | flag::OVERFLOW)
                || conn.phase == Phase::Draining
            {
                return;
            }
            if budget == 0 {
                log::trace!("[{}] read budget spent: ready list", Show(token));
                self.push_ready(token);
                return;
            }
            // Back-pressure: read no more than the output queue can take,
            // so echo never queues past `--max-buffer`.
            let space = conn
                .out
                .as_ref()
                .map_or(self.config.max_buffer, |q| q.space());
            if space == 0 {
                if !conn.has(flag::PAUSED) {
                    log::debug!("[{}] output full: reading paused", Show(token));
                }
                conn.flags |= flag::PAUSED;
                return;
            }
            let want = space.min(self.scratch.len()).min(budget);
            let buf = &mut self.scratch[..want];
            match (&conn.stream).read(buf) {
                // Ok(0): the peer closed its side (EOF). It may still read
                // what we owe it, so this is a half-close, not an error.
                Ok(0) => {
                    conn.flags |= flag::READ_CLOSED;
                    log::debug!("[{}] read: 0 bytes, eof", Show(token));
                    if conn.phase == Phase::Open {
                        let (mut outbox, session) = conn.split(
                            token,
                            self.config.max_buffer,
                            &mut self.broadcasts,
                            &mut self.stats,
                        );
                        self.protocol.eof(session, &mut outbox);
                    }
                    return;
                }
                Ok(n) => {
                    log::trace!("[{}] read {n} bytes", Show(token));
                    self.stats.bytes_in += n as u64;
                    budget -= n;
                    conn.stamp = self.now;
                    if conn.phase == Phase::Open {
                        let (mut outbox, session) = conn.split(
                            token,
                            self.config.max_buffer,
                            &mut self.broadcasts,
                            &mut self.stats,
                        );
                        self.protocol.data(session, &buf[..n], &mut outbox);
                    }
                    // A lingering connection's input is read and dropped.
                    //
                    // A short read means the socket is drained for now: a
                    // stream socket hands over everything it holds, up to
                    // the buffer, and bytes that arrive after this read
                    // raise a new edge. So the read that would only say
                    // `WouldBlock` is skipped: one system call less per
                    // message. (Linux; elsewhere we read on to WouldBlock.)
                    // Not when the event said the peer has closed: then
                    // the FIN is queued behind these bytes and no new
                    // edge will come for it (see `Drain`).
                    if cfg!(target_os = "linux") && drain == Drain::UntilShortRead && n < want {
                        log::trace!("[{}] short read: drained for now", Show(token));
                        return;
                    }
                }
                // Drained: wait for the next edge. Also what a spurious
                // wake-up looks like.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::trace!("[{}] read: WouldBlock, drained", Show(token));
                    return;
                }
                // A signal interrupted the call; nothing happened, retry.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("[{}] read failed: {e}", Show(token));
                    conn.flags |= flag::FAILED;
                    return;
                }
            }
        }
    }

    /// After a handler: close the connection if it is finished, move it
    /// between phases, and bring its registered interest up to date.
    fn settle(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let token = conn_token(key, conn.generation);
        if conn.has(flag::FAILED) {
            return self.close(key, "error");
        }
        if conn.has(flag::OVERFLOW) {
            self.stats.dropped_slow += 1;
            log::warn!(
                "[{}] slow consumer: output passed --max-buffer, disconnecting",
                Show(token)
            );
            return self.close(key, "slow consumer");
        }
        if conn.phase == Phase::Draining && conn.queued() == 0 {
            if !conn.has(flag::REJECT) {
                return self.close(key, "done");
            }
            // Shut our side so the client sees the error line and EOF,
            // then read and drop what it still sends until it closes or
            // the linger time passes.
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.flags &= !flag::REJECT;
            conn.phase = Phase::Lingering;
            conn.stamp = self.now + LINGER.as_millis() as u64;
            self.timers.push(conn.stamp, token);
            // Input may already be waiting and its edge consumed.
            self.push_ready(token);
        }
        let conn = &mut self.conns[key];
        if conn.has(flag::PAUSED) && conn.queued() <= self.config.max_buffer / 2 {
            // Drained enough: resume reading. The edge for bytes that
            // arrived while paused is long gone, so look for them on the
            // next turn rather than waiting for an event that won't come.
            conn.flags &= !flag::PAUSED;
            conn.stamp = self.now;
            self.push_ready(token);
        }
        let conn = &mut self.conns[key];
        match conn.interest() {
            None => self.close(key, "finished"),
            Some(want) if want != conn.registered() => {
                match self
                    .poll
                    .registry()
                    .reregister(&mut conn.stream, token, want)
                {
                    Ok(()) => {
                        log::trace!("[{}] interest now {want:?}", Show(token));
                        conn.set_registered(want);
                    }
                    Err(e) => {
                        log::debug!("[{}] reregister failed: {e}", Show(token));
                        self.close(key, "error");
                    }
                }
            }
            Some(_) => {}
        }
    }

    /// Closes and forgets a connection, and tells the protocol.
    fn close(&mut self, key: usize, why: &str) {
        let token = conn_token(key, self.conns[key].generation);
        // Deregister before the stream is dropped and the key freed: the
        // key may be handed to the next accept at once, and epoll must not
        // keep anything of the old socket under it.
        if let Err(e) = self.poll.registry().deregister(&mut self.conns[key].stream) {
            log::debug!("[{}] deregister failed: {e}", Show(token));
        }
        let conn = self.conns.remove(key);
        self.stats.active -= 1;
        self.stats.closed += 1;
        log::debug!("[{}] closed ({why})", Show(token));
        let mut outbox = GoneOutbox {
            token,
            broadcasts: &mut self.broadcasts,
        };
        self.protocol.close(conn.session, &mut outbox);
        // conn.stream drops here: close(2).
        if let Err(e) = self.resume_accepting() {
            log::warn!("cannot re-register a listener: {e}");
        }
    }

    /// Delivers queued broadcasts to their recipients, closing the ones
    /// that cannot take them; their departure may broadcast more.
    fn deliver(&mut self) {
        while !self.broadcasts.is_empty() {
            let batch = std::mem::take(&mut self.broadcasts);
            if self.shutdown_deadline.is_some() {
                // Shutting down: flush what was already queued, start
                // nothing new.
                continue;
            }
            // Recipient by recipient, every chunk of the batch meant for
            // it in one go: one vectored write each, not one per line.
            let mut mine: Vec<&Rc<[u8]>> = Vec::with_capacity(batch.len());
            for (key, conn) in self.conns.iter_mut() {
                let token = conn_token(key, conn.generation);
                if conn.phase != Phase::Open || conn.has(flag::FAILED | flag::OVERFLOW) {
                    continue;
                }
                mine.clear();
                mine.extend(
                    batch
                        .iter()
                        .filter(|b| !(b.to == Audience::Others && token == b.from))
                        .map(|b| &b.chunk),
                );
                if mine.is_empty() {
                    continue;
                }
                let before = conn.queued();
                conn.send_shared_batch(&mine, self.config.max_buffer, &mut self.stats);
                if conn.has(flag::FAILED | flag::OVERFLOW) {
                    self.doomed.push(token);
                } else if before == 0 && conn.queued() > 0 {
                    self.touched.push(token);
                }
            }
            // Closing a doomed client broadcasts its `left` line, which
            // the next turn of this loop delivers.
            let mut touched = std::mem::take(&mut self.touched);
            touched.append(&mut self.doomed);
            for &token in &touched {
                if let Some(key) = self.live(token) {
                    self.settle(key);
                }
            }
            touched.clear();
            self.touched = touched;
        }
    }

    // ----- UDP, signals, timers ---------------------------------------------

    fn on_udp(&mut self, readable: bool, writable: bool) -> io::Result<()> {
        let Some(udp) = self.udp.as_mut() else {
            return Ok(());
        };
        if writable {
            udp.on_writable(&mut self.stats)?;
        }
        if readable && udp.on_readable(&mut self.scratch, &mut self.stats)? == Next::MoreReady {
            self.push_ready(UDP);
        }
        let udp = self.udp.as_mut().expect("checked above");
        udp.update_interest(self.poll.registry(), UDP)
    }

    fn on_signal(&mut self) -> io::Result<()> {
        let mut stop = false;
        for signal in self.signals.pending() {
            log::info!("signal {signal}: shutting down");
            stop = true;
        }
        if stop && self.shutdown_deadline.is_none() {
            self.begin_shutdown()?;
        }
        Ok(())
    }

    /// Graceful shutdown: close the listeners at once (new connects are
    /// refused), stop reading, and let every client's queued output drain
    /// for at most [`SHUTDOWN_GRACE`].
    fn begin_shutdown(&mut self) -> io::Result<()> {
        self.shutdown_deadline = Some(self.now + SHUTDOWN_GRACE.as_millis() as u64);
        self.accepting = Accepting::Off;
        if let Some(mut l) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Dropping the Unix listener also removes its socket file.
        if let Some((mut l, _file)) = self.unix.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut u) = self.udp.take() {
            let _ = u.deregister(self.poll.registry());
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            conn.phase = Phase::Draining;
            conn.flags &= !flag::REJECT;
            self.settle(key);
        }
        Ok(())
    }

    fn finish(self) -> io::Result<()> {
        if !self.conns.is_empty() {
            log::warn!(
                "shutdown: {} clients still had output queued after {:?}; closing them",
                self.conns.len(),
                SHUTDOWN_GRACE
            );
        }
        let mut stats = self.stats.clone();
        stats.closed += stats.active as u64;
        stats.active = 0;
        log::info!("final {stats}");
        Ok(())
    }

    /// Pops due timers: idle connections, lingering closes, stats, accept retry.
    fn expire(&mut self) -> io::Result<()> {
        if let Accepting::PausedUntil(t) = self.accepting {
            if self.now >= t {
                self.resume_accepting()?;
            }
        }
        if let (Some(at), Some(every)) = (self.next_stats, self.config.stats_interval) {
            if self.now >= at {
                log::info!("{}", self.stats);
                self.next_stats = Some(self.now + every.as_millis() as u64);
            }
        }
        while let Some(token) = self.timers.pop_due(self.now) {
            let Some(key) = self.live(token) else {
                continue;
            };
            let conn = &self.conns[key];
            let due = match (conn.phase, self.config.idle_timeout) {
                (Phase::Lingering, _) => conn.stamp,
                // Waiting on the client to read is not being idle.
                (_, Some(idle)) if conn.has(flag::PAUSED) => self.now + idle.as_millis() as u64,
                (_, Some(idle)) => conn.stamp + idle.as_millis() as u64,
                (_, None) => continue,
            };
            if due <= self.now {
                let why = if conn.phase == Phase::Lingering {
                    "linger over"
                } else {
                    "idle"
                };
                self.close(key, why);
                self.deliver();
            } else {
                self.timers.push(due, token);
            }
        }
        Ok(())
    }
}

fn set_nodelay(s: &TcpStream) {
    // Echo and chat answer at once; Nagle would hold small replies back
    // waiting for an ACK the client delays.
    if let Err(e) = s.set_nodelay(true) {
        log::debug!("TCP_NODELAY: {e}");
    }
}

fn is_out_of_fds(e: &io::Error) -> bool {
    // EMFILE (24): this process's limit; ENFILE (23): the system's.
    matches!(e.raw_os_error(), Some(23 | 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_collide_with_listeners() {
        for (key, generation) in [
            (0, 0),
            (0, 1),
            (12345, 0x7fff_ffff),
            (u32::MAX as usize - 16, 7),
        ] {
            let t = conn_token(key, generation);
            assert!(t.0 >= FIRST_CONN);
            assert_eq!(conn_key(t), (key, generation));
        }
        assert_ne!(
            conn_token(3, 1),
            conn_token(3, 2),
            "a reused key gets a new token"
        );
    }
}
