//! `reactor serve --metrics`: the endpoint on the server's own loop, seen
//! from outside, every scrape checked by the strict text-format parser.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    connect, echo_roundtrip, eventually, http, pattern, scrape, start_with_metrics,
    start_with_metrics_lines,
};
use reactor::metrics::exposition::Exposition;

/// Every series INTERFACE.md names, as the sample names that must appear.
const REQUIRED: &[&str] = &[
    "reactor_connections_active",
    "reactor_connections_accepted_total",
    "reactor_connections_closed_total",
    "reactor_bytes_received_total",
    "reactor_bytes_sent_total",
    "reactor_queued_bytes",
    "reactor_paused_connections",
    "reactor_poll_wakeups_total",
    "reactor_events_per_wakeup_bucket",
    "reactor_events_per_wakeup_sum",
    "reactor_events_per_wakeup_count",
    "reactor_loop_busy_seconds_total",
    "reactor_accept_paused_total",
    "reactor_slow_consumers_dropped_total",
    "reactor_udp_datagrams_total",
    "reactor_ready_list_length",
    "reactor_reads_total",
];

fn every_series_is_there_valid_and_counts_real_traffic(engine: &str) {
    let (server, metrics) = start_with_metrics(&["--engine", engine]);
    let before = scrape(metrics);
    for name in REQUIRED {
        assert!(before.samples(name).next().is_some(), "no {name}");
    }
    for f in &before.families {
        assert!(f.name.starts_with("reactor_"), "{}", f.name);
        assert!(f.help.is_some(), "{} has no HELP", f.name);
    }

    // Traffic: 3 TCP echo clients of 10 KiB each, closed by EOF.
    for i in 0..3 {
        let s = connect(server.addr);
        let data = Arc::new(pattern(i, 10_240));
        assert_eq!(echo_roundtrip(&s, data.clone()), *data);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        common::read_to_eof(&mut &s);
    }

    let after = scrape(metrics);
    let v = |e: &reactor::metrics::exposition::Exposition, name: &str, labels: &[(&str, &str)]| {
        e.value(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?}"))
    };
    assert_eq!(
        v(&after, "reactor_connections_accepted_total", &[])
            - v(&before, "reactor_connections_accepted_total", &[]),
        3.0
    );
    assert!(v(&after, "reactor_bytes_received_total", &[]) >= 30_720.0);
    assert!(v(&after, "reactor_bytes_sent_total", &[]) >= 30_720.0);
    assert!(v(&after, "reactor_reads_total", &[]) >= 3.0);
    eventually("the three closes are counted", || {
        scrape(metrics).value("reactor_connections_closed_total", &[("reason", "done")])
            == Some(3.0)
    });
    assert!(
        v(&after, "reactor_poll_wakeups_total", &[])
            > v(&before, "reactor_poll_wakeups_total", &[])
    );
    assert!(
        v(&after, "reactor_events_per_wakeup_count", &[])
            == v(&after, "reactor_poll_wakeups_total", &[]),
        "every wake-up is in the histogram"
    );
    assert!(
        v(&after, "reactor_loop_busy_seconds_total", &[])
            > v(&before, "reactor_loop_busy_seconds_total", &[])
    );
    assert_eq!(v(&after, "reactor_connections_active", &[]), 0.0);
}
engines!(every_series_is_there_valid_and_counts_real_traffic: reactor, uring);

fn udp_datagrams_are_counted_by_direction(engine: &str) {
    let (_server, metrics, lines) =
        start_with_metrics_lines(&["--engine", engine, "--udp", "127.0.0.1:0"]);
    assert_eq!(lines.len(), 1, "udp, then metrics: {lines:?}");
    let udp_addr: std::net::SocketAddr = lines[0]
        .strip_prefix("listening on udp ")
        .unwrap()
        .parse()
        .unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    for i in 0..5u8 {
        sock.send_to(&[i; 32], udp_addr).unwrap();
        let mut buf = [0; 64];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[i; 32]);
    }
    let e = scrape(metrics);
    assert_eq!(
        e.value("reactor_udp_datagrams_total", &[("direction", "received")]),
        Some(5.0)
    );
    assert_eq!(
        e.value("reactor_udp_datagrams_total", &[("direction", "sent")]),
        Some(5.0)
    );
}
engines!(udp_datagrams_are_counted_by_direction: reactor, uring);

fn other_paths_are_404_and_head_has_no_body(engine: &str) {
    let (_server, metrics) = start_with_metrics(&["--engine", engine]);
    let (code, _) = http(metrics, "GET / HTTP/1.1");
    assert_eq!(code, 404);
    let (code, _) = http(metrics, "GET /metrics/x HTTP/1.1");
    assert_eq!(code, 404);
    let (code, raw) = http(metrics, "HEAD /metrics HTTP/1.1");
    assert_eq!(code, 200);
    assert!(raw.ends_with("\r\n\r\n"), "HEAD: headers only");
    let (code, raw) = http(metrics, "POST /metrics HTTP/1.1");
    assert_eq!(code, 405);
    assert!(raw.contains("Allow: GET, HEAD"));
}
engines!(other_paths_are_404_and_head_has_no_body: reactor, uring);

fn rejected_and_paused_connections_show(engine: &str) {
    let (server, metrics) = start_with_metrics(&[
        "--engine",
        engine,
        "--max-connections",
        "1",
        "--max-buffer",
        "4096",
    ]);
    let held = connect(server.addr);
    // A second client is turned away at once.
    let mut extra = connect(server.addr);
    common::read_until_closed(&mut extra);
    eventually("the rejection is counted", || {
        scrape(metrics).value(
            "reactor_connections_closed_total",
            &[("reason", "rejected")],
        ) == Some(1.0)
    });
    // The held client sends and never reads: its echo fills the kernel
    // buffers, then the server's queue, and the server pauses it. It
    // writes until the pause is seen: a timed-out write alone proves
    // nothing, as the server's send buffer toward us grows by itself (up
    // to `tcp_wmem`'s maximum, 4 MiB), so on a busy machine a write may
    // time out before the server's queue passes 4096. 64 MB bounds it if
    // the server never pauses; then the check below times out.
    let mut w = held.try_clone().unwrap();
    let paused = Arc::new(AtomicBool::new(false));
    let seen = paused.clone();
    let writer = thread::spawn(move || {
        let chunk = [7u8; 65536];
        w.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for _ in 0..1024 {
            if seen.load(Ordering::Relaxed) {
                return;
            }
            match w.write(&chunk) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("write: {e}"),
            }
        }
    });
    eventually("the client is paused with output queued", || {
        let e = scrape(metrics);
        e.value("reactor_paused_connections", &[]) == Some(1.0)
            && e.value("reactor_queued_bytes", &[]).unwrap() > 0.0
    });
    paused.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    drop(held);
}
engines!(rejected_and_paused_connections_show: reactor, uring);

fn an_endless_header_is_cut_off_and_memory_stays_bounded(engine: &str) {
    let (server, metrics) = start_with_metrics(&["--engine", engine]);
    scrape(metrics);
    let rss_before = server.rss_kib();
    // Eight clients at once, each sending a header that never ends.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                let s = connect(metrics);
                let mut w = s.try_clone().unwrap();
                let writer = thread::spawn(move || {
                    let _ = w.write_all(b"GET /metrics HTTP/1.1\r\nX-Endless: ");
                    let junk = [b'a'; 16384];
                    let started = Instant::now();
                    let mut sent = 0u64;
                    while started.elapsed() < Duration::from_secs(60) {
                        match w.write(&junk) {
                            Ok(n) => sent += n as u64,
                            Err(_) => return (true, sent),
                        }
                    }
                    (false, sent)
                });
                let mut r = s;
                let mut head = [0u8; 12];
                r.read_exact(&mut head).unwrap();
                common::read_until_closed(&mut r);
                (head, writer.join().unwrap())
            })
        })
        .collect();
    let mut total_sent = 0;
    for c in clients {
        let (head, (cut_off, sent)) = c.join().unwrap();
        assert_eq!(&head, b"HTTP/1.1 431");
        assert!(cut_off, "the server hung up on the endless writer");
        total_sent += sent;
    }
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB after {total_sent} bytes of header"
    );
    // And the endpoint still answers.
    scrape(metrics);
}
engines!(an_endless_header_is_cut_off_and_memory_stays_bounded: reactor, uring);

#[test]
fn metrics_with_the_threads_engine_is_a_usage_error() {
    let out = common::run_bounded(
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--engine",
            "threads",
            "--metrics",
            "127.0.0.1:0",
        ],
        b"",
        common::TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics"));
}

/// Every sample without a `worker` label equals the sum of the samples
/// with the same name and other labels over `workers` workers, and each
/// of those has exactly one sample per worker `0..workers`.
fn sums_equal_the_workers(e: &Exposition, workers: usize) {
    use std::collections::BTreeMap;
    /// A sample's name and its labels other than `worker`, sorted.
    type Series = (String, Vec<(String, String)>);
    let mut sums: BTreeMap<Series, f64> = BTreeMap::new();
    let mut parts: BTreeMap<Series, (f64, Vec<usize>)> = BTreeMap::new();
    for f in &e.families {
        for s in &f.samples {
            let mut rest: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| k != "worker")
                .cloned()
                .collect();
            rest.sort();
            let key = (s.name.clone(), rest);
            match s.label("worker") {
                None => assert!(sums.insert(key, s.value).is_none()),
                Some(w) => {
                    let p = parts.entry(key).or_default();
                    p.0 += s.value;
                    p.1.push(w.parse().expect("a worker number"));
                }
            }
        }
    }
    assert!(sums.len() >= 30, "{} unlabelled samples", sums.len());
    assert_eq!(
        sums.keys().collect::<Vec<_>>(),
        parts.keys().collect::<Vec<_>>(),
        "every sum has its workers' series and nothing else"
    );
    for (key, sum) in &sums {
        let (total, mut ids) = parts[key].clone();
        ids.sort();
        assert_eq!(ids, (0..workers).collect::<Vec<_>>(), "{key:?}");
        // Integers in f64 (busy seconds are nanoseconds / 1e9): exact
        // enough for a relative check.
        assert!(
            (sum - total).abs() <= 1e-9 * sum.abs().max(1.0),
            "{key:?}: sum {sum}, workers add to {total}"
        );
    }
}

/// `serve --workers N --metrics`: one endpoint, the sums and each
/// worker's series, counting real traffic spread over the workers.
fn workers_share_one_endpoint(engine: &str, workers: usize) {
    let n = workers.to_string();
    let (server, metrics) = start_with_metrics(&["--engine", engine, "--workers", &n]);
    let before = scrape(metrics);
    for name in REQUIRED {
        assert!(before.samples(name).next().is_some(), "no {name}");
    }
    sums_equal_the_workers(&before, workers);
    let clients: Vec<_> = (0..30).map(|_| connect(server.addr)).collect();
    for (i, c) in clients.iter().enumerate() {
        let data = Arc::new(pattern(i as u64, 1000));
        assert_eq!(echo_roundtrip(c, data.clone()), *data);
    }
    // Workers send their numbers a few times a second.
    let mut last = before;
    eventually(
        "all 30 connections are counted, over several workers",
        || {
            last = scrape(metrics);
            let busy = (0..workers)
                .filter(|w| {
                    let w = w.to_string();
                    last.value("reactor_connections_active", &[("worker", &w)]) > Some(0.0)
                })
                .count();
            last.value("reactor_connections_active", &[]) == Some(30.0) && busy >= 2
        },
    );
    sums_equal_the_workers(&last, workers);
    assert_eq!(
        last.value("reactor_connections_accepted_total", &[]),
        Some(30.0)
    );
    assert!(last.value("reactor_bytes_received_total", &[]) >= Some(30_000.0));
    drop(clients);
    eventually("the 30 closes are counted", || {
        last = scrape(metrics);
        last.value("reactor_connections_closed_total", &[("reason", "done")]) == Some(30.0)
    });
    sums_equal_the_workers(&last, workers);
}

fn two_workers_share_one_endpoint_with_sums_and_worker_labels(engine: &str) {
    workers_share_one_endpoint(engine, 2);
}
engines!(two_workers_share_one_endpoint_with_sums_and_worker_labels: reactor, uring);

#[test]
fn three_workers_share_one_endpoint_with_sums_and_worker_labels() {
    workers_share_one_endpoint("reactor", 3);
}

#[test]
fn a_replaced_workers_counters_go_on_and_its_clients_count_as_closed() {
    let (server, metrics) = start_with_metrics(&["--workers", "2"]);
    let clients: Vec<_> = (0..20).map(|_| connect(server.addr)).collect();
    for (i, c) in clients.iter().enumerate() {
        let data = Arc::new(pattern(i as u64, 100));
        assert_eq!(echo_roundtrip(c, data.clone()), *data);
    }
    let accepted = |e: &Exposition, w: &str| {
        e.value("reactor_connections_accepted_total", &[("worker", w)])
            .unwrap()
    };
    let mut e = scrape(metrics);
    eventually("all 20 counted", || {
        e = scrape(metrics);
        e.value("reactor_connections_active", &[]) == Some(20.0)
    });
    // The worker that holds the most clients dies.
    let victim = if accepted(&e, "1") >= accepted(&e, "0") {
        1
    } else {
        0
    };
    let held = accepted(&e, &victim.to_string());
    assert!(held > 0.0);
    let text = server.stderr_text();
    let tag = format!("worker-{victim} started (pid ");
    let pid = text
        .lines()
        .find_map(|l| Some(l.split_once(&tag)?.1.trim_end_matches(')').to_string()))
        .unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    server.wait_for_log(&format!("worker-{victim} (pid {pid}) exited unexpectedly"));
    let w = victim.to_string();
    eventually("its clients count as closed by worker_exited", || {
        e = scrape(metrics);
        e.value(
            "reactor_connections_closed_total",
            &[("worker", &w), ("reason", "worker_exited")],
        ) == Some(held)
    });
    sums_equal_the_workers(&e, 2);
    assert_eq!(accepted(&e, &w), held, "its count goes on, not back to 0");
    assert_eq!(
        e.value("reactor_connections_active", &[("worker", &w)]),
        Some(0.0)
    );
    assert_eq!(
        e.value("reactor_connections_active", &[]),
        Some(20.0 - held)
    );
    // New clients: the replacement's count adds to its predecessor's.
    drop(clients);
    let fresh: Vec<_> = (0..20).map(|_| connect(server.addr)).collect();
    for (i, c) in fresh.iter().enumerate() {
        let data = Arc::new(pattern(i as u64, 100));
        assert_eq!(echo_roundtrip(c, data.clone()), *data);
    }
    eventually("40 accepted in all", || {
        e = scrape(metrics);
        e.value("reactor_connections_accepted_total", &[]) == Some(40.0)
    });
    assert!(accepted(&e, &w) >= held);
    sums_equal_the_workers(&e, 2);
}

fn workers_with_metrics_print_the_metrics_line_last_and_exit_0(engine: &str) {
    let (mut server, metrics, lines) =
        start_with_metrics_lines(&["--engine", engine, "--workers", "2", "--udp", "127.0.0.1:0"]);
    assert_eq!(lines.len(), 1, "udp, then metrics: {lines:?}");
    assert!(lines[0].starts_with("listening on udp "), "{lines:?}");
    scrape(metrics);
    server.terminate();
    // Exited, so the endpoint closed with the listeners. (Not checked by
    // connecting: a parallel test may bind the freed port in between.)
    assert!(server.wait().success(), "{}", server.stderr_text());
}
engines!(workers_with_metrics_print_the_metrics_line_last_and_exit_0: reactor, uring);

fn a_worker_whose_supervisor_stops_reading_keeps_serving(engine: &str) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    // A worker as the supervisor starts it, snapshots every millisecond
    // (about 700 bytes each: the 64 KiB pipe is full in a tenth of a
    // second), and nobody reading its stdout after the first line.
    let mut worker = Command::new(common::bin())
        .args(["serve", "--addr", "127.0.0.1:0", "--log-level", "warn"])
        .args(["--engine", engine])
        .args(["--worker-index", "0", "--snapshot-every-ms", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let leash = worker.stdin.take().unwrap();
    let mut out = BufReader::new(worker.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let addr: std::net::SocketAddr = first
        .strip_prefix("listening on ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{first}"));
    // Echo goes on for 3 s, the pipe full all along: a loop blocked in
    // the write would answer nothing (connect's read timeout fails it).
    let started = Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        let s = connect(addr);
        let data = Arc::new(pattern(rounds, 1000));
        assert_eq!(echo_roundtrip(&s, data.clone()), *data);
        rounds += 1;
    }
    // Stopped by closing its stdin. It wrote snapshots (3 s of them would
    // be megabytes; the pipe holds 64 KiB, or one 4 KiB page when the
    // user's pipe quota is spent): the pipe was full while we echoed.
    drop(leash);
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    assert!(worker.wait().unwrap().success());
    assert!(rest.len() >= 4096, "{} bytes", rest.len());
}
engines!(a_worker_whose_supervisor_stops_reading_keeps_serving: reactor, uring);
