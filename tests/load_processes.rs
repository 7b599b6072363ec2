//! `reactor load` past one process: child load processes and merged,
//! exact reports (`reactor load merge`).

mod common;

use common::*;
use reactor::client::load::merge::decode_histogram;
use serde_json::Value;

fn sum(parts: &Value, key: &str) -> u64 {
    parts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[key].as_u64().unwrap())
        .sum()
}

/// The merged report's latency histogram, decoded.
fn latency_count(v: &Value) -> u64 {
    decode_histogram(v["tally"]["latency_hdr"].as_str().unwrap())
        .unwrap()
        .len()
}

fn a_256_file_limit_opens_1000_connections_through_several_processes(engine: &str) {
    let server = Server::start(&["--log-level", "warn"]);
    let script = "ulimit -n 256; exec \"$0\" load \"$@\"";
    let addr = server.addr.to_string();
    let args = [
        "--engine",
        engine,
        "-c",
        "1000",
        "-d",
        "1",
        "--warmup",
        "0.2",
        "--json",
        addr.as_str(),
    ];
    let mut all = vec!["-c", script, bin()];
    all.extend_from_slice(&args);
    let out = run_program_bounded("sh", &all, b"", LOAD_LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["ok"], true);
    let processes = v["processes"].as_u64().unwrap();
    assert!(
        processes >= 4,
        "1000 connections at <256 each: {processes} processes"
    );
    assert_eq!(v["parts"].as_array().unwrap().len() as u64, processes);
    assert_eq!(v["connections_opened"], 1000);
    assert_eq!(sum(&v["parts"], "connections_opened"), 1000);
    // One exact report: the counts are the processes' counts added, and
    // the merged histogram holds every one of their samples.
    let messages = v["messages"].as_u64().unwrap();
    assert!(messages > 0);
    assert_eq!(messages, sum(&v["parts"], "messages"), "{v}");
    assert_eq!(latency_count(&v), sum(&v["parts"], "latency_count"));
    assert_eq!(latency_count(&v), messages);
    // The children are told the engine the parent names here; one that
    // could not run it would have failed the run.
    assert_eq!(v["settings"]["engine"], engine, "{v}");
}
loaders!(a_256_file_limit_opens_1000_connections_through_several_processes: reactor, uring);

#[test]
fn merge_adds_two_reports_exactly() {
    let server = Server::start(&["--log-level", "warn"]);
    let addr = server.addr.to_string();
    let dir = std::env::temp_dir();
    let mut files = Vec::new();
    let mut reports = Vec::new();
    for (i, c) in ["10", "20"].iter().enumerate() {
        let (code, v) = load_json(&[&addr, "-c", c, "-d", "0.5", "--warmup", "0"]);
        assert_eq!(code, Some(0), "{v}");
        let f = dir.join(format!("reactor-merge-{}-{i}.json", std::process::id()));
        std::fs::write(&f, v.to_string()).unwrap();
        files.push(f.display().to_string());
        reports.push(v);
    }
    let out = run_bounded(
        &["load", "merge", &files[0], &files[1], "--json"],
        b"",
        TIMEOUT,
    );
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    assert_eq!(out.status.code(), Some(0));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let both = |k: &str| reports[0][k].as_u64().unwrap() + reports[1][k].as_u64().unwrap();
    assert_eq!(m["messages"].as_u64().unwrap(), both("messages"));
    assert_eq!(m["connections_opened"].as_u64().unwrap(), 30);
    assert_eq!(m["settings"]["connections"], 30);
    assert_eq!(m["processes"], 2);
    assert_eq!(
        latency_count(&m),
        latency_count(&reports[0]) + latency_count(&reports[1])
    );
    let p99 = m["latency_us"]["p99"].as_f64().unwrap();
    let max = m["latency_us"]["max"].as_f64().unwrap();
    assert!(p99 > 0.0 && p99 <= max);
}

#[test]
fn merge_refuses_a_file_that_is_not_a_report() {
    let f = std::env::temp_dir().join(format!("reactor-merge-bad-{}.json", std::process::id()));
    std::fs::write(&f, "{\"workload\": \"echo\"}").unwrap();
    let out = run_bounded(&["load", "merge", &f.display().to_string()], b"", TIMEOUT);
    let _ = std::fs::remove_file(&f);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tally"));
}

#[test]
fn a_child_load_process_holds_until_its_parent_says_go() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let server = Server::start(&["--log-level", "warn"]);
    let addr = server.addr.to_string();
    let mut child = Command::new(bin())
        .args(["load", &addr, "--workload", "hold", "-c", "20", "-d", "0.2"])
        .args([
            "--processes",
            "2",
            "--process-index",
            "0",
            "--interval",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    // Its ten connections open and answer; then it says it is ready.
    while next()["progress"]["ready"] != true {}
    // The hold is 0.2 s, but without `go` it has not begun: the child
    // keeps reporting, holding everything open.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "held and ended without go"
    );
    stdin.write_all(b"go\n").unwrap();
    let result = loop {
        let v = next();
        if let Some(r) = v.get("result") {
            break r.clone();
        }
    };
    assert_eq!(result["opened"], 10);
    assert_eq!(result["survived"], 10);
    assert!(child.wait().unwrap().success());
}

#[test]
fn several_processes_report_one_merged_row_per_interval() {
    let server = Server::start(&["--log-level", "warn"]);
    let script = "ulimit -n 256; exec \"$0\" load \"$@\"";
    let addr = server.addr.to_string();
    let mut all = vec!["-c", script, bin()];
    all.extend_from_slice(&[
        addr.as_str(),
        "-c",
        "1000",
        "-d",
        "1.5",
        "--warmup",
        "0.5",
        "--interval",
        "0.5",
        "--json",
    ]);
    let out = run_program_bounded("sh", &all, b"", LOAD_LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}\n{stderr}"));
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert!(v["processes"].as_u64().unwrap() >= 4, "{v}");
    let rows = v["intervals"].as_array().unwrap();
    // 2 s in 0.5 s intervals and the short last one; an interval every
    // process skipped (all stalled past its end) has no row, so a busy
    // machine may show fewer. Outcomes, not timings: when the processes
    // opened their connections or how many messages one row holds depends
    // on the machine; what the rows add up to does not.
    assert!(
        (2..=7).contains(&rows.len()),
        "{} intervals: {v}",
        rows.len()
    );
    let t: Vec<f64> = rows.iter().map(|r| r["t"].as_f64().unwrap()).collect();
    assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    assert!(t[0] >= 0.45 && *t.last().unwrap() >= 1.95, "{t:?}");
    // Each row adds every process's interval (one that skipped it counts
    // with its last connections and errors): once all are open, a row
    // holds all 1,000 connections and never more, and every message of
    // the run is in some row, so the rows hold at least the measured
    // messages.
    let open: Vec<u64> = rows
        .iter()
        .map(|r| r["connections_open"].as_u64().unwrap())
        .collect();
    assert_eq!(open.iter().max(), Some(&1000), "{open:?}");
    for r in rows {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["latency_us"]["p99"].as_f64() >= r["latency_us"]["p50"].as_f64());
    }
    let total: u64 = rows.iter().map(|r| r["messages"].as_u64().unwrap()).sum();
    let measured = v["messages"].as_u64().unwrap();
    assert!(measured > 0 && total >= measured, "{total} vs {measured}");
    // One progress line per row, printed by the parent alone.
    let lines = stderr.lines().filter(|l| l.starts_with('[')).count();
    assert_eq!(lines, rows.len(), "{stderr}");
}

#[test]
fn rows_are_printed_during_the_run_when_a_load_process_could_not_start() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Instant;
    let server = Server::start(&["--log-level", "warn"]);
    let addr = server.addr.to_string();
    // 40 descriptors: the parent keeps two pipes per child, so starting
    // the 20-odd-th of 30 fails with "Too many open files".
    let script = "ulimit -n 40; exec \"$0\" load \"$@\"";
    let mut child = Command::new("sh")
        .args(["-c", script, bin(), &addr, "-c", "30", "--processes", "30"])
        .args(["-d", "3", "--warmup", "0", "--interval", "0.5", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a run that hangs is killed (its children follow, their
    // stdin closing), which ends the stderr read below.
    let pid = child.id().to_string();
    let (finished, watchdog) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if watchdog.recv_timeout(LOAD_LIMIT).is_err() {
            let _ = Command::new("kill").arg(&pid).status();
        }
    });
    let mut rows = Vec::new();
    let mut refused = false;
    for line in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        refused |= line.contains("cannot start load process");
        if line.starts_with('[') {
            rows.push(Instant::now());
        }
    }
    let _ = child.wait();
    let _ = finished.send(());
    let _ = guard.join();
    assert!(
        refused,
        "every load process started: the test tests nothing"
    );
    // The processes that started are not held up by the ones that did
    // not: their rows come as the run goes (0.5 s apart over 3 s), not
    // all at once when it ends.
    assert!(rows.len() >= 2, "{} rows", rows.len());
    let spread = *rows.last().unwrap() - rows[0];
    assert!(
        spread >= std::time::Duration::from_secs(1),
        "rows printed within {spread:?}"
    );
}
