//! `reactor load --engine uring`: the same loop, with every established
//! connection's traffic on one io_uring ([`crate::net::ring`]).
//!
//! ```text
//!   ┌──────────────────────── Worker::run_uring ───────────────────────┐
//!   │ open_more                 non-blocking connects, as the mio loop │
//!   │ RingIo::turn              one io_uring_enter: this turn's sends  │
//!   │                           (one per connection), re-armed         │
//!   │                           receives and cancels go in; it waits   │
//!   │                           for completions                        │
//!   │ each completion:                                                 │
//!   │   Received  bytes in a pool buffer: checked, recycled; the       │
//!   │             messages they complete counted, their successors     │
//!   │             queued (closed loop)                                 │
//!   │   Sent      the connection may send again                        │
//!   │   Polled    the Poll's epoll descriptor: connects that ended     │
//!   │ end_turn                  due messages, timeouts, intervals,     │
//!   │                           phases: the mio loop's own code        │
//!   └──────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Why it is cheaper than the readiness loop: with readiness every reply
//! costs a `recv` of its own and every batch of messages a `send` of its
//! own, plus an `epoll_wait` per wake-up. Here the replies arrive through
//! one *multishot* receive per connection into a shared pool of provided
//! buffers (no system call per receive at all, and no read that only says
//! `WouldBlock`), and all of a turn's sends are handed over in the same
//! `io_uring_enter` that waits for the next completions: one system call
//! per turn, whatever the number of connections it served. The kernel
//! still does each connection's TCP work (on loopback most of the cost of
//! a message), but the per-call entry, file lookup and epoll bookkeeping
//! are paid once per turn rather than once per message.
//!
//! Connections are opened exactly as the mio loop opens them (a
//! non-blocking connect registered with the loop's `Poll`, paced and
//! windowed, its failures counted the same way). The ring watches the
//! `Poll`'s epoll descriptor with a one-shot poll, so one wait covers both;
//! once a connect completes, the socket leaves the epoll set and the ring
//! takes it ([`RingIo::adopt`]). Messages are built, checked, timed and
//! counted by the mio loop's code (`send`, [`Conn::check_reply`],
//! `completed`); only where bytes go differs: `send` appends them to the
//! connection's waiting output here ([`RingIo::queue`]), handed to the ring
//! at the end of the turn with at most one send in flight per connection,
//! so bytes never overtake each other.
//!
//! # Tags
//! A connection's operations carry its slab key in the low 32 bits and a
//! generation above, as in the server's uring engine: a late completion
//! for a closed connection (whose key a new connection may have taken
//! since) no longer matches and is dropped, its buffer given back.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::net::ring::{self, Batch, Chunk, Event, PoolShape, RecvBuf, Ring};

use super::*;

/// Submission queue entries: a full queue is submitted early, so this
/// bounds nothing but batching.
const SQ_ENTRIES: u32 = 4096;
/// Completions handled per slice of a wake-up.
const REAP_SLICE: usize = 256;
/// Receive buffers consumed incrementally (kernel 6.12 on): a reply takes
/// only its bytes from the buffer at the head, so 64-byte echoes pack one
/// after another and a `--pipeline` burst fits one completion.
const BUF_INC: PoolShape = PoolShape {
    buffers: 256,
    size: 64 * 1024,
    initial: 8,
};
/// Older kernels: each completion takes a whole buffer.
const BUF_WHOLE: PoolShape = PoolShape {
    buffers: 8192,
    size: 4096,
    initial: 256,
};
/// Closed loop: a turn waits for the replies of this share of the
/// connections (at most [`WAIT_MOST`]), or, after [`MIN_WAIT`], for any:
/// one wake-up per batch of replies rather than per reply. It is what
/// makes a message cheaper here than in the server it drives (waiting
/// for one completion per turn, the loop cost 0.92-0.96 of the C server's
/// CPU per message ping-pong; see docs/load.md). The batch is what the
/// server's core was going to answer anyway: in closed loop the server
/// has every other connection's messages to work on meanwhile.
const WAIT_SHARE: usize = 4;
/// The most replies a turn waits for (see [`WAIT_SHARE`]).
const WAIT_MOST: usize = 64;
/// The longest a reply that has arrived waits for others before the loop
/// looks at it: a bound on what batching adds to a measured latency.
const MIN_WAIT: Duration = Duration::from_micros(50);
/// Tag of the one-shot poll on the `Poll`'s epoll descriptor.
const CONNECTS: u64 = 0;

/// Whether this loop can run here: a small ring of the kind
/// [`RingIo::new`] makes, and a multishot receive on it that brings a byte
/// back (buffer rings came in 5.19, multishot receive in 6.0).
pub(crate) fn usable() -> bool {
    match probe() {
        Ok(()) => true,
        Err(e) => {
            log::debug!("load: {}; the mio loop runs", ring::unavailable(&e));
            false
        }
    }
}

fn probe() -> io::Result<()> {
    let small = PoolShape {
        buffers: 4,
        size: 4096,
        initial: 4,
    };
    let mut ring = Ring::new(8, 8, Some(small), small)?;
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ring.recv_multi(theirs.as_fd(), 1)?;
    std::io::Write::write_all(&mut ours, b"?")?;
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while events.is_empty() && Instant::now() < deadline {
        ring.submit_and_wait(Some(Duration::from_millis(100)))?;
        ring.complete(&mut events, 4);
    }
    match events.pop() {
        Some(Event::Received {
            result: Ok(Some(buf)),
            ..
        }) => {
            ring.recycle(buf);
            Ok(())
        }
        Some(Event::Received { result: Err(e), .. }) => Err(e),
        _ => Err(io::Error::other("a multishot receive brought nothing back")),
    }
}

/// A connection's side of the ring, by slab key.
#[derive(Debug, Default)]
struct RingConn {
    /// Of the connection the ring holds at this key; 0: none.
    generation: u32,
    /// Bytes not handed to the ring yet.
    waiting: Vec<u8>,
    /// A send is in flight: the next waits for its completion.
    flying: bool,
    /// On the dirty list already.
    dirty: bool,
}

/// The ring of one load loop and its connections' output.
pub(super) struct RingIo {
    ring: Ring,
    conns: Vec<RingConn>,
    next_generation: u32,
    /// Completions of the slice being handled (kept for its capacity).
    events: Vec<Event>,
    /// Readiness events of connects (kept for its capacity).
    mio_events: Events,
    connects: Vec<usize>,
    /// Keys with waiting output, sent at the end of the turn.
    dirty: Vec<usize>,
    /// Sockets whose cancel is queued: closed once it is submitted.
    closing: Vec<Stream>,
    /// Sends' batches and byte buffers back from the kernel, for reuse.
    spare_batches: Vec<Batch>,
    spare_bytes: Vec<Vec<u8>>,
    /// The poll on the epoll descriptor is armed.
    connects_armed: bool,
}

fn tag_of(key: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | key as u64
}

impl RingIo {
    /// A ring for `conns` connections; io_uring refused is one line that
    /// says why (the run then exits 1).
    pub(super) fn new(conns: usize) -> io::Result<RingIo> {
        // Room for a receive and a send completion of every connection.
        let cq = (conns as u32 * 2)
            .clamp(SQ_ENTRIES, 65536)
            .next_power_of_two();
        let ring = Ring::new(SQ_ENTRIES, cq, Some(BUF_INC), BUF_WHOLE)
            .map_err(|e| io::Error::new(e.kind(), ring::unavailable(&e)))?;
        Ok(RingIo {
            ring,
            conns: Vec::new(),
            next_generation: 1,
            events: Vec::with_capacity(REAP_SLICE),
            mio_events: Events::with_capacity(1024),
            connects: Vec::new(),
            dirty: Vec::new(),
            closing: Vec::new(),
            spare_batches: Vec::new(),
            spare_bytes: Vec::new(),
            connects_armed: false,
        })
    }

    /// Takes the established connection at `key`: arms its multishot
    /// receive.
    pub(super) fn adopt(&mut self, key: usize, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.conns.len() <= key {
            self.conns.resize_with(key + 1, RingConn::default);
        }
        let generation = self.next_generation;
        // Generations wrap below the ring's tag limit, and skip 0.
        self.next_generation = (generation + 1) & 0x00ff_ffff;
        self.next_generation = self.next_generation.max(1);
        let rc = &mut self.conns[key];
        rc.generation = generation;
        rc.waiting.clear();
        rc.flying = false;
        self.ring.recv_multi(fd, tag_of(key, generation))
    }

    /// Queues `out`'s bytes on `key` (leaving `out` empty).
    pub(super) fn queue(&mut self, key: usize, out: &mut Vec<u8>) {
        let rc = &mut self.conns[key];
        if rc.waiting.is_empty() {
            // The usual case: no copy, the buffers change places.
            std::mem::swap(&mut rc.waiting, out);
        } else {
            rc.waiting.extend_from_slice(out);
        }
        out.clear();
        if !rc.dirty {
            rc.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Lets go of the connection at `key`: cancels what the ring has armed
    /// on it and closes the socket once the cancel is submitted (the ring
    /// holds its own reference to the socket until then).
    pub(super) fn forget(&mut self, key: usize, stream: Stream) {
        match self.conns.get_mut(key) {
            Some(rc) if rc.generation != 0 => {
                rc.generation = 0;
                rc.waiting.clear();
                rc.flying = false;
                if let Err(e) = self.ring.cancel_fd(stream.as_fd()) {
                    log::warn!("load: cannot cancel a closed connection's receive: {e}");
                }
                self.closing.push(stream);
            }
            // Never adopted (a connect that failed or timed out).
            _ => drop(stream),
        }
    }

    /// The slab key of `tag` if it names a connection the ring holds.
    fn live(&self, tag: u64) -> Option<usize> {
        let (key, generation) = ((tag & 0xffff_ffff) as usize, (tag >> 32) as u32);
        match self.conns.get(key) {
            Some(rc) if rc.generation == generation && generation != 0 => Some(key),
            _ => None,
        }
    }

    /// Hands every connection's waiting output to the ring (one send per
    /// connection with none in flight), then submits it all and waits for
    /// completions, at most `timeout`: one `io_uring_enter`. With
    /// `replies` connections expecting replies, it waits for a share of
    /// them (see [`WAIT_SHARE`]).
    fn turn(
        &mut self,
        poll: &Poll,
        conns: &Slab<Conn>,
        timeout: Duration,
        replies: usize,
    ) -> io::Result<()> {
        if !self.connects_armed {
            self.ring.poll_readable(poll, CONNECTS)?;
            self.connects_armed = true;
        }
        let mut sends = 0;
        for key in std::mem::take(&mut self.dirty).drain(..) {
            let rc = &mut self.conns[key];
            rc.dirty = false;
            if rc.generation == 0 || rc.flying || rc.waiting.is_empty() {
                continue;
            }
            let Some(conn) = conns.get(key) else { continue };
            let bytes =
                std::mem::replace(&mut rc.waiting, self.spare_bytes.pop().unwrap_or_default());
            let mut batch = self.spare_batches.pop().unwrap_or_default();
            batch.chunks.push(Chunk::Owned(bytes));
            rc.flying = true;
            let tag = tag_of(key, rc.generation);
            self.ring.send(conn.stream.as_fd(), batch, tag)?;
            sends += 1;
        }
        // The sends' own completions are in the count too (most complete
        // during the submission itself).
        let want = (replies / WAIT_SHARE).min(WAIT_MOST);
        if want > 1 {
            self.ring
                .submit_and_wait_for(sends + want, MIN_WAIT, Some(timeout))?;
        } else {
            self.ring.submit_and_wait(Some(timeout))?;
        }
        // The cancels for these are in the kernel now (unless a signal cut
        // the submission short: then they wait for the next turn).
        if self.ring.all_submitted() {
            self.closing.clear();
        }
        Ok(())
    }

    /// Keeps a send's batch and bytes for the next sends.
    fn recycle_batch(&mut self, mut batch: Batch) {
        for chunk in batch.chunks.drain(..) {
            if let Chunk::Owned(mut v) = chunk {
                v.clear();
                self.spare_bytes.push(v);
            }
        }
        batch.head = 0;
        self.spare_batches.push(batch);
    }
}

impl Worker {
    /// [`Worker::run`] on the ring: the same phases, the same end of turn.
    pub(super) fn run_uring(mut self) -> Tally {
        let mut last_timeout_check = Instant::now();
        let mut now = last_timeout_check;
        loop {
            self.open_more(now);
            let timeout = self.poll_timeout(now, last_timeout_check);
            // Open loop sends on a schedule and waits for nothing more than
            // its next due time; the closing phases wait for stragglers.
            let replies = if self.plan.open_loop() || !self.sending() {
                0
            } else {
                self.conns.len() - self.connecting
            };
            let ring = self.ring.as_mut().expect("run_uring runs with a ring");
            if let Err(e) = ring.turn(&self.poll, &self.conns, timeout, replies) {
                self.tally
                    .fail(Failure::Closed, || format!("io_uring failed: {e}"));
                break;
            }
            // One clock read per wake-up and every CLOCK_EVERY completions,
            // as the mio loop reads it per events (see `Worker::clock`).
            self.clock = Instant::now();
            let mut handled = 0;
            loop {
                let ring = self.ring.as_mut().expect("ring");
                let mut events = std::mem::take(&mut ring.events);
                ring.ring.complete(&mut events, REAP_SLICE);
                if events.is_empty() {
                    self.ring.as_mut().expect("ring").events = events;
                    break;
                }
                for event in events.drain(..) {
                    if handled > 0 && handled % CLOCK_EVERY == 0 {
                        self.clock = Instant::now();
                    }
                    handled += 1;
                    self.on_completion(event);
                }
                self.ring.as_mut().expect("ring").events = events;
            }
            now = Instant::now();
            if self.end_turn(now, &mut last_timeout_check) {
                break;
            }
        }
        self.finish()
    }

    fn on_completion(&mut self, event: Event) {
        match event {
            Event::Received { tag, result, more } => self.on_received(tag, result, more),
            Event::Sent { tag, result, batch } => self.on_sent(tag, result, batch),
            Event::Polled { .. } => self.on_connects(),
            // No accept is ever armed.
            Event::Accepted { .. } => {}
        }
    }

    /// The epoll descriptor is readable: connects have ended. Handled as
    /// the mio loop handles them (which hands established ones to the
    /// ring); the poll is re-armed at the next turn.
    fn on_connects(&mut self) {
        let ring = self.ring.as_mut().expect("ring");
        ring.connects_armed = false;
        let mut keys = std::mem::take(&mut ring.connects);
        if let Err(e) = attempt(|| self.poll.poll(&mut ring.mio_events, Some(Duration::ZERO))) {
            self.tally
                .fail(Failure::Closed, || format!("poll failed: {e}"));
        }
        keys.extend(ring.mio_events.iter().map(|e| e.token().0));
        for key in keys.drain(..) {
            // Only connects are in the epoll set: any event on one means it
            // has ended, and `on_writable` says how.
            if self.conns.get(key).is_some_and(|c| c.connecting.is_some()) {
                self.on_writable(key);
            }
        }
        self.ring.as_mut().expect("ring").connects = keys;
    }

    fn on_received(&mut self, tag: u64, result: io::Result<Option<RecvBuf>>, more: bool) {
        let ring = self.ring.as_mut().expect("ring");
        let Some(key) = ring.live(tag) else {
            // A late completion for a closed connection.
            if let Ok(Some(buf)) = result {
                ring.ring.recycle(buf);
            }
            return;
        };
        let id = self.conns[key].id;
        match result {
            Ok(Some(buf)) => {
                let checked = self.conns[key].check_reply(&self.template, ring.ring.bytes(&buf));
                ring.ring.recycle(buf);
                match checked {
                    Ok(0) => {}
                    // Stamped with the wake-up's clock, as in the mio loop.
                    Ok(n) => self.completed(key, n, self.clock),
                    Err(m) => return self.close_failed(key, Failure::Mismatch, m),
                }
            }
            Ok(None) => {
                let what = format!("connection {id}: closed by the server");
                return self.close_failed(key, Failure::Closed, what);
            }
            // Out of pool buffers: provide more (at most once per batch of
            // completions); the receive is re-armed below.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                let open = self.conns.len();
                ring.ring.grow_pool(|| open);
            }
            Err(e) => {
                return self.close_failed(key, Failure::Closed, format!("connection {id}: {e}"))
            }
        }
        if !more {
            // The multishot receive is over (ENOBUFS, or the kernel ended
            // it): arm another while the connection lives.
            let ring = self.ring.as_mut().expect("ring");
            if let (Some(key), Some(conn)) = (ring.live(tag), self.conns.get(key)) {
                if let Err(e) = ring.ring.recv_multi(conn.stream.as_fd(), tag) {
                    let what = format!("connection {id}: cannot arm a receive: {e}");
                    self.close_failed(key, Failure::Closed, what);
                }
            }
        }
    }

    fn on_sent(&mut self, tag: u64, result: io::Result<usize>, mut batch: Batch) {
        let ring = self.ring.as_mut().expect("ring");
        let Some(key) = ring.live(tag) else {
            return ring.recycle_batch(batch);
        };
        let rc = &mut ring.conns[key];
        rc.flying = false;
        match result {
            Ok(n) if n < batch.len() => {
                // A short send: the rest goes first, ahead of what was
                // queued meanwhile.
                batch.consume(n);
                let mut rest = Vec::with_capacity(batch.len() + rc.waiting.len());
                for c in &batch.chunks {
                    rest.extend_from_slice(c.bytes());
                }
                rest.drain(..batch.head);
                rest.extend_from_slice(&rc.waiting);
                rc.waiting = rest;
            }
            Ok(_) => {}
            Err(e) => {
                ring.recycle_batch(batch);
                let id = self.conns[key].id;
                let what = format!("connection {id}: write failed: {e}");
                return self.close_failed(key, Failure::Closed, what);
            }
        }
        if !rc.waiting.is_empty() && !rc.dirty {
            rc.dirty = true;
            ring.dirty.push(key);
        }
        ring.recycle_batch(batch);
    }
}
