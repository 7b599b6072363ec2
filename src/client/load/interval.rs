//! Live progress: what the loops counted in each `--interval`, merged,
//! printed as one line on stderr, kept for `--json`'s `intervals` and
//! written to `--hdr-log`.
//!
//! Each loop closes an interval when the wall clock passes the next
//! boundary (boundaries count from the run's start, so every loop's
//! interval `i` covers the same time) and sends it over a channel. The
//! main thread adds up interval `i` from every loop (histograms with
//! `add`, so the percentiles are exact) and prints it once all loops have
//! reported it, or once the loops still running have.
//!
//! A loop stalled past a boundary skips that interval (see [`Live::close`]).
//! Its connections are still open and its errors still happened, and
//! both are running totals, not counts in the interval: so for an
//! interval a sender skipped, the collector adds the `open` and `errors`
//! it last reported (`open` only while it still runs), and a row's totals
//! never dip because one loop or process was late.
//!
//! Load processes (`processes.rs`) do the same one level up: each child
//! merges its own loops' intervals and, instead of printing them, sends
//! each one to the parent as one JSON line ([`Interval::to_json`],
//! histograms serialized exactly). Every child counts its intervals from
//! the parent's start, so interval `i` covers the same time in every
//! process, and the parent's [`Collector`] merges them by index as it
//! merges loops: one row per interval, `t` from the run's start.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::merge::{decode_histogram, encode_histogram};
use super::report::{histogram, percentiles, quantile_us};

/// Where a loop sends its intervals: its loop number, the interval, and
/// whether it is the loop's last.
pub type ToCollector = std::sync::mpsc::Sender<(usize, Interval, bool)>;

/// Where a child load process sends its merged intervals (see
/// [`Collector::forwarding`]).
pub type Forward = Box<dyn FnMut(&Interval)>;

/// What one loop counted in one interval.
#[derive(Debug)]
pub struct Interval {
    /// Which interval: it covers `index x every .. end` of the run.
    pub index: u32,
    /// When it ended, from the start of the run (the last one is short).
    pub end: Duration,
    /// Messages completed in it (warm-up and the wait for the last replies
    /// included: this is what the loop did, not only what is measured).
    pub messages: u64,
    /// Their latency, ns (open loop: from the due time).
    pub latency: Histogram<u64>,
    /// Open loop: their latency from the actual send, ns.
    pub uncorrected: Histogram<u64>,
    /// Connections open at its end.
    pub open: u64,
    /// Connections opened in it.
    pub opened: u64,
    /// Failures counted so far, since the start of the run.
    pub errors: u64,
}

impl Interval {
    /// An empty interval `index`.
    pub fn new(index: u32) -> Interval {
        Interval {
            index,
            end: Duration::ZERO,
            messages: 0,
            latency: histogram(),
            uncorrected: histogram(),
            open: 0,
            opened: 0,
            errors: 0,
        }
    }

    /// The interval as JSON, histograms exact (a child load process sends
    /// it to its parent).
    pub fn to_json(&self) -> Value {
        json!({
            "index": self.index,
            "end_us": self.end.as_micros() as u64,
            "messages": self.messages,
            "latency": encode_histogram(&self.latency),
            "uncorrected": encode_histogram(&self.uncorrected),
            "open": self.open,
            "opened": self.opened,
            "errors": self.errors,
        })
    }

    /// The inverse of [`Interval::to_json`].
    pub fn from_json(v: &Value) -> Result<Interval, String> {
        let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("interval: no {k}"));
        let h = |k: &str| {
            v[k].as_str()
                .ok_or_else(|| format!("interval: no {k}"))
                .and_then(decode_histogram)
        };
        Ok(Interval {
            index: u32::try_from(n("index")?).map_err(|e| format!("interval index: {e}"))?,
            end: Duration::from_micros(n("end_us")?),
            messages: n("messages")?,
            latency: h("latency")?,
            uncorrected: h("uncorrected")?,
            open: n("open")?,
            opened: n("opened")?,
            errors: n("errors")?,
        })
    }

    /// Adds another loop's count of the same interval to this one.
    pub fn merge(&mut self, other: &Interval) {
        debug_assert_eq!(self.index, other.index);
        self.end = self.end.max(other.end);
        self.messages += other.messages;
        self.latency.add(&other.latency).expect("same bounds");
        self.uncorrected
            .add(&other.uncorrected)
            .expect("same bounds");
        self.open += other.open;
        self.opened += other.opened;
        self.errors += other.errors;
    }
}

/// A loop's side of live progress: the interval being counted, and where
/// finished ones go.
pub struct Live {
    to: ToCollector,
    /// This loop's number, so the collector can tell loops apart.
    loop_id: usize,
    started: Instant,
    every: Duration,
    /// When the current interval ends.
    pub next: Instant,
    /// The interval being counted: the loop adds to it.
    pub current: Interval,
}

impl Live {
    /// Intervals of `every` from `started` on, sent to `to` as `loop_id`'s.
    pub fn new(to: ToCollector, loop_id: usize, started: Instant, every: Duration) -> Live {
        Live {
            to,
            loop_id,
            started,
            every,
            next: started + every,
            current: Interval::new(0),
        }
    }

    /// Ends the current interval at `now` with `open` connections and
    /// `errors` so far, sends it (`last`: the loop is done), and starts
    /// the next one.
    pub fn close(&mut self, now: Instant, open: u64, errors: u64, last: bool) {
        let index = self.current.index;
        let mut done = std::mem::replace(&mut self.current, Interval::new(index + 1));
        done.end = now.saturating_duration_since(self.started);
        done.open = open;
        done.errors = errors;
        // The collector may be gone if the main thread gave up; the
        // loop's own result still counts.
        let _ = self.to.send((self.loop_id, done, last));
        // After a stall, skip the boundaries already passed rather than
        // sending empty intervals in a burst.
        while self.next <= now {
            self.next += self.every;
        }
        let ended = (self.next - self.started).as_secs_f64() / self.every.as_secs_f64();
        self.current.index = (ended.round() as u32).saturating_sub(1);
    }
}

/// One row of `intervals` in the JSON report.
#[derive(Debug, Clone)]
pub struct Row {
    /// End of the interval, seconds from the start of the run.
    pub t: f64,
    /// Messages completed in it.
    pub messages: u64,
    /// Messages per second in it.
    pub msgs_per_sec: f64,
    /// Its latency percentiles (µs).
    pub latency_us: Value,
    /// Connections open at its end.
    pub connections_open: u64,
    /// Failures so far.
    pub errors: u64,
}

impl Row {
    /// The JSON object: `t`, `msgs_per_sec`, `latency_us`,
    /// `connections_open`, `errors`.
    pub fn json(&self) -> Value {
        json!({
            "t": (self.t * 1000.0).round() / 1000.0,
            "messages": self.messages,
            "msgs_per_sec": self.msgs_per_sec.round(),
            "latency_us": self.latency_us,
            "connections_open": self.connections_open,
            "errors": self.errors,
        })
    }
}

/// What the collector knows of one sender (a loop, or a load process).
#[derive(Debug, Clone, Copy, Default)]
struct Sender {
    /// The last interval it reported.
    last: Option<u32>,
    /// It has finished: nothing more will come.
    done: bool,
    /// `open` and `errors` of its interval shown last: what it carries
    /// into an interval it skipped.
    open: u64,
    errors: u64,
}

/// An interval some senders have reported, merged so far, and which
/// senders those were.
struct Pending {
    merged: Interval,
    from: Vec<Option<(u64, u64)>>,
}

/// The main thread's side: merges, prints, logs.
pub struct Collector {
    every: Duration,
    /// Per loop (or load process).
    loops: Vec<Sender>,
    /// Intervals some loops have reported.
    pending: BTreeMap<u32, Pending>,
    rows: Vec<Row>,
    open_loop: bool,
    hdr_log: Option<HdrLog>,
    /// Where the lines go (stderr, or above the progress bar).
    print: Box<dyn FnMut(String)>,
    /// In a child load process: where merged intervals go instead of
    /// being printed (to the parent).
    forward: Option<Forward>,
}

impl Collector {
    /// A collector for `loops` loops reporting every `every`.
    pub fn new(
        every: Duration,
        loops: usize,
        open_loop: bool,
        hdr_log: Option<HdrLog>,
        print: Box<dyn FnMut(String)>,
    ) -> Collector {
        Collector {
            every,
            loops: vec![Sender::default(); loops],
            pending: BTreeMap::new(),
            rows: Vec::new(),
            open_loop,
            hdr_log,
            print,
            forward: None,
        }
    }

    /// Sends each merged interval to `forward` instead of printing it or
    /// keeping a row (a child load process: its parent shows them).
    pub fn forwarding(mut self, forward: Forward) -> Collector {
        self.forward = Some(forward);
        self
    }

    /// Loop (or load process) `from` has finished without saying so with
    /// its last interval: nothing more is waited for from it.
    pub fn finished(&mut self, from: usize) {
        self.loops[from].done = true;
        self.flush(false);
    }

    /// Takes loop `from`'s interval; `last` when that loop has finished.
    /// Each loop sends its intervals in order.
    pub fn add(&mut self, from: usize, interval: Interval, last: bool) {
        let sender = &mut self.loops[from];
        sender.last = Some(interval.index);
        sender.done = last;
        let totals = (interval.open, interval.errors);
        let senders = self.loops.len();
        match self.pending.get_mut(&interval.index) {
            Some(p) => {
                p.merged.merge(&interval);
                p.from[from] = Some(totals);
            }
            None => {
                let mut p = Pending {
                    merged: interval,
                    from: vec![None; senders],
                };
                p.from[from] = Some(totals);
                self.pending.insert(p.merged.index, p);
            }
        }
        self.flush(false);
    }

    /// Prints every interval that every loop has reported or finished
    /// before; with `all`, everything left (the run is over).
    pub fn flush(&mut self, all: bool) {
        while let Some(entry) = self.pending.first_entry() {
            let index = *entry.key();
            let complete = self
                .loops
                .iter()
                .all(|s| s.done || s.last.is_some_and(|l| l >= index));
            if !(all || complete) {
                return;
            }
            let Pending { mut merged, from } = entry.remove();
            for (sender, totals) in self.loops.iter_mut().zip(from) {
                match totals {
                    Some((open, errors)) => (sender.open, sender.errors) = (open, errors),
                    None => {
                        // Skipped (stalled past the boundary) or already
                        // gone: its running totals carry over; its
                        // connections only while it still runs.
                        let gone = sender.done && !sender.last.is_some_and(|l| l >= index);
                        if !gone {
                            merged.open += sender.open;
                        }
                        merged.errors += sender.errors;
                    }
                }
            }
            self.show(merged);
        }
    }

    fn show(&mut self, iv: Interval) {
        if let Some(forward) = &mut self.forward {
            forward(&iv);
            return;
        }
        let start = self.every * iv.index;
        let secs = iv.end.saturating_sub(start).as_secs_f64().max(1e-9);
        let rate = iv.messages as f64 / secs;
        let mut line = format!(
            "[{:>7.2} s] {:>6} open{}  {:>10.0} msgs/s",
            iv.end.as_secs_f64(),
            iv.open,
            if iv.opened > 0 {
                format!(" (+{:.0}/s)", iv.opened as f64 / secs)
            } else {
                String::new()
            },
            rate
        );
        if !iv.latency.is_empty() {
            line += &format!(
                "  p50 {} p99 {} p99.9 {} µs",
                short(quantile_us(&iv.latency, 0.5)),
                short(quantile_us(&iv.latency, 0.99)),
                short(quantile_us(&iv.latency, 0.999)),
            );
        }
        if self.open_loop && !iv.uncorrected.is_empty() {
            line += &format!(
                " (uncorrected p99 {})",
                short(quantile_us(&iv.uncorrected, 0.99))
            );
        }
        line += &format!("  errors {}", iv.errors);
        (self.print)(line);
        if let Some(log) = &mut self.hdr_log {
            log.write(&iv, start, self.open_loop);
        }
        self.rows.push(Row {
            t: iv.end.as_secs_f64(),
            messages: iv.messages,
            msgs_per_sec: rate,
            latency_us: percentiles(&iv.latency),
            connections_open: iv.open,
            errors: iv.errors,
        });
    }

    /// The rows printed so far, for the report.
    pub fn finish(mut self) -> Vec<Row> {
        self.flush(true);
        if let Some(log) = self.hdr_log.take() {
            log.close();
        }
        self.rows
    }
}

/// Where interval lines go: above the live `bar` on a terminal (which
/// stays at the bottom), else plain lines on stderr.
pub fn printer(bar: Option<&indicatif::ProgressBar>) -> Box<dyn FnMut(String)> {
    match bar {
        Some(bar) => {
            let bar = bar.clone();
            Box::new(move |line| bar.println(line))
        }
        None => Box::new(|line| eprintln!("{line}")),
    }
}

/// A latency in µs, shortened for a progress line.
fn short(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

/// `--hdr-log FILE`: an HdrHistogram interval log (the format
/// `HistogramLogProcessor` and the other HdrHistogram tools read). Values
/// are nanoseconds; in open loop each interval is written twice, the
/// corrected histogram untagged and the uncorrected one tagged
/// `uncorrected`.
pub struct HdrLog {
    file: BufWriter<File>,
    serializer: V2DeflateSerializer,
    failed: bool,
}

impl HdrLog {
    /// Creates `path` and writes the log's header; `started` is the wall
    /// time the run began, which interval timestamps count from.
    pub fn create(path: &Path, started: SystemTime) -> std::io::Result<HdrLog> {
        let mut file = BufWriter::new(File::create(path)?);
        let mut serializer = V2DeflateSerializer::new();
        IntervalLogWriterBuilder::new()
            .add_comment("reactor load: latency histograms, values in nanoseconds")
            .with_start_time(started)
            .with_base_time(started)
            .begin_log_with(&mut file, &mut serializer)?;
        writeln!(
            file,
            "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
        )?;
        Ok(HdrLog {
            file,
            serializer,
            failed: false,
        })
    }

    fn write(&mut self, iv: &Interval, start: Duration, open_loop: bool) {
        // The crate's writer borrows the file and serializer while it
        // lives; a bare builder writes no header, so one per interval
        // appends just that interval's lines.
        let duration = iv.end.saturating_sub(start);
        let written = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut self.file, &mut self.serializer)
            .map_err(|e| e.to_string())
            .and_then(|mut w| {
                w.write_histogram(&iv.latency, start, duration, None)
                    .map_err(|e| e.to_string())?;
                if open_loop {
                    let tag = Tag::new("uncorrected");
                    w.write_histogram(&iv.uncorrected, start, duration, tag)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            });
        if let Err(e) = written {
            if !self.failed {
                eprintln!("reactor load: --hdr-log: {e}");
            }
            self.failed = true;
        }
    }

    fn close(mut self) {
        if let Err(e) = self.file.flush() {
            eprintln!("reactor load: --hdr-log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn interval(index: u32, messages: u64, latency_us: u64) -> Interval {
        let mut iv = Interval::new(index);
        iv.end = Duration::from_secs(u64::from(index) + 1);
        iv.messages = messages;
        iv.open = 1;
        crate::client::load::report::record_n(
            &mut iv.latency,
            Duration::from_micros(latency_us),
            messages,
        );
        iv
    }

    fn collector(loops: usize) -> (Collector, Rc<RefCell<Vec<String>>>) {
        let lines = Rc::new(RefCell::new(Vec::new()));
        let sink = lines.clone();
        let c = Collector::new(
            Duration::from_secs(1),
            loops,
            false,
            None,
            Box::new(move |l| sink.borrow_mut().push(l)),
        );
        (c, lines)
    }

    #[test]
    fn an_interval_is_printed_once_every_loop_has_sent_it() {
        let (mut c, lines) = collector(2);
        c.add(0, interval(0, 10, 100), false);
        c.add(0, interval(1, 10, 100), false);
        assert!(lines.borrow().is_empty(), "loop 1 has sent nothing yet");
        c.add(1, interval(0, 30, 300), false);
        assert_eq!(lines.borrow().len(), 1);
        let rows = c.finish();
        assert_eq!(rows.len(), 2);
        // Interval 0 adds both loops: 40 messages, a quarter of them at
        // 100 µs, so its p50 is the other loop's 300 µs (exact, not an
        // average of the two loops' percentiles).
        assert_eq!(rows[0].messages, 40);
        assert_eq!(rows[0].connections_open, 2);
        let p50 = rows[0].latency_us["p50"].as_f64().unwrap();
        assert!((299.0..=301.0).contains(&p50), "{p50}");
        assert_eq!(rows[1].messages, 10);
    }

    #[test]
    fn an_interval_survives_json_exactly() {
        let mut iv = interval(3, 1000, 250);
        iv.opened = 7;
        iv.errors = 2;
        crate::client::load::report::record_n(&mut iv.uncorrected, Duration::from_micros(90), 5);
        let back = Interval::from_json(&iv.to_json()).unwrap();
        assert_eq!(back.index, 3);
        assert_eq!(back.end, iv.end);
        assert_eq!(
            (back.messages, back.open, back.opened, back.errors),
            (1000, 1, 7, 2)
        );
        assert_eq!(back.latency, iv.latency);
        assert_eq!(back.uncorrected, iv.uncorrected);
        assert!(Interval::from_json(&json!({"index": 1})).is_err());
    }

    #[test]
    fn a_process_that_finished_is_not_waited_for() {
        let (mut c, lines) = collector(2);
        c.add(0, interval(0, 5, 100), false);
        c.add(0, interval(1, 5, 100), false);
        assert!(lines.borrow().is_empty());
        c.finished(1);
        assert_eq!(lines.borrow().len(), 2);
    }

    #[test]
    fn a_forwarding_collector_sends_merged_intervals_and_prints_nothing() {
        let (c, lines) = collector(2);
        let sent = Rc::new(RefCell::new(Vec::new()));
        let sink = sent.clone();
        let mut c = c.forwarding(Box::new(move |iv: &Interval| {
            sink.borrow_mut().push((iv.index, iv.messages))
        }));
        c.add(0, interval(0, 5, 100), false);
        c.add(1, interval(0, 7, 100), true);
        c.add(0, interval(1, 1, 100), true);
        assert!(c.finish().is_empty());
        assert!(lines.borrow().is_empty());
        assert_eq!(*sent.borrow(), [(0, 12), (1, 1)]);
    }

    #[test]
    fn a_skipped_interval_carries_the_senders_open_and_errors() {
        let (mut c, _) = collector(3);
        let with = |index, open, errors| {
            let mut iv = interval(index, 5, 100);
            (iv.open, iv.errors) = (open, errors);
            iv
        };
        for s in 0..3 {
            c.add(s, with(0, 100, s as u64), false);
        }
        // Sender 1 stalls past boundary 1 and skips interval 1; sender 2
        // ends after interval 0.
        c.add(2, with(1, 0, 2), true);
        c.add(0, with(1, 100, 0), false);
        c.add(1, with(2, 100, 1), false);
        c.add(0, with(2, 100, 0), false);
        let rows = c.finish();
        let totals: Vec<(u64, u64)> = rows
            .iter()
            .map(|r| (r.connections_open, r.errors))
            .collect();
        // Interval 1 counts sender 1's 100 connections and 1 error from
        // interval 0; interval 2 counts sender 2's errors but not its
        // connections (it has finished).
        assert_eq!(totals, [(300, 3), (200, 3), (200, 3)]);
        // Messages are per interval: nothing is carried.
        assert_eq!(rows[1].messages, 10);
    }

    #[test]
    fn a_finished_loop_holds_nothing_up() {
        let (mut c, lines) = collector(2);
        c.add(1, interval(0, 5, 100), true);
        c.add(0, interval(0, 5, 100), false);
        c.add(0, interval(1, 5, 100), false);
        c.add(0, interval(2, 5, 100), false);
        // Loop 1 is done after interval 0, so 1 and 2 need only loop 0.
        assert_eq!(lines.borrow().len(), 3);
        let rows = c.finish();
        let t: Vec<f64> = rows.iter().map(|r| r.t).collect();
        assert_eq!(t, [1.0, 2.0, 3.0]);
    }
}
