//! Reports that add up exactly: a [`Tally`] as JSON and back, histograms
//! included, and `reactor load merge`.
//!
//! Percentiles cannot be averaged: the p99 of two runs is not the mean of
//! their p99s. So every `--json` report carries its raw counts and each
//! latency histogram in HdrHistogram's V2 serialized form (base64), and
//! merging decodes the histograms and adds them bucket by bucket
//! (`Histogram::add`). The same path joins the load processes of one run
//! ([`super::processes`]) and the reports of several load hosts.

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::report::{Failure, Report, Tally};
use super::Workload;

/// A histogram as base64 of its V2 serialized form.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .expect("serializing into memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The histogram [`encode_histogram`] wrote.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("histogram does not decode: {e:?}"))?;
    // Re-home it in the report's own bounds, so `add` always fits.
    let mut out = super::report::histogram();
    out.add(&h)
        .map_err(|e| format!("histogram out of range: {e:?}"))?;
    Ok(out)
}

/// Every count of `t`, exactly, histograms serialized.
pub fn tally_json(t: &Tally) -> Value {
    let mut errors = serde_json::Map::new();
    for kind in Failure::ALL {
        errors.insert(kind.name().into(), json!(t.count(kind)));
    }
    json!({
        "opened": t.opened,
        "not_opened": t.not_opened,
        "messages": t.messages,
        "bytes": t.bytes,
        "errors": errors,
        "examples": t.examples,
        "measured_secs": t.measured_secs,
        "open_secs": t.open_secs,
        "survived": t.survived,
        "cycles": t.cycles,
        "lost": t.lost,
        "latency_hdr": encode_histogram(&t.latency),
        "latency_uncorrected_hdr": encode_histogram(&t.latency_uncorrected),
        "connect_latency_hdr": encode_histogram(&t.connect_latency),
    })
}

/// The tally [`tally_json`] wrote.
pub fn tally_from_json(v: &Value) -> Result<Tally, String> {
    let n = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("tally: `{k}` missing or not a count"))
    };
    let f = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("tally: `{k}` missing or not a number"))
    };
    let h = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("tally: `{k}` missing"))
            .and_then(decode_histogram)
    };
    let mut t = Tally {
        opened: n("opened")?,
        not_opened: n("not_opened")?,
        messages: n("messages")?,
        bytes: n("bytes")?,
        measured_secs: f("measured_secs")?,
        open_secs: f("open_secs")?,
        survived: n("survived")?,
        cycles: n("cycles")?,
        lost: n("lost")?,
        latency: h("latency_hdr")?,
        latency_uncorrected: h("latency_uncorrected_hdr")?,
        connect_latency: h("connect_latency_hdr")?,
        ..Tally::default()
    };
    for kind in Failure::ALL {
        t.errors[kind as usize] = v["errors"]
            .get(kind.name())
            .and_then(Value::as_u64)
            .unwrap_or(0);
    }
    if let Some(examples) = v["examples"].as_array() {
        t.examples = examples
            .iter()
            .filter_map(|e| e.as_str().map(String::from))
            .collect();
    }
    Ok(t)
}

/// One part's main counts, for a report's `parts`.
pub fn part(t: &Tally) -> Value {
    json!({
        "connections_opened": t.opened,
        "messages": t.messages,
        "errors": t.total_errors(),
        "latency_count": t.latency.len(),
    })
}

/// The workload named in a report.
pub fn workload_named(name: &str) -> Option<Workload> {
    [
        Workload::Echo,
        Workload::Hold,
        Workload::Churn,
        Workload::Chat,
    ]
    .into_iter()
    .find(|w| w.name() == name)
}

/// Adds up `--json` reports into one: counts summed, histograms added,
/// connections asked for summed, settings of the first (its `connections`
/// replaced by the total). All must be of one workload.
pub fn merge_reports(reports: &[Value]) -> Result<Report, String> {
    let first = reports.first().ok_or("nothing to merge")?;
    let name = first["workload"].as_str().unwrap_or("?");
    let workload = workload_named(name).ok_or_else(|| format!("unknown workload `{name}`"))?;
    let mut tally = Tally::default();
    let (mut connections, mut processes) = (0, 0);
    let mut parts = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        if r["workload"] != first["workload"] {
            return Err(format!(
                "report {} is a {} run, report 1 a {name} run",
                i + 1,
                r["workload"]
            ));
        }
        let t = r.get("tally").ok_or_else(|| {
            format!(
                "report {} has no `tally` (made by an older reactor load?)",
                i + 1
            )
        })?;
        let t = tally_from_json(t).map_err(|e| format!("report {}: {e}", i + 1))?;
        parts.push(part(&t));
        tally.merge(t);
        connections += r["settings"]["connections"].as_u64().unwrap_or(0);
        processes += r["processes"].as_u64().unwrap_or(1);
    }
    let mut settings = first["settings"].clone();
    settings["connections"] = json!(connections);
    let mut extra = serde_json::Map::new();
    extra.insert("processes".into(), processes.into());
    extra.insert("parts".into(), parts.into());
    Ok(Report {
        workload: workload.name(),
        settings,
        connections,
        udp: first["settings"]["udp"].is_string(),
        open_loop: first.get("latency_uncorrected_us").is_some(),
        // Intervals of different runs do not line up; each input has its own.
        intervals: Vec::new(),
        extra,
        tally,
    })
}

/// `reactor load merge FILE...`: prints the merged report (table, or JSON
/// with `json`); 0 when the merged run is clean, 1 when not, 2 when a file
/// cannot be read.
pub fn run(files: &[PathBuf], json: bool) -> ExitCode {
    let mut reports = Vec::new();
    for f in files {
        let parsed = std::fs::read_to_string(f)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => reports.push(v),
            Err(e) => {
                eprintln!("reactor load merge: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    match merge_reports(&reports) {
        Ok(report) => report.print(json),
        Err(e) => {
            eprintln!("reactor load merge: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::load::report::record;
    use std::time::Duration;

    fn tally(seed: u64) -> Tally {
        let mut t = Tally {
            opened: 10 + seed,
            messages: 1000 * seed,
            bytes: 64_000 * seed,
            measured_secs: 1.5,
            survived: seed,
            ..Tally::default()
        };
        for i in 0..1000 {
            record(&mut t.latency, Duration::from_nanos(1_000 + i * 37 * seed));
        }
        record(&mut t.connect_latency, Duration::from_micros(50 * seed));
        t.fail(Failure::Timeout, || format!("late {seed}"));
        t
    }

    #[test]
    fn a_tally_survives_json_exactly() {
        let t = tally(3);
        let back = tally_from_json(&tally_json(&t)).unwrap();
        assert_eq!(back.latency, t.latency);
        assert_eq!(back.connect_latency, t.connect_latency);
        assert_eq!(tally_json(&back), tally_json(&t));
    }

    #[test]
    fn merged_reports_equal_the_tallies_merged_in_memory() {
        let report = |seed| Report {
            workload: "echo",
            settings: json!({"workload": "echo", "connections": 5}),
            connections: 5,
            udp: false,
            open_loop: false,
            intervals: Vec::new(),
            extra: serde_json::Map::new(),
            tally: tally(seed),
        };
        let merged = merge_reports(&[report(1).json(), report(4).json()]).unwrap();
        let mut expected = tally(1);
        expected.merge(tally(4));
        assert_eq!(merged.tally.latency, expected.latency);
        assert_eq!(merged.tally.messages, 5000);
        assert_eq!(merged.connections, 10);
        assert_eq!(merged.json()["processes"], 2);
        assert_eq!(merged.json()["errors"]["timeout"], 2);
        // The p99 of the whole, not an average of the parts' p99s.
        let p99 = merged.json()["latency_us"]["p99"].as_f64().unwrap();
        let want = expected.latency.value_at_quantile(0.99) as f64 / 1000.0;
        assert!((p99 - want).abs() < 0.1, "{p99} vs {want}");
    }

    #[test]
    fn reports_of_different_workloads_do_not_merge() {
        let a = json!({"workload": "echo", "tally": tally_json(&tally(1))});
        let b = json!({"workload": "hold", "tally": tally_json(&tally(1))});
        assert!(merge_reports(&[a, b]).is_err());
    }
}
