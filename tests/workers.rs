//! `reactor serve --workers N`: one port shared by worker processes, each
//! running the readiness engine or the uring one.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;

use common::*;

fn workers(engine: &str, n: usize, extra: &[&str]) -> Server {
    let n = n.to_string();
    let mut args = vec!["--workers", n.as_str()];
    args.extend_from_slice(extra);
    Server::start_engine(engine, &args)
}

/// `worker-I`'s final stats line: its `accepted=` count.
fn accepted_by(server: &Server, worker: usize) -> Option<u64> {
    let text = server.stderr_text();
    let tag = format!("@worker-{worker}] final stats: ");
    let line = text.lines().find(|l| l.contains(&tag))?;
    let n = line.split("accepted=").nth(1)?.split(' ').next()?;
    n.parse().ok()
}

/// The pid the supervisor logged for `worker-I`'s latest start.
fn worker_pid(server: &Server, worker: usize) -> u32 {
    let text = server.stderr_text();
    let tag = format!("worker-{worker} started (pid ");
    let line = text.lines().rfind(|l| l.contains(&tag)).unwrap();
    line.split(&tag)
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap()
}

fn echoes(s: &std::net::TcpStream, seed: u64) -> bool {
    let data = pattern(seed, 1000);
    let mut w = s;
    if w.write_all(&data).is_err() {
        return false;
    }
    let mut got = vec![0; data.len()];
    let mut r = s;
    r.read_exact(&mut got).is_ok() && got == data
}

fn connections_land_on_several_workers_and_all_echo(engine: &str) {
    let mut server = workers(engine, 3, &[]);
    let clients: Vec<_> = (0..30).map(|_| server.connect()).collect();
    for (i, c) in clients.iter().enumerate() {
        assert!(echoes(c, i as u64), "client {i} did not echo");
    }
    drop(clients);
    server.terminate();
    assert!(server.wait().success());
    let counts: Vec<u64> = (0..3)
        .map(|w| accepted_by(&server, w).unwrap_or(0))
        .collect();
    assert_eq!(
        counts.iter().sum::<u64>(),
        30,
        "{counts:?}\n{}",
        server.stderr_text()
    );
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "all on one worker: {counts:?}"
    );
    // The supervisor's own final line adds them up.
    let text = server.stderr_text();
    let total = text
        .lines()
        .find(|l| l.contains("supervisor] final stats:"))
        .unwrap_or_else(|| panic!("no summed final line: {text}"));
    assert!(total.contains("accepted=30 "), "{total}");
    // Each worker ran the engine asked for (the uring engine logs its ring).
    let rings = text.matches("io_uring:").count();
    assert_eq!(rings, if engine == "uring" { 3 } else { 0 }, "{text}");
}
engines!(connections_land_on_several_workers_and_all_echo: reactor, uring);

fn sigterm_flushes_every_worker_and_exits_0(engine: &str) {
    let mut server = workers(engine, 3, &["--stats-interval", "1"]);
    const EACH: usize = 100_000;
    let clients: Vec<_> = (0..12).map(|_| server.connect()).collect();
    let sent: Vec<Arc<Vec<u8>>> = (0..12).map(|i| Arc::new(pattern(i, EACH))).collect();
    // Write everything without reading: the echo waits in the server's
    // queues and the clients' receive buffers.
    for (c, d) in clients.iter().zip(&sent) {
        let mut w = c;
        w.write_all(d).unwrap();
    }
    // Once the summed stats say every byte was read, stop the server.
    server.wait_for_log(&format!("bytes_in={} ", 12 * EACH));
    server.terminate();
    for (i, (c, d)) in clients.iter().zip(&sent).enumerate() {
        let mut r = c;
        let got = read_to_eof(&mut r);
        assert!(got == **d, "client {i}: {} of {EACH} bytes", got.len());
    }
    assert!(server.wait().success(), "{}", server.stderr_text());
    let flushed = (0..3)
        .filter(|&w| accepted_by(&server, w).unwrap_or(0) > 0)
        .count();
    assert!(flushed >= 2, "{}", server.stderr_text());
}
engines!(sigterm_flushes_every_worker_and_exits_0: reactor, uring);

fn a_killed_worker_is_replaced_while_the_others_clients_keep_echoing(engine: &str) {
    let mut server = workers(engine, 3, &[]);
    let clients: Vec<_> = (0..30).map(|_| server.connect()).collect();
    for (i, c) in clients.iter().enumerate() {
        assert!(echoes(c, i as u64));
    }
    let victim = worker_pid(&server, 1);
    let killed = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    server.wait_for_log(&format!("worker-1 (pid {victim}) exited unexpectedly"));
    eventually("a replacement for worker-1", || {
        worker_pid(&server, 1) != victim
    });
    // The killed worker's clients were cut off; every other one still
    // echoes, byte for byte.
    let alive: Vec<bool> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| echoes(c, 100 + i as u64))
        .collect();
    let cut = alive.iter().filter(|a| !**a).count();
    assert!((1..30).contains(&cut), "{cut} of 30 clients cut off");
    // New connections reach every worker, the replacement included.
    let fresh: Vec<_> = (0..30).map(|_| server.connect()).collect();
    for (i, c) in fresh.iter().enumerate() {
        assert!(echoes(c, 200 + i as u64), "new client {i}");
    }
    drop((clients, fresh));
    server.terminate();
    assert!(server.wait().success(), "{}", server.stderr_text());
    assert!(
        accepted_by(&server, 1).is_some_and(|n| n > 0),
        "{}",
        server.stderr_text()
    );
}
engines!(a_killed_worker_is_replaced_while_the_others_clients_keep_echoing: reactor, uring);

fn three_workers_hold_2400_connections_under_a_1000_file_limit(engine: &str) {
    let mut server = Server::start_engine_with_fd_limit(
        engine,
        1000,
        &["--workers", "3", "--log-level", "warn"],
    );
    let addr = server.addr.to_string();
    let (code, v) = load_json(&[&addr, "--workload", "hold", "-c", "2400", "-d", "1"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["connections_opened"], 2400);
    assert_eq!(v["survived"], 2400);
    server.terminate();
    assert!(server.wait().success());
}
engines!(three_workers_hold_2400_connections_under_a_1000_file_limit: reactor, uring);

#[test]
fn chat_and_unix_refuse_more_than_one_worker() {
    for extra in [
        &["--mode", "chat"][..],
        &["--unix", "/tmp/reactor-workers-test.sock"],
    ] {
        let mut args = vec!["serve", "--addr", "127.0.0.1:0", "--workers", "2"];
        args.extend_from_slice(extra);
        let out = run_bounded(&args, b"", TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--workers"), "{err}");
    }
}
