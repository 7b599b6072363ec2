//! The completion engine: one thread, one io_uring, every socket
//! (`reactor serve --engine uring`).
//!
//! ```text
//!            ┌──────────────── Engine::run ────────────────────┐
//!            │ ring.submit_and_wait(timeout)  (io_uring_enter) │
//!            │   hands the kernel this turn's sends, re-arms,  │
//!            │   cancels; returns with completions             │
//!            │ for each completion:                            │
//!            │   Accepted → open a connection, arm its receive │
//!            │   Received → bytes from the pool → protocol     │
//!            │   Sent     → drop what went out, maybe resume   │
//!            │   Polled   → the signal pipe: begin shutdown;   │
//!            │              the metrics endpoint: serve it;    │
//!            │              the UDP socket: echo datagrams     │
//!            │ deliver broadcasts; UDP left over: serve again  │
//!            │ expire timers                                   │
//!            │ queue one send per connection with output       │
//!            └─────────────────────────────────────────────────┘
//! ```
//!
//! The readiness engine ([`super::event_loop`]) asks "which sockets are
//! ready?" and then makes a system call per socket. This one states what
//! it wants in advance and learns what was *done*: one multishot accept
//! per listener, one multishot receive per connection (into a shared pool
//! of provided buffers, so an idle connection owns none), and at most one
//! send per connection in flight, all handed over together in the one
//! `io_uring_enter` that also waits. `docs/readiness-vs-completion.md`
//! walks one echo message through both.
//!
//! The protocols are the same [`Protocol`] implementations, answering
//! through an [`Outbox`](crate::protocol::Outbox) ([`conn::UringOutbox`]).
//! Every memory hand-off to the kernel is in [`crate::net::ring`], the
//! only module of the crate allowed `unsafe`.
//!
//! # Tags
//! Each operation carries a tag back in its completion. A connection's tag
//! is its slab key in the low 32 bits and a generation above, so a late
//! completion for a closed connection (whose key may be reused) no longer
//! matches and is ignored, as the readiness engine does with tokens.

use std::io::{self, Read};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use slab::Slab;

use super::listen::{Listeners, SocketFile};
use super::memory::MemoryCap;
use super::stats::Stats;
use super::timer::Timers;
use super::{until_nearest, Accepting, Config, ServeError};
use super::{ACCEPT_RETRY, LINGER, SHUTDOWN_GRACE};
use crate::metrics::endpoint::Endpoint;
use crate::protocol::Protocol;

mod conn;
mod handlers;
mod lifecycle;
mod memory;
mod metrics;
mod udp;

use crate::net::ring::{Event, PoolShape, Ring};
use crate::server::snapshots::SnapshotOut;
use conn::{Broadcast, Conn, Spare, OWNED_CHUNK_MAX};
use udp::UdpSide;

/// Submission queue entries: one turn's sends, re-arms and cancels; a
/// full queue is submitted early, so this bounds nothing but batching.
const SQ_ENTRIES: u32 = 4096;
/// Receive buffers: how many at most, their size, and how many are
/// provided at start (more once receives keep running out, up to the most
/// and [`POOL_SHARE`](crate::net::ring::POOL_SHARE) per connection
/// receiving: `Ring::grow_pool`); a buffer's pages cost memory only once
/// written. Both
/// shapes cost at most 32 MiB, and 256 KiB at start.
///
/// Echo's buffers are consumed incrementally (kernel 6.12 on) and 64 KiB:
/// a 64 KiB burst arrives in one completion rather than 16 (at 4 KiB,
/// `--pipeline 16` of 4 KiB messages cost 1.4x the CPU per message: 16
/// receives per round), while small messages are packed one after another.
/// Chat keeps 4 KiB buffers used whole: its lines are short, and one
/// receive is relayed to every client, so a bigger receive is a bigger
/// burst of output per turn (at 64 KiB, a talker's burst filled two
/// readers' queues alike before either could be flushed, and the cap then
/// dropped the reader that kept up).
const BUF_INC: PoolShape = PoolShape {
    buffers: 512,
    size: 64 * 1024,
    initial: 4,
};
/// Used whole (chat, and echo on older kernels), each completion takes a
/// buffer for itself, so they stay small: 16 KiB ones let a flooding
/// client hold 4 MiB.
const BUF_WHOLE: PoolShape = PoolShape {
    buffers: 8192,
    size: 4096,
    initial: 64,
};

/// Completions handled per slice of a wake-up.
const REAP_SLICE: usize = 256;

/// Listener tags (accepts are told apart from receives by the ring).
const TCP: u64 = 0;
const UNIX: u64 = 1;
/// Poll tags: the signal pipe, the metrics endpoint's `Poll`, the UDP
/// socket's `Poll`.
const SIGNALS: u64 = 0;
const METRICS: u64 = 1;
const UDP: u64 = 2;

/// The tag of the connection at `key` with `generation`; [`key_of`] is its
/// inverse.
fn tag_of(key: usize, generation: u32) -> u64 {
    ((generation as u64) << 32) | key as u64
}

fn key_of(tag: u64) -> (usize, u32) {
    ((tag & 0xffff_ffff) as usize, (tag >> 32) as u32)
}

/// Generations wrap below the ring's tag limit.
fn next_generation(g: u32) -> u32 {
    (g + 1) & 0x00ff_ffff
}

/// The uring engine, generic over the protocol it serves.
pub struct Engine<P: Protocol> {
    ring: Ring,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, SocketFile)>,
    /// Multishot accept armed, per listener (TCP, Unix).
    accept_armed: [bool; 2],
    /// Read end of signal-hook's pipe for SIGINT and SIGTERM.
    signals: UnixStream,
    /// The `--metrics` endpoint (see `metrics.rs`).
    metrics: Option<Endpoint>,
    /// The `--udp` echo socket (see `udp.rs`).
    udp: Option<UdpSide>,
    conns: Slab<Conn<P::Session>>,
    protocol: P,
    /// Completions of this turn.
    events: Vec<Event>,
    /// Connections with output to hand to the ring at the end of the turn.
    dirty: Vec<u64>,
    broadcasts: Vec<Broadcast>,
    /// Descriptors to close once the cancels for them are submitted.
    closing: Vec<OwnedFd>,
    /// The `--metrics` endpoint after shutdown closed it, kept (its
    /// `Poll`'s descriptor open) until its poll's cancel is submitted.
    retired: Option<Endpoint>,
    /// The same for the UDP socket's `Poll`.
    retired_udp: Option<UdpSide>,
    spare: Spare,
    /// Bytes held for all clients under `--max-memory`, and the
    /// connections (by tag) waiting for room; see `memory.rs`.
    memory: MemoryCap<u64>,
    /// Connections re-armed by the last `resume_waiting` (kept for reuse).
    woken: Vec<usize>,
    timers: Timers,
    stats: Stats,
    config: Config,
    max_connections: usize,
    accepting: Accepting,
    /// Connections held when descriptors ran out, while that episode lasts.
    emfile_at: Option<usize>,
    started: Instant,
    now: u64,
    next_generation: u32,
    next_stats: Option<u64>,
    /// In a worker whose supervisor serves `--metrics`: its `snapshot`
    /// lines on stdout.
    snapshots: Option<SnapshotOut>,
    shutdown_deadline: Option<u64>,
}

/// Sets up the ring; io_uring refused is one clear message (exit 1).
pub fn new_engine<P: Protocol>(
    config: Config,
    max_connections: usize,
    listeners: Listeners,
    protocol: P,
) -> Result<Engine<P>, ServeError> {
    // Room for a completion from most connections at once. Past this the
    // kernel keeps completions in its overflow list (none are lost; the
    // feature NODROP is in every kernel with multishot receive), so the
    // bound is about memory: the queue's pages count as the server's RSS
    // once written, and 65,536 entries (1 MiB) were 53 of the bytes per
    // idle connection at 19,900 connections.
    let cq = (max_connections as u32)
        .clamp(4096, 16384)
        .next_power_of_two();
    let ring = Ring::new(
        SQ_ENTRIES,
        cq,
        P::MIRRORS_INPUT.then_some(BUF_INC),
        BUF_WHOLE,
    )
    .map_err(|e| ServeError::Unavailable(crate::net::ring::unavailable(&e)))?;
    let (size, inc) = ring.buffer_size();
    log::info!(
        "io_uring: {} completion entries, {} receive buffers of {} bytes provided{}",
        ring.cq_entries(),
        ring.buffers_provided(),
        size,
        if inc { ", consumed incrementally" } else { "" }
    );
    let io = ServeError::Io;
    let (signals, pipe_in) = UnixStream::pair().map_err(io)?;
    signals.set_nonblocking(true).map_err(io)?;
    let pipe_in2 = pipe_in.try_clone().map_err(io)?;
    let metrics = listeners
        .metrics
        .map(Endpoint::new)
        .transpose()
        .map_err(io)?;
    let udp = listeners
        .udp
        .map(|s| UdpSide::new(s, config.max_buffer))
        .transpose()
        .map_err(io)?;
    signal_hook::low_level::pipe::register(SIGINT, pipe_in).map_err(io)?;
    signal_hook::low_level::pipe::register(SIGTERM, pipe_in2).map_err(io)?;
    let next_stats = config.stats_interval.map(|d| d.as_millis() as u64);
    let snapshots = SnapshotOut::new(config.snapshot_every);
    let mut engine = Engine {
        ring,
        tcp: Some(listeners.tcp),
        unix: listeners.unix.map(|u| (u.listener, u.file)),
        accept_armed: [false; 2],
        signals,
        metrics,
        udp,
        conns: Slab::new(),
        protocol,
        events: Vec::with_capacity(REAP_SLICE),
        dirty: Vec::new(),
        broadcasts: Vec::new(),
        closing: Vec::new(),
        retired: None,
        retired_udp: None,
        spare: Spare::default(),
        // A woken reader takes one receive buffer's worth into an owned
        // chunk that may occupy up to OWNED_CHUNK_MAX (counted by
        // capacity: a recycled one may be that big for a short reply).
        memory: MemoryCap::new(config.max_memory, size + OWNED_CHUNK_MAX, OWNED_CHUNK_MAX),
        woken: Vec::new(),
        timers: Timers::default(),
        stats: Stats::default(),
        config,
        max_connections,
        accepting: Accepting::On,
        emfile_at: None,
        started: Instant::now(),
        now: 0,
        next_generation: 1,
        next_stats,
        snapshots,
        shutdown_deadline: None,
    };
    engine.arm_accepts().map_err(io)?;
    engine
        .ring
        .poll_readable(&engine.signals, SIGNALS)
        .map_err(io)?;
    if let Some(m) = &engine.metrics {
        engine.ring.poll_readable(m, METRICS).map_err(io)?;
    }
    engine.watch_udp().map_err(io)?;
    Ok(engine)
}

impl<P: Protocol> Engine<P> {
    /// Runs until a signal's graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        loop {
            if !self.closing.is_empty() || self.retired.is_some() || self.retired_udp.is_some() {
                // The cancels for these sockets must reach the kernel while
                // the descriptors still name them; closing them now rather
                // than after the wait lets the clients see the close now.
                self.ring.submit()?;
                if self.ring.all_submitted() {
                    let closed = !self.closing.is_empty();
                    self.closing.clear();
                    self.retired = None;
                    self.retired_udp = None;
                    if closed {
                        // A descriptor is free now: a paused accept may take it.
                        self.resume_accepting();
                    }
                }
            }
            let timeout = self.wait_timeout();
            self.ring.submit_and_wait(timeout)?;
            // One clock read per wake-up: `now` is derived from it, as in
            // the readiness loop.
            let woke = Instant::now();
            self.now = woke.duration_since(self.started).as_millis() as u64;
            let mut completions = 0;
            // In slices, so that 20,000 completions at once (every idle
            // client speaking after a quiet spell) do not leave a 20,000
            // entry buffer behind.
            let mut events = std::mem::take(&mut self.events);
            loop {
                self.ring.complete(&mut events, REAP_SLICE);
                if events.is_empty() {
                    break;
                }
                log::trace!("wake-up: {} completion(s)", events.len());
                completions += events.len();
                for event in events.drain(..) {
                    self.on_event(event)?;
                    // Broadcasts go out before the next completion is
                    // handled: a `joined` line must not reach a client
                    // accepted later.
                    self.deliver();
                }
            }
            self.events = events;
            // Chat at `--max-memory`: judged once every completion taken
            // is handled, sends included (see `memory.rs`).
            self.drop_over_cap();
            if let Some(u) = self.udp.as_mut() {
                if !std::mem::take(&mut u.served) && u.again {
                    self.on_udp(false)?;
                }
            }
            self.expire()?;
            self.resume_waiting();
            self.check_memory_count();
            self.flush()?;
            self.stats.count_wakeup(completions);
            self.stats.busy_nanos += woke.elapsed().as_nanos() as u64;
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now >= deadline {
                    return self.finish();
                }
            }
        }
    }

    /// How long to wait: until the nearest deadline, or for ever; not at
    /// all while datagrams may be left after the UDP budget.
    fn wait_timeout(&self) -> Option<Duration> {
        if self.udp.as_ref().is_some_and(|u| u.again) {
            return Some(Duration::ZERO);
        }
        until_nearest(
            self.started,
            [
                self.timers.next(),
                self.next_stats,
                self.accepting.retry_at(),
                self.shutdown_deadline,
                self.metrics.as_ref().and_then(|m| m.next_deadline()),
                self.snapshots.as_ref().and_then(SnapshotOut::next_deadline),
            ],
        )
    }

    fn on_event(&mut self, event: Event) -> io::Result<()> {
        match event {
            Event::Accepted { tag, result, more } => {
                self.on_accepted(tag, result, more);
                Ok(())
            }
            Event::Received { tag, result, more } => {
                self.on_received(tag, result, more);
                Ok(())
            }
            Event::Sent { tag, result, batch } => {
                self.on_sent(tag, result, batch);
                Ok(())
            }
            Event::Polled { tag: SIGNALS } => self.on_signal(),
            Event::Polled { tag: UDP } => self.on_udp(true),
            Event::Polled { .. } => self.on_metrics(),
        }
    }

    /// The slab key of `tag` if it still names a live connection.
    fn live(&self, tag: u64) -> Option<usize> {
        let (key, generation) = key_of(tag);
        match self.conns.get(key) {
            Some(c) if c.generation == generation => Some(key),
            _ => None,
        }
    }

    fn on_signal(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 64];
        while matches!((&self.signals).read(&mut buf), Ok(n) if n > 0) {}
        log::info!("signal: shutting down");
        if self.shutdown_deadline.is_none() {
            self.begin_shutdown()?;
        }
        Ok(())
    }
}
