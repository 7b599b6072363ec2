//! Chat fan-out: one sender, many receivers, every line checked.
//!
//! The small version runs with `cargo test`. The measured one is ignored
//! by default; docs/benchmarks.md runs it pinned:
//!
//! ```text
//! cargo build --release
//! taskset -c 1 cargo test --release --test fanout -- --ignored --nocapture
//! ```

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use mio::{Events, Interest, Poll, Token};

/// Connects `receivers` chat clients and one sender, sends `lines`
/// numbered lines of 64 bytes, and waits until every receiver has every
/// line, whole and in order. Server notices (`* ...`) between them are
/// allowed: the threads engine may deliver other clients' `joined` lines
/// after the sender's. Returns (seconds, server CPU seconds) for the
/// sending part.
fn fan_out(server: &Server, receivers: usize, lines: usize) -> (f64, f64) {
    let mut poll = Poll::new().unwrap();
    let mut socks = Vec::with_capacity(receivers);
    for i in 0..receivers {
        let s = server.connect();
        s.set_nonblocking(true).unwrap();
        let mut s = mio::net::TcpStream::from_std(s);
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)
            .unwrap();
        socks.push(s);
    }
    let mut sender = server.connect();
    let mut welcome = [0; 64];
    let n = sender.read(&mut welcome).unwrap();
    let name = std::str::from_utf8(&welcome[..n])
        .unwrap()
        .strip_prefix("* welcome ")
        .expect("welcome line")
        .trim_end()
        .to_string();
    let prefix = format!("{name}: ");
    // Each receiver first gets its welcome and the joins after it; skip
    // those by reading until the sender's join notice.
    let joined = format!("* {name} joined\n").into_bytes();
    let mut seen: Vec<Vec<u8>> = vec![Vec::new(); receivers];
    let mut tails: Vec<Vec<u8>> = vec![Vec::new(); receivers];
    let mut ready = vec![false; receivers];
    let mut waiting = receivers;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0; 256 * 1024];
    let deadline = Instant::now() + TIMEOUT;
    // Phase 1: everyone has seen the sender join.
    while waiting > 0 {
        assert!(
            Instant::now() < deadline,
            "receivers never saw the sender join"
        );
        read_ready(&mut poll, &mut events, &socks, &mut buf, |i, data| {
            if ready[i] {
                tails[i].extend_from_slice(data);
                return;
            }
            seen[i].extend_from_slice(data);
            if let Some(at) = find(&seen[i], &joined) {
                tails[i] = seen[i].split_off(at + joined.len());
                ready[i] = true;
                waiting -= 1;
            }
        });
    }
    // Phase 2: send, and check what arrives line by line.
    let cpu0 = server.cpu_ticks();
    let started = Instant::now();
    let all: String = (0..lines).map(numbered).collect();
    let writer = thread::spawn(move || {
        sender.write_all(all.as_bytes()).unwrap();
        sender
    });
    let mut next = vec![0usize; receivers];
    // Checked in place, without building the expected line: at millions
    // of lines a second the check must not be what is measured.
    let expect = |i: usize, next: &mut usize, got: &[u8]| {
        assert!(*next < lines, "receiver {i}: a line too many");
        let body = got.strip_prefix(prefix.as_bytes()).unwrap_or(&[]);
        let number = body.get(..6).and_then(|d| std::str::from_utf8(d).ok());
        let whole = body.len() == 64 && body[6..63].iter().all(|&b| b == b'x');
        assert!(
            whole && number.and_then(|d| d.parse().ok()) == Some(*next),
            "receiver {i}: expected line {next}, got {:?}",
            String::from_utf8_lossy(got)
        );
        *next += 1;
    };
    for (i, tail) in tails.iter_mut().enumerate() {
        take_lines(tail, |got| expect(i, &mut next[i], got));
    }
    let mut done = next.iter().filter(|&&n| n == lines).count();
    while done < receivers {
        assert!(
            Instant::now() < deadline + TIMEOUT,
            "only {done} of {receivers} receivers got every line"
        );
        read_ready(&mut poll, &mut events, &socks, &mut buf, |i, data| {
            let before = next[i];
            tails[i].extend_from_slice(data);
            take_lines(&mut tails[i], |got| expect(i, &mut next[i], got));
            if before < lines && next[i] == lines {
                done += 1;
            }
        });
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = (server.cpu_ticks() - cpu0) as f64 / 100.0;
    drop(writer.join().unwrap());
    assert!(next.iter().all(|&n| n == lines));
    (secs, cpu)
}

/// Line `k` of the sender: its number in 6 digits, padding, newline; 64
/// bytes in all.
fn numbered(k: usize) -> String {
    format!("{k:06}{}\n", "x".repeat(57))
}

/// Hands every complete line in `tail` that is not a server notice
/// (`* ...`) to `each`, and keeps only the incomplete rest.
fn take_lines(tail: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    let mut start = 0;
    while let Some(end) = tail[start..].iter().position(|&b| b == b'\n') {
        let got = &tail[start..start + end + 1];
        start += end + 1;
        if !got.starts_with(b"* ") {
            each(got);
        }
    }
    tail.drain(..start);
}

/// Waits up to 100 ms for readable receivers and reads each to
/// `WouldBlock`, handing every chunk to `on_bytes(receiver, bytes)`.
fn read_ready(
    poll: &mut Poll,
    events: &mut Events,
    socks: &[mio::net::TcpStream],
    buf: &mut [u8],
    mut on_bytes: impl FnMut(usize, &[u8]),
) {
    poll.poll(events, Some(Duration::from_millis(100))).unwrap();
    for ev in events.iter() {
        let i = ev.token().0;
        loop {
            match (&socks[i]).read(buf) {
                Ok(0) => panic!("receiver {i} was closed"),
                Ok(n) => on_bytes(i, &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("receiver {i}: {e}"),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn every_receiver_gets_every_line_in_order() {
    let server = Server::start(&["--mode", "chat", "--log-level", "warn"]);
    fan_out(&server, 200, 500);
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture, see docs/benchmarks.md"]
fn measure_a_64_byte_line_to_1000_clients() {
    // The threads engine writes every line to every recipient on its own,
    // so 20,000 lines (20 million writes) would outlast the test's window.
    let engines: [(&str, &[usize]); 2] =
        [("reactor", &[1, 2_000, 20_000]), ("threads", &[1, 2_000])];
    for (engine, line_counts) in engines {
        for &lines in line_counts {
            let server = Server::start_pinned(
                0,
                &[
                    "--engine",
                    engine,
                    "--mode",
                    "chat",
                    "--log-level",
                    "warn",
                    "--max-buffer",
                    "67108864",
                ],
            );
            let (secs, cpu) = fan_out(&server, 1000, lines);
            let delivered = (lines * 1000) as f64;
            println!(
                "fan-out ({engine}): {lines} lines x 1000 receivers = {delivered} deliveries \
                 in {secs:.3} s: {:.0} lines/s delivered, server CPU {cpu:.2} s = {:.0} ns \
                 per delivered line",
                delivered / secs,
                cpu * 1e9 / delivered
            );
        }
    }
}
