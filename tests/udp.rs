//! UDP echo on the same loop as TCP: datagrams back whole, a bounded send
//! queue, and the client tools over UDP. The server's tests run against
//! both engines that serve `--udp` (reactor, uring).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

fn udp_server(engine: &str, extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--log-level", "info", "--udp", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut server = Server::start_engine(engine, &args);
    let line = server.next_stdout_line();
    let addr = line
        .strip_prefix("listening on udp ")
        .unwrap_or_else(|| panic!("second line: {line:?}"))
        .parse()
        .unwrap();
    (server, addr)
}

/// Sends `data` and waits for it to come back, resending a few times: UDP
/// may drop a datagram even on loopback when a receive buffer is full.
fn udp_roundtrip(server: SocketAddr, data: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0; 65_536];
    for _ in 0..40 {
        s.send(data).unwrap();
        if let Ok(n) = s.recv(&mut buf) {
            buf.truncate(n);
            return buf;
        }
    }
    panic!("no reply to a {}-byte datagram", data.len());
}

fn tcp_line_comes_first_then_udp(engine: &str) {
    let (server, addr) = udp_server(engine, &[]);
    assert!(server.first.starts_with("listening on 127.0.0.1:"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
}
engines!(tcp_line_comes_first_then_udp: reactor, uring);

fn datagrams_of_every_size_come_back_whole_from_many_sockets(engine: &str) {
    let (server, addr) = udp_server(engine, &[]);
    let mut clients = Vec::new();
    for i in 0..24u64 {
        clients.push(thread::spawn(move || {
            for size in [1, 1400, 65_507] {
                let data = pattern(i * 3 + size as u64, size);
                let got = udp_roundtrip(addr, &data);
                assert_eq!(
                    got.len(),
                    size,
                    "client {i}: a {size}-byte datagram was cut"
                );
                assert!(got == data, "client {i}: {size}-byte datagram changed");
            }
        }));
    }
    for c in clients {
        c.join().unwrap();
    }
    // TCP is served by the same loop meanwhile.
    let data = Arc::new(pattern(1, 10_000));
    assert!(echo_roundtrip(&server.connect(), data.clone()) == *data);
}
engines!(datagrams_of_every_size_come_back_whole_from_many_sockets: reactor, uring);

/// On loopback a UDP send almost never blocks (a full receiver drops the
/// datagram instead), so this checks the server's memory as a whole under
/// a flood; the queue's own bound is unit-tested in src/server/udp.rs.
fn a_flood_that_is_never_read_does_not_grow_the_server(engine: &str) {
    let (server, addr) = udp_server(engine, &["--max-buffer", "1048576"]);
    let before = server.rss_kib();
    // 16 sockets send 64 KiB datagrams as fast as they can and never read
    // their replies.
    let mut flooders = Vec::new();
    for _ in 0..16 {
        flooders.push(thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(addr).unwrap();
            let data = vec![7u8; 65_000];
            for _ in 0..800 {
                let _ = s.send(&data);
            }
            s // kept open (and unread) until joined
        }));
    }
    let sockets: Vec<UdpSocket> = flooders.into_iter().map(|f| f.join().unwrap()).collect();
    let after = server.rss_kib();
    // 800 MiB went past; the server may hold its 1 MiB queue, plus change.
    assert!(
        after < before + 8 * 1024,
        "server RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(udp_roundtrip(addr, b"still here"), b"still here");
    drop(sockets);
    // The final stats line counts datagrams.
    server.terminate();
    server.wait_for_log("udp_in=");
    let stats = server.stderr_text();
    let line = stats.lines().rev().find(|l| l.contains("udp_in=")).unwrap();
    let udp_in: u64 = line
        .split("udp_in=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(udp_in >= 1, "{line}");
}
engines!(a_flood_that_is_never_read_does_not_grow_the_server: reactor, uring);

fn connect_sends_each_line_as_one_datagram(engine: &str) {
    let (_server, addr) = udp_server(engine, &[]);
    let out = run_bounded(
        &["connect", "--udp", &addr.to_string()],
        b"first line\nsecond\n",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first line\nsecond\n");
}
engines!(connect_sends_each_line_as_one_datagram: reactor, uring);

fn load_runs_echo_over_udp(engine: &str) {
    let (_server, addr) = udp_server(engine, &[]);
    let (code, v) = load_json(&[
        "--udp",
        &addr.to_string(),
        "-c",
        "20",
        "--pipeline",
        "4",
        "-d",
        "1",
        "--warmup",
        "0.2",
    ]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["connections_opened"], 20);
    assert!(v["messages"].as_u64().unwrap() > 0);
    assert!(v["datagrams_lost"].as_u64().is_some());
    assert_eq!(v["errors"]["mismatch"], 0);
    // Live progress over UDP too: a 1.2 s run in 1 s intervals.
    let intervals = v["intervals"].as_array().unwrap();
    assert!((1..=3).contains(&intervals.len()), "{v}");
    assert!(intervals[0]["messages"].as_u64().unwrap() > 0, "{v}");
}
engines!(load_runs_echo_over_udp: reactor, uring);

#[test]
fn load_over_udp_with_nobody_there_fails() {
    let free = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, v) = load_json(&[
        "--udp",
        &free.to_string(),
        "-c",
        "2",
        "-d",
        "0.5",
        "--warmup",
        "0",
        "--timeout",
        "1",
    ]);
    assert_eq!(code, Some(1), "{v}");
    assert!(v["errors"]["total"].as_u64().unwrap() > 0, "{v}");
}

fn a_deep_udp_pipeline_keeps_every_socket_served(engine: &str) {
    // 100 sockets x 32 datagrams in flight: replies come back as fast as
    // they are answered, and one socket could keep the loop to itself.
    // Each must get its turn, and the run must measure, not stall. (The
    // window is long enough for a debug build on a loaded machine.)
    let (_server, addr) = udp_server(engine, &[]);
    let (code, v) = load_json(&[
        "--udp",
        &addr.to_string(),
        "-c",
        "100",
        "--pipeline",
        "32",
        "-s",
        "1400",
        "-d",
        "3",
        "--warmup",
        "0.5",
    ]);
    assert_eq!(code, Some(0), "{v}");
    assert!(v["messages"].as_u64().unwrap() > 100, "{v}");
    let secs = v["measured_secs"].as_f64().unwrap();
    assert!((2.9..=3.1).contains(&secs), "{v}");
    assert_eq!(v["errors"]["total"], 0);
}
engines!(a_deep_udp_pipeline_keeps_every_socket_served: reactor, uring);
