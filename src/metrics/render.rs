//! From snapshots to the Prometheus text exposition format (0.0.4).
//!
//! Encoding happens only when a scrape arrives: the loop hands over its
//! [`Snapshot`]s, a fresh `prometheus-client` registry with one
//! [`Collector`] encodes them, and the result is turned from OpenMetrics
//! text (what `prometheus-client` writes) into the 0.0.4 text format that
//! `text/plain; version=0.0.4` promises. The two differ in only two
//! places, both handled by [`openmetrics_to_text_004`]: a counter's
//! `# HELP`/`# TYPE` lines name the sample (`x_total`), not the family
//! (`x`), and there is no `# EOF` line. (It also writes the sum's empty
//! label set as `x{}`, which becomes plain `x`.)
//!
//! With several workers, every series appears once as the sum (no
//! `worker` label) and once per worker with `worker="N"`; a query wanting
//! the total selects `{worker=""}`, one wanting the spread `{worker!=""}`.

use std::fmt::Write as _;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::snapshot::{Snapshot, EVENT_BUCKETS};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition for `workers`, each `(worker id, its snapshot)`: the sum
/// of all of them, and with more than one worker also each one labelled
/// `worker`. A single in-process loop passes one pair.
pub fn render(workers: &[(usize, Snapshot)]) -> String {
    let mut total = Snapshot::default();
    for (_, s) in workers {
        total.add(s);
    }
    let mut series = vec![(None, total)];
    if workers.len() > 1 {
        series.extend(
            workers
                .iter()
                .map(|(w, s)| (Some(w.to_string()), s.clone())),
        );
    }
    let mut registry = Registry::with_prefix("reactor");
    registry.register_collector(Box::new(Snapshots(series)));
    let mut open = String::with_capacity(8192);
    // Writing into a String cannot fail.
    prometheus_client::encoding::text::encode(&mut open, &registry)
        .expect("encoding into a String");
    openmetrics_to_text_004(&open)
}

/// The collector: the snapshots to encode, each with its `worker` label
/// (`None` for the sum).
#[derive(Debug)]
struct Snapshots(Vec<(Option<String>, Snapshot)>);

/// What kind of series a [`Family`] is, and how to read it from a snapshot.
enum Kind {
    Counter(fn(&Snapshot) -> u64),
    Gauge(fn(&Snapshot) -> u64),
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
}

/// The plain one-number series, in the order they are written.
const FAMILIES: &[Family] = &[
    Family {
        name: "connections_active",
        help: "Connections open now.",
        kind: Kind::Gauge(|s| s.connections_active),
    },
    Family {
        name: "connections_accepted",
        help: "Connections accepted, rejected ones included.",
        kind: Kind::Counter(|s| s.connections_accepted),
    },
    Family {
        name: "bytes_received",
        help: "Bytes read from clients (TCP, Unix and UDP).",
        kind: Kind::Counter(|s| s.bytes_received),
    },
    Family {
        name: "bytes_sent",
        help: "Bytes written to clients (TCP, Unix and UDP).",
        kind: Kind::Counter(|s| s.bytes_sent),
    },
    Family {
        name: "reads",
        help: "Reads that returned data (one per message in ping-pong echo).",
        kind: Kind::Counter(|s| s.reads),
    },
    Family {
        name: "queued_bytes",
        help: "Bytes waiting in the server's own output queues.",
        kind: Kind::Gauge(|s| s.queued_bytes),
    },
    Family {
        name: "paused_connections",
        help: "Connections not read from until their output drains (back-pressure).",
        kind: Kind::Gauge(|s| s.paused_connections),
    },
    Family {
        name: "ready_list_length",
        help: "Sockets whose budget ran out with work left, served again next turn.",
        kind: Kind::Gauge(|s| s.ready_list),
    },
    Family {
        name: "poll_wakeups",
        help: "Times poll returned.",
        kind: Kind::Counter(|s| s.poll_wakeups),
    },
    Family {
        name: "accept_paused",
        help: "Times accepting paused because the process ran out of descriptors (EMFILE/ENFILE).",
        kind: Kind::Counter(|s| s.accept_paused),
    },
    Family {
        name: "slow_consumers_dropped",
        help: "Chat clients disconnected for not reading their output.",
        kind: Kind::Counter(|s| s.slow_consumers_dropped),
    },
];

impl Snapshots {
    /// Writes one value per snapshot under the descriptor `m` belongs to,
    /// each with its `worker` label and `extra` labels.
    fn each(
        &self,
        m: &mut MetricEncoder,
        extra: &[(&'static str, &str)],
        mut write: impl FnMut(MetricEncoder, &Snapshot) -> Result<(), std::fmt::Error>,
    ) -> Result<(), std::fmt::Error> {
        for (worker, s) in &self.0 {
            let mut labels: Vec<(&str, String)> = Vec::with_capacity(2);
            if let Some(w) = worker {
                labels.push(("worker", w.clone()));
            }
            labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
            write(m.encode_family(&labels)?, s)?;
        }
        Ok(())
    }
}

impl Collector for Snapshots {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in FAMILIES {
            let ty = match f.kind {
                Kind::Counter(_) => MetricType::Counter,
                Kind::Gauge(_) => MetricType::Gauge,
            };
            let mut m = encoder.encode_descriptor(f.name, f.help, None, ty)?;
            self.each(&mut m, &[], |m, s| match f.kind {
                Kind::Counter(get) => ConstCounter::new(get(s)).encode(m),
                Kind::Gauge(get) => ConstGauge::new(get(s)).encode(m),
            })?;
        }

        let mut m = encoder.encode_descriptor(
            "connections_closed",
            "Connections closed, by reason.",
            None,
            MetricType::Counter,
        )?;
        // Every reason any snapshot has, so each worker shows the same set.
        let mut reasons: Vec<&str> = self
            .0
            .iter()
            .flat_map(|(_, s)| s.closed.keys().map(String::as_str))
            .collect();
        reasons.sort_unstable();
        reasons.dedup();
        for reason in reasons {
            self.each(&mut m, &[("reason", reason)], |m, s| {
                ConstCounter::new(s.closed.get(reason).copied().unwrap_or(0)).encode(m)
            })?;
        }

        let mut m = encoder.encode_descriptor(
            "udp_datagrams",
            "UDP datagrams, by direction (received, sent).",
            None,
            MetricType::Counter,
        )?;
        for (direction, get) in [
            (
                "received",
                (|s: &Snapshot| s.udp_received) as fn(&Snapshot) -> u64,
            ),
            ("sent", |s: &Snapshot| s.udp_sent),
        ] {
            self.each(&mut m, &[("direction", direction)], |m, s| {
                ConstCounter::new(get(s)).encode(m)
            })?;
        }

        let mut m = encoder.encode_descriptor(
            "loop_busy_seconds",
            "Time the loop spent handling events, not waiting in poll.",
            None,
            MetricType::Counter,
        )?;
        self.each(&mut m, &[], |m, s| {
            ConstCounter::new(s.busy_nanos as f64 / 1e9).encode(m)
        })?;

        let mut m = encoder.encode_descriptor(
            "events_per_wakeup",
            "Readiness events returned by one poll call.",
            None,
            MetricType::Histogram,
        )?;
        self.each(&mut m, &[], |mut m, s| {
            let mut buckets: Vec<(f64, u64)> = EVENT_BUCKETS
                .iter()
                .zip(&s.events_per_wakeup)
                .map(|(le, n)| (*le as f64, *n))
                .collect();
            // Counts past the last bound are clamped into it, so +Inf adds none.
            buckets.push((f64::INFINITY, 0));
            m.encode_histogram::<NoLabelSet>(s.events as f64, s.poll_wakeups, &buckets, None)
        })?;
        Ok(())
    }
}

/// Rewrites `prometheus-client`'s OpenMetrics text as the Prometheus text
/// format 0.0.4: a counter family `x` is written with `# HELP x_total` and
/// `# TYPE x_total counter` (its samples are `x_total` in both formats),
/// the OpenMetrics-only `# EOF` line is dropped, and an empty label set
/// `x{} 1` becomes `x 1`. Every other line is the same in both formats and
/// passes through.
pub fn openmetrics_to_text_004(open: &str) -> String {
    let lines: Vec<&str> = open.lines().collect();
    let mut out = String::with_capacity(open.len() + 256);
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            continue;
        }
        let counter_family = |name: &str| {
            // The TYPE line follows the HELP line it belongs to.
            let ty = if line.starts_with("# TYPE ") {
                Some(*line)
            } else {
                lines.get(i + 1).copied()
            };
            ty == Some(format!("# TYPE {name} counter").as_str())
        };
        match parse_descriptor(line) {
            Some((keyword, name, rest)) if counter_family(name) => {
                let _ = writeln!(out, "# {keyword} {name}_total{rest}");
            }
            // An unlabelled series in a labelled family comes out as
            // `name{} value`; both formats prefer plain `name value`.
            _ => match line.split_once("{} ") {
                Some((name, value))
                    if name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') =>
                {
                    let _ = writeln!(out, "{name} {value}");
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            },
        }
    }
    out
}

/// `# HELP name rest` / `# TYPE name rest` → (keyword, name, " rest").
fn parse_descriptor(line: &str) -> Option<(&str, &str, &str)> {
    let body = line.strip_prefix("# ")?;
    let (keyword, after) = body.split_once(' ')?;
    if keyword != "HELP" && keyword != "TYPE" {
        return None;
    }
    let end = after.find(' ').unwrap_or(after.len());
    Some((keyword, &after[..end], &after[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot {
            connections_active: 3,
            connections_accepted: 5,
            bytes_received: 100,
            bytes_sent: 90,
            busy_nanos: 1_500_000_000,
            udp_sent: 4,
            ..Snapshot::default()
        };
        s.closed.insert("done".into(), 1);
        s.closed.insert("rejected".into(), 1);
        s.count_wakeup(1);
        s.count_wakeup(3);
        s
    }

    #[test]
    fn counters_are_typed_under_their_sample_name_and_no_eof_line() {
        let text = render(&[(0, sample())]);
        assert!(text.contains("# TYPE reactor_connections_accepted_total counter\n"));
        assert!(text.contains("# HELP reactor_connections_accepted_total Connections"));
        assert!(text.contains("\nreactor_connections_accepted_total 5\n"));
        assert!(text.contains("# TYPE reactor_connections_active gauge\n"));
        assert!(text.contains("\nreactor_connections_active 3\n"));
        assert!(text.contains("reactor_connections_closed_total{reason=\"rejected\"} 1\n"));
        assert!(text.contains("reactor_udp_datagrams_total{direction=\"sent\"} 4\n"));
        assert!(text.contains("reactor_loop_busy_seconds_total 1.5\n"));
        assert!(!text.contains("EOF"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn the_histogram_is_cumulative_and_ends_with_inf() {
        let text = render(&[(0, sample())]);
        assert!(text.contains("# TYPE reactor_events_per_wakeup histogram\n"));
        assert!(text.contains("reactor_events_per_wakeup_bucket{le=\"0.0\"} 0\n"));
        assert!(text.contains("reactor_events_per_wakeup_bucket{le=\"1.0\"} 1\n"));
        assert!(text.contains("reactor_events_per_wakeup_bucket{le=\"2.0\"} 1\n"));
        assert!(text.contains("reactor_events_per_wakeup_bucket{le=\"4.0\"} 2\n"));
        assert!(text.contains("reactor_events_per_wakeup_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("reactor_events_per_wakeup_sum 4.0\n"));
        assert!(text.contains("reactor_events_per_wakeup_count 2\n"));
    }

    #[test]
    fn several_workers_give_the_sum_and_one_labelled_series_each() {
        let text = render(&[(0, sample()), (1, sample())]);
        assert!(text.contains("\nreactor_connections_accepted_total 10\n"));
        assert!(text.contains("reactor_connections_accepted_total{worker=\"0\"} 5\n"));
        assert!(text.contains("reactor_connections_accepted_total{worker=\"1\"} 5\n"));
        assert!(text.contains("reactor_connections_closed_total{worker=\"1\",reason=\"done\"} 1\n"));
        assert!(text.contains("reactor_events_per_wakeup_count{worker=\"0\"} 2\n"));
        assert!(text.contains("\nreactor_events_per_wakeup_count 4\n"));
        assert!(!render(&[(0, sample())]).contains("worker"));
    }

    #[test]
    fn only_counter_descriptors_are_renamed() {
        let open = "# HELP a A.\n# TYPE a counter\na_total{} 1\n# HELP b B.\n# TYPE b gauge\nb{x=\"{} \"} 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text_004(open),
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# HELP b B.\n# TYPE b gauge\nb{x=\"{} \"} 2\n"
        );
    }
}

#[cfg(test)]
mod cost {
    /// `cargo test --release --lib render_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn render_cost() {
        let s = super::Snapshot::default();
        let t = std::time::Instant::now();
        let n = 20_000;
        let mut len = 0;
        for _ in 0..n {
            len += super::render(&[(0, s.clone())]).len();
        }
        println!(
            "render: {:.1} µs each ({len})",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
