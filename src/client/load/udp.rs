//! The echo workload over UDP: one connected datagram socket per
//! "connection", `--pipeline` datagrams in flight on each.
//!
//! Datagrams keep their boundaries but may be lost or reordered, so a
//! reply is matched by the sequence number it carries, not by its place
//! in a stream. A datagram not answered within a second (or `--timeout`,
//! if shorter) is counted lost and replaced; loss is reported, not
//! fatal, unless nothing at all comes back for `--timeout`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use super::interval::{Live, ToCollector};
use super::message::{Template, HEADER};
use super::report::{record, Failure, Tally};
use super::{Plan, Progress};
use crate::net::io::attempt;
use crate::net::ready::ReadyList;

/// The largest UDP payload over IPv4: 65,535 − 8 (UDP) − 20 (IP).
pub const MAX_DATAGRAM: usize = 65_507;
/// How long a datagram may go unanswered before it counts as lost.
const LOSS_WAIT: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(50);
/// Datagrams read from one socket per turn. Every reply is answered with a
/// new datagram at once, so a fast server could keep one socket readable
/// forever; past the budget the socket waits on the ready list.
const RECV_BUDGET: usize = 64;

struct Sock {
    socket: UdpSocket,
    id: u32,
    next_seq: u32,
    /// Datagrams in flight: sequence number and when it was sent.
    inflight: VecDeque<(u32, Instant)>,
    /// Datagrams that could not be sent yet (send buffer full).
    owed: u32,
    writable: bool,
}

/// One poll loop's share of the UDP sockets.
pub struct UdpWorker {
    plan: Arc<Plan>,
    progress: Arc<Progress>,
    poll: Poll,
    socks: Vec<Sock>,
    tally: Tally,
    buf: Vec<u8>,
    out: Vec<u8>,
    template: Template,
    completions: u64,
    /// Sockets whose budget ran out while still readable.
    ready: ReadyList<usize>,
    /// Intact replies, warm-up included.
    replies: u64,
    live: Option<Live>,
}

impl UdpWorker {
    /// Binds one socket per id, each connected to `addr`. With `live`, it
    /// sends an interval every `plan.interval`, tagged with its loop number.
    pub fn new(
        plan: Arc<Plan>,
        progress: Arc<Progress>,
        addr: SocketAddr,
        ids: Vec<u32>,
        live: Option<(ToCollector, usize)>,
    ) -> io::Result<UdpWorker> {
        let poll = Poll::new()?;
        let mut socks = Vec::with_capacity(ids.len());
        let mut tally = Tally::default();
        for (i, id) in ids.into_iter().enumerate() {
            let local = match plan.source_ips.get(i % plan.source_ips.len().max(1)) {
                Some(ip) => SocketAddr::new(*ip, 0),
                None if addr.is_ipv4() => "127.0.0.1:0".parse().expect("literal"),
                None => "[::1]:0".parse().expect("literal"),
            };
            let opened = UdpSocket::bind(local).and_then(|mut s| {
                s.connect(addr)?;
                poll.registry()
                    .register(&mut s, Token(i), Interest::READABLE)?;
                Ok(s)
            });
            match opened {
                Ok(socket) => {
                    tally.opened += 1;
                    socks.push(Sock {
                        socket,
                        id,
                        next_seq: 0,
                        inflight: VecDeque::new(),
                        owed: 0,
                        writable: false,
                    });
                }
                Err(e) => {
                    tally.fail(Failure::Connect, || format!("udp socket {id}: {e}"));
                    break;
                }
            }
        }
        progress.opened.fetch_add(tally.opened, Ordering::Relaxed);
        let template = Template::new(plan.size);
        let live = live
            .filter(|_| !plan.interval.is_zero())
            .map(|(to, id)| Live::new(to, id, progress.started, plan.interval));
        Ok(UdpWorker {
            live,
            plan,
            progress,
            poll,
            socks,
            tally,
            buf: vec![0; MAX_DATAGRAM + 1],
            out: Vec::with_capacity(MAX_DATAGRAM),
            template,
            completions: 0,
            ready: ReadyList::default(),
            replies: 0,
        })
    }

    /// Runs warm-up, the measured window and the drain.
    pub fn run(mut self) -> Tally {
        let start = Instant::now();
        let measure_at = start + self.plan.warmup;
        let stop_at = measure_at + self.plan.duration;
        let loss_wait = LOSS_WAIT.min(self.plan.timeout);
        let mut measuring = false;
        let mut last_reply = start;
        let mut last_scan = start;
        let mut events = Events::with_capacity(1024);
        for i in 0..self.socks.len() {
            self.send(i, self.plan.pipeline, start);
        }
        loop {
            let now = Instant::now();
            let sending = now < stop_at;
            if !measuring && now >= measure_at {
                measuring = true;
                self.tally.reset_measurement();
                self.progress.measuring.store(true, Ordering::Relaxed);
            }
            // A scan of every socket, so only when it can matter.
            let idle = |socks: &[Sock]| socks.iter().all(|s| s.inflight.is_empty());
            if !sending && idle(&self.socks) {
                break;
            }
            if now.duration_since(last_reply) > self.plan.timeout && !idle(&self.socks) {
                let secs = self.plan.timeout.as_secs_f64();
                self.tally.fail(Failure::Timeout, || {
                    format!("no datagram came back for {secs} s")
                });
                break;
            }
            let wait = self.ready.poll_timeout(TICK);
            if let Err(e) = attempt(|| self.poll.poll(&mut events, Some(wait))) {
                self.tally
                    .fail(Failure::Closed, || format!("poll failed: {e}"));
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                let i = event.token().0;
                if event.is_writable() {
                    let owed = std::mem::take(&mut self.socks[i].owed);
                    self.send(i, owed, now);
                }
                // A connected UDP socket reports an ICMP "port
                // unreachable" as an error event; recv() returns it.
                if (event.is_readable() || event.is_error())
                    && self.receive(i, Instant::now(), measuring, sending)
                {
                    last_reply = now;
                }
            }
            // No edge will come for what a socket still holds past its
            // budget: serve those after the events.
            // (A socket is pushed at most once per turn: only `receive`
            // pushes, once, when its budget runs out.)
            let batch = self.ready.begin_turn();
            for &i in &batch {
                if self.receive(i, Instant::now(), measuring, sending) {
                    last_reply = now;
                }
            }
            self.ready.end_turn(batch);
            // Whatever waited too long is lost; send another in its place.
            // Losses are counted after a second, so looking every tick
            // (not every turn of the loop) is plenty.
            if now.duration_since(last_scan) >= TICK {
                last_scan = now;
                for i in 0..self.socks.len() {
                    let mut lost = 0;
                    let s = &mut self.socks[i];
                    while s
                        .inflight
                        .front()
                        .is_some_and(|&(_, t)| now.duration_since(t) > loss_wait)
                    {
                        s.inflight.pop_front();
                        lost += 1;
                    }
                    self.tally.lost += u64::from(lost);
                    if lost > 0 && sending {
                        self.send(i, lost, now);
                    }
                }
            }
            if measuring {
                // Replies count only while sending, so the window ends at
                // stop_at however long the drain takes.
                self.tally.measured_secs =
                    now.min(stop_at).duration_since(measure_at).as_secs_f64();
            }
            self.progress
                .messages
                .fetch_add(std::mem::take(&mut self.completions), Ordering::Relaxed);
            let open = self.socks.len() as u64;
            if let Some(live) = self.live.as_mut().filter(|l| now >= l.next) {
                live.close(now, open, self.tally.total_errors(), false);
            }
        }
        if let Some(live) = &mut self.live {
            let open = self.socks.len() as u64;
            live.close(Instant::now(), open, self.tally.total_errors(), true);
        }
        if self.replies == 0 && !self.socks.is_empty() && self.tally.total_errors() == 0 {
            self.tally.fail(Failure::Timeout, || {
                "not one datagram came back: is a UDP echo server there?".into()
            });
        }
        self.tally
    }

    /// Reads every datagram waiting on socket `i`; true if any was a reply.
    fn receive(&mut self, i: usize, now: Instant, measuring: bool, sending: bool) -> bool {
        let size = self.plan.size;
        let mut any = false;
        for _ in 0..RECV_BUDGET {
            let s = &mut self.socks[i];
            let n = match attempt(|| s.socket.recv(&mut self.buf)) {
                Ok(Some(n)) => n,
                Ok(None) => return any,
                // ECONNREFUSED: an ICMP port-unreachable came back for an
                // earlier datagram; the server is not there.
                Err(e) => {
                    let id = s.id;
                    self.tally
                        .fail(Failure::Connect, || format!("udp socket {id}: {e}"));
                    s.inflight.clear();
                    return any;
                }
            };
            any = true;
            let d = &self.buf[..n];
            let seq = if n >= HEADER {
                u32::from_le_bytes(d[4..8].try_into().expect("4 bytes"))
            } else {
                0
            };
            let intact = n == size && self.template.matches(s.id, seq, 0, d);
            let slot = s.inflight.iter().position(|&(q, _)| q == seq);
            match (intact, slot) {
                (true, Some(at)) => {
                    let (_, sent) = s.inflight.remove(at).expect("position found");
                    self.completions += 1;
                    self.replies += 1;
                    let latency = now.saturating_duration_since(sent);
                    if measuring && sending {
                        record(&mut self.tally.latency, latency);
                        self.tally.messages += 1;
                        self.tally.bytes += size as u64;
                    }
                    if let Some(live) = &mut self.live {
                        live.current.messages += 1;
                        record(&mut live.current.latency, latency);
                    }
                    if sending {
                        self.send(i, 1, now);
                    }
                }
                (true, None) => {
                    // Answered after it was counted lost, or duplicated on
                    // the way: UDP allows both; not a corruption.
                }
                (false, _) => {
                    let id = s.id;
                    self.tally.fail(Failure::Mismatch, || {
                        format!(
                            "udp socket {id}: a {n}-byte datagram came back that was never sent \
                             (expected {size} bytes of message {seq})"
                        )
                    });
                }
            }
        }
        self.ready.push(i);
        any
    }

    fn send(&mut self, i: usize, count: u32, now: Instant) {
        let s = &mut self.socks[i];
        for k in 0..count {
            self.out.clear();
            self.template.append(&mut self.out, s.id, s.next_seq);
            match attempt(|| s.socket.send(&self.out)) {
                Ok(Some(_)) => {
                    s.inflight.push_back((s.next_seq, now));
                    s.next_seq = s.next_seq.wrapping_add(1);
                }
                Ok(None) => {
                    s.owed += count - k;
                    if !s.writable {
                        s.writable = true;
                        let _ = self.poll.registry().reregister(
                            &mut s.socket,
                            Token(i),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(e) => {
                    // The ICMP error for an earlier datagram surfaces here
                    // too; count it once and carry on.
                    let id = s.id;
                    self.tally
                        .fail(Failure::Connect, || format!("udp socket {id}: {e}"));
                    return;
                }
            }
        }
        if s.writable && s.owed == 0 {
            s.writable = false;
            let _ = self
                .poll
                .registry()
                .reregister(&mut s.socket, Token(i), Interest::READABLE);
        }
    }
}
