//! One load-generating poll loop over stream connections (TCP or Unix).
//!
//! The client side of a reactor: a `Poll`, a `Slab` of connections keyed
//! by `Token`, non-blocking connects that complete on a writable event,
//! and reads drained until `WouldBlock`. Each loop runs the whole
//! workload for its share of the connections and returns a [`Tally`].

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

use super::message::{self, Checker};
use super::report::{record, Failure, Tally};
use super::{Plan, Progress, Workload};
use crate::server::stream::Stream;

/// At most this many connects in progress per loop. A storm of SYNs all
/// at once overflows the server's accept queue and turns into 1-second
/// SYN retransmits; a window keeps opening fast and steady.
const MAX_CONNECTING: usize = 512;
/// How often timeouts are checked.
const SWEEP: Duration = Duration::from_millis(100);
/// Read buffer, shared by every connection of the loop.
const SCRATCH: usize = 64 * 1024;
/// Bytes read from one connection per turn. Each reply is answered with a
/// new message at once, so against a fast server one connection could stay
/// readable forever and starve the rest; past the budget it waits on the
/// ready list (no new edge would say it is still readable).
const READ_BUDGET: usize = 4 * SCRATCH;

/// Where the connections go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain stream socket.
    Unix(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Opening connections (echo and hold).
    Opening,
    /// Running, not yet counted.
    Warmup,
    /// Counting.
    Measure,
    /// hold: connections open and idle.
    Hold,
    /// hold: the round trip after the hold.
    Recheck,
    /// No new messages or connections; waiting for what is in flight.
    Drain,
}

struct Conn {
    stream: Stream,
    id: u32,
    connecting: Option<Instant>,
    /// Bytes not yet written.
    out: Vec<u8>,
    written: usize,
    /// Next message to send, and how many may be sent in all so far.
    next_seq: u32,
    check: Checker,
    /// When each message in flight was sent (or was due, with `--rate`).
    inflight: VecDeque<Instant>,
    /// `WRITABLE` is in the registered interest.
    writable: bool,
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
    /// Earliest time the next connect may start (`--connect-rate`).
    next_connect: Instant,
    /// Seconds between connects for this loop; zero when unpaced.
    connect_gap: Duration,
    /// Source addresses, used in turn.
    sources: Vec<IpAddr>,
    next_source: usize,
    /// Connections whose read budget ran out while still readable. A
    /// stale key (closed and reused since) just gets a harmless extra read.
    again: Vec<usize>,
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
    scratch: Vec<u8>,
    /// Messages completed, warm-up included (for the progress line).
    completions: u64,
    reported_messages: u64,
    reported_opened: u64,
}

impl Worker {
    /// A loop that will open the connections `ids`.
    pub fn new(
        plan: Arc<Plan>,
        progress: Arc<Progress>,
        ids: Vec<u32>,
        share: f64,
    ) -> io::Result<Worker> {
        let now = Instant::now();
        let connect_gap = if plan.connect_rate > 0.0 {
            Duration::from_secs_f64(1.0 / (plan.connect_rate * share))
        } else {
            Duration::ZERO
        };
        let next_id = ids.first().copied().unwrap_or(0);
        let id_step = (1.0 / share).round().max(1.0) as u32;
        let slots = ids.len();
        Ok(Worker {
            sources: plan.source_ips.clone(),
            next_source: ids.first().map_or(0, |&i| i as usize),
            poll: Poll::new()?,
            conns: Slab::with_capacity(ids.len()),
            to_open: ids.into(),
            next_id,
            id_step,
            slots,
            connecting: 0,
            next_connect: now,
            connect_gap,
            due: BinaryHeap::new(),
            again: Vec::new(),
            phase: if plan.workload == Workload::Churn {
                Phase::Warmup
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
            completions: 0,
            reported_messages: 0,
            reported_opened: 0,
            plan,
            progress,
        })
    }

    /// Runs the workload to the end.
    pub fn run(mut self) -> Tally {
        if self.phase == Phase::Warmup {
            self.enter(Phase::Warmup, Instant::now());
        }
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        loop {
            let now = Instant::now();
            self.open_more(now);
            let timeout = self.poll_timeout(now, last_sweep);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.tally
                        .fail(Failure::Closed, || format!("poll failed: {e}"));
                    break;
                }
            }
            for event in events.iter() {
                let key = event.token().0;
                if !self.conns.contains(key) {
                    continue; // closed earlier in this batch
                }
                if event.is_writable() || event.is_error() || event.is_write_closed() {
                    self.on_writable(key);
                }
                if self.conns.contains(key)
                    && (event.is_readable() || event.is_read_closed() || event.is_error())
                {
                    self.on_readable(key);
                }
            }
            for key in std::mem::take(&mut self.again) {
                if self.conns.contains(key) {
                    self.on_readable(key);
                }
            }
            let now = Instant::now();
            self.send_due(now);
            if now.duration_since(last_sweep) >= SWEEP {
                self.sweep(now);
                last_sweep = now;
            }
            self.report_progress();
            if self.advance(now) {
                break;
            }
        }
        self.report_progress();
        for mut c in self.conns.drain() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        self.tally
    }

    fn poll_timeout(&self, now: Instant, last_sweep: Instant) -> Duration {
        if !self.again.is_empty() {
            return Duration::ZERO;
        }
        let mut at = last_sweep + SWEEP;
        if let Some(end) = self.phase_end {
            at = at.min(end);
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
        self.reported_messages = self.completions;
        self.reported_opened = self.tally.opened;
    }

    // ----- phases ----------------------------------------------------------

    fn enter(&mut self, phase: Phase, now: Instant) {
        let plan = &self.plan;
        self.phase = phase;
        self.phase_end = match phase {
            Phase::Opening => None,
            Phase::Warmup => Some(now + plan.warmup),
            Phase::Measure => {
                self.measure_start = now;
                self.tally.reset_measurement();
                self.progress.measuring.store(true, Ordering::Relaxed);
                Some(now + plan.duration)
            }
            Phase::Hold => Some(now + plan.duration),
            Phase::Recheck | Phase::Drain => Some(now + plan.timeout),
        };
        if phase == Phase::Drain && self.plan.workload != Workload::Hold {
            self.tally.measured_secs = now.duration_since(self.measure_start).as_secs_f64();
            self.due.clear();
        }
        if phase == Phase::Recheck {
            let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.send(key, 1, now);
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
        let quiet = self
            .conns
            .iter()
            .all(|(_, c)| c.inflight.is_empty() && c.connecting.is_none());
        let opened_all = (self.to_open.is_empty() || self.stop_opening) && self.connecting == 0;
        match (self.plan.workload, self.phase) {
            (Workload::Echo, Phase::Opening) if opened_all => self.enter(Phase::Warmup, now),
            (Workload::Hold, Phase::Opening) if opened_all && quiet => {
                self.tally.open_secs = now.duration_since(self.started).as_secs_f64();
                self.enter(Phase::Hold, now);
            }
            (_, Phase::Warmup) if timed_out => self.enter(Phase::Measure, now),
            (_, Phase::Measure) if timed_out => self.enter(Phase::Drain, now),
            (_, Phase::Hold) if timed_out => self.enter(Phase::Recheck, now),
            (_, Phase::Recheck) | (_, Phase::Drain) if quiet || timed_out => {
                if !quiet {
                    self.time_out_everything(now);
                }
                if self.phase == Phase::Recheck {
                    self.tally.survived =
                        self.conns.iter().filter(|(_, c)| c.check.seq == 2).count() as u64;
                }
                return true;
            }
            _ => {}
        }
        if self.conns.is_empty() && opened_all && self.phase == Phase::Hold {
            // Nothing left to hold.
            self.enter(Phase::Recheck, now);
        }
        false
    }

    fn sending(&self) -> bool {
        match self.plan.workload {
            Workload::Echo => matches!(self.phase, Phase::Opening | Phase::Warmup | Phase::Measure),
            _ => true,
        }
    }

    fn may_open(&self) -> bool {
        if self.stop_opening {
            return false;
        }
        match self.plan.workload {
            Workload::Churn => matches!(self.phase, Phase::Warmup | Phase::Measure),
            _ => self.phase == Phase::Opening,
        }
    }

    // ----- connecting ------------------------------------------------------

    fn open_more(&mut self, now: Instant) {
        while self.may_open() && self.connecting < MAX_CONNECTING {
            if !self.connect_gap.is_zero() && now < self.next_connect {
                return;
            }
            let id = if self.plan.workload == Workload::Churn {
                // churn opens an endless stream of connections, at most
                // `slots` at a time.
                if self.conns.len() >= self.slots {
                    return;
                }
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(self.id_step);
                id
            } else {
                match self.to_open.pop_front() {
                    Some(id) => id,
                    None => return,
                }
            };
            if !self.connect_gap.is_zero() {
                // Catch up at most one gap behind, so a stall does not
                // turn into a burst.
                self.next_connect =
                    self.next_connect.max(now - self.connect_gap) + self.connect_gap;
            }
            match self.connect() {
                Ok(stream) => {
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let mut conn = Conn {
                        stream,
                        id,
                        connecting: Some(now),
                        out: Vec::new(),
                        written: 0,
                        next_seq: 0,
                        check: Checker::default(),
                        inflight: VecDeque::new(),
                        writable: true,
                    };
                    if let Err(e) = self.poll.registry().register(
                        &mut conn.stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        self.tally
                            .fail(Failure::Connect, || format!("register: {e}"));
                        continue;
                    }
                    entry.insert(conn);
                    self.connecting += 1;
                }
                // A Unix listener with a full backlog says EAGAIN: try
                // this id again on a later turn.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.plan.workload != Workload::Churn {
                        self.to_open.push_front(id);
                    }
                    return;
                }
                Err(e) => self.connect_failed(id, e),
            }
        }
    }

    fn connect(&mut self) -> io::Result<Stream> {
        match &self.plan.target {
            Target::Unix(path) => Ok(Stream::Unix(mio::net::UnixStream::connect(path)?)),
            Target::Tcp(addr) => {
                let socket = Socket::new(
                    Domain::for_address(*addr),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )?;
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                if !self.sources.is_empty() {
                    let ip = self.sources[self.next_source % self.sources.len()];
                    self.next_source += 1;
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                }
                match socket.connect(&(*addr).into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let std: std::net::TcpStream = socket.into();
                Ok(Stream::Tcp(mio::net::TcpStream::from_std(std)))
            }
        }
    }

    fn connect_failed(&mut self, id: u32, e: io::Error) {
        let opened = self.progress.opened.load(Ordering::Relaxed);
        match e.raw_os_error() {
            // EMFILE, ENFILE: this process is out of descriptors.
            Some(libc::EMFILE) | Some(libc::ENFILE) => {
                self.stop_opening = true;
                self.tally.not_opened += 1 + self.to_open.len() as u64;
                self.to_open.clear();
                let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |l| l.0);
                self.tally.fail(Failure::FdLimit, || {
                    format!(
                        "out of file descriptors after about {opened} connections: this load \
                         process reached its open-file limit (RLIMIT_NOFILE = {limit}); the \
                         limit is the client's, not the server's ({e})"
                    )
                });
            }
            // EADDRNOTAVAIL: no free local port for this source address.
            Some(libc::EADDRNOTAVAIL) => self.tally.fail(Failure::Ports, || {
                format!(
                    "connection {id}: no local port left ({e}); spread connections over \
                     more source addresses with --source-ip 127.0.0.2,127.0.0.3,..."
                )
            }),
            _ => self.tally.fail(Failure::Connect, || {
                format!("connection {id}: connect failed: {e}")
            }),
        }
    }

    fn established(&mut self, key: usize, now: Instant) {
        let sending = self.sending();
        let conn = &mut self.conns[key];
        let since = conn.connecting.take().expect("was connecting");
        self.connecting -= 1;
        self.tally.opened += 1;
        self.last_open = now;
        let measuring = self.plan.workload != Workload::Churn || self.phase == Phase::Measure;
        if measuring {
            record(&mut self.tally.connect_latency, now - since);
        }
        // From now on WRITABLE is wanted only while output waits.
        conn.writable = false;
        let _ = self
            .poll
            .registry()
            .reregister(&mut conn.stream, Token(key), Interest::READABLE);
        let first = match self.plan.workload {
            Workload::Echo if self.plan.rate > 0.0 => {
                // Spread the connections' schedules over one period.
                let period = Duration::from_secs_f64(1.0 / self.plan.rate);
                let offset = period.mul_f64((conn.id % 1000) as f64 / 1000.0);
                self.due.push(Reverse((now + offset, key)));
                0
            }
            Workload::Echo => self.plan.pipeline,
            _ => 1,
        };
        if sending && first > 0 {
            self.send(key, first, now);
        }
    }

    // ----- traffic ---------------------------------------------------------

    /// Queues `count` more messages on `key` and writes what it can.
    fn send(&mut self, key: usize, count: u32, stamp: Instant) {
        let size = self.plan.size;
        let conn = &mut self.conns[key];
        for _ in 0..count {
            message::append(&mut conn.out, conn.id, conn.next_seq, size);
            conn.next_seq = conn.next_seq.wrapping_add(1);
            conn.inflight.push_back(stamp);
        }
        self.flush(key);
    }

    /// `--rate`: sends every message that has come due.
    fn send_due(&mut self, now: Instant) {
        if self.plan.rate <= 0.0 {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / self.plan.rate);
        while let Some(&Reverse((due, key))) = self.due.peek() {
            if due > now || !self.sending() {
                return;
            }
            self.due.pop();
            if self.conns.contains(key) && self.conns[key].connecting.is_none() {
                // Latency counts from when the message was due, not when
                // it went out: a client that falls behind its schedule
                // must not hide the delay (coordinated omission).
                self.send(key, 1, due);
                self.due.push(Reverse((due + period, key)));
            }
        }
    }

    fn flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        while conn.written < conn.out.len() {
            match (&conn.stream).write(&conn.out[conn.written..]) {
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !conn.writable {
                        conn.writable = true;
                        let _ = self.poll.registry().reregister(
                            &mut conn.stream,
                            Token(key),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let id = conn.id;
                    return self.lose(
                        key,
                        Failure::Closed,
                        format!("connection {id}: write failed: {e}"),
                    );
                }
            }
        }
        conn.out.clear();
        conn.written = 0;
        if conn.writable {
            conn.writable = false;
            let _ =
                self.poll
                    .registry()
                    .reregister(&mut conn.stream, Token(key), Interest::READABLE);
        }
    }

    fn on_writable(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.connecting.is_some() {
            let id = conn.id;
            let result = match &conn.stream {
                Stream::Tcp(s) => s.take_error().and_then(|e| match e {
                    Some(e) => Err(e),
                    None => s.peer_addr().map(|_| ()),
                }),
                Stream::Unix(s) => s.take_error().and_then(|e| e.map_or(Ok(()), Err)),
            };
            match result {
                Ok(()) => self.established(key, Instant::now()),
                // Not connected yet: a spurious wake-up.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => {
                    self.connecting -= 1;
                    self.drop_conn(key);
                    self.connect_failed(id, e);
                }
            }
            return;
        }
        self.flush(key);
    }

    fn on_readable(&mut self, key: usize) {
        if self.conns[key].connecting.is_some() {
            // A refused connect reports readable too; the writable side
            // (checked first) has already dealt with it.
            return;
        }
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                self.again.push(key);
                return;
            }
            let conn = &mut self.conns[key];
            let n = match (&conn.stream).read(&mut self.scratch) {
                Ok(0) => {
                    let id = conn.id;
                    return self.lose(
                        key,
                        Failure::Closed,
                        format!("connection {id}: closed by the server"),
                    );
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let id = conn.id;
                    return self.lose(key, Failure::Closed, format!("connection {id}: {e}"));
                }
            };
            budget = budget.saturating_sub(n);
            let id = conn.id;
            let completed = match conn.check.feed(id, self.plan.size, &self.scratch[..n]) {
                Ok(c) => c,
                Err(m) => return self.lose(key, Failure::Mismatch, m.to_string()),
            };
            let sent = conn.next_seq;
            if conn.check.seq.wrapping_sub(sent) as i32 > 0
                || (conn.check.seq == sent && conn.check.offset > 0)
            {
                return self.lose(
                    key,
                    Failure::Mismatch,
                    format!("connection {id}: received bytes that were never sent"),
                );
            }
            if completed > 0 {
                self.completed(key, completed);
                if !self.conns.contains(key) {
                    return;
                }
            }
        }
    }

    /// `n` messages on `key` came back whole and correct.
    fn completed(&mut self, key: usize, n: u32) {
        let now = Instant::now();
        let counting = match self.plan.workload {
            Workload::Hold => true,
            _ => self.phase == Phase::Measure,
        };
        self.completions += u64::from(n);
        let conn = &mut self.conns[key];
        for _ in 0..n {
            let sent = conn
                .inflight
                .pop_front()
                .expect("checked: never more than sent");
            if counting {
                record(&mut self.tally.latency, now.saturating_duration_since(sent));
                self.tally.messages += 1;
                self.tally.bytes += self.plan.size as u64;
            }
        }
        match self.plan.workload {
            Workload::Echo if self.plan.rate <= 0.0 && self.sending() => self.send(key, n, now),
            Workload::Churn => {
                if counting {
                    self.tally.cycles += 1;
                }
                self.drop_conn(key);
            }
            _ => {}
        }
    }

    /// Checks the connects and replies in progress against `--timeout`.
    fn sweep(&mut self, now: Instant) {
        let limit = self.plan.timeout;
        let mut stalled = false;
        let late: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match (c.connecting, c.inflight.front()) {
                (Some(t), _) if now - t > limit => {
                    stalled |= self.last_open <= t;
                    Some((k, true))
                }
                (None, Some(&t)) if now.saturating_duration_since(t) > limit => Some((k, false)),
                _ => None,
            })
            .collect();
        if stalled {
            self.stalled();
        }
        for (key, connecting) in late {
            self.time_out(key, connecting);
        }
    }

    fn time_out_everything(&mut self, _now: Instant) {
        let late: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connecting.is_some() || !c.inflight.is_empty())
            .map(|(k, c)| (k, c.connecting.is_some()))
            .collect();
        for (key, connecting) in late {
            self.time_out(key, connecting);
        }
    }

    fn time_out(&mut self, key: usize, connecting: bool) {
        let id = self.conns[key].id;
        let secs = self.plan.timeout.as_secs_f64();
        if connecting {
            self.connecting -= 1;
            self.drop_conn(key);
            self.tally.fail(Failure::Timeout, || {
                format!("connection {id}: connect took over {secs} s")
            });
        } else {
            self.lose(
                key,
                Failure::Timeout,
                format!("connection {id}: no reply within {secs} s"),
            );
        }
    }

    /// Counts a failure on an open connection and closes it.
    fn lose(&mut self, key: usize, kind: Failure, what: String) {
        self.drop_conn(key);
        self.tally.fail(kind, || what);
    }

    fn drop_conn(&mut self, key: usize) {
        let mut conn = self.conns.remove(key);
        // Deregister before the socket closes with the drop.
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }
}
