//! `--find-max-rate P99_MS`: the highest open-loop rate the server
//! sustains with its p99 latency at most P99_MS.
//!
//! Each step is a whole open-loop run (connect, `--warmup`, `--duration`)
//! at one total rate, spread evenly over the connections. The rate doubles
//! while steps pass, then the range between the last pass and the first
//! failure is bisected until it is within 5 %. A step passes when its p99
//! (counted from the due times, so a server that falls behind cannot hide
//! it) is at most P99_MS, nothing failed, and at least 95 % of the offered
//! messages completed.

use std::process::ExitCode;
use std::sync::Arc;

use serde_json::json;

use super::report::{quantile_us, Report, Tally};
use super::{run_loops, Options};

/// Total messages per second the search starts from when `--rate` is 0.
const FIRST_RATE: f64 = 1000.0;
/// The bisection stops when the failing rate is within this factor of the
/// passing one.
const PRECISION: f64 = 1.05;
/// At most this many steps in all.
const MAX_STEPS: usize = 40;

/// One rate tried.
#[derive(Debug)]
struct Step {
    rate: f64,
    achieved: f64,
    p99_ms: f64,
    errors: u64,
    pass: bool,
}

/// Runs the search and prints its outcome; 0 when some rate passed.
pub fn run(args: Options, p99_ms: f64) -> ExitCode {
    let connections = f64::from(args.plan.connections);
    let mut rate = if args.plan.rate > 0.0 {
        args.plan.rate * connections
    } else {
        FIRST_RATE
    };
    let mut steps: Vec<Step> = Vec::new();
    let mut best: Option<(f64, Tally)> = None;
    let mut last_tally = None;
    let (mut pass, mut fail) = (0.0_f64, f64::INFINITY);
    while steps.len() < MAX_STEPS {
        let mut plan = args.plan.clone();
        plan.rate = rate / connections;
        // The steps are the progress lines here.
        plan.interval = std::time::Duration::ZERO;
        let tally = match run_loops(Arc::new(plan), args.threads, None, None) {
            Ok((tally, _, _)) => tally,
            Err(e) => {
                eprintln!("reactor load: {e}");
                return ExitCode::FAILURE;
            }
        };
        let achieved = if tally.measured_secs > 0.0 {
            tally.messages as f64 / tally.measured_secs
        } else {
            0.0
        };
        let step = Step {
            rate,
            achieved,
            p99_ms: quantile_us(&tally.latency, 0.99) / 1000.0,
            errors: tally.total_errors(),
            pass: false,
        };
        let step = Step {
            pass: step.errors == 0
                && tally.messages > 0
                && step.p99_ms <= p99_ms
                && step.achieved >= 0.95 * rate,
            ..step
        };
        eprintln!(
            "step {:>2}: rate {:>10.0}/s  achieved {:>10.0}/s  p99 {:>9.3} ms  errors {}  {}",
            steps.len() + 1,
            step.rate,
            step.achieved,
            step.p99_ms,
            step.errors,
            if step.pass { "pass" } else { "FAIL" }
        );
        if step.pass {
            pass = rate;
            best = Some((rate, tally));
        } else {
            fail = fail.min(rate);
            last_tally = Some(tally);
        }
        steps.push(step);
        rate = if fail.is_infinite() {
            rate * 2.0
        } else if pass == 0.0 {
            // Not even the first rate passed: halve until one does.
            rate / 2.0
        } else if fail / pass > PRECISION {
            (pass + fail) / 2.0
        } else {
            break;
        };
        if rate < 1.0 {
            break;
        }
    }
    let found = best.as_ref().map(|(r, _)| *r);
    let tally = match best {
        Some((_, t)) => t,
        None => last_tally.unwrap_or_default(),
    };
    let mut extra = serde_json::Map::new();
    extra.insert("max_rate".into(), json!(found.map(f64::round)));
    extra.insert("p99_target_ms".into(), json!(p99_ms));
    extra.insert(
        "steps".into(),
        steps
            .iter()
            .map(|s| {
                json!({
                    "rate": s.rate.round(),
                    "achieved": s.achieved.round(),
                    "p99_ms": (s.p99_ms * 1000.0).round() / 1000.0,
                    "errors": s.errors,
                    "pass": s.pass,
                })
            })
            .collect(),
    );
    let report = Report {
        workload: args.plan.workload.name(),
        settings: args.settings,
        connections: u64::from(args.plan.connections),
        udp: false,
        open_loop: true,
        intervals: Vec::new(),
        extra,
        tally,
    };
    if !args.json {
        match found {
            Some(r) => println!(
                "max rate      {r:.0} msgs/s with p99 <= {p99_ms} ms ({} steps; the report below is that step's)",
                steps.len()
            ),
            None => println!(
                "max rate      none: no rate tried kept p99 <= {p99_ms} ms ({} steps)",
                steps.len()
            ),
        }
    }
    let status = report.print(args.json);
    if found.is_some() {
        status
    } else {
        ExitCode::FAILURE
    }
}
