//! `--max-memory` and the other promises under abuse, on real sockets:
//! a flood of clients that write and never read, chat's biggest reader,
//! `/quit` while still sending, a `/who` flood, the pause hysteresis and
//! timers after churn.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};

/// A client socket with small kernel buffers, so what it sends and does
/// not read back waits in the server's queues, not in the kernel.
fn small_window_client(addr: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.set_send_buffer_size(16384).unwrap();
    s.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    let s: TcpStream = s.into();
    s.set_nodelay(true).unwrap();
    s
}

/// Clients that each write a slice of one pattern and read nothing.
struct Flood {
    socks: Vec<TcpStream>,
    sent: Vec<usize>,
    data: Arc<Vec<u8>>,
}

impl Flood {
    /// `n` clients each write up to `each` bytes, until the server stops
    /// taking more from all of them (half a second with no progress).
    fn start(addr: SocketAddr, n: usize, each: usize) -> Flood {
        let data = Arc::new(pattern(7, each + n));
        let socks: Vec<TcpStream> = (0..n).map(|_| small_window_client(addr)).collect();
        for s in &socks {
            s.set_nonblocking(true).unwrap();
        }
        let mut flood = Flood {
            socks,
            sent: vec![0; n],
            data,
        };
        flood.push(each);
        flood
    }

    /// Writes on, each client up to `each` bytes in all, until the server
    /// takes no more (half a second with no progress).
    fn push(&mut self, each: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_millis(500) {
            let mut progress = false;
            for (i, mut s) in self.socks.iter().enumerate() {
                let sent = &mut self.sent[i];
                if *sent >= each {
                    continue;
                }
                let end = (*sent + 64 * 1024).min(each);
                match s.write(&self.data[i + *sent..i + end]) {
                    Ok(k) => {
                        *sent += k;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("flood client {i}: {e}"),
                }
            }
            if progress {
                quiet_since = Instant::now();
            } else {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn total(&self) -> usize {
        self.sent.iter().sum()
    }

    /// Every client reads, all at once, until it has its bytes back; each
    /// must be exactly what it sent.
    fn read_back(self) {
        let mut got: Vec<Vec<u8>> = self.sent.iter().map(|&n| Vec::with_capacity(n)).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buf = vec![0; 64 * 1024];
        loop {
            let mut done = true;
            for (i, mut s) in self.socks.iter().enumerate() {
                if got[i].len() >= self.sent[i] {
                    continue;
                }
                done = false;
                match s.read(&mut buf) {
                    Ok(0) => panic!("client {i}: EOF after {} bytes", got[i].len()),
                    Ok(k) => got[i].extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the flood did not get its bytes back"
            );
        }
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.len(), self.sent[i], "client {i}: too many bytes");
            assert!(
                g[..] == self.data[i..i + self.sent[i]],
                "client {i}: bytes differ"
            );
        }
    }
}

const CAP: usize = 8 << 20;

/// 64 clients each write up to 4 MiB and read nothing, against an 8 MiB
/// cap: the server's RSS stays near the cap, a client that reads is served
/// meanwhile, and every client gets every byte back once it reads.
fn a_memory_flood_is_held_to_the_cap_and_every_byte_comes_back(engine: &str) {
    let server = Server::start_engine(engine, &["--max-memory", &CAP.to_string()]);
    let before = server.rss_kib();
    let flood = Flood::start(server.addr, 64, 4 << 20);
    // How much was sent is not the check: 64 clients' kernel buffers hold
    // more than twice the cap even if the server never read a byte. The
    // cap's check is the RSS bound below.
    let grown = server.rss_kib().saturating_sub(before) as usize * 1024;
    eprintln!(
        "{engine} flood: {} MiB sent, RSS grew {} MiB",
        flood.total() >> 20,
        grown >> 20
    );
    assert!(
        grown <= CAP + (16 << 20),
        "RSS grew {} MiB with a {} MiB cap",
        grown >> 20,
        CAP >> 20
    );
    // A client that reads is still served at the cap.
    let healthy = server.connect();
    let data = Arc::new(pattern(99, 200_000));
    assert!(echo_roundtrip(&healthy, data.clone()) == *data);
    flood.read_back();
    // And once the flood has read, memory is free for everyone again.
    let again = server.connect();
    assert!(echo_roundtrip(&again, data.clone()) == *data);
}
engines!(a_memory_flood_is_held_to_the_cap_and_every_byte_comes_back: reactor, uring);

fn a_flood_read_back_one_client_at_a_time_still_gets_every_byte(engine: &str) {
    let server = Server::start_engine(engine, &["--max-memory", "4194304"]);
    let flood = Flood::start(server.addr, 50, 512 * 1024);
    let mut got = 0;
    for (i, s) in flood.socks.iter().enumerate() {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let back = read_n(&mut &*s, flood.sent[i]);
        assert!(back[..] == flood.data[i..i + flood.sent[i]], "client {i}");
        got += back.len();
    }
    assert_eq!(got, flood.total());
}
engines!(a_flood_read_back_one_client_at_a_time_still_gets_every_byte: reactor, uring);

/// How many connections the server's debug log says waited at
/// `--max-memory` (`[<connection>] --max-memory reached`, either engine).
fn memory_waiters(log: &str) -> usize {
    let mut who: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("] --max-memory reached")?.0.rsplit_once('['))
        .map(|(_, name)| name)
        .collect();
    who.sort_unstable();
    who.dedup();
    who.len()
}

/// A client waiting for memory goes again once another client frees it,
/// before its own queue has drained: the waiting line, not only its own
/// reading, brings it back.
fn a_waiting_client_goes_again_when_another_frees_memory(engine: &str) {
    let server = Server::start_engine(
        engine,
        &[
            "--max-memory",
            "4194304",
            "--max-buffer",
            "67108864",
            "--log-level",
            "debug",
        ],
    );
    let each = 32 << 20;
    // The hog fills the cap by itself; then the other can queue nothing.
    let hog = Flood::start(server.addr, 1, each);
    let mut other = Flood::start(server.addr, 1, each);
    // Half a second without progress may be a busy machine, not the cap:
    // then the other's kernel buffers would take the 2 MiB below with
    // the resume broken. So first the server must say that both wait.
    eventually("both clients wait at --max-memory", || {
        memory_waiters(&server.stderr_text()) >= 2
    });
    other.push(each);
    let stuck = other.total();
    // The hog leaves with its echo unread (a reset): its memory is free.
    drop(hog);
    let deadline = Instant::now() + Duration::from_secs(60);
    while other.total() < stuck + (2 << 20) && Instant::now() < deadline {
        other.push(each);
    }
    assert!(
        other.total() >= stuck + (2 << 20),
        "the waiting client took {} bytes more after the hog left",
        other.total() - stuck
    );
    other.read_back();
}
engines!(a_waiting_client_goes_again_when_another_frees_memory: reactor, uring);

/// The readiness engine serves a client with nothing queued at the cap by
/// mirroring its input; one that reads its echo slowly makes its socket
/// take only part of each read, so it waits, is woken by its own socket
/// having room, and waits again, over and over. It must hold one place in
/// the waiting queue, not one per wait (debug builds check this every
/// turn and would end the server), and get every byte back.
#[test]
fn a_client_that_reads_slowly_at_the_cap_keeps_one_place_in_line() {
    let server = Server::start(&[
        "--max-memory",
        "4194304",
        "--max-buffer",
        "67108864",
        "--log-level",
        "debug",
    ]);
    let hog = Flood::start(server.addr, 1, 32 << 20);
    eventually("the hog waits at --max-memory", || {
        memory_waiters(&server.stderr_text()) >= 1
    });
    let slow = small_window_client(server.addr);
    slow.set_read_timeout(Some(TIMEOUT)).unwrap();
    // More than the server's kernel send buffer toward it can take
    // (`tcp_wmem` lets it grow to 4 MiB), so that its writes come up short.
    let data = Arc::new(pattern(3, 16 << 20));
    let (mut w, d) = (slow.try_clone().unwrap(), data.clone());
    let writer = thread::spawn(move || w.write_all(&d));
    let waits = || {
        server
            .stderr_text()
            .matches("] --max-memory reached")
            .count()
    };
    let hog_waits = waits();
    let mut got = Vec::new();
    let mut buf = [0; 512];
    // Slowly, until it has waited a few times or read half of it.
    while waits() < hog_waits + 3 && got.len() < data.len() / 2 {
        let n = (&slow).read(&mut buf).expect("slow client's echo");
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        thread::sleep(Duration::from_millis(1));
    }
    assert!(
        waits() >= hog_waits + 3,
        "the slow client did not wait at the cap again and again"
    );
    drop(hog);
    let start = got.len();
    got.resize(data.len(), 0);
    (&slow)
        .read_exact(&mut got[start..])
        .expect("the rest of the echo");
    assert!(got == *data, "the echo differs from what was sent");
    writer.join().unwrap().unwrap();
}

fn chat_drops_the_biggest_reader_at_the_memory_cap(engine: &str) {
    sink_is_dropped_and_watcher_kept(engine, "1048576");
}
engines!(chat_drops_the_biggest_reader_at_the_memory_cap: reactor, uring);

/// At a cap below two wake-ups' worth of the talker's input (the uring
/// engine's first pool is 64 buffers of 4 KiB), the uring engine reaches
/// the cap with the sink and the watcher holding the same bytes: the same
/// lines relayed to both, and (judged after each completion, as it was)
/// each one's last send, whose completion came behind the first receives
/// of the next wake-up. Only the kernel knows the watcher took them all
/// (`MemoryCap::victim`); without asking it, the watcher was dropped every
/// time.
fn chat_drops_the_reader_that_reads_nothing_when_both_hold_the_same(engine: &str) {
    sink_is_dropped_and_watcher_kept(engine, "524288");
}
engines!(chat_drops_the_reader_that_reads_nothing_when_both_hold_the_same: reactor, uring);

/// Chat under `--max-memory` (`max_memory` bytes): a talker floods 1000-byte
/// lines, a watcher reads everything, a sink with a small window reads
/// nothing. The sink is dropped; the watcher reads on until it sees so.
fn sink_is_dropped_and_watcher_kept(engine: &str, max_memory: &str) {
    let server = Server::start_engine(
        engine,
        &[
            "--mode",
            "chat",
            "--max-memory",
            max_memory,
            "--max-buffer",
            "8388608",
        ],
    );
    let sink = small_window_client(server.addr);
    let mut watcher = BufReader::new(server.connect());
    let mut line = String::new();
    watcher.read_line(&mut line).unwrap(); // welcome
    let mut talker = server.connect();
    // The talker talks until the sink is dropped. A fixed amount is not
    // enough: the server's kernel send buffer toward the sink grows by
    // itself up to `tcp_wmem`'s maximum (4 MiB here), so a few MB may all
    // fit in the kernel and never reach the cap. 64 MB bounds the test if
    // the server never drops anyone; then the watcher below times out.
    let dropped = Arc::new(AtomicBool::new(false));
    let stop = dropped.clone();
    let talk = thread::spawn(move || {
        let text = format!("{}\n", "x".repeat(1000));
        for _ in 0..64_000 {
            if stop.load(Ordering::Relaxed) || talker.write_all(text.as_bytes()).is_err() {
                break;
            }
        }
        talker
    });
    // The watcher reads everything; the sink reads nothing and is dropped.
    let mut lines = 0u64;
    loop {
        line.clear();
        match watcher.read_line(&mut line) {
            Ok(0) => panic!("watcher closed after {lines} lines"),
            Ok(_) => lines += 1,
            Err(e) => panic!("watcher: {e} after {lines} lines; the sink was never dropped"),
        }
        if line == "* guest-1 left\n" {
            break;
        }
    }
    dropped.store(true, Ordering::Relaxed);
    server.wait_for_log("--max-memory");
    drop(talk.join().unwrap());
    // The sink was closed by the server: after what was already in its
    // kernel buffers, it reads EOF or a reset, never a wait.
    let mut sink = sink;
    sink.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match sink.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the dropped sink was not closed: {e}"),
        }
    }
}

fn quit_while_still_sending_gets_bye_not_a_reset(engine: &str) {
    let server = Server::start_engine(engine, &["--mode", "chat"]);
    let s = server.connect();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let _ = w.write_all(b"/quit\n");
        // Keep sending after the quit: without the linger, closing with
        // this unread input makes a reset that can destroy `* bye`.
        let junk = vec![b'j'; 64 * 1024];
        for _ in 0..32 {
            if w.write_all(&junk).is_err() {
                break;
            }
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    // Read to the end: a clean EOF, not a reset, must follow `* bye`.
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    let end = loop {
        match (&s).read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    writer.join().unwrap();
    assert_eq!(got, b"* welcome guest-1\n* bye\n");
    assert!(end.is_ok(), "the connection ended with {end:?}, not EOF");
}
engines!(quit_while_still_sending_gets_bye_not_a_reset: reactor, uring);

fn a_who_flood_is_answered_in_full_and_others_are_served_meanwhile(engine: &str) {
    let server = Server::start_engine(engine, &["--mode", "chat"]);
    // 40 clients with 32-byte names make each answer about 1.4 KB.
    let mut crowd = Vec::new();
    for i in 0..40 {
        let mut c = BufReader::new(server.connect());
        writeln!(c.get_mut(), "/nick {:0>32}", i).unwrap();
        crowd.push(c);
    }
    // A small window: the answers wait in the server, not in the kernel.
    let attacker = small_window_client(server.addr);
    let mut line = String::new();
    let mut watcher = BufReader::new(server.connect());
    let talker = server.connect();
    let flood = b"/who\n".repeat(64 * 1024 / 5);
    let count = flood.len() / 5;
    let mut a = attacker.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut r = BufReader::new(a.try_clone().unwrap());
        let mut answers = 0;
        let mut l = Vec::new();
        while answers < count {
            if answers % 1000 == 0 {
                // A slow reader: it still gets everything.
                thread::sleep(Duration::from_millis(20));
            }
            l.clear();
            assert!(r.read_until(b'\n', &mut l).unwrap() > 0, "attacker closed");
            if l.starts_with(b"* online: ") {
                answers += 1;
            }
        }
        a.flush().unwrap();
        answers
    });
    (&attacker).write_all(&flood).unwrap();
    // Others' lines are relayed while the flood is answered.
    (&talker).write_all(b"still here\n").unwrap();
    loop {
        line.clear();
        assert!(watcher.read_line(&mut line).unwrap() > 0);
        if line.ends_with(": still here\n") {
            break;
        }
    }
    assert_eq!(reader.join().unwrap(), count, "every /who answered");
}
engines!(a_who_flood_is_answered_in_full_and_others_are_served_meanwhile: reactor, uring);

#[test]
fn a_paused_client_is_not_read_again_before_its_queue_drained_to_half() {
    // Trace logs show every read and every pause. The client writes 16 MiB
    // through a 4 MiB buffer and reads slowly, so reading pauses; then it
    // reads fast, so whole write budgets drain while the queue is still
    // above half and put the connection on the ready list while paused
    // (that retry must not read). How many retries happen is the kernel's
    // business, so only the reads are asserted.
    let server = Server::start(&["--max-buffer", "4194304", "--log-level", "trace"]);
    let s = server.connect();
    let data = Arc::new(pattern(5, 16 << 20));
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let writer = thread::spawn(move || w.write_all(&d).unwrap());
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0; 1 << 20];
    while got.len() < data.len() {
        // Slowly at first, so the queue fills and reading pauses; then
        // fast, so whole write budgets drain while it is still paused and
        // put it on the ready list.
        let slow = got.len() < 6 << 20;
        let want = if slow { 16 * 1024 } else { buf.len() };
        let n = (&s).read(&mut buf[..want]).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
        if slow {
            thread::sleep(Duration::from_millis(10));
        }
    }
    writer.join().unwrap();
    assert!(got == *data);
    let log = server.stderr_text();
    let mut paused = false;
    let (mut pauses, mut retries_while_paused) = (0, 0);
    for l in log.lines().filter(|l| l.contains("[conn ")) {
        if l.contains("output full: reading paused") {
            paused = true;
            pauses += 1;
        } else if l.contains("output drained: reading again") {
            paused = false;
        } else if paused && l.contains("budget spent") {
            retries_while_paused += 1;
        } else if paused && l.contains("] read ") {
            panic!("read while paused: {l}");
        }
    }
    eprintln!("{pauses} pauses, {retries_while_paused} ready-list entries while paused");
    assert!(pauses > 0, "the client was never paused");
}

#[test]
fn churn_with_a_long_idle_timeout_leaves_no_timers_behind() {
    let server = Server::start(&["--idle-timeout", "3600", "--log-level", "debug"]);
    let before = server.rss_kib();
    for _ in 0..5000 {
        let s = server.connect();
        drop(s);
    }
    // Each closed connection left an idle entry due in an hour; they are
    // tidied once they could outnumber the live ones.
    server.wait_for_log("timers: tidied");
    let grown = server.rss_kib().saturating_sub(before);
    assert!(grown < 8 * 1024, "RSS grew {grown} KiB");
}

fn a_client_turned_away_while_sending_gets_the_line_and_an_eof(engine: &str) {
    let server = Server::start_engine(engine, &["--mode", "chat", "--max-connections", "1"]);
    let mut first = BufReader::new(server.connect());
    let mut line = String::new();
    first.read_line(&mut line).unwrap();
    for _ in 0..5 {
        let s = server.connect();
        // Sent before the server gets round to accepting it: unread input
        // at the close would make a reset that can destroy the line.
        (&s).write_all(b"hello, is there room?\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0; 256];
        let end = loop {
            match (&s).read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        assert_eq!(got, b"* error: server full\n");
        assert!(end.is_ok(), "ended with {end:?}");
    }
}
engines!(a_client_turned_away_while_sending_gets_the_line_and_an_eof: reactor, uring);

/// While a client that never reads holds the cap, others connect, write
/// until they wait for memory, and close, round after round: the queue of
/// waiting connections drops their entries instead of growing by one a
/// round. The rounds come over a Unix socket, where a client with nothing
/// queued waits at once (the readiness engine cannot peek there to serve
/// it without memory); each round's close must be seen although the
/// connection is waiting (neither read nor written).
fn clients_that_wait_and_close_leave_no_entries_behind(engine: &str) {
    let path = std::env::temp_dir().join(format!(
        "reactor-test-memory-{}-{engine}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let server = Server::start_engine(
        engine,
        &[
            "--max-memory",
            "1048576",
            "--max-buffer",
            "67108864",
            "--log-level",
            "debug",
            "--unix",
            path.to_str().unwrap(),
        ],
    );
    let waits = || server.stderr_text().matches("--max-memory reached").count();
    let _hog = Flood::start(server.addr, 1, 8 << 20);
    // Half a second without progress may be a busy machine, not the cap.
    eventually("the hog holds the cap", || waits() > 0);
    // More rounds than the queue keeps before tidying (2 x live + 64).
    for round in 0..100 {
        let before = waits();
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(&[b'x'; 4096]).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while waits() == before {
            assert!(Instant::now() < deadline, "round {round} never waited");
            thread::sleep(Duration::from_millis(2));
        }
    }
    server.wait_for_log("stale entries of the waiting queue");
    let tidied: usize = server
        .stderr_text()
        .lines()
        .filter_map(|l| l.split("memory: tidied ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse::<usize>().ok())
        .sum();
    let _ = std::fs::remove_file(&path);
    assert!(tidied >= 64, "only {tidied} entries tidied");
}
engines!(clients_that_wait_and_close_leave_no_entries_behind: reactor, uring);
