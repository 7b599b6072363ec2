//! A strict parser of the Prometheus text exposition format (0.0.4).
//!
//! `reactor top` reads the endpoint with it, and the tests check every
//! scrape with it, so anything the endpoint writes that Prometheus might
//! misread fails a test here first. Stricter than Prometheus itself: it
//! also rejects blank lines, `\r`, a family split into two groups, a
//! `TYPE` line after its samples, duplicate series, negative counters,
//! and histograms whose buckets are not cumulative or whose `+Inf`
//! bucket disagrees with `_count`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// The type a `# TYPE` line declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// `_bucket{le}`, `_sum`, `_count`.
    Histogram,
    /// `{quantile}`, `_sum`, `_count`.
    Summary,
    /// No `TYPE` line, or `untyped`.
    Untyped,
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_bucket`, `x_total`, ...).
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A metric family: its descriptor lines and its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// The family name (for a histogram, without `_bucket` etc.).
    pub name: String,
    /// The `# HELP` text, unescaped.
    pub help: Option<String>,
    /// The declared type.
    pub kind: Kind,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// A whole parsed exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    /// The families in the order they appeared.
    pub families: Vec<Family>,
}

impl Exposition {
    /// The family called `name`.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The value of the sample `name` whose labels are exactly `labels`
    /// (in any order).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples(name)
            .find(|s| {
                s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.label(k) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Every sample named `name`.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .iter()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| s.name == name)
    }
}

/// Where and why the text is not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses `text` strictly; see the module docs for what is rejected.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut p = Parser::default();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(err(text.lines().count(), "the last line has no newline"));
    }
    for (i, line) in text.split_terminator('\n').enumerate() {
        p.line(i + 1, line).map_err(|m| err(i + 1, &m))?;
    }
    let last = text.lines().count();
    for f in &p.out.families {
        check_family(f).map_err(|m| err(last, &m))?;
    }
    Ok(p.out)
}

fn err(line: usize, message: &str) -> ParseError {
    ParseError {
        line,
        message: message.to_string(),
    }
}

#[derive(Default)]
struct Parser {
    out: Exposition,
    /// Families already closed: seeing one of them again is an error.
    done: HashSet<String>,
    /// Series seen (sample name plus sorted labels).
    series: HashSet<String>,
}

impl Parser {
    fn line(&mut self, _n: usize, line: &str) -> Result<(), String> {
        if line.is_empty() {
            return Err("blank line".into());
        }
        if line.contains('\r') {
            return Err("carriage return".into());
        }
        if let Some(rest) = line.strip_prefix('#') {
            return self.comment(rest);
        }
        let sample = sample(line)?;
        let family = self.family_for(&sample.name);
        self.enter(&family, None)?;
        let f = self.out.families.last_mut().expect("entered above");
        let mut key: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        key.sort();
        if !self
            .series
            .insert(format!("{}{{{}}}", sample.name, key.join(",")))
        {
            return Err(format!("duplicate series {}", sample.name));
        }
        let mut seen = HashSet::new();
        if let Some((k, _)) = sample.labels.iter().find(|(k, _)| !seen.insert(k)) {
            return Err(format!("label {k} given twice"));
        }
        f.samples.push(sample);
        Ok(())
    }

    fn comment(&mut self, rest: &str) -> Result<(), String> {
        let Some(rest) = rest.strip_prefix(' ') else {
            return Ok(()); // "#foo": a plain comment
        };
        let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match keyword {
            "HELP" => {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                check_name(name)?;
                self.enter(name, None)?;
                let f = self.out.families.last_mut().expect("entered above");
                if f.help.is_some() {
                    return Err(format!("second HELP for {name}"));
                }
                f.help = Some(unescape(help, false)?);
            }
            "TYPE" => {
                let (name, ty) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("TYPE without a type: {rest}"))?;
                check_name(name)?;
                let kind = match ty {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "histogram" => Kind::Histogram,
                    "summary" => Kind::Summary,
                    "untyped" => Kind::Untyped,
                    other => return Err(format!("unknown type {other}")),
                };
                self.enter(name, Some(kind))?;
            }
            _ => {} // any other comment
        }
        Ok(())
    }

    /// The family a sample called `name` belongs to: a declared histogram
    /// or summary owns its suffixed names; anything else is its own.
    fn family_for(&self, name: &str) -> String {
        if let Some(f) = self.out.families.last() {
            let owns = |suffixes: &[&str]| {
                suffixes
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.name.as_str()))
            };
            let hit = match f.kind {
                Kind::Histogram => owns(&["_bucket", "_sum", "_count"]),
                Kind::Summary => name == f.name || owns(&["_sum", "_count"]),
                // Only to reject it below: in 0.0.4 a counter's samples
                // carry the family's own name (OpenMetrics adds `_total`).
                Kind::Counter => owns(&["_total"]),
                _ => false,
            };
            if hit {
                return f.name.clone();
            }
        }
        name.to_string()
    }

    /// Makes `name` the current family, opening it if new. A `TYPE`
    /// (`kind`) may only come before the family's samples, once.
    fn enter(&mut self, name: &str, kind: Option<Kind>) -> Result<(), String> {
        let current = self.out.families.last().map(|f| f.name.as_str());
        if current != Some(name) {
            if self.done.contains(name) {
                return Err(format!("{name} appears in two separate groups"));
            }
            if let Some(c) = current {
                self.done.insert(c.to_string());
            }
            self.out.families.push(Family {
                name: name.to_string(),
                help: None,
                kind: Kind::Untyped,
                samples: Vec::new(),
            });
        }
        let f = self.out.families.last_mut().expect("pushed above");
        if let Some(kind) = kind {
            if !f.samples.is_empty() {
                return Err(format!("TYPE for {name} after its samples"));
            }
            if f.kind != Kind::Untyped {
                return Err(format!("second TYPE for {name}"));
            }
            f.kind = kind;
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok && !name.starts_with("__") {
        Ok(())
    } else {
        Err(format!("bad label name {name:?}"))
    }
}

/// Undoes `\\`, `\n` and (in label values) `\"`.
fn unescape(s: &str, quotes: bool) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('"') if quotes => out.push('"'),
                other => return Err(format!("bad escape \\{other:?}")),
            },
            '"' if quotes => return Err("unescaped quote".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        s if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            s.parse().map_err(|_| format!("bad value {s:?}"))
        }
        _ => Err(format!("bad value {s:?}")),
    }
}

/// `name{k="v",...} value [timestamp]`
fn sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut l) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = l.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = l.find('=').ok_or("label without =")?;
            let key = &l[..eq];
            check_label_name(key)?;
            let v = l[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            // Find the closing quote, skipping escaped characters.
            let bytes = v.as_bytes();
            let mut i = 0;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            if i >= bytes.len() {
                return Err("unterminated label value".into());
            }
            labels.push((key.to_string(), unescape(&v[..i], true)?));
            l = &v[i + 1..];
            l = match l.strip_prefix(',') {
                Some(after) => after,
                None if l.starts_with('}') => l,
                None => return Err("labels need commas".into()),
            };
        }
    }
    let rest = rest.strip_prefix(' ').ok_or("one space before the value")?;
    let mut parts = rest.split(' ');
    let v = value(parts.next().unwrap_or(""))?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("text after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value: v,
    })
}

/// Type-specific rules, checked once a family is complete.
fn check_family(f: &Family) -> Result<(), String> {
    match f.kind {
        Kind::Counter => {
            for s in &f.samples {
                if s.name != f.name {
                    return Err(format!("{} in counter family {}", s.name, f.name));
                }
                if s.value.is_nan() || s.value < 0.0 {
                    return Err(format!("counter {} is {}", s.name, s.value));
                }
            }
        }
        Kind::Histogram => check_histogram(f)?,
        Kind::Gauge | Kind::Untyped => {
            if let Some(s) = f.samples.iter().find(|s| s.name != f.name) {
                return Err(format!("{} in family {}", s.name, f.name));
            }
        }
        Kind::Summary => {}
    }
    Ok(())
}

fn check_histogram(f: &Family) -> Result<(), String> {
    // Group by labels other than `le`.
    #[derive(Default)]
    struct Group {
        buckets: Vec<(f64, f64)>,
        sum: Option<f64>,
        count: Option<f64>,
    }
    let mut groups: BTreeMap<Vec<(String, String)>, Group> = BTreeMap::new();
    for s in &f.samples {
        let mut key: Vec<_> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        key.sort();
        let g = groups.entry(key).or_default();
        let suffix = &s.name[f.name.len()..];
        match suffix {
            "_bucket" => {
                let le = s.label("le").ok_or("bucket without le")?;
                g.buckets.push((value(le)?, s.value));
            }
            "_sum" => g.sum = Some(s.value),
            "_count" => g.count = Some(s.value),
            _ => unreachable!("family_for only assigns these suffixes"),
        }
    }
    for (labels, g) in groups {
        let what = format!("{}{labels:?}", f.name);
        if g.sum.is_none() || g.count.is_none() {
            return Err(format!("{what}: _sum or _count missing"));
        }
        if !g
            .buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            return Err(format!("{what}: buckets not ascending and cumulative"));
        }
        match g.buckets.last() {
            Some((le, n)) if le.is_infinite() && Some(*n) == g.count => {}
            _ => {
                return Err(format!(
                    "{what}: +Inf bucket missing or not equal to _count"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP x_total Things, \\\\ and \\n.\n# TYPE x_total counter\n\
        x_total 3\nx_total{a=\"q\\\"\",b=\"\"} 4 1700000000\n\
        # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n\
        # a comment\ng -1.5e3\n";

    #[test]
    fn a_good_exposition_parses_with_values_and_labels() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.value("x_total", &[]), Some(3.0));
        assert_eq!(e.value("x_total", &[("b", ""), ("a", "q\"")]), Some(4.0));
        assert_eq!(
            e.family("x_total").unwrap().help.as_deref(),
            Some("Things, \\ and \n.")
        );
        assert_eq!(e.family("h").unwrap().kind, Kind::Histogram);
        assert_eq!(e.value("h_count", &[]), Some(2.0));
        assert_eq!(e.value("g", &[]), Some(-1500.0));
    }

    #[test]
    fn what_is_rejected() {
        let bad = [
            ("no newline at the end", "x 1"),
            ("blank line", "x 1\n\ny 2\n"),
            ("CR", "x 1\r\n"),
            ("bad name", "1x 2\n"),
            ("empty value", "x \n"),
            ("bad value", "x one\n"),
            ("two spaces", "x  1\n"),
            ("unquoted label", "x{a=b} 1\n"),
            ("unterminated label", "x{a=\"b} 1\n"),
            ("bad escape", "x{a=\"\\t\"} 1\n"),
            ("duplicate series", "x{a=\"1\"} 1\nx{a=\"1\"} 2\n"),
            ("duplicate label", "x{a=\"1\",a=\"2\"} 1\n"),
            ("split family", "x 1\ny 1\nx{a=\"1\"} 2\n"),
            ("TYPE after sample", "x 1\n# TYPE x gauge\n"),
            ("second TYPE", "# TYPE x gauge\n# TYPE x gauge\n"),
            ("negative counter", "# TYPE x counter\nx -1\n"),
            ("foreign name in counter", "# TYPE x counter\nx_total 1\n"),
            (
                "non-cumulative buckets",
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            ),
            (
                "no +Inf",
                "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
            ),
            (
                "+Inf not count",
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n",
            ),
        ];
        for (why, text) in bad {
            assert!(parse(text).is_err(), "accepted: {why}");
        }
    }

    #[test]
    fn the_servers_own_rendering_passes() {
        use crate::metrics::{render, Snapshot};
        let mut s = Snapshot::default();
        s.count_wakeup(7);
        s.closed.insert("idle".into(), 1);
        for workers in [vec![(0, s.clone())], vec![(0, s.clone()), (1, s)]] {
            let text = render(&workers);
            let e = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(
                e.value("reactor_events_per_wakeup_sum", &[]),
                Some(7.0 * workers.len() as f64)
            );
        }
    }
}
