//! One load-generating poll loop over stream connections (TCP or Unix).
//!
//! The client side of a reactor: a `Poll`, a `Slab` of connections keyed
//! by `Token`, non-blocking connects that complete on a writable event,
//! and edge-triggered reads: a readable event is read until a read comes
//! back short (the socket is empty then, and anything later raises a new
//! edge) or, when the event says the peer closed or the entry comes from
//! the ready list, until `WouldBlock`. Each loop runs the whole workload
//! for its share of the connections and returns a [`Tally`].
//!
//! With `--engine uring` the same loop opens its connections the same way
//! and then hands each established one to an io_uring (`uring.rs`); only
//! where bytes go differs, so messages, checks, latency and counts are
//! this module's code for both.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use super::interval::{Live, ToCollector};
use super::message::{Checker, Template};
use super::report::{record, record_n, Failure, Tally};
use super::{Plan, Progress, Workload};
use crate::buffer::OutQueue;
use crate::net::io::attempt;
use crate::net::ready::{ReadyList, READ_BUDGET, SCRATCH};
use crate::net::Stream;

mod connect;
mod traffic;
mod uring;

pub(super) use uring::usable as uring_usable;

/// At most this many connects in progress per loop. A storm of SYNs all
/// at once overflows the server's accept queue and turns into 1-second
/// SYN retransmits; a window keeps opening fast and steady.
const MAX_CONNECTING: usize = 512;
/// How often timeouts are checked.
const TIMEOUT_CHECK: Duration = Duration::from_millis(100);
/// The clock is read when `poll` returns and again after every this many
/// events of the same wake-up (see [`Worker::clock`]).
const CLOCK_EVERY: usize = 16;

/// Where the connections go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain stream socket.
    Unix(PathBuf),
}

/// Where a loop is in its run. Echo: `Opening`, `WarmingUp`, `Measuring`,
/// `AwaitingReplies`; hold: `Opening`, `Holding`, `Rechecking`; churn:
/// `WarmingUp`, `Measuring`, `AwaitingReplies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Opening connections (echo and hold).
    Opening,
    /// Running, not yet counted.
    WarmingUp,
    /// Counting.
    Measuring,
    /// hold: connections open and idle.
    Holding,
    /// hold: the round trip after the hold.
    Rechecking,
    /// No new messages or connections; waiting (up to `--timeout`) for the
    /// replies still in flight, which are checked too.
    AwaitingReplies,
}

/// Messages written together: they share their timestamps, so their
/// latencies are recorded together too.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// When they were due (open loop) or sent (closed loop): latency
    /// counts from here.
    due: Instant,
    /// When they were handed to the socket: the uncorrected latency
    /// counts from here (the same as `due` in closed loop).
    sent: Instant,
    /// How many of them are still waiting for their echo.
    count: u32,
}

struct Conn {
    stream: Stream,
    id: u32,
    connecting: Option<Instant>,
    /// Bytes the kernel has not taken yet: made on a short write, dropped
    /// once written (most connections never have one).
    unsent: Option<OutQueue>,
    /// The next message to send.
    next_seq: u32,
    check: Checker,
    /// Messages in flight, oldest first, in the batches they were sent in.
    inflight: VecDeque<Batch>,
    /// How many messages `inflight` holds.
    in_flight: u32,
    /// Open loop: due times of messages that could not go out yet because
    /// `--pipeline` messages were already in flight. They go as replies
    /// free the window, late, and their latency counts from the due time.
    behind: VecDeque<Instant>,
    /// `WRITABLE` is in the registered interest.
    writable: bool,
    /// On the ready list already (its read budget ran out).
    on_ready_list: bool,
}

impl Conn {
    /// Checks `data`, the next bytes received on this connection: how many
    /// messages they completed, or what is wrong with them (a byte that
    /// differs from what was sent, or bytes never sent). The one check of
    /// both loops.
    fn check_reply(&mut self, template: &Template, data: &[u8]) -> Result<u32, String> {
        let id = self.id;
        let completed = self
            .check
            .feed(template, id, data)
            .map_err(|m| m.to_string())?;
        let sent = self.next_seq;
        if self.check.seq.wrapping_sub(sent) as i32 > 0
            || (self.check.seq == sent && self.check.offset > 0)
        {
            return Err(format!(
                "connection {id}: received bytes that were never sent"
            ));
        }
        Ok(completed)
    }
}

/// One loop's share of the work.
pub struct Worker {
    plan: Arc<Plan>,
    progress: Arc<Progress>,
    poll: Poll,
    conns: Slab<Conn>,
    /// Connection ids still to open.
    to_open: VecDeque<u32>,
    /// churn: the id the next new connection gets, the step between a
    /// loop's ids, and how many connections it keeps going at once.
    next_id: u32,
    id_step: u32,
    slots: usize,
    connecting: usize,
    /// hold: connections established whose first round trip has not come
    /// back. They count against the connect window too: a connection the
    /// client sees established may still wait in the server's accept
    /// queue, and a full accept queue drops SYNs (1 s retransmits).
    unconfirmed: usize,
    /// hold: this loop told `progress` it has opened everything.
    hold_ready: bool,
    /// Earliest time the next connect may start (`--connect-rate`).
    next_connect: Instant,
    /// Seconds between connects for this loop; zero when unpaced.
    connect_gap: Duration,
    /// Source addresses, used in turn.
    sources: Vec<IpAddr>,
    next_source: usize,
    /// Connections whose read budget ran out while still readable. A
    /// stale key (closed and reused since) just gets a harmless extra read.
    ready: ReadyList<usize>,
    /// `--rate`: when each connection's next message is due.
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    phase: Phase,
    phase_end: Option<Instant>,
    started: Instant,
    measure_start: Instant,
    stop_opening: bool,
    /// When a connection last completed its handshake (or the run began).
    last_open: Instant,
    tally: Tally,
    /// The one read buffer every connection of the loop reads into.
    scratch: Vec<u8>,
    /// Messages are built here and written in one call per batch.
    outgoing: Vec<u8>,
    /// Every message of `--size` bytes, precomputed.
    template: Template,
    live: Option<Live>,
    /// The time of the events being handled: read when `poll` returns and
    /// every [`CLOCK_EVERY`] events after, not once per event. Replies
    /// read and messages written while handling them are stamped with it,
    /// so a latency is the time between the clock reads just before the
    /// message's write (in open loop the corrected latency starts at its
    /// due time instead) and just before its reply's last read: true to
    /// within the time the loop takes to handle 16 events (about 0.1 ms
    /// on this machine, ping-pong or `--pipeline 16` with 64-byte
    /// messages; more with large messages, since one event may then read
    /// and check up to a read budget of bytes), and never negative. At 100 connections, ping-pong, a wake-up brings 7 to 12
    /// events, so this is one clock read per wake-up instead of one per
    /// message.
    clock: Instant,
    /// `--engine uring`: the ring that carries every established
    /// connection's traffic (`poll` then only sees connects).
    ring: Option<uring::RingIo>,
    /// Messages completed, warm-up included (for the progress line).
    completions: u64,
    reported_messages: u64,
    reported_opened: u64,
}

impl Worker {
    /// A loop that will open the connections `ids` (a `share` of all).
    /// With `live`, it sends an [`Interval`](super::interval::Interval) every `plan.interval`, tagged
    /// with its loop number.
    pub fn new(
        plan: Arc<Plan>,
        progress: Arc<Progress>,
        ids: Vec<u32>,
        share: f64,
        live: Option<(ToCollector, usize)>,
    ) -> io::Result<Worker> {
        let now = Instant::now();
        let live = live
            .filter(|_| !plan.interval.is_zero())
            .map(|(to, loop_id)| Live::new(to, loop_id, progress.started, plan.interval));
        let connect_gap = if plan.connect_rate > 0.0 {
            Duration::from_secs_f64(1.0 / (plan.connect_rate * share))
        } else {
            Duration::ZERO
        };
        let next_id = ids.first().copied().unwrap_or(0);
        let id_step = (1.0 / share).round().max(1.0) as u32;
        let slots = ids.len();
        let ring = match plan.engine {
            super::Engine::Reactor => None,
            super::Engine::Uring => Some(uring::RingIo::new(ids.len())?),
        };
        Ok(Worker {
            ring,
            sources: plan.source_ips.clone(),
            next_source: ids.first().map_or(0, |&i| i as usize),
            poll: Poll::new()?,
            conns: Slab::with_capacity(ids.len()),
            to_open: ids.into(),
            next_id,
            id_step,
            slots,
            connecting: 0,
            unconfirmed: 0,
            hold_ready: false,
            next_connect: now,
            connect_gap,
            due: BinaryHeap::new(),
            ready: ReadyList::default(),
            phase: if plan.workload == Workload::Churn {
                Phase::WarmingUp
            } else {
                Phase::Opening
            },
            phase_end: None,
            started: now,
            measure_start: now,
            stop_opening: false,
            last_open: now,
            tally: Tally::default(),
            scratch: vec![0; SCRATCH],
            outgoing: Vec::new(),
            template: Template::new(plan.size),
            live,
            completions: 0,
            reported_messages: 0,
            reported_opened: 0,
            clock: now,
            plan,
            progress,
        })
    }

    /// Runs the workload to the end.
    pub fn run(mut self) -> Tally {
        if self.phase == Phase::WarmingUp {
            self.enter(Phase::WarmingUp, Instant::now());
        }
        if self.ring.is_some() {
            return self.run_uring();
        }
        let mut events = Events::with_capacity(1024);
        let mut last_timeout_check = Instant::now();
        let mut now = last_timeout_check;
        loop {
            self.open_more(now);
            let timeout = self.poll_timeout(now, last_timeout_check);
            if let Err(e) = attempt(|| self.poll.poll(&mut events, Some(timeout))) {
                self.tally
                    .fail(Failure::Closed, || format!("poll failed: {e}"));
                break;
            }
            for (i, event) in events.iter().enumerate() {
                if i % CLOCK_EVERY == 0 {
                    self.clock = Instant::now();
                }
                self.on_event(event);
            }
            let batch = self.ready.begin_turn();
            for (i, &key) in batch.iter().enumerate() {
                if i % CLOCK_EVERY == 0 {
                    self.clock = Instant::now();
                }
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.on_ready_list = false;
                    // No fresh edge stands behind a ready-list entry, so a
                    // short read proves nothing: read until WouldBlock.
                    self.on_readable(key, true);
                }
            }
            self.ready.end_turn(batch);
            now = Instant::now();
            if self.end_turn(now, &mut last_timeout_check) {
                break;
            }
        }
        self.finish()
    }

    /// The end of every turn of either loop: messages that came due,
    /// timeouts, progress, the interval, the phase. True when the run is
    /// over.
    fn end_turn(&mut self, now: Instant, last_timeout_check: &mut Instant) -> bool {
        self.send_due(now);
        if now.duration_since(*last_timeout_check) >= TIMEOUT_CHECK {
            self.check_timeouts(now);
            *last_timeout_check = now;
        }
        self.report_progress();
        if self.live.as_ref().is_some_and(|l| now >= l.next) {
            self.close_interval(now, false);
        }
        self.advance(now)
    }

    /// The run is over: the last progress and interval, and the tally.
    fn finish(mut self) -> Tally {
        self.report_progress();
        self.close_interval(Instant::now(), true);
        // Closing a socket takes it out of the epoll set (see `close_conn`);
        // dropping the ring cancels whatever it still had armed.
        self.conns.clear();
        self.tally
    }

    /// One readiness event: a connect that ended, output that may go,
    /// replies to read.
    fn on_event(&mut self, event: &mio::event::Event) {
        let key = event.token().0;
        if !self.conns.contains(key) {
            return; // closed earlier in this batch
        }
        if event.is_writable() || event.is_error() || event.is_write_closed() {
            self.on_writable(key);
        }
        if self.conns.contains(key)
            && (event.is_readable() || event.is_read_closed() || event.is_error())
        {
            // If the peer's FIN is queued behind the data, a short read
            // would hide it: its edge was this very event.
            let to_end = event.is_read_closed() || event.is_error();
            self.on_readable(key, to_end);
        }
    }

    fn poll_timeout(&self, now: Instant, last_timeout_check: Instant) -> Duration {
        if !self.ready.is_empty() {
            return Duration::ZERO;
        }
        let mut at = last_timeout_check + TIMEOUT_CHECK;
        if let Some(end) = self.phase_end {
            at = at.min(end);
        }
        if let Some(live) = &self.live {
            at = at.min(live.next);
        }
        if let Some(Reverse((due, _))) = self.due.peek() {
            // epoll_wait counts in milliseconds (mio rounds up), so a
            // message due sooner than that would go out up to 1 ms late,
            // and `--rate` latency, counted from the due time, would show
            // the timer's slop. Spin instead for that last millisecond.
            if due.saturating_duration_since(now) < Duration::from_millis(1) {
                return Duration::ZERO;
            }
            at = at.min(*due);
        }
        if !self.connect_gap.is_zero() && !self.to_open.is_empty() && self.may_open() {
            at = at.min(self.next_connect);
        }
        at.saturating_duration_since(now)
    }

    fn report_progress(&mut self) {
        let p = &self.progress;
        p.messages
            .fetch_add(self.completions - self.reported_messages, Ordering::Relaxed);
        p.opened
            .fetch_add(self.tally.opened - self.reported_opened, Ordering::Relaxed);
        if let Some(live) = &mut self.live {
            live.current.opened += self.tally.opened - self.reported_opened;
        }
        self.reported_messages = self.completions;
        self.reported_opened = self.tally.opened;
    }

    /// Sends the interval that ends now (`last`: the loop is done).
    fn close_interval(&mut self, now: Instant, last: bool) {
        let open = (self.conns.len() - self.connecting) as u64;
        let errors = self.tally.total_errors();
        if let Some(live) = &mut self.live {
            live.close(now, open, errors, last);
        }
    }

    // ----- phases ----------------------------------------------------------

    fn enter(&mut self, phase: Phase, now: Instant) {
        let plan = &self.plan;
        self.phase = phase;
        self.phase_end = match phase {
            Phase::Opening => None,
            Phase::WarmingUp => Some(now + plan.warmup),
            Phase::Measuring => {
                self.measure_start = now;
                self.tally.reset_measurement();
                self.progress.measuring.store(true, Ordering::Relaxed);
                Some(now + plan.duration)
            }
            Phase::Holding => Some(now + plan.duration),
            Phase::Rechecking | Phase::AwaitingReplies => Some(now + plan.timeout),
        };
        if phase == Phase::AwaitingReplies && self.plan.workload != Workload::Hold {
            self.tally.measured_secs = now.duration_since(self.measure_start).as_secs_f64();
            self.due.clear();
        }
        if phase == Phase::Rechecking {
            // Thousands of writes take a while: each message is stamped
            // with a clock read at most 16 writes old, as on the event path.
            let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
            let mut stamp = now;
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 && i % 16 == 0 {
                    stamp = Instant::now();
                }
                self.send(key, 1, stamp, stamp);
            }
        }
    }

    /// A connect timed out and none completed while it waited: the server
    /// has stopped accepting (its backlog is full and SYNs are dropped).
    /// Trying the rest one window at a time would take about
    /// timeout x remaining / window, so stop opening and say why.
    fn stalled(&mut self) {
        if self.phase != Phase::Opening || self.stop_opening {
            return;
        }
        self.stop_opening = true;
        let (left, opened) = (self.to_open.len() as u64, self.tally.opened);
        self.tally.not_opened += left;
        self.to_open.clear();
        let secs = self.plan.timeout.as_secs_f64();
        self.tally.fail_first(
            Failure::Timeout,
            format!(
                "no connect completed for {secs} s after {opened} opened on this thread: \
                 the server stopped accepting; {left} connections were not tried"
            ),
        );
    }

    /// Moves to the next phase when this one is over; true when done.
    fn advance(&mut self, now: Instant) -> bool {
        let timed_out = self.phase_end.is_some_and(|end| now >= end);
        // A scan of every connection: only asked for in the phases that
        // wait for everything in flight, never while measuring.
        let nothing_in_flight = || {
            self.conns
                .iter()
                .all(|(_, c)| c.inflight.is_empty() && c.connecting.is_none())
        };
        let opened_all = (self.to_open.is_empty() || self.stop_opening) && self.connecting == 0;
        match (self.plan.workload, self.phase) {
            (Workload::Echo, Phase::Opening) if opened_all => self.enter(Phase::WarmingUp, now),
            (Workload::Hold, Phase::Opening)
                if opened_all && (self.hold_ready || nothing_in_flight()) =>
            {
                if !self.hold_ready {
                    self.hold_ready = true;
                    self.tally.open_secs = now.duration_since(self.started).as_secs_f64();
                    self.progress.ready.fetch_add(1, Ordering::AcqRel);
                }
                // Every loop, of every load process, holds at once.
                if self.progress.may_hold() {
                    self.enter(Phase::Holding, now);
                }
            }
            (_, Phase::WarmingUp) if timed_out => self.enter(Phase::Measuring, now),
            (_, Phase::Measuring) if timed_out => self.enter(Phase::AwaitingReplies, now),
            (_, Phase::Holding) if timed_out => self.enter(Phase::Rechecking, now),
            (_, Phase::Rechecking) | (_, Phase::AwaitingReplies)
                if timed_out || nothing_in_flight() =>
            {
                // Whatever is still in flight when the time is up is late.
                self.time_out_in_flight();
                if self.phase == Phase::Rechecking {
                    self.tally.survived =
                        self.conns.iter().filter(|(_, c)| c.check.seq == 2).count() as u64;
                }
                return true;
            }
            _ => {}
        }
        if self.conns.is_empty() && opened_all && self.phase == Phase::Holding {
            // Nothing left to hold.
            self.enter(Phase::Rechecking, now);
        }
        false
    }

    fn sending(&self) -> bool {
        match self.plan.workload {
            Workload::Echo => matches!(
                self.phase,
                Phase::Opening | Phase::WarmingUp | Phase::Measuring
            ),
            _ => true,
        }
    }

    fn may_open(&self) -> bool {
        if self.stop_opening {
            return false;
        }
        match self.plan.workload {
            Workload::Churn => matches!(self.phase, Phase::WarmingUp | Phase::Measuring),
            _ => self.phase == Phase::Opening,
        }
    }
}
