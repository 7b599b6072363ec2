//! `--workload chat`: N chat clients, each sending `--rate` lines a
//! second, every one of which must reach every other client exactly once
//! and in order.
//!
//! Each line is `ID SEQ T ` padded with `.` to `--size` bytes with its
//! `\n` (longer if the numbers need it): the sender's id, its line number
//! (from 0) and the send time in ns since the run began. A chat server
//! relays it to every other client as `NAME: TEXT`, so the receiver reads
//! the sender and sequence from the text, never from the name, and counts
//! from each sender separately: the next line from sender X must carry
//! exactly the sequence expected from X. A higher one means lines were
//! lost (named: sender and sequence), a lower one a duplicate or a
//! reordering. Server notices (`* ...`) are skipped. After the last line
//! is sent, the run waits up to `--timeout` for every client to have
//! received every other client's last line; what is still missing then is
//! lost too. Latency is from the send to each receipt.
//!
//! Every client keeps the next sequence expected from every other, so
//! memory grows with N²: at most [`MAX_CLIENTS`] clients, one loop.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use super::interval::{Live, ToCollector};
use super::report::{record, Failure, Tally};
use super::worker::Target;
use super::{Plan, Progress};
use crate::buffer::OutQueue;
use crate::net::io::attempt;
use crate::net::ready::want_writable;
use crate::net::ready::{ReadyList, READ_BUDGET, SCRATCH};
use crate::net::Stream;

/// Most chat clients in one run (each tracks every other: N² counters).
pub const MAX_CLIENTS: u32 = 5000;
/// Longest line a client keeps while waiting for its end.
const MAX_LINE: usize = 64 * 1024;
/// How often the wait for the last lines checks whether it is over.
const CHECK: Duration = Duration::from_millis(100);

struct Client {
    stream: Stream,
    /// Bytes of a line not yet ended.
    partial: Vec<u8>,
    welcomed: bool,
    /// Lines sent so far (the next one's sequence).
    sent: u32,
    /// The next sequence expected from each sender.
    expect: Vec<u32>,
    unsent: Option<OutQueue>,
    writable: bool,
    on_ready_list: bool,
    failed: bool,
}

/// The chat workload's one loop.
pub struct ChatLoop {
    plan: Arc<Plan>,
    progress: Arc<Progress>,
    poll: Poll,
    clients: Vec<Client>,
    ready: ReadyList<usize>,
    scratch: Vec<u8>,
    tally: Tally,
    live: Option<Live>,
    /// Counting deliveries (after the warm-up, before the end of sending).
    counting: bool,
    lines_sent: u64,
    deliveries: u64,
}

/// What the chat run adds to the report.
pub struct ChatCounts {
    /// Lines the clients sent.
    pub lines_sent: u64,
    /// Lines received, warm-up and the wait at the end included.
    pub deliveries: u64,
}

impl ChatLoop {
    /// Connects every client (blocking connects: the run starts only once
    /// all are in).
    pub fn new(
        plan: Arc<Plan>,
        progress: Arc<Progress>,
        live: Option<(ToCollector, usize)>,
    ) -> io::Result<ChatLoop> {
        let poll = Poll::new()?;
        let n = plan.connections as usize;
        let mut clients = Vec::with_capacity(n);
        let mut tally = Tally::default();
        for id in 0..n {
            match connect(&plan, id) {
                Ok(mut stream) => {
                    poll.registry()
                        .register(&mut stream, Token(id), Interest::READABLE)?;
                    clients.push(Client {
                        stream,
                        partial: Vec::new(),
                        welcomed: false,
                        sent: 0,
                        expect: vec![0; n],
                        unsent: None,
                        writable: false,
                        on_ready_list: false,
                        failed: false,
                    });
                    tally.opened += 1;
                }
                Err(e) => {
                    tally.not_opened += (n - id) as u64;
                    tally.fail(Failure::Connect, || format!("client {id}: connect: {e}"));
                    break;
                }
            }
        }
        progress.opened.fetch_add(tally.opened, Ordering::Relaxed);
        let live = live
            .filter(|_| !plan.interval.is_zero())
            .map(|(to, id)| Live::new(to, id, progress.started, plan.interval));
        Ok(ChatLoop {
            poll,
            clients,
            ready: ReadyList::default(),
            scratch: vec![0; SCRATCH],
            tally,
            live,
            counting: false,
            lines_sent: 0,
            deliveries: 0,
            plan,
            progress,
        })
    }

    /// Runs: wait for every welcome, send for `--warmup` + `--duration`,
    /// wait for the last lines. Returns the tally and the chat counts.
    pub fn run(mut self) -> (Tally, ChatCounts) {
        let n = self.clients.len();
        let mut events = Events::with_capacity(1024);
        let start = Instant::now();
        // 1. Everyone in: once every client has its welcome, the server
        // has every client on its list, and any line sent from now on
        // goes to all of them.
        let deadline = start + self.plan.timeout;
        while self.clients.iter().any(|c| !c.welcomed && !c.failed) {
            let now = Instant::now();
            if now >= deadline {
                let missing = self.clients.iter().filter(|c| !c.welcomed).count();
                let secs = self.plan.timeout.as_secs_f64();
                self.tally.fail(Failure::Timeout, || {
                    format!("{missing} clients got no welcome line within {secs} s")
                });
                return self.finish();
            }
            if !self.turn(&mut events, deadline - now, now) {
                return self.finish();
            }
        }
        // 2. Send on schedule, each client's lines spread over its period.
        let rate = if self.plan.rate > 0.0 {
            self.plan.rate
        } else {
            1.0
        };
        let period = Duration::from_secs_f64(1.0 / rate);
        let began = Instant::now();
        let measure_at = began + self.plan.warmup;
        let stop_at = measure_at + self.plan.duration;
        let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..n)
            .map(|id| Reverse((began + period.mul_f64(id as f64 / n as f64), id)))
            .collect();
        loop {
            let now = Instant::now();
            if !self.counting && now >= measure_at && now < stop_at {
                self.counting = true;
                self.tally.reset_measurement();
                self.progress.measuring.store(true, Ordering::Relaxed);
            }
            if now >= stop_at {
                break;
            }
            while let Some(&Reverse((at, id))) = due.peek() {
                if at > now {
                    break;
                }
                due.pop();
                self.send_line(id, now);
                due.push(Reverse((at + period, id)));
            }
            let next = due.peek().map_or(stop_at, |Reverse((at, _))| *at);
            let wait = next.min(stop_at).saturating_duration_since(now);
            if !self.turn(&mut events, wait, now) {
                return self.finish();
            }
        }
        self.counting = false;
        self.tally.measured_secs = self.plan.duration.as_secs_f64();
        // 3. Wait for every line to reach every other client.
        let deadline = Instant::now() + self.plan.timeout;
        let mut last_check = Instant::now();
        loop {
            let now = Instant::now();
            if now.duration_since(last_check) >= CHECK || now >= deadline {
                last_check = now;
                if self.all_delivered() {
                    break;
                }
                if now >= deadline {
                    self.report_missing();
                    break;
                }
            }
            if !self.turn(&mut events, CHECK, now) {
                break;
            }
        }
        self.finish()
    }

    /// One `poll` and everything it reported; false when polling failed.
    fn turn(&mut self, events: &mut Events, wait: Duration, now: Instant) -> bool {
        let wait = self.ready.poll_timeout(wait.min(CHECK));
        let wait = match &self.live {
            Some(live) => wait.min(live.next.saturating_duration_since(now)),
            None => wait,
        };
        if let Err(e) = attempt(|| self.poll.poll(events, Some(wait))) {
            self.tally
                .fail(Failure::Closed, || format!("poll failed: {e}"));
            return false;
        }
        for event in events.iter() {
            let id = event.token().0;
            if event.is_writable() {
                self.flush(id);
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                let to_end = event.is_read_closed() || event.is_error();
                self.on_readable(id, to_end);
            }
        }
        let batch = self.ready.begin_turn();
        for &id in &batch {
            self.clients[id].on_ready_list = false;
            self.on_readable(id, true);
        }
        self.ready.end_turn(batch);
        let now = Instant::now();
        if let Some(live) = &mut self.live {
            if now >= live.next {
                let open = self.clients.iter().filter(|c| !c.failed).count() as u64;
                live.close(now, open, self.tally.total_errors(), false);
            }
        }
        let p = &self.progress;
        p.messages.store(self.deliveries, Ordering::Relaxed);
        true
    }

    fn send_line(&mut self, id: usize, now: Instant) {
        let client = &mut self.clients[id];
        if client.failed {
            return;
        }
        let t = now
            .saturating_duration_since(self.progress.started)
            .as_nanos();
        let mut line = format!("{id} {} {t} ", client.sent).into_bytes();
        let size = self.plan.size.max(line.len() + 1);
        line.resize(size - 1, b'.');
        line.push(b'\n');
        client.sent += 1;
        self.lines_sent += 1;
        let queue = client
            .unsent
            .get_or_insert_with(|| OutQueue::new(usize::MAX));
        let _ = queue.push(&line);
        self.flush(id);
    }

    /// Writes what waits for client `id`; `WRITABLE` only while bytes wait.
    fn flush(&mut self, id: usize) {
        let client = &mut self.clients[id];
        let Some(queue) = &mut client.unsent else {
            return;
        };
        if let Err(e) = queue.write_to(&mut &client.stream, usize::MAX) {
            return self.close_failed(id, format!("client {id}: write failed: {e}"));
        }
        let want = !queue.is_empty();
        if want {
            // A short write: keep the rest and ask for WRITABLE.
        } else {
            client.unsent = None;
        }
        let registry = self.poll.registry();
        let _ = want_writable(
            registry,
            &mut client.stream,
            Token(id),
            &mut client.writable,
            want,
        );
    }

    /// Reads, splits into lines and checks what arrived for client `id`
    /// (a short read ends it unless `to_end`, as in the echo loop).
    fn on_readable(&mut self, id: usize, to_end: bool) {
        let mut budget = READ_BUDGET;
        let mut now = None;
        loop {
            let client = &mut self.clients[id];
            if client.failed {
                return;
            }
            if budget == 0 {
                if !client.on_ready_list {
                    client.on_ready_list = true;
                    self.ready.push(id);
                }
                return;
            }
            let n = match attempt(|| (&client.stream).read(&mut self.scratch)) {
                Ok(Some(0)) => {
                    return self.close_failed(id, format!("client {id}: closed by the server"))
                }
                Ok(Some(n)) => n,
                Ok(None) => return,
                Err(e) => return self.close_failed(id, format!("client {id}: {e}")),
            };
            budget = budget.saturating_sub(n);
            // One clock read per read that brought lines.
            let now = *now.get_or_insert_with(Instant::now);
            let mut data = &self.scratch[..n];
            while let Some(end) = memchr::memchr(b'\n', data) {
                let client = &mut self.clients[id];
                let line = if client.partial.is_empty() {
                    &data[..end]
                } else {
                    client.partial.extend_from_slice(&data[..end]);
                    &client.partial[..]
                };
                let verdict = check_line(line, id, &mut client.expect, &mut client.welcomed);
                client.partial.clear();
                data = &data[end + 1..];
                match verdict {
                    Line::Notice => {}
                    Line::Delivered(sent_ns) => {
                        self.deliveries += 1;
                        let sent = self.progress.started + Duration::from_nanos(sent_ns);
                        let latency = now.saturating_duration_since(sent);
                        if self.counting {
                            record(&mut self.tally.latency, latency);
                            self.tally.messages += 1;
                            self.tally.bytes += self.plan.size as u64;
                        }
                        if let Some(live) = &mut self.live {
                            live.current.messages += 1;
                            record(&mut live.current.latency, latency);
                        }
                    }
                    Line::Lost { sender, from, to } => {
                        let what = if to == from + 1 {
                            format!("sequence {from}")
                        } else {
                            format!("sequences {from} to {}", to - 1)
                        };
                        self.tally.fail(Failure::Lost, || {
                            format!(
                                "client {id}: sender {sender} {what} lost (the next line \
                                 from it was sequence {to})"
                            )
                        });
                    }
                    Line::Bad(what) => {
                        self.tally
                            .fail(Failure::Mismatch, || format!("client {id}: {what}"));
                    }
                }
            }
            let client = &mut self.clients[id];
            client.partial.extend_from_slice(data);
            if client.partial.len() > MAX_LINE {
                return self.close_failed(
                    id,
                    format!("client {id}: a line longer than {MAX_LINE} bytes"),
                );
            }
            if n < self.scratch.len() && !to_end {
                return;
            }
        }
    }

    fn all_delivered(&self) -> bool {
        self.clients.iter().enumerate().all(|(r, c)| {
            c.failed
                || self
                    .clients
                    .iter()
                    .enumerate()
                    .all(|(x, sender)| x == r || sender.failed || c.expect[x] >= sender.sent)
        })
    }

    /// After the wait: every line some client still lacks is lost.
    fn report_missing(&mut self) {
        let mut missing = Vec::new();
        for (r, c) in self.clients.iter().enumerate() {
            if c.failed {
                continue;
            }
            for (x, sender) in self.clients.iter().enumerate() {
                if x != r && c.expect[x] < sender.sent {
                    missing.push((r, x, c.expect[x], sender.sent));
                }
            }
        }
        let secs = self.plan.timeout.as_secs_f64();
        for (r, x, from, sent) in missing {
            self.tally.fail(Failure::Lost, || {
                format!(
                    "client {r}: sender {x} sequence {from} never arrived ({} of its {sent} \
                     lines missing after waiting {secs} s)",
                    sent - from
                )
            });
        }
    }

    /// Counts a failure on client `id` and stops using it.
    fn close_failed(&mut self, id: usize, what: String) {
        let client = &mut self.clients[id];
        if client.failed {
            return;
        }
        client.failed = true;
        let _ = self.poll.registry().deregister(&mut client.stream);
        self.tally.fail(Failure::Closed, || what);
    }

    fn finish(mut self) -> (Tally, ChatCounts) {
        if let Some(live) = &mut self.live {
            let open = self.clients.iter().filter(|c| !c.failed).count() as u64;
            live.close(Instant::now(), open, self.tally.total_errors(), true);
        }
        self.progress
            .messages
            .store(self.deliveries, Ordering::Relaxed);
        let counts = ChatCounts {
            lines_sent: self.lines_sent,
            deliveries: self.deliveries,
        };
        (self.tally, counts)
    }
}

/// What one received line was.
#[derive(Debug, PartialEq)]
enum Line {
    /// A server notice (`* ...`), or the welcome.
    Notice,
    /// The next line from its sender, sent at this many ns into the run.
    Delivered(u64),
    /// Lines `from..to` of `sender` never came; this one is `to`.
    Lost { sender: usize, from: u32, to: u32 },
    /// Not a line of ours, or one out of place.
    Bad(String),
}

/// Checks one line received by client `me` against what it expects.
fn check_line(line: &[u8], me: usize, expect: &mut [u32], welcomed: &mut bool) -> Line {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(notice) = line.strip_prefix(b"* ") {
        if notice.starts_with(b"welcome ") {
            *welcomed = true;
        }
        return Line::Notice;
    }
    let text = match memchr::memmem::find(line, b": ") {
        Some(at) => &line[at + 2..],
        None => return Line::Bad(format!("an unexpected line {:?}", show(line))),
    };
    let mut fields = text.split(|&b| b == b' ').map(|f| {
        std::str::from_utf8(f)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    });
    let (Some(Some(sender)), Some(Some(seq)), Some(Some(t))) =
        (fields.next(), fields.next(), fields.next())
    else {
        return Line::Bad(format!("a line not sent by this run {:?}", show(line)));
    };
    let sender = sender as usize;
    if sender == me {
        return Line::Bad(format!("its own line {seq} came back to it"));
    }
    let Some(next) = expect.get_mut(sender) else {
        return Line::Bad(format!("a line from sender {sender}, who does not exist"));
    };
    let seq = seq as u32;
    if seq == *next {
        *next += 1;
        Line::Delivered(t)
    } else if seq > *next {
        let from = *next;
        *next = seq + 1;
        Line::Lost {
            sender,
            from,
            to: seq,
        }
    } else {
        Line::Bad(format!(
            "sender {sender} sequence {seq} arrived again or out of order (expected {next})"
        ))
    }
}

fn show(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned()
}

fn connect(plan: &Plan, id: usize) -> io::Result<Stream> {
    match &plan.target {
        Target::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_nonblocking(true)?;
            Ok(Stream::Unix(mio::net::UnixStream::from_std(s)))
        }
        Target::Tcp(addr) => {
            let socket = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            if !plan.source_ips.is_empty() {
                let ip = plan.source_ips[id % plan.source_ips.len()];
                socket.bind(&SocketAddr::new(ip, 0).into())?;
            }
            socket.connect_timeout(&(*addr).into(), plan.timeout)?;
            socket.set_tcp_nodelay(true)?;
            socket.set_nonblocking(true)?;
            let std: std::net::TcpStream = socket.into();
            Ok(Stream::Tcp(mio::net::TcpStream::from_std(std)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, me: usize, expect: &mut [u32]) -> Line {
        check_line(line.as_bytes(), me, expect, &mut false)
    }

    #[test]
    fn lines_from_each_sender_are_counted_separately() {
        let mut expect = vec![0; 3];
        assert_eq!(
            check("guest-1: 0 0 5 ....", 2, &mut expect),
            Line::Delivered(5)
        );
        assert_eq!(
            check("guest-2: 1 0 7 ....", 2, &mut expect),
            Line::Delivered(7)
        );
        assert_eq!(
            check("guest-2: 1 1 9 ....", 2, &mut expect),
            Line::Delivered(9)
        );
        assert_eq!(expect, [1, 2, 0]);
    }

    #[test]
    fn a_gap_names_the_sender_and_the_missing_sequence() {
        let mut expect = vec![0; 2];
        check("a: 0 0 1 .", 1, &mut expect);
        let lost = check("a: 0 3 1 .", 1, &mut expect);
        assert_eq!(
            lost,
            Line::Lost {
                sender: 0,
                from: 1,
                to: 3
            }
        );
        // Counting goes on from the line that came.
        assert_eq!(check("a: 0 4 1 .", 1, &mut expect), Line::Delivered(1));
    }

    #[test]
    fn duplicates_own_lines_and_strangers_are_bad() {
        let mut expect = vec![0; 2];
        check("a: 0 0 1 .", 1, &mut expect);
        assert!(matches!(check("a: 0 0 1 .", 1, &mut expect), Line::Bad(_)));
        assert!(matches!(check("me: 1 0 1 .", 1, &mut expect), Line::Bad(_)));
        assert!(matches!(check("x: 9 0 1 .", 1, &mut expect), Line::Bad(_)));
        assert!(matches!(check("hello", 1, &mut expect), Line::Bad(_)));
    }

    #[test]
    fn notices_are_skipped_and_the_welcome_is_seen() {
        let mut welcomed = false;
        let mut expect = vec![0; 2];
        let l = check_line(b"* welcome guest-1", 0, &mut expect, &mut welcomed);
        assert_eq!(l, Line::Notice);
        assert!(welcomed);
        assert_eq!(check("* guest-2 joined", 0, &mut expect), Line::Notice);
    }
}
