//! What `reactor top` draws: rates between two readings, laid out with
//! ratatui. Pure: it draws into any backend, so tests draw into ratatui's
//! `TestBackend` and read the screen back as text.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Bar, BarChart, BarGroup, Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

use super::scrape::{Reading, Values};
use crate::metrics::snapshot::EVENT_BUCKETS;

/// One worker's (or the sum's) rates over the last interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    /// Open connections now.
    pub active: f64,
    /// Accepted per second.
    pub accepted: f64,
    /// Closed per second.
    pub closed: f64,
    /// Reads per second (≈ messages per second in ping-pong echo).
    pub reads: f64,
    /// Bytes received per second.
    pub bytes_in: f64,
    /// Bytes sent per second.
    pub bytes_out: f64,
    /// Share of the interval the loop was busy, 0..=1.
    pub busy: f64,
    /// Wake-ups per second.
    pub wakeups: f64,
    /// Mean events per wake-up over the interval.
    pub events_per_wakeup: f64,
    /// Paused connections now.
    pub paused: f64,
    /// Queued output bytes now.
    pub queued: f64,
    /// Ready-list length now.
    pub ready: f64,
    /// Wake-ups in the interval per histogram bucket (not cumulative).
    pub histogram: Vec<u64>,
}

/// The rates from `before` to `now`, `secs` apart.
pub fn rates(before: &Values, now: &Values, secs: f64) -> Rates {
    let secs = secs.max(1e-3);
    // A counter that went down means the server restarted: start over.
    let d = |a: f64, b: f64| if b >= a { b - a } else { b };
    let wakeups = d(before.wakeups, now.wakeups);
    let cumulative: Vec<f64> = now
        .buckets
        .iter()
        .zip(before.buckets.iter().chain(std::iter::repeat(&0.0)))
        .map(|(n, b)| d(*b, *n))
        .collect();
    let histogram = cumulative
        .iter()
        .enumerate()
        .map(|(i, c)| (c - if i == 0 { 0.0 } else { cumulative[i - 1] }).max(0.0) as u64)
        .collect();
    Rates {
        active: now.active,
        accepted: d(before.accepted, now.accepted) / secs,
        closed: d(before.closed, now.closed) / secs,
        reads: d(before.reads, now.reads) / secs,
        bytes_in: d(before.bytes_in, now.bytes_in) / secs,
        bytes_out: d(before.bytes_out, now.bytes_out) / secs,
        busy: (d(before.busy, now.busy) / secs).min(1.0),
        wakeups: wakeups / secs,
        events_per_wakeup: if wakeups > 0.0 {
            d(before.events, now.events) / wakeups
        } else {
            0.0
        },
        paused: now.paused,
        queued: now.queued,
        ready: now.ready,
        histogram,
    }
}

/// Everything on one screen.
#[derive(Clone, Debug, Default)]
pub struct Screen {
    /// Where the metrics come from.
    pub source: String,
    /// The sum's rates; `None` until two readings exist.
    pub total: Option<Rates>,
    /// Each worker's rates.
    pub workers: Vec<(String, Rates)>,
    /// The last scrape's error, if it failed.
    pub error: Option<String>,
}

impl Screen {
    /// The screen for the interval from `before` to `now`.
    pub fn between(source: &str, before: &Reading, now: &Reading) -> Screen {
        let secs = now.at.duration_since(before.at).as_secs_f64();
        let workers = now
            .workers
            .iter()
            .map(|(w, v)| {
                let prev = before
                    .workers
                    .iter()
                    .find(|(p, _)| p == w)
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                (w.clone(), rates(&prev, v, secs))
            })
            .collect();
        Screen {
            source: source.to_string(),
            total: Some(rates(&before.total, &now.total, secs)),
            workers,
            error: None,
        }
    }
}

/// `1234567` → `1.2M`.
pub fn si(x: f64) -> String {
    let (v, unit) = match x.abs() {
        a if a >= 1e9 => (x / 1e9, "G"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e4 => (x / 1e3, "k"),
        _ => return format!("{x:.0}"),
    };
    format!("{v:.1}{unit}")
}

/// Draws `screen` over the whole frame.
pub fn draw(frame: &mut Frame, screen: &Screen) {
    let rows = Layout::vertical([
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .split(frame.area());
    let title = format!(" reactor top · {} ", screen.source);
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let summary = match (&screen.total, &screen.error) {
        (_, Some(e)) => vec![Line::from(Span::styled(
            format!("scrape failed: {e}"),
            Style::default().fg(Color::Red),
        ))],
        (None, None) => vec![Line::from("waiting for a second reading…")],
        (Some(t), None) => vec![
            Line::from(vec![
                Span::styled("connections  ", bold),
                Span::raw(format!(
                    "{} open   {}/s accepted   {}/s closed",
                    si(t.active),
                    si(t.accepted),
                    si(t.closed)
                )),
            ]),
            Line::from(vec![
                Span::styled("traffic      ", bold),
                Span::raw(format!(
                    "{} reads/s (= msgs/s in ping-pong)   in {}B/s   out {}B/s",
                    si(t.reads),
                    si(t.bytes_in),
                    si(t.bytes_out)
                )),
            ]),
            Line::from(vec![
                Span::styled("loop         ", bold),
                Span::raw(format!(
                    "busy {:.1} %   {}/s wake-ups   {:.1} events per wake-up",
                    t.busy * 100.0,
                    si(t.wakeups),
                    t.events_per_wakeup
                )),
            ]),
            Line::from(vec![
                Span::styled("back-pressure", bold),
                Span::raw(format!(
                    " {} paused   {}B queued   {} on the ready list",
                    si(t.paused),
                    si(t.queued),
                    si(t.ready)
                )),
            ]),
        ],
    };
    frame.render_widget(
        Paragraph::new(summary).block(Block::default().borders(Borders::ALL).title(title)),
        rows[0],
    );
    draw_histogram(frame, rows[1], screen.total.as_ref());
    draw_workers(frame, rows[2], screen);
    frame.render_widget(
        Paragraph::new("q quit · numbers are per second over the last interval"),
        rows[3],
    );
}

fn draw_histogram(frame: &mut Frame, area: Rect, total: Option<&Rates>) {
    let empty = Vec::new();
    let histogram = total.map(|t| &t.histogram).unwrap_or(&empty);
    let bars: Vec<Bar> = EVENT_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, le)| {
            let n = histogram.get(i).copied().unwrap_or(0);
            Bar::default()
                .label(Line::from(format!("≤{le}")))
                .value(n)
                .text_value(si(n as f64))
        })
        .collect();
    frame.render_widget(
        BarChart::default()
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" events per wake-up (wake-ups this interval) "),
            )
            .data(BarGroup::default().bars(&bars))
            .bar_width(5)
            .bar_gap(1)
            .bar_style(Style::default().fg(Color::Cyan)),
        area,
    );
}

fn draw_workers(frame: &mut Frame, area: Rect, screen: &Screen) {
    let mut rows: Vec<Row> = screen
        .workers
        .iter()
        .map(|(w, r)| worker_row(w.clone(), r))
        .collect();
    if rows.is_empty() {
        if let Some(t) = &screen.total {
            rows.push(worker_row("0".into(), t));
        }
    }
    let header = Row::new([
        "worker", "conns", "reads/s", "in B/s", "out B/s", "busy %", "ev/wake", "paused",
        "queued B",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let widths = [Constraint::Length(8); 9];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(" workers ")),
        area,
    );
}

fn worker_row(name: String, r: &Rates) -> Row<'static> {
    Row::new([
        name,
        si(r.active),
        si(r.reads),
        si(r.bytes_in),
        si(r.bytes_out),
        format!("{:.1}", r.busy * 100.0),
        format!("{:.1}", r.events_per_wakeup),
        si(r.paused),
        si(r.queued),
    ])
}

/// The screen as plain text, `width` × `height` (for `--once` and tests).
pub fn to_text(screen: &Screen, width: u16, height: u16) -> String {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let mut terminal = ratatui::Terminal::new(backend).expect("a test backend");
    terminal
        .draw(|f| draw(f, screen))
        .expect("drawing into memory");
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let line: String = (0..width)
            .map(|x| buffer[(x, y)].symbol().to_string())
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(wakeups: f64, busy: f64, buckets: Vec<f64>) -> Values {
        Values {
            active: 7.0,
            accepted: wakeups,
            wakeups,
            busy,
            events: wakeups * 3.0,
            bytes_in: wakeups * 100.0,
            buckets,
            ..Values::default()
        }
    }

    #[test]
    fn rates_are_differences_over_the_interval() {
        let a = values(10.0, 1.0, vec![0.0, 5.0, 10.0]);
        let b = values(30.0, 1.5, vec![0.0, 5.0, 30.0]);
        let r = rates(&a, &b, 2.0);
        assert_eq!(r.wakeups, 10.0);
        assert_eq!(r.busy, 0.25);
        assert_eq!(r.events_per_wakeup, 3.0);
        assert_eq!(r.bytes_in, 1000.0);
        assert_eq!(r.active, 7.0);
        assert_eq!(r.histogram, vec![0, 0, 20], "per bucket, not cumulative");
    }

    #[test]
    fn a_restarted_server_does_not_give_negative_rates() {
        let r = rates(&values(100.0, 9.0, vec![]), &values(4.0, 0.5, vec![]), 1.0);
        assert_eq!(r.wakeups, 4.0);
        assert_eq!(r.busy, 0.5);
    }

    #[test]
    fn the_screen_shows_the_numbers_and_one_row_per_worker() {
        let r = rates(
            &values(0.0, 0.0, vec![0.0; 12]),
            &values(2000.0, 0.5, vec![2000.0; 12]),
            1.0,
        );
        let screen = Screen {
            source: "127.0.0.1:9".into(),
            total: Some(r.clone()),
            workers: vec![("0".into(), r.clone()), ("1".into(), r)],
            error: None,
        };
        let text = to_text(&screen, 100, 30);
        assert!(text.contains("reactor top · 127.0.0.1:9"), "{text}");
        assert!(text.contains("7 open"), "{text}");
        assert!(text.contains("busy 50.0 %"), "{text}");
        assert!(text.contains("3.0 events per wake-up"), "{text}");
        assert!(text.contains("≤1024"), "{text}");
        let rows = text
            .lines()
            .filter(|l| l.contains("│1       ") || l.contains("│0       "))
            .count();
        assert_eq!(rows, 2, "{text}");
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(999.0), "999");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(2_500_000.0), "2.5M");
    }
}
