//! What the short-read shortcut can save at most: the price of one `read`
//! that finds the socket empty (`WouldBlock`), next to the price of one
//! 64-byte message sent and received on loopback.
//!
//! docs/benchmarks.md uses these figures to bound what skipping the
//! reference's `EAGAIN` read can buy. Ignored by default; run pinned:
//!
//! ```text
//! taskset -c 0 cargo test --release --test syscall_cost -- --ignored --nocapture
//! ```

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// A connected loopback pair: (client, server side).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// Nanoseconds per `read` on an empty non-blocking socket; every call is
/// checked to have returned `WouldBlock`.
fn empty_read_ns(calls: u32) -> f64 {
    let (_client, server) = pair();
    server.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut s = &server;
    let start = Instant::now();
    for _ in 0..calls {
        match s.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("expected WouldBlock from an empty socket, got {other:?}"),
        }
    }
    start.elapsed().as_nanos() as f64 / calls as f64
}

/// Nanoseconds per 64-byte message written on one end of a loopback
/// connection and read whole on the other (both ends in this thread, so
/// no sleeping and no waking: the kernel's send and receive work only).
fn message_ns(messages: u32) -> f64 {
    let (mut client, mut server) = pair();
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let start = Instant::now();
    for _ in 0..messages {
        client.write_all(&msg).unwrap();
        server.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    }
    start.elapsed().as_nanos() as f64 / messages as f64
}

#[test]
fn an_empty_socket_says_would_block_and_messages_arrive_whole() {
    // The measurement's premises, small enough for every `cargo test`:
    // both functions panic if a read does not say `WouldBlock` or a
    // message comes back different.
    empty_read_ns(1_000);
    message_ns(1_000);
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture, see docs/benchmarks.md"]
fn cost_of_an_empty_read() {
    for round in 1..=3 {
        let empty = empty_read_ns(1_000_000);
        let message = message_ns(200_000);
        println!(
            "round {round}: read -> WouldBlock {empty:.0} ns; \
             64-byte message send + receive {message:.0} ns; ratio {:.3}",
            empty / message
        );
    }
}
