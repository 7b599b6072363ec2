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
//! The loop only dispatches; this file holds the loop, the token layout
//! and the ready list. The handlers it dispatches to are in `accept.rs`
//! (listeners), `handlers.rs` (one connection's readiness, and broadcast
//! delivery) and `lifecycle.rs` (UDP, signals, shutdown, timers). What a
//! connection holds lives in [`super::connection`]; what it says lives in
//! [`crate::protocol`].
//!
//! # Tokens
//! Which token is which socket, and why a connection's token carries a
//! generation, is [`super::token`]'s subject; [`EventLoop::live`] applies
//! the stale-event check.
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

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::connection::{flag, Broadcast, Connection};
use super::listen::{Listeners, SocketFile};
use super::stats::Stats;
use super::timer::Timers;
use super::token::{
    connection_key, FixedTokens, TokenName, LISTENER_TCP, LISTENER_UNIX, SIGNALS, UDP,
};
use super::udp::UdpEcho;
use super::Config;
use crate::protocol::Protocol;

mod accept;
mod handlers;
mod lifecycle;

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
    /// The current episode of descriptor exhaustion was logged; it ends
    /// when an accept finds the backlog empty.
    emfile_logged: bool,
    /// The server's own sockets already on the ready list.
    fixed_ready: FixedTokens,
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
            fixed_ready: FixedTokens::default(),
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
                    TokenName(event.token()),
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
                self.fixed_ready.remove(token);
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
        if connection_key(token).is_none() {
            if self.fixed_ready.insert(token) {
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
        let (key, generation) = connection_key(token)?;
        match self.conns.get(key) {
            Some(c) if c.generation == generation => Some(key),
            _ => None,
        }
    }
}
