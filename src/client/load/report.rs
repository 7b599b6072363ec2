//! What a load run counted, merged across threads, and how it is shown:
//! a table for people, one JSON object for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::interval::Row;

/// How many failure descriptions a report keeps (the counts are exact).
const EXAMPLES: usize = 5;

/// Latency histograms hold nanoseconds, 1 ns to 10 minutes, 3 significant
/// digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    record_n(h, d, 1);
}

/// Records `n` samples of the same duration at once: messages sent in one
/// write and completed by one read share both timestamps, so a pipeline's
/// worth costs one histogram update, not one per message.
pub fn record_n(h: &mut Histogram<u64>, d: Duration, n: u64) {
    let ns = (d.as_nanos() as u64).clamp(1, h.high());
    h.record_n(ns, n).expect("value clamped into range");
}

/// The kinds of failure a run can meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A connect was refused or failed.
    Connect,
    /// This process ran out of file descriptors (`RLIMIT_NOFILE`).
    FdLimit,
    /// No local port was left for the source address.
    Ports,
    /// A byte came back different from the one sent.
    Mismatch,
    /// The server closed or reset a connection we had not finished.
    Closed,
    /// A connect or a reply took longer than `--timeout`.
    Timeout,
    /// chat: a line never reached a client that should have had it.
    Lost,
}

impl Failure {
    /// Every kind, in declaration order.
    pub const ALL: [Failure; 7] = [
        Failure::Connect,
        Failure::FdLimit,
        Failure::Ports,
        Failure::Mismatch,
        Failure::Closed,
        Failure::Timeout,
        Failure::Lost,
    ];

    /// The key used in JSON and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::FdLimit => "fd_limit",
            Failure::Ports => "ports",
            Failure::Mismatch => "mismatch",
            Failure::Closed => "closed",
            Failure::Timeout => "timeout",
            Failure::Lost => "lost",
        }
    }
}

/// Everything one poll loop counted; [`Tally::merge`] adds them up.
#[derive(Debug)]
pub struct Tally {
    /// Connections that completed the handshake.
    pub opened: u64,
    /// Connections that were planned but never opened (after a limit).
    pub not_opened: u64,
    /// Messages that completed their round trip in the measured window.
    pub messages: u64,
    /// Bytes sent in those messages.
    pub bytes: u64,
    /// Round-trip time per message (ns); in open loop counted from the
    /// time the message was due.
    pub latency: Histogram<u64>,
    /// Open loop: round-trip time counted from the actual send (ns).
    pub latency_uncorrected: Histogram<u64>,
    /// Time from `connect` to established (ns).
    pub connect_latency: Histogram<u64>,
    /// Failure counts, one per [`Failure`] kind, in declaration order.
    pub errors: [u64; 7],
    /// A few failures, described.
    pub examples: Vec<String>,
    /// Length of the measured window, seconds.
    pub measured_secs: f64,
    /// hold: seconds to open every connection and do its first round trip.
    pub open_secs: f64,
    /// hold: connections that answered the round trip after the hold.
    pub survived: u64,
    /// churn: connect, round trip, close cycles completed in the window.
    pub cycles: u64,
    /// udp: datagrams sent and never answered.
    pub lost: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            opened: 0,
            not_opened: 0,
            messages: 0,
            bytes: 0,
            latency: histogram(),
            latency_uncorrected: histogram(),
            connect_latency: histogram(),
            errors: [0; 7],
            examples: Vec::new(),
            measured_secs: 0.0,
            open_secs: 0.0,
            survived: 0,
            cycles: 0,
            lost: 0,
        }
    }
}

impl Tally {
    /// Counts one failure, keeping its description if there is room.
    pub fn fail(&mut self, kind: Failure, what: impl FnOnce() -> String) {
        self.errors[kind as usize] += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what());
        }
    }

    /// Counts one failure whose description goes before the others: the
    /// one that explains them.
    pub fn fail_first(&mut self, kind: Failure, what: String) {
        self.errors[kind as usize] += 1;
        self.examples.insert(0, what);
        self.examples.truncate(EXAMPLES);
    }

    /// The count for one kind of failure.
    pub fn count(&self, kind: Failure) -> u64 {
        self.errors[kind as usize]
    }

    /// Every failure counted.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Starts the measured window afresh: what the warm-up counted goes.
    pub fn reset_measurement(&mut self) {
        self.messages = 0;
        self.bytes = 0;
        self.cycles = 0;
        self.latency.reset();
        self.latency_uncorrected.reset();
    }

    /// Adds another loop's (or process's) counts to these. Loops measure
    /// windows of the same length side by side, so rates add up; the window
    /// kept is the longest. Histograms are added bucket by bucket, so the
    /// merged percentiles are exact (never averages of percentiles).
    pub fn merge(&mut self, other: Tally) {
        self.opened += other.opened;
        self.not_opened += other.not_opened;
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.latency.add(&other.latency).expect("same bounds");
        self.latency_uncorrected
            .add(&other.latency_uncorrected)
            .expect("same bounds");
        self.connect_latency
            .add(&other.connect_latency)
            .expect("same bounds");
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        for e in other.examples {
            if self.examples.len() < EXAMPLES {
                self.examples.push(e);
            }
        }
        self.measured_secs = self.measured_secs.max(other.measured_secs);
        self.open_secs = self.open_secs.max(other.open_secs);
        self.survived += other.survived;
        self.cycles += other.cycles;
        self.lost += other.lost;
    }
}

/// A finished run, ready to print.
pub struct Report {
    /// `echo`, `hold` or `churn`.
    pub workload: &'static str,
    /// Every setting, as JSON (also printed at the top of the table).
    pub settings: Value,
    /// Connections asked for.
    pub connections: u64,
    /// Datagram mode (`--udp`).
    pub udp: bool,
    /// Open loop (`--rate`): the uncorrected latency is shown too.
    pub open_loop: bool,
    /// `--interval`: one row per interval.
    pub intervals: Vec<Row>,
    /// Keys only some runs have (`--find-max-rate`, chat), added to the
    /// JSON object as they are.
    pub extra: serde_json::Map<String, Value>,
    /// The counts.
    pub tally: Tally,
}

impl Report {
    /// Prints the table (or with `json` the JSON object) on stdout and
    /// returns the exit status: 0 when [`ok`](Report::ok), else 1.
    pub fn print(&self, json: bool) -> std::process::ExitCode {
        if json {
            println!("{}", self.json());
        } else {
            print!("{}", self.table());
        }
        if self.ok() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }

    fn per_sec(&self, n: u64) -> f64 {
        if self.tally.measured_secs > 0.0 {
            n as f64 / self.tally.measured_secs
        } else {
            0.0
        }
    }

    /// What made the run fail, if anything.
    pub fn problems(&self) -> Vec<String> {
        let t = &self.tally;
        let mut p = Vec::new();
        if t.total_errors() > 0 {
            p.push(format!("{} errors", t.total_errors()));
        }
        if t.opened < self.connections && !self.udp {
            p.push(format!(
                "{} of {} connections opened",
                t.opened, self.connections
            ));
        }
        match self.workload {
            "hold" if t.survived < self.connections => p.push(format!(
                "{} of {} connections survived the hold",
                t.survived, self.connections
            )),
            "echo" if t.messages == 0 => p.push("no message completed".into()),
            "churn" if t.cycles == 0 => p.push("no connection cycle completed".into()),
            "chat" if t.messages == 0 => p.push("no line delivered".into()),
            _ => {}
        }
        p
    }

    /// True when everything opened and every byte came back as sent.
    pub fn ok(&self) -> bool {
        self.problems().is_empty()
    }

    /// The `--json` object.
    pub fn json(&self) -> Value {
        let t = &self.tally;
        let mut errors = serde_json::Map::new();
        errors.insert("total".into(), json!(t.total_errors()));
        for kind in Failure::ALL {
            errors.insert(kind.name().into(), json!(t.count(kind)));
        }
        let mut v = json!({
            "workload": self.workload,
            "settings": self.settings,
            "connections_opened": t.opened,
            "connections_not_opened": t.not_opened,
            "messages": t.messages,
            "msgs_per_sec": round1(self.per_sec(t.messages)),
            "bytes_per_sec": round1(self.per_sec(t.bytes)),
            "measured_secs": round3(t.measured_secs),
            "latency_us": percentiles(&t.latency),
            "connect_latency_us": percentiles(&t.connect_latency),
            "connections_per_sec": round1(self.per_sec(t.cycles)),
            "cycles": t.cycles,
            "open_secs": round3(t.open_secs),
            "survived": t.survived,
            "datagrams_lost": t.lost,
            "errors": errors,
            "failures": t.examples,
            "problems": self.problems(),
            "ok": self.ok(),
            "intervals": self.intervals.iter().map(Row::json).collect::<Vec<_>>(),
            // Load processes behind these counts (see `extra` for several).
            "processes": 1,
            // Every count above, exactly, histograms included, so that
            // `reactor load merge` can add reports up.
            "tally": super::merge::tally_json(t),
        });
        if self.open_loop {
            v["latency_uncorrected_us"] = percentiles(&t.latency_uncorrected);
        }
        for (k, x) in &self.extra {
            v[k] = x.clone();
        }
        v
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let t = &self.tally;
        let mut s = String::new();
        let _ = writeln!(s, "reactor load: {}", describe(&self.settings));
        if let Some(p) = self.extra.get("processes").and_then(Value::as_u64) {
            if p > 1 {
                let _ = writeln!(s, "processes     {p} (counts added, histograms merged)");
            }
        }
        let _ = writeln!(
            s,
            "connections   {} opened{}",
            t.opened,
            if t.not_opened > 0 {
                format!(", {} never opened", t.not_opened)
            } else {
                String::new()
            }
        );
        match self.workload {
            "hold" => {
                let _ = writeln!(
                    s,
                    "opening       {:.3} s for all, first round trip included",
                    t.open_secs
                );
                let _ = writeln!(
                    s,
                    "survived      {} of {} after the hold",
                    t.survived, self.connections
                );
            }
            "churn" => {
                let _ = writeln!(
                    s,
                    "cycles        {} in {:.2} s ({:.0} connections/s)",
                    t.cycles,
                    t.measured_secs,
                    self.per_sec(t.cycles)
                );
            }
            _ => {}
        }
        if self.workload == "hold" {
            let _ = writeln!(
                s,
                "messages      {} round trips (one before the hold, one after)",
                t.messages
            );
        } else if self.workload == "chat" {
            let _ = writeln!(
                s,
                "deliveries    {} in {:.2} s ({:.0} lines/s delivered; {} lines sent in all)",
                t.messages,
                t.measured_secs,
                self.per_sec(t.messages),
                self.extra.get("lines_sent").cloned().unwrap_or(Value::Null)
            );
        } else {
            let _ = writeln!(
                s,
                "messages      {} in {:.2} s ({:.0} msg/s, {:.2} MB/s)",
                t.messages,
                t.measured_secs,
                self.per_sec(t.messages),
                self.per_sec(t.bytes) / 1e6
            );
        }
        if self.udp {
            let _ = writeln!(s, "lost          {} datagrams", t.lost);
        }
        let _ = writeln!(
            s,
            "{:14} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "p50", "p90", "p99", "p99.9", "max"
        );
        let uncorrected = if self.open_loop {
            Some(("uncorrected µs", &t.latency_uncorrected))
        } else {
            None
        };
        let latency = if self.workload == "chat" {
            "delivery µs"
        } else {
            "latency µs"
        };
        for (name, h) in [(latency, &t.latency)]
            .into_iter()
            .chain(uncorrected)
            .chain([("connect µs", &t.connect_latency)])
        {
            if h.is_empty() {
                continue;
            }
            let _ = write!(s, "{name:<14}");
            for q in QUANTILES {
                let _ = write!(s, " {:>10.1}", quantile_us(h, q.1));
            }
            let _ = writeln!(s);
        }
        if t.total_errors() == 0 {
            let _ = writeln!(s, "errors        none");
        } else {
            let counts: Vec<String> = Failure::ALL
                .iter()
                .filter(|k| t.count(**k) > 0)
                .map(|k| format!("{} {}", k.name(), t.count(*k)))
                .collect();
            let _ = writeln!(s, "errors        {}", counts.join(", "));
            for e in &t.examples {
                let _ = writeln!(s, "  - {e}");
            }
        }
        let problems = self.problems();
        if problems.is_empty() {
            let _ = writeln!(s, "result        ok");
        } else {
            let _ = writeln!(s, "result        FAILED: {}", problems.join("; "));
        }
        s
    }
}

const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p999", 0.999),
    ("max", 1.0),
];

/// Quantile `q` of `h` in µs (`q` = 1: the maximum); 0 when empty.
pub fn quantile_us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    let ns = if q >= 1.0 {
        h.max()
    } else {
        h.value_at_quantile(q)
    };
    ns as f64 / 1000.0
}

/// `p50`, `p90`, `p99`, `p999` and `max` of `h`, in µs, as JSON.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let mut m = serde_json::Map::new();
    for (name, q) in QUANTILES {
        m.insert(name.into(), json!(round1(quantile_us(h, q))));
    }
    Value::Object(m)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One line naming what was run.
fn describe(settings: &Value) -> String {
    let get = |k: &str| settings.get(k).cloned().unwrap_or(Value::Null);
    let target = match (get("unix"), get("udp")) {
        (Value::String(p), _) => format!("unix {p}"),
        (_, Value::String(a)) => format!("udp {a}"),
        _ => get("addr").as_str().unwrap_or("?").to_string(),
    };
    let workload = get("workload").as_str().unwrap_or("?").to_string();
    let shape = if workload == "chat" {
        let rate = get("rate").as_f64().filter(|&r| r > 0.0).unwrap_or(1.0);
        format!("{rate} lines/s per client")
    } else {
        format!("pipeline {}", get("pipeline"))
    };
    let time = if workload == "hold" {
        format!("held {} s", get("duration"))
    } else {
        format!("{} s (+{} s warm-up)", get("duration"), get("warmup"))
    };
    format!(
        "{workload} against {target}, {} connections, {} B messages, {shape}, {time}, {} thread(s)",
        get("connections"),
        get("size"),
        get("threads"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(workload: &'static str, tally: Tally) -> Report {
        Report {
            workload,
            settings: json!({"workload": workload}),
            connections: 2,
            udp: false,
            open_loop: false,
            intervals: Vec::new(),
            extra: serde_json::Map::new(),
            tally,
        }
    }

    #[test]
    fn merged_tallies_add_counts_and_histograms() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        a.messages = 3;
        b.messages = 4;
        record(&mut a.latency, Duration::from_micros(10));
        record(&mut b.latency, Duration::from_micros(30));
        b.fail(Failure::Mismatch, || "flipped".into());
        a.merge(b);
        assert_eq!(a.messages, 7);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.count(Failure::Mismatch), 1);
        assert_eq!(a.examples, ["flipped"]);
    }

    #[test]
    fn any_error_or_missing_connection_fails_the_run() {
        let clean = || Tally {
            opened: 2,
            messages: 10,
            measured_secs: 1.0,
            ..Tally::default()
        };
        assert!(report("echo", clean()).ok());
        let mut t = clean();
        t.fail(Failure::Timeout, || "slow".into());
        let r = report("echo", t);
        assert!(!r.ok());
        assert_eq!(r.json()["errors"]["timeout"], 1);
        assert_eq!(r.json()["errors"]["total"], 1);
        let short = Tally {
            opened: 1,
            messages: 10,
            ..Tally::default()
        };
        assert!(!report("echo", short).ok());
    }

    #[test]
    fn json_has_the_documented_keys() {
        let v = report("echo", Tally::default()).json();
        for key in [
            "workload",
            "settings",
            "connections_opened",
            "messages",
            "msgs_per_sec",
            "bytes_per_sec",
            "latency_us",
            "connect_latency_us",
            "errors",
            "ok",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for q in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_us"].get(q).is_some(), "missing latency {q}");
        }
    }
}
