//! One scrape: `GET /metrics` over a blocking socket with timeouts, the
//! response head parsed by `httparse`, the body by the strict
//! [`exposition`](crate::metrics::exposition) parser, and the series
//! `reactor top` shows picked out per worker.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::metrics::exposition::{self, Exposition};
use crate::metrics::snapshot::EVENT_BUCKETS;

/// Longest wait to connect, or for the response.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response accepted.
const MAX_RESPONSE: u64 = 4 << 20;

/// The numbers `top` shows for one worker (or the sum), as scraped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Values {
    /// `reactor_connections_active`.
    pub active: f64,
    /// `reactor_connections_accepted_total`.
    pub accepted: f64,
    /// Sum of `reactor_connections_closed_total` over reasons.
    pub closed: f64,
    /// `reactor_bytes_received_total`.
    pub bytes_in: f64,
    /// `reactor_bytes_sent_total`.
    pub bytes_out: f64,
    /// `reactor_reads_total`.
    pub reads: f64,
    /// `reactor_queued_bytes`.
    pub queued: f64,
    /// `reactor_paused_connections`.
    pub paused: f64,
    /// `reactor_ready_list_length`.
    pub ready: f64,
    /// `reactor_poll_wakeups_total`.
    pub wakeups: f64,
    /// `reactor_loop_busy_seconds_total`.
    pub busy: f64,
    /// `reactor_events_per_wakeup_sum`.
    pub events: f64,
    /// `reactor_events_per_wakeup_bucket`, cumulative, by [`EVENT_BUCKETS`].
    pub buckets: Vec<f64>,
}

/// One scrape: the sum and each worker, at one instant.
#[derive(Clone, Debug)]
pub struct Reading {
    /// When the response arrived.
    pub at: Instant,
    /// The sum over workers (the unlabelled series).
    pub total: Values,
    /// Each worker's own series, by `worker` label; empty for one process.
    pub workers: Vec<(String, Values)>,
}

/// Scrapes `addr` once.
pub fn scrape(addr: SocketAddr) -> Result<Reading, String> {
    let body = get(addr).map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8(body).map_err(|_| format!("{addr}: response is not UTF-8"))?;
    let e = exposition::parse(&text).map_err(|e| format!("{addr}: bad exposition: {e}"))?;
    reading(&e)
}

/// Picks the series `top` needs out of a parsed exposition.
pub fn reading(e: &Exposition) -> Result<Reading, String> {
    let total = values(e, None)?;
    let mut ids: Vec<String> = e
        .samples("reactor_connections_active")
        .filter_map(|s| s.label("worker").map(str::to_string))
        .collect();
    ids.sort_by_key(|w| (w.len(), w.clone()));
    let workers = ids
        .into_iter()
        .map(|w| values(e, Some(&w)).map(|v| (w, v)))
        .collect::<Result<_, _>>()?;
    Ok(Reading {
        at: Instant::now(),
        total,
        workers,
    })
}

fn values(e: &Exposition, worker: Option<&str>) -> Result<Values, String> {
    let mine = |s: &&exposition::Sample| s.label("worker") == worker;
    let one = |name: &str| {
        e.samples(name)
            .filter(mine)
            .find(|s| s.labels.len() == usize::from(worker.is_some()))
            .map(|s| s.value)
            .ok_or_else(|| format!("the endpoint has no {name}"))
    };
    let closed = e
        .samples("reactor_connections_closed_total")
        .filter(mine)
        .map(|s| s.value)
        .sum();
    let buckets = EVENT_BUCKETS
        .iter()
        .map(|le| {
            e.samples("reactor_events_per_wakeup_bucket")
                .filter(mine)
                .find(|s| s.label("le").and_then(|v| v.parse::<f64>().ok()) == Some(*le as f64))
                .map(|s| s.value)
                .unwrap_or(0.0)
        })
        .collect();
    Ok(Values {
        active: one("reactor_connections_active")?,
        accepted: one("reactor_connections_accepted_total")?,
        closed,
        bytes_in: one("reactor_bytes_received_total")?,
        bytes_out: one("reactor_bytes_sent_total")?,
        reads: one("reactor_reads_total")?,
        queued: one("reactor_queued_bytes")?,
        paused: one("reactor_paused_connections")?,
        ready: one("reactor_ready_list_length")?,
        wakeups: one("reactor_poll_wakeups_total")?,
        busy: one("reactor_loop_busy_seconds_total")?,
        events: one("reactor_events_per_wakeup_sum")?,
        buckets,
    })
}

/// `GET /metrics`, returning the body of a 200 response.
fn get(addr: SocketAddr) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: reactor-top\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let head = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad("response cut short".into())),
        Err(e) => return Err(bad(format!("bad response: {e}"))),
    };
    if resp.code != Some(200) {
        return Err(bad(format!("HTTP status {:?}", resp.code)));
    }
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let body = raw.split_off(head);
    match len {
        Some(n) if n != body.len() => Err(bad(format!("body {} bytes, promised {n}", body.len()))),
        _ => Ok(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{render, Snapshot};

    #[test]
    fn a_reading_has_the_sum_and_each_worker() {
        let mut a = Snapshot {
            connections_active: 2,
            bytes_sent: 100,
            ..Snapshot::default()
        };
        a.count_wakeup(3);
        a.closed.insert("done".into(), 1);
        a.closed.insert("idle".into(), 1);
        let text = render(&[(0, a.clone()), (1, a.clone())]);
        let r = reading(&exposition::parse(&text).unwrap()).unwrap();
        assert_eq!(r.total.active, 4.0);
        assert_eq!(r.total.closed, 4.0);
        assert_eq!(r.workers.len(), 2);
        assert_eq!(r.workers[1].0, "1");
        assert_eq!(r.workers[1].1.bytes_out, 100.0);
        assert_eq!(r.total.buckets[3], 2.0, "le=4 holds both wake-ups of 3");

        let single = render(&[(0, a)]);
        let r = reading(&exposition::parse(&single).unwrap()).unwrap();
        assert!(r.workers.is_empty());
        assert_eq!(r.total.active, 2.0);
    }
}
