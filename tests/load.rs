//! `reactor load` end to end, against the real server and against test
//! peers that misbehave on purpose.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn echo_server() -> Server {
    Server::start(&["--log-level", "warn"])
}

/// Runs `reactor load ADDR ARGS --json` against a fresh echo server,
/// checks that it exited 0 and returns its report.
fn load_ok(engine: &str, args: &[&str]) -> Value {
    let server = echo_server();
    let addr = server.addr.to_string();
    let mut all = vec![addr.as_str(), "--engine", engine];
    all.extend_from_slice(args);
    let (code, v) = load_json(&all);
    assert_eq!(code, Some(0), "{v}");
    v
}

fn echo_ping_pong_verifies_and_reports_latency(engine: &str) {
    let v = load_ok(engine, &["-c", "20", "-d", "1", "--warmup", "0.2"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["workload"], "echo");
    assert_eq!(v["connections_opened"], 20);
    assert_eq!(v["errors"]["total"], 0);
    assert!(v["messages"].as_u64().unwrap() > 0, "{v}");
    assert!(v["msgs_per_sec"].as_f64().unwrap() > 0.0);
    let (bytes, msgs) = (
        v["bytes_per_sec"].as_f64().unwrap(),
        v["msgs_per_sec"].as_f64().unwrap(),
    );
    assert!(
        (bytes / (msgs * 64.0) - 1.0).abs() < 1e-3,
        "{bytes} B/s, {msgs} msg/s"
    );
    let lat = &v["latency_us"];
    let (p50, p99, max) = (
        lat["p50"].as_f64().unwrap(),
        lat["p99"].as_f64().unwrap(),
        lat["max"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{lat}");
    assert!(v["connect_latency_us"]["p50"].as_f64().unwrap() > 0.0);
    assert_eq!(v["settings"]["connections"], 20);
    assert_eq!(v["settings"]["pipeline"], 1);
    assert_eq!(v["settings"]["engine"], engine);
}
loaders!(echo_ping_pong_verifies_and_reports_latency: reactor, uring);

fn pipelined_echo_over_several_threads(engine: &str) {
    let v = load_ok(
        engine,
        &[
            "-c",
            "30",
            "--pipeline",
            "16",
            "--threads",
            "2",
            "-s",
            "1000",
            "-d",
            "1",
            "--warmup",
            "0",
        ],
    );
    assert_eq!(v["connections_opened"], 30);
    assert!(v["messages"].as_u64().unwrap() > 0);
    assert_eq!(v["errors"]["total"], 0, "{v}");
}
loaders!(pipelined_echo_over_several_threads: reactor, uring);

fn open_loop_rate_sends_on_schedule(engine: &str) {
    let v = load_ok(
        engine,
        &["-c", "10", "--rate", "100", "-d", "2", "--warmup", "0.5"],
    );
    // 10 connections x 100/s x 2 s = 2,000 on schedule. The schedule is a
    // ceiling: open loop never sends ahead of it. How much of it a client
    // gets done is a matter of timing on a busy machine (it once got under
    // 500 with both cores compiling), so the floor only says it ran.
    let n = v["messages"].as_u64().unwrap();
    assert!((10..=2_100).contains(&n), "{n} messages");
}
loaders!(open_loop_rate_sends_on_schedule: reactor, uring);

#[test]
fn hold_ten_thousand_connections() {
    let v = load_ok("reactor", &["--workload", "hold", "-c", "10000", "-d", "1"]);
    assert_eq!(v["connections_opened"], 10_000);
    assert_eq!(v["survived"], 10_000);
    // One round trip before the hold and one after, on every connection.
    assert_eq!(v["messages"], 20_000);
    assert!(v["open_secs"].as_f64().unwrap() > 0.0);
}

#[test]
fn churn_opens_and_closes_connections() {
    let v = load_ok(
        "reactor",
        &[
            "--workload",
            "churn",
            "-c",
            "8",
            "-d",
            "1",
            "--warmup",
            "0.2",
        ],
    );
    let cycles = v["cycles"].as_u64().unwrap();
    assert!(cycles > 8, "{v}");
    assert_eq!(v["messages"].as_u64().unwrap(), cycles);
    assert!(v["connections_per_sec"].as_f64().unwrap() > 0.0);
    assert!(v["connect_latency_us"]["p50"].as_f64().unwrap() > 0.0);
}

#[test]
fn connect_rate_paces_new_connections() {
    let v = load_ok(
        "reactor",
        &[
            "--workload",
            "churn",
            "-c",
            "4",
            "--connect-rate",
            "50",
            "-d",
            "1",
            "--warmup",
            "0",
        ],
    );
    // At most 50 a second (plus the first), however fast the machine.
    let opened = v["connections_opened"].as_u64().unwrap();
    assert!((5..=60).contains(&opened), "{opened} connections");
}

#[test]
fn source_addresses_are_used() {
    let v = load_ok(
        "reactor",
        &[
            "-c",
            "6",
            "--source-ip",
            "127.0.0.2,127.0.0.3",
            "-d",
            "0.5",
            "--warmup",
            "0",
        ],
    );
    assert_eq!(v["settings"]["source_ip"][1], "127.0.0.3");
}

/// A peer that echoes faithfully except for one byte.
fn corrupting_peer(flip_at: usize) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let mut flipped = false;
        while !flag.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let first = !flipped;
            flipped = true;
            thread::spawn(move || {
                let mut seen = 0;
                let mut buf = [0; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if first && (seen..seen + n).contains(&flip_at) {
                        buf[flip_at - seen] ^= 0x01;
                    }
                    seen += n;
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, stop)
}

fn one_flipped_byte_is_reported_and_fails_the_run(engine: &str) {
    let (addr, stop) = corrupting_peer(1000);
    let addr = addr.to_string();
    let (code, v) = load_json(&[
        &addr, "--engine", engine, "-c", "3", "-d", "1", "--warmup", "0",
    ]);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"]["mismatch"], 1, "{v}");
    let what = v["failures"][0].as_str().unwrap();
    // Byte 1000 of the stream is byte 40 of message 15 (64-byte messages).
    assert!(what.contains("message 15 byte 40"), "{what}");
}
loaders!(one_flipped_byte_is_reported_and_fails_the_run: reactor, uring);

fn the_table_names_the_failure_too(engine: &str) {
    let (addr, stop) = corrupting_peer(10);
    let out = load(&[
        &addr.to_string(),
        "--engine",
        engine,
        "-c",
        "1",
        "-d",
        "0.5",
        "--warmup",
        "0",
    ]);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mismatch 1"), "{text}");
    assert!(text.contains("result        FAILED"), "{text}");
}
loaders!(the_table_names_the_failure_too: reactor, uring);

fn a_server_that_hangs_up_is_counted(engine: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        // Echo one message, then hang up.
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0; 64];
        if s.read_exact(&mut buf).is_ok() {
            let _ = s.write_all(&buf);
        }
    });
    let (code, v) = load_json(&[
        &addr.to_string(),
        "--engine",
        engine,
        "-c",
        "1",
        "-d",
        "1",
        "--warmup",
        "0",
    ]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["errors"]["closed"], 1, "{v}");
    let what = v["failures"][0].as_str().unwrap();
    assert!(what.contains("closed by the server"), "{what}");
}
loaders!(a_server_that_hangs_up_is_counted: reactor, uring);

fn nobody_listening_is_a_connect_failure(engine: &str) {
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, v) = load_json(&[
        &free.to_string(),
        "--engine",
        engine,
        "-c",
        "5",
        "-d",
        "0.5",
        "--warmup",
        "0",
    ]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["connections_opened"], 0);
    assert_eq!(v["errors"]["connect"], 5, "{v}");
}
loaders!(nobody_listening_is_a_connect_failure: reactor, uring);

fn a_peer_that_never_answers_times_out(engine: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepted by the kernel's backlog, never read.
    let (code, v) = load_json(&[
        &addr.to_string(),
        "--engine",
        engine,
        "-c",
        "2",
        "-d",
        "0.5",
        "--warmup",
        "0",
        "--timeout",
        "1",
    ]);
    drop(listener);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["errors"]["timeout"], 2, "{v}");
}
loaders!(a_peer_that_never_answers_times_out: reactor, uring);

#[test]
fn the_open_file_limit_is_named_before_it_is_reached() {
    let server = echo_server();
    // One load process with 64 descriptors is asked for 200 connections:
    // it says so before opening any, instead of failing part-way.
    let out = run_program_bounded(
        "sh",
        &[
            "-c",
            "ulimit -n 64; exec \"$0\" load \"$1\" --workload hold -c 200 -d 0.2 --processes 1 --json",
            bin(),
            &server.addr.to_string(),
        ],
        b"",
        LOAD_LIMIT,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("RLIMIT_NOFILE"), "{why}");
    assert!(why.contains("more processes"), "{why}");
}

/// `--engine auto`, the default: the uring loop for echo over streams
/// where io_uring can run, the mio loop for everything else; the report
/// names the one that ran.
#[test]
fn the_default_engine_is_uring_for_echo_where_it_can_run_and_reactor_otherwise() {
    let server = echo_server();
    let addr = server.addr.to_string();
    let (code, echo) = load_json(&[&addr, "-c", "4", "-d", "0.5", "--warmup", "0"]);
    assert_eq!(code, Some(0), "{echo}");
    let uring = loader_available("uring");
    let expected = if uring { "uring" } else { "reactor" };
    assert_eq!(echo["settings"]["engine"], expected, "{echo}");
    assert!(echo["messages"].as_u64().unwrap() > 0, "{echo}");
    let (code, hold) = load_json(&[&addr, "--workload", "hold", "-c", "4", "-d", "0.2"]);
    assert_eq!(code, Some(0), "{hold}");
    assert_eq!(hold["settings"]["engine"], "reactor", "{hold}");
}

#[test]
fn flags_that_do_not_go_together_exit_two() {
    for args in [
        vec!["--workload", "hold", "--udp", "127.0.0.1:9"],
        vec!["--source-ip", "10.1.2.3"],
        vec!["-c", "0"],
        vec!["--pipeline", "0"],
        vec!["--udp", "127.0.0.1:9", "-s", "4"],
        vec!["--timeout", "0"],
        vec!["--workload", "storm"],
        vec!["--engine", "uring", "--workload", "hold"],
        vec!["--engine", "uring", "--udp", "127.0.0.1:9"],
        vec!["--engine", "epoll"],
    ] {
        let out = load(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn a_server_that_stops_accepting_ends_the_opening_phase() {
    // A listener with a one-slot backlog that never accepts: the kernel
    // completes a couple of handshakes, then drops every further SYN.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(1).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let started = std::time::Instant::now();
    let (code, v) = load_json(&[
        &addr.to_string(),
        "--workload",
        "hold",
        "-c",
        "2000",
        "-d",
        "0.2",
        "--timeout",
        "1",
    ]);
    drop(socket);
    assert_eq!(code, Some(1), "{v}");
    // Without the stop, 2000 connects 512 at a time at 1 s each would
    // take several seconds more; with it the run gives up after about one
    // timeout of no progress.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(v["connections_not_opened"].as_u64().unwrap() > 0, "{v}");
    let failures = v["failures"].to_string();
    assert!(failures.contains("stopped accepting"), "{failures}");
}

/// An echo peer that takes its input slowly: a small receive buffer, read
/// a little at a time with a pause between reads, so what the load tool
/// sends piles up in its send buffer and its sends come back short. Set on
/// the listener, so every accepted socket has them from the handshake: the
/// small buffer (a small window) and a small MSS. The MSS is what makes
/// the load tool's send buffer small: the kernel sizes it from the peer's
/// segment size and the initial window, about 730 KiB with loopback's
/// 64 KiB segments (`ss -tm`), which a `--pipeline 8 -s 65536` burst
/// (512 KiB) never fills: without the small MSS no send came back short
/// (counted in the uring loop: none in 2 s; with it, 14).
fn slow_reading_peer() -> (SocketAddr, Arc<AtomicBool>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_tcp_mss(1024).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(16).unwrap();
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        while !flag.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            thread::spawn(move || {
                let mut buf = [0; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            });
        }
    });
    (addr, stop)
}

fn short_sends_to_a_slow_reader_resume_where_they_stopped(engine: &str) {
    let (addr, stop) = slow_reading_peer();
    let (code, v) = load_json(&[
        &addr.to_string(),
        "--engine",
        engine,
        "-s",
        "65536",
        "--pipeline",
        "8",
        "-c",
        "2",
        "-d",
        "2",
        "--warmup",
        "0",
        // A message takes 64 reads with a pause after each: generous.
        "--timeout",
        "30",
    ]);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["errors"]["total"], 0, "{v}");
    assert!(v["messages"].as_u64().unwrap() > 0, "{v}");
}
loaders!(short_sends_to_a_slow_reader_resume_where_they_stopped: reactor, uring);

fn replies_that_outrun_the_receive_pool_all_arrive(engine: &str) {
    // 200 connections x 16 messages x 4 KiB: 12.8 MiB of replies in
    // flight, far more than the uring loop's first receive buffers
    // (8 x 64 KiB), so its multishot receives run out of buffers
    // (ENOBUFS, which ends them) again and again, and each must be armed
    // again or its connection hears nothing more and times out.
    let v = load_ok(
        engine,
        &[
            "-c",
            "200",
            "--pipeline",
            "16",
            "-s",
            "4096",
            "-d",
            "2",
            "--warmup",
            "0",
        ],
    );
    assert_eq!(v["connections_opened"], 200, "{v}");
    assert_eq!(v["errors"]["total"], 0, "{v}");
    assert!(v["messages"].as_u64().unwrap() > 0, "{v}");
}
loaders!(replies_that_outrun_the_receive_pool_all_arrive: reactor, uring);
