//! The reactor: one thread, one `mio::Poll`, every socket.
//!
//! ```text
//!            ┌──────────────── EventLoop::run ─────────────────┐
//!            │ poll.poll(events, timeout)   (epoll_wait)       │
//!            │   for each event: dispatch(token)               │
//!            │      LISTENER_TCP/UNIX → accept (accept.rs)     │
//!            │      UDP               → datagrams (udp.rs)     │
//!            │      SIGNALS, STOP     → shutdown (shutdown.rs) │
//!            │      METRICS, its clients → metrics.rs          │
//!            │      connection token  → connections.rs         │
//!            │   serve the ready list (budgets left over)      │
//!            │   expire deadlines (timers.rs)                  │
//!            └─────────────────────────────────────────────────┘
//! ```
//!
//! This file holds the loop and its dispatch, and nothing else. What a
//! connection holds and how its state moves is [`super::connection`]'s
//! business; what the server says is [`crate::protocol`]'s. Which token is
//! which socket, and why a connection's token carries a generation, is
//! [`super::token`]'s subject; [`EventLoop::key_of`] applies that check.
//!
//! # Reading: how far, and why
//! mio's readiness is edge-triggered (`EPOLLET`): an event reports a
//! change, and no new event comes until the socket has been read to
//! `WouldBlock`. Every read loop here goes that far, with two exceptions
//! that the code states where they apply:
//! - a budget ([`crate::net::ready::READ_BUDGET`], [`ACCEPT_BUDGET`]; the shared read buffer
//!   and the byte budgets are [`crate::net::ready`]'s): a socket that still
//!   has bytes when its budget is spent goes on the ready list
//!   ([`crate::net::ready`]) and is read again next turn, so one fast
//!   client cannot starve the others;
//! - a short read ([`ReadUntil::ShortRead`]): on Linux, a stream socket
//!   that returns fewer bytes than asked for is empty *now*, and the next
//!   arrival raises a new edge, so the read that would only say
//!   `WouldBlock` is skipped. Only when the event was a fresh edge without
//!   a hang-up; see [`ReadUntil`].

use std::io;
use std::sync::Arc;
use std::time::Instant;

use mio::event::Event;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::connection::{Broadcast, Connection, Lists};
use super::listen::{Listeners, SocketFile};
use super::memory::MemoryCap;
use super::snapshots::SnapshotOut;
use super::stats::Stats;
use super::timer::Timers;
use super::token::{
    connection_key, FixedTokens, TokenName, LISTENER_TCP, LISTENER_UNIX, METRICS, SIGNALS, STOP,
    UDP,
};
use super::udp::{Next, UdpEcho};
use super::{Accepting, Config, ServeError, ACCEPT_RETRY, SHUTDOWN_GRACE};
use crate::buffer::GROWTH_SLACK;
use crate::metrics::endpoint::Endpoint;
use crate::net::ready::{ReadyList, SCRATCH};
use crate::protocol::Protocol;

mod accept;

pub(crate) use accept::concerns_one_connection;
mod broadcast;
mod connections;
mod memory;
mod metrics;
mod shutdown;
mod timers;

/// Most connections accepted per wake-up before clients get a turn.
const ACCEPT_BUDGET: usize = 256;
/// Events fetched per `poll` call.
const EVENTS: usize = 1024;
/// With `--metrics`, the loop looks at the clock after this many events
/// (or ready-list entries) of a turn, and serves the endpoint if it was
/// not served this millisecond: a turn of 1,024 busy sockets can take
/// over 10 ms, and a scrape should not wait for all of it (`metrics.rs`).
const METRICS_CHECK_EVERY: usize = 64;

/// How far a readable connection is read this time.
///
/// Edge-triggered readiness reports each *arrival* once. When the event
/// carried no hang-up, a read that returns less than asked for means the
/// socket is empty for now, and anything arriving later (data or FIN)
/// raises a new edge: [`ReadUntil::ShortRead`] may stop there. When the
/// event already says the peer closed (`EPOLLRDHUP`), the FIN is queued
/// behind the data and its edge was this very event; and a ready-list
/// retry has no fresh edge behind it at all. Both read on to
/// `WouldBlock` or EOF: [`ReadUntil::WouldBlock`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum ReadUntil {
    ShortRead,
    WouldBlock,
}

/// What one event (or ready-list entry) asks of a socket.
#[derive(Debug, Clone, Copy)]
struct Readiness {
    readable: bool,
    writable: bool,
    /// The peer can take no more output (it is gone, or reset us).
    write_closed: bool,
    read_until: ReadUntil,
}

impl Readiness {
    fn of(event: &Event) -> Readiness {
        // An error or hang-up is reported to both sides: the read or write
        // that follows finds out what it was.
        let hung_up = event.is_read_closed() || event.is_error();
        Readiness {
            readable: event.is_readable() || hung_up,
            writable: event.is_writable() || event.is_write_closed() || event.is_error(),
            write_closed: event.is_write_closed(),
            read_until: if hung_up {
                ReadUntil::WouldBlock
            } else {
                ReadUntil::ShortRead
            },
        }
    }

    /// A ready-list retry: no fresh edge stands behind it, so a short read
    /// proves nothing; read to the end.
    const RETRY: Readiness = Readiness {
        readable: true,
        writable: true,
        write_closed: false,
        read_until: ReadUntil::WouldBlock,
    };
}

/// Asks a running server, from another thread, to shut down gracefully
/// (as SIGTERM does). Cloned freely; dropping it does nothing.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<Waker>);

impl StopHandle {
    /// Begins the graceful shutdown: listeners close at once, queued output
    /// is flushed for up to 5 s, then `run` returns.
    pub fn stop(&self) {
        if let Err(e) = self.0.wake() {
            log::warn!("cannot wake the event loop to stop it: {e}");
        }
    }
}

/// The event loop, generic over the protocol it serves.
pub(crate) struct EventLoop<P: Protocol> {
    poll: Poll,
    tcp: Option<mio::net::TcpListener>,
    unix: Option<(mio::net::UnixListener, SocketFile)>,
    udp: Option<UdpEcho>,
    /// The `--metrics` endpoint: its listener and its HTTP clients, on a
    /// `Poll` of their own that is registered here as `METRICS`.
    metrics: Option<Endpoint>,
    /// The loop time (ms) the endpoint was last served at.
    metrics_served: u64,
    /// In a worker whose supervisor serves `--metrics`: its `snapshot`
    /// lines on stdout.
    snapshots: Option<SnapshotOut>,
    signals: Signals,
    stop: StopHandle,
    conns: Slab<Connection<P::Session>>,
    protocol: P,
    /// The shared read buffer.
    scratch: Box<[u8]>,
    /// Sockets with readiness left over after their budget ran out.
    ready: ReadyList<Token>,
    /// The server's own sockets already on the ready list (connections
    /// keep that bit themselves).
    fixed_ready: FixedTokens,
    /// Broadcasts waiting for the current handler to finish.
    broadcasts: Vec<Broadcast>,
    /// Connections whose state or interest may have changed while a
    /// broadcast was delivered; advanced once it is done.
    to_advance: Vec<Token>,
    timers: Timers,
    /// Bytes all connections' output queues occupy (the sum of their
    /// footprints), held under `--max-memory`, and the connections waiting
    /// for memory, in the order they began to wait; see `memory.rs`.
    memory: MemoryCap<Token>,
    /// Connections woken by the last `resume_waiting` (kept for reuse).
    woken: Vec<Token>,
    stats: Stats,
    config: Config,
    max_connections: usize,
    accepting: Accepting,
    /// The current episode of descriptor exhaustion was logged; it ends
    /// when an accept finds the backlog empty.
    emfile_logged: bool,
    started: Instant,
    /// Milliseconds since `started`, read once per wake-up (and, with
    /// `--metrics`, every [`METRICS_CHECK_EVERY`] events of a long turn).
    now: u64,
    next_generation: u32,
    next_stats: Option<u64>,
    /// When shutdown must end, once it began.
    shutdown_deadline: Option<u64>,
}

impl<P: Protocol> EventLoop<P> {
    /// Registers every listener, the signal pipe and the stop handle with
    /// a new `Poll`.
    pub fn new(
        config: Config,
        max_connections: usize,
        listeners: Listeners,
        protocol: P,
    ) -> Result<Self, ServeError> {
        let io = ServeError::Io;
        let poll = Poll::new().map_err(io)?;
        let registry = poll.registry();
        let Listeners {
            tcp,
            unix,
            udp,
            metrics,
        } = listeners;
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
        let metrics = match metrics {
            Some(l) => {
                let m = Endpoint::new(l).map_err(io)?;
                m.register(registry, METRICS).map_err(io)?;
                Some(m)
            }
            None => None,
        };
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(io)?;
        registry
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io)?;
        let stop = StopHandle(Arc::new(Waker::new(registry, STOP).map_err(io)?));
        let next_stats = config.stats_interval.map(|d| d.as_millis() as u64);
        Ok(EventLoop {
            poll,
            tcp: Some(tcp),
            unix,
            udp,
            metrics,
            metrics_served: 0,
            // The first one right away, so a scrape soon after the start
            // already sees every worker.
            snapshots: SnapshotOut::new(config.snapshot_every),
            signals,
            stop,
            conns: Slab::new(),
            protocol,
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            ready: ReadyList::default(),
            fixed_ready: FixedTokens::default(),
            broadcasts: Vec::new(),
            to_advance: Vec::new(),
            timers: Timers::default(),
            // A woken reader takes one read (the scratch buffer's worth)
            // into a queue that may grow by its slack.
            memory: MemoryCap::new(config.max_memory, SCRATCH + GROWTH_SLACK, GROWTH_SLACK),
            woken: Vec::new(),
            stats: Stats::default(),
            config,
            max_connections,
            accepting: Accepting::On,
            emfile_logged: false,
            started: Instant::now(),
            now: 0,
            next_generation: 1,
            next_stats,
            shutdown_deadline: None,
        })
    }

    /// A handle that stops this loop from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Runs until a graceful shutdown completes. Only `poll` itself failing
    /// ends it early: every other failure concerns one socket, which is
    /// closed or retried while the rest are served.
    pub fn run(mut self) -> io::Result<Stats> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                // A signal arriving during epoll_wait interrupts it; that
                // is not a failure, the signal's own event follows.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // Busy time runs from here to the next poll call: one clock
            // read per wake-up on top of the one the loop needs anyway.
            let woke = Instant::now();
            self.now = woke.duration_since(self.started).as_millis() as u64;
            let turn = self.ready.begin_turn();
            log::trace!(
                "poll: {} event(s), {} on the ready list",
                events.iter().count(),
                turn.len()
            );
            let mut n_events = 0;
            for event in events.iter() {
                n_events += 1;
                log::trace!(
                    "[{}] event:{}{}{}{}",
                    TokenName(event.token()),
                    if event.is_readable() { " readable" } else { "" },
                    if event.is_writable() { " writable" } else { "" },
                    if event.is_read_closed() {
                        " read-closed"
                    } else {
                        ""
                    },
                    if event.is_error() { " error" } else { "" },
                );
                self.dispatch(event.token(), Readiness::of(event));
                if n_events % METRICS_CHECK_EVERY == 0 {
                    self.serve_metrics_mid_turn();
                }
            }
            for (i, &token) in turn.iter().enumerate() {
                self.serve_again(token);
                if (i + 1) % METRICS_CHECK_EVERY == 0 {
                    self.serve_metrics_mid_turn();
                }
            }
            self.ready.end_turn(turn);
            self.expire();
            self.resume_waiting();
            self.check_memory_count();
            self.stats.count_wakeup(n_events);
            self.stats.busy_nanos += woke.elapsed().as_nanos() as u64;
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now >= deadline {
                    return Ok(self.finish());
                }
            }
        }
    }

    fn dispatch(&mut self, token: Token, readiness: Readiness) {
        match token {
            LISTENER_TCP | LISTENER_UNIX => self.accept(token),
            UDP => self.on_udp(readiness),
            SIGNALS => self.on_signal(),
            STOP => self.on_stop(),
            METRICS => self.on_metrics(),
            _ => self.on_connection(token, readiness),
        }
    }

    /// A ready-list entry: the socket had more to do when its budget ran out.
    fn serve_again(&mut self, token: Token) {
        if connection_key(token).is_none() {
            self.fixed_ready.remove(token);
        } else if let Some(key) = self.key_of(token) {
            self.conns[key].lists.leave(Lists::READY);
        } else {
            return; // closed since it was listed
        }
        self.dispatch(token, Readiness::RETRY);
    }

    /// Serve `token` again next turn (once, however often it is asked).
    fn push_ready(&mut self, token: Token) {
        if connection_key(token).is_none() {
            if self.fixed_ready.insert(token) {
                self.ready.push(token);
            }
        } else if let Some(key) = self.key_of(token) {
            let conn = &mut self.conns[key];
            if conn.lists.join(Lists::READY) {
                self.ready.push(token);
            }
        }
    }

    /// The slab key of `token` if that connection is still the one the
    /// token was made for; `None` for a stale token (see [`super::token`]).
    fn key_of(&self, token: Token) -> Option<usize> {
        let (key, generation) = connection_key(token)?;
        match self.conns.get(key) {
            Some(c) if c.generation == generation => Some(key),
            _ => None,
        }
    }

    /// UDP echo: datagrams in, the same datagrams out (see `udp.rs`). A
    /// failure is that socket's alone and is logged; TCP clients go on.
    fn on_udp(&mut self, readiness: Readiness) {
        let Some(udp) = self.udp.as_mut() else {
            return;
        };
        if readiness.writable {
            udp.on_writable(&mut self.stats);
        }
        if readiness.readable
            && udp.on_readable(&mut self.scratch, &mut self.stats) == Next::MoreReady
        {
            self.push_ready(UDP);
        }
        if let Some(udp) = self.udp.as_mut() {
            if let Err(e) = udp.update_interest(self.poll.registry(), UDP) {
                log::warn!("udp: cannot update interest: {e}");
            }
        }
    }
}
