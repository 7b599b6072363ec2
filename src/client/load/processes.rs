//! Past one process's open-file limit: load processes.
//!
//! Every connection is a descriptor, and one process may hold at most
//! `RLIMIT_NOFILE` of them (20,000 here). So a run that needs more, or
//! that is told `--processes P`, re-executes this binary as P child load
//! processes (a hidden `--process-index I`). Child I opens every P-th
//! connection, from id I, with the run's other settings unchanged, and
//! prints on its stdout a progress line now and then and one result line at
//! the end: its whole [`Tally`] as JSON, histograms serialized
//! ([`super::merge`]). The parent shows the total progress, then merges the
//! children's tallies exactly (counts added, histograms added bucket by
//! bucket) into one report, as if one process had done it all.
//!
//! Intervals too: every child counts its `--interval`s from the parent's
//! start (a hidden `--run-started-us`, wall-clock time, so interval `i`
//! covers the same second in every process), merges its loops' intervals
//! and sends each one to the parent as a JSON line, histograms serialized.
//! The parent merges interval `i` of every child exactly (the same
//! [`Collector`] that merges one process's loops), prints one progress
//! line per interval and puts one row per interval in the report.
//!
//! A child's stdin is a pipe from the parent; if the parent dies the pipe
//! closes and the child exits, so no load process outlives its run.

use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::interval::{self, Collector, HdrLog, Interval};
use super::merge::{part, tally_from_json, tally_json};
use super::report::{Failure, Report, Tally};
use super::{process_ids, run_share, Options, Progress, Workload};

/// Descriptors a load process keeps for itself: poll, stdio, pipes,
/// threads (a quarter of a small limit).
pub const FD_RESERVE: u64 = 64;

/// How often a child reports its progress.
const CHILD_REPORT: Duration = Duration::from_millis(250);

/// Connections one load process can hold under the open-file `limit`.
pub fn per_process(limit: u64) -> u64 {
    limit.saturating_sub(FD_RESERVE.min(limit / 4)).max(1)
}

/// Load processes for this run: `--processes`, or as many as the
/// connections need at [`per_process`] each (UDP: one).
pub fn count(args: &Options, limit: u64) -> u32 {
    if let Some(p) = args.processes {
        return p.min(args.plan.connections).max(1);
    }
    // These keep everything in one process: datagram sockets and the
    // rate search are the parent's alone, and a chat room's every line is
    // checked against every client by one loop. (`--hdr-log` is written by
    // the parent from the merged intervals.)
    let one =
        args.udp.is_some() || args.find_max_rate.is_some() || args.plan.workload == Workload::Chat;
    if one {
        return 1;
    }
    u64::from(args.plan.connections)
        .div_ceil(per_process(limit))
        .min(u64::from(u32::MAX)) as u32
}

/// Checks, before opening anything, the limits that would stop this run
/// part-way; says on stderr which limit, which setting and what to do.
/// False when the run cannot succeed.
pub fn check_limits(args: &Options, limit: u64) -> bool {
    let plan = &args.plan;
    let processes = u64::from(count(args, limit));
    let need = crate::net::limits::Need {
        connections: u64::from(plan.connections),
        processes,
        per_process_fds: u64::from(plan.connections).div_ceil(processes)
            + FD_RESERVE.min(limit / 4),
        // The server of a loopback run is on this machine too: its sockets
        // are counted with ours.
        sockets_per_connection: if plan.target_is_loopback() { 2 } else { 1 },
        per_source: plan.per_source(),
        listen_backlog: 0,
    };
    let verdict = crate::net::limits::check(&need);
    for w in &verdict.warnings {
        eprintln!("reactor load: warning: {w}");
    }
    for e in &verdict.errors {
        eprintln!("reactor load: {e}");
    }
    verdict.errors.is_empty()
}

/// The parent: starts `count` children, shows their progress, merges their
/// results into one report.
pub fn run_parent(args: Options, count: u32) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("reactor load: cannot find this program to start load processes: {e}");
            return ExitCode::FAILURE;
        }
    };
    let connections = args.plan.connections;
    eprintln!(
        "reactor load: {connections} connections over {count} load processes \
         (about {} each)",
        u64::from(connections).div_ceil(u64::from(count))
    );
    let opened: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let messages: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let results: Arc<Mutex<Vec<Option<Value>>>> = Arc::new(Mutex::new(vec![None; count as usize]));
    let ready: Arc<Vec<AtomicBool>> =
        Arc::new((0..count).map(|_| AtomicBool::new(false)).collect());
    // Children's intervals: (child, Some(interval)), and (child, None)
    // once its stdout ends.
    let (to_parent, intervals) = mpsc::channel::<(usize, Option<Interval>)>();
    let started = Instant::now();
    let wall_start = SystemTime::now();
    let started_us = wall_start
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    // `--hdr-log`: the parent writes the merged intervals.
    let hdr_log = match &args.hdr_log {
        Some(path) => match HdrLog::create(path, wall_start) {
            Ok(log) => Some(log),
            Err(e) => {
                eprintln!("reactor load: --hdr-log {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut children = Vec::new();
    for i in 0..count {
        let spawned = Command::new(&exe)
            .arg("load")
            .args(&args.argv)
            .args(["--processes", &count.to_string()])
            .args(["--process-index", &i.to_string()])
            .args(["--run-started-us", &started_us.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("reactor load: cannot start load process {i}: {e}");
                break;
            }
        };
        let stdout = child.stdout.take().expect("piped");
        let (opened, messages, results) = (opened.clone(), messages.clone(), results.clone());
        let ready = ready.clone();
        let to_parent = to_parent.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(p) = v.get("progress") {
                    let n = |k: &str| p[k].as_u64().unwrap_or(0);
                    opened[i as usize].store(n("opened"), Ordering::Relaxed);
                    messages[i as usize].store(n("messages"), Ordering::Relaxed);
                    if p["ready"] == true {
                        ready[i as usize].store(true, Ordering::Release);
                    }
                } else if let Some(iv) = v.get("interval") {
                    match Interval::from_json(iv) {
                        Ok(iv) => {
                            let _ = to_parent.send((i as usize, Some(iv)));
                        }
                        Err(e) => eprintln!("reactor load: process {i}: {e}"),
                    }
                } else if let Some(r) = v.get("result") {
                    results.lock().expect("not poisoned")[i as usize] = Some(r.clone());
                }
            }
            let _ = to_parent.send((i as usize, None));
        });
        children.push((i, child, reader));
    }
    drop(to_parent);
    // Progress: a live line on a terminal, and the children's intervals
    // merged, one line each `--interval` (0: none).
    let terminal = io::stderr().is_terminal();
    let bar = terminal.then(indicatif::ProgressBar::new_spinner);
    let (mut last_open, mut last_msgs, mut last_at) = (0u64, 0u64, Instant::now());
    let every = args.plan.interval;
    let print = interval::printer(bar.as_ref());
    let open_loop = args.plan.open_loop();
    // Only the children that started send intervals: waiting for one that
    // never did would hold every row until the end. (Children are started
    // in order, so they are 0..children.len().)
    let senders = if every.is_zero() { 0 } else { children.len() };
    let mut collector = Collector::new(every, senders, open_loop, hdr_log, print);
    let take = |collector: &mut Collector, (i, iv): (usize, Option<Interval>)| {
        if i < senders {
            match iv {
                Some(iv) => collector.add(i, iv, false),
                None => collector.finished(i),
            }
        }
    };
    let mut released = false;
    loop {
        let alive: Vec<bool> = children
            .iter_mut()
            .map(|(_, c, _)| c.try_wait().ok().flatten().is_none())
            .collect();
        let running = alive.iter().filter(|&&r| r).count();
        if running == 0 {
            break;
        }
        // hold: once every live child has opened all it could, all begin
        // holding together, so the whole run's connections are held at once.
        let all_ready = children
            .iter()
            .zip(&alive)
            .all(|((i, _, _), &live)| !live || ready[*i as usize].load(Ordering::Acquire));
        if !released && all_ready {
            released = true;
            for (_, c, _) in &mut children {
                if let Some(stdin) = c.stdin.as_mut() {
                    let _ = stdin.write_all(b"go\n").and_then(|()| stdin.flush());
                }
            }
        }
        // Wait up to 200 ms for intervals, then take all that came.
        match intervals.recv_timeout(Duration::from_millis(200)) {
            Ok(got) => take(&mut collector, got),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every child's stdout has ended: only their exits are left.
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(200)),
        }
        for got in intervals.try_iter() {
            take(&mut collector, got);
        }
        let Some(b) = &bar else {
            continue;
        };
        let open: u64 = opened.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        let msgs: u64 = messages.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        let now = Instant::now();
        let dt = now.duration_since(last_at).as_secs_f64().max(1e-3);
        let line = format!(
            "{:.0} s: {open}/{connections} connections opened ({:.0}/s), {msgs} messages \
             ({:.0}/s), {running} of {count} load processes running",
            started.elapsed().as_secs_f64(),
            open.saturating_sub(last_open) as f64 / dt,
            msgs.saturating_sub(last_msgs) as f64 / dt,
        );
        (last_open, last_msgs, last_at) = (open, msgs, now);
        b.set_message(line);
        b.tick();
    }
    let mut tally = Tally::default();
    let mut parts = Vec::new();
    let mut launched = vec![false; count as usize];
    let mut readers = Vec::new();
    for (i, mut child, reader) in children {
        launched[i as usize] = true;
        let status = child.wait();
        let _ = reader.join();
        readers.push((i, status));
    }
    // Every reader has ended: the last intervals are in the channel.
    for got in intervals.try_iter() {
        take(&mut collector, got);
    }
    let rows = collector.finish();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for (i, status) in readers {
        let result = results.lock().expect("not poisoned")[i as usize].take();
        match result.map(|r| tally_from_json(&r)) {
            Some(Ok(t)) => {
                parts.push(part(&t));
                tally.merge(t)
            }
            other => {
                let why = match (other, status) {
                    (Some(Err(e)), _) => format!("its result does not parse: {e}"),
                    (_, Ok(s)) => format!("it exited ({s}) without a result"),
                    (_, Err(e)) => format!("it could not be waited for: {e}"),
                };
                lost_process(&mut tally, connections, (i, count), &why);
            }
        }
    }
    for (i, was) in launched.iter().enumerate() {
        if !was {
            lost_process(
                &mut tally,
                connections,
                (i as u32, count),
                "it could not be started",
            );
        }
    }
    let mut extra = serde_json::Map::new();
    extra.insert("processes".into(), count.into());
    extra.insert("parts".into(), parts.into());
    let report = Report {
        workload: args.plan.workload.name(),
        settings: args.settings,
        connections: u64::from(connections),
        udp: args.udp.is_some(),
        open_loop,
        intervals: rows,
        extra,
        tally,
    };
    report.print(args.json)
}

/// Counts a load process that gave no result: its connections never
/// opened, as far as the report can tell.
fn lost_process(tally: &mut Tally, connections: u32, process: (u32, u32), why: &str) {
    let share = process_ids(connections, process).count() as u64;
    tally.not_opened += share;
    tally.fail_first(
        Failure::Connect,
        format!("load process {} ({share} connections): {why}", process.0),
    );
}

/// One line of JSON to the parent.
fn say(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// When the parent's run began, on this process's clock: its intervals
/// count from there, so they line up with every other child's.
fn parent_start(started_us: Option<u64>) -> Instant {
    let now = Instant::now();
    let Some(us) = started_us else {
        return now;
    };
    let then = UNIX_EPOCH + Duration::from_micros(us);
    // A start in the future (clock stepped) counts from now.
    let ago = SystemTime::now().duration_since(then).unwrap_or_default();
    now.checked_sub(ago).unwrap_or(now)
}

/// A child: runs its share, reporting progress, and prints its tally.
pub fn run_child(args: Options, index: u32) -> ExitCode {
    let count = args.processes.unwrap_or(1).max(1);
    let plan = Arc::new(args.plan);
    let progress = Arc::new(Progress {
        started: parent_start(args.run_started_us),
        ..Progress::default()
    });
    // hold begins when the parent says `go`.
    progress.gated.store(true, Ordering::Release);
    // The parent holds our stdin; when it goes, so do we.
    let watch = progress.clone();
    let _ = thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            for line in io::stdin().lock().lines().map_while(Result::ok) {
                if line == "go" {
                    watch.go.store(true, Ordering::Release);
                }
            }
            std::process::exit(1);
        });
    let done = Arc::new(AtomicBool::new(false));
    let reporter = {
        let (progress, done) = (progress.clone(), done.clone());
        thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                say(json!({"progress": {
                    "opened": progress.opened.load(Ordering::Relaxed),
                    "messages": progress.messages.load(Ordering::Relaxed),
                    "ready": progress.loops.load(Ordering::Acquire) > 0
                        && progress.ready.load(Ordering::Acquire)
                            >= progress.loops.load(Ordering::Acquire),
                }}));
                thread::sleep(CHILD_REPORT);
            }
        })
    };
    let forward = Box::new(|iv: &Interval| say(json!({ "interval": iv.to_json() })));
    let outcome = run_share(
        plan,
        args.threads,
        args.udp,
        None,
        progress,
        (index, count),
        Some(forward),
    );
    done.store(true, Ordering::Release);
    let _ = reporter.join();
    match outcome.map(|(tally, _, _)| tally) {
        Ok(t) => {
            say(json!({"result": tally_json(&t)}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("reactor load: process {index}: {e}");
            ExitCode::FAILURE
        }
    }
}
