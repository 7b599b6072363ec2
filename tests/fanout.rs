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

/// Connects `receivers` chat clients and one sender, sends `lines` lines of
/// 64 bytes, and waits until every receiver has every line, in order.
/// Returns (seconds, server CPU seconds) for the sending part.
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
    let mut text = vec![b'x'; 63];
    text.push(b'\n');
    let expected_line: Vec<u8> = [prefix.as_bytes(), &text].concat();
    // Each receiver first gets its welcome and the joins after it; skip
    // those by reading until the sender's join notice.
    let joined = format!("* {name} joined\n").into_bytes();
    let mut seen: Vec<Vec<u8>> = vec![Vec::new(); receivers];
    let mut got: Vec<usize> = vec![0; receivers];
    let mut ready = vec![false; receivers];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0; 256 * 1024];
    let deadline = Instant::now() + TIMEOUT;
    // Phase 1: everyone has seen the sender join.
    while ready.iter().any(|r| !r) {
        assert!(
            Instant::now() < deadline,
            "receivers never saw the sender join"
        );
        read_ready(&mut poll, &mut events, &socks, &mut buf, |i, data| {
            if ready[i] {
                got[i] += data.len();
                return;
            }
            seen[i].extend_from_slice(data);
            if let Some(at) = find(&seen[i], &joined) {
                ready[i] = true;
                got[i] = seen[i].len() - (at + joined.len());
            }
        });
    }
    // Phase 2: send, and count what arrives.
    let cpu0 = server.cpu_ticks();
    let started = Instant::now();
    let all = text.repeat(lines);
    let writer = thread::spawn(move || {
        sender.write_all(&all).unwrap();
        sender
    });
    let want = expected_line.len() * lines;
    let mut tails: Vec<Vec<u8>> = vec![Vec::new(); receivers];
    let mut done = got.iter().filter(|&&g| g >= want).count();
    while done < receivers {
        assert!(
            Instant::now() < deadline + TIMEOUT,
            "only {done} of {receivers} receivers got every line"
        );
        read_ready(&mut poll, &mut events, &socks, &mut buf, |i, data| {
            let before = got[i];
            got[i] += data.len();
            // Check the stream line by line as it comes.
            tails[i].extend_from_slice(data);
            let whole = tails[i].len() / expected_line.len() * expected_line.len();
            for line in tails[i][..whole].chunks(expected_line.len()) {
                assert_eq!(line, &expected_line[..], "receiver {i}");
            }
            tails[i].drain(..whole);
            if before < want && got[i] >= want {
                done += 1;
            }
        });
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = (server.cpu_ticks() - cpu0) as f64 / 100.0;
    drop(writer.join().unwrap());
    assert!(got.iter().all(|&g| g == want), "a receiver got extra bytes");
    (secs, cpu)
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
    for lines in [1, 2_000, 20_000] {
        let server = Server::start_pinned(
            0,
            &[
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
            "fan-out: {lines} lines x 1000 receivers = {delivered} deliveries in {secs:.3} s: \
             {:.0} lines/s delivered, server CPU {cpu:.2} s = {:.0} ns per delivered line",
            delivered / secs,
            cpu * 1e9 / delivered
        );
    }
}
