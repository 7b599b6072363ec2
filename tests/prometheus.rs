//! A real Prometheus scrapes `reactor serve --metrics`: the test writes a
//! scrape config, runs `prometheus` on a free loopback port with a
//! temporary storage directory, and asks its HTTP API whether the target
//! is up and whether a counter moved. Where Prometheus is not installed
//! or cannot run, that part says so and is skipped; the strict parser
//! still checks the same endpoint first (`.ci/run` installs the Debian
//! package where it is missing).

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect, http, scrape, start_with_metrics};

/// Prometheus takes its time to start and to scrape on a busy machine.
const PATIENCE: Duration = Duration::from_secs(90);

/// A running Prometheus and its temporary directory, both gone on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second; `Err` says why
    /// it cannot run here.
    fn start(target: SocketAddr) -> Result<Prometheus, String> {
        if Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            return Err("prometheus is not installed".into());
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "reactor-prometheus-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).map_err(|e| e.to_string())?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: reactor\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).map_err(|e| e.to_string())?;
        // A free loopback port: bound by us, released, then given to it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start prometheus: {e}"))?;
        let mut p = Prometheus { child, dir, addr };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = p.child.try_wait().map_err(|e| e.to_string())? {
                let mut err = String::new();
                if let Some(mut e) = p.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("prometheus exited ({status}): {err}"));
            }
            if std::net::TcpStream::connect(addr).is_ok()
                && http(addr, "GET /-/ready HTTP/1.1").0 == 200
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err("prometheus did not become ready".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of an instant query with exactly one result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let (code, raw) = http(
            self.addr,
            &format!("GET /api/v1/query?query={} HTTP/1.1", encode(promql)),
        );
        assert_eq!(code, 200, "{raw}");
        let body = raw.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], "success", "{body}");
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// The type Prometheus recorded for `metric` from the TYPE lines.
    fn metadata_type(&self, metric: &str) -> Option<String> {
        let (_, raw) = http(
            self.addr,
            &format!("GET /api/v1/metadata?metric={metric} HTTP/1.1"),
        );
        let body = raw.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        Some(v["data"][metric][0]["type"].as_str()?.to_string())
    }

    /// Waits until `f` holds, within [`PATIENCE`].
    fn eventually(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !f() {
            assert!(Instant::now() < deadline, "Prometheus never saw: {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_endpoint_and_sees_a_counter_move() {
    let (server, metrics) = start_with_metrics(&[]);
    // The strict parser first: this part runs everywhere.
    let first = scrape(metrics);
    assert!(first
        .value("reactor_connections_accepted_total", &[])
        .is_some());

    let prometheus = match Prometheus::start(metrics) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP (the Prometheus part only): {why}");
            return;
        }
    };
    prometheus.eventually("up == 1 for the reactor target", || {
        prometheus.query("up{job=\"reactor\"}") == Some(1.0)
    });
    let before = prometheus
        .query("reactor_connections_accepted_total{job=\"reactor\"}")
        .expect("the counter is stored");
    let held: Vec<_> = (0..5).map(|_| connect(server.addr)).collect();
    prometheus.eventually("accepted_total grows by 5", || {
        prometheus.query("reactor_connections_accepted_total{job=\"reactor\"}")
            >= Some(before + 5.0)
    });
    drop(held);
    // The TYPE lines were read as meant: a counter, a gauge, a histogram
    // (whose buckets rate() and histogram_quantile() can use).
    prometheus.eventually("the metadata is stored", || {
        prometheus
            .metadata_type("reactor_connections_accepted_total")
            .is_some()
    });
    assert_eq!(
        prometheus
            .metadata_type("reactor_connections_accepted_total")
            .as_deref(),
        Some("counter")
    );
    assert_eq!(
        prometheus
            .metadata_type("reactor_connections_active")
            .as_deref(),
        Some("gauge")
    );
    assert_eq!(
        prometheus
            .metadata_type("reactor_events_per_wakeup")
            .as_deref(),
        Some("histogram")
    );
    prometheus.eventually("a quantile from the events histogram", || {
        prometheus
            .query("histogram_quantile(0.5, rate(reactor_events_per_wakeup_bucket[5s]))")
            .is_some_and(|q| q.is_finite())
    });
}

/// The Grafana dashboard's queries, with Grafana's `$__rate_interval`
/// filled in.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "10s")
        })
        .collect()
}

#[test]
fn the_dashboard_asks_only_for_series_the_endpoint_has() {
    let (_server, metrics) = start_with_metrics(&[]);
    let e = scrape(metrics);
    let queries = dashboard_queries();
    assert!(queries.len() >= 10);
    for q in &queries {
        // Every reactor_* name in the query, less a histogram suffix, is
        // a family of the exposition.
        for name in q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("reactor_"))
        {
            assert!(
                e.samples(name).next().is_some(),
                "the dashboard asks for {name}, which the endpoint does not have: {q}"
            );
        }
    }
}

#[test]
fn prometheus_accepts_every_dashboard_query() {
    let (_server, metrics) = start_with_metrics(&[]);
    let prometheus = match Prometheus::start(metrics) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    prometheus.eventually("up == 1", || {
        prometheus.query("up{job=\"reactor\"}") == Some(1.0)
    });
    for q in dashboard_queries() {
        // `query` asserts the API said "success": the query parses and runs.
        prometheus.query(&q);
    }
}
