//! `reactor top`, used as a person would: in a real terminal (tmux),
//! reading the screen back with `capture-pane` and typing `q`.
//! Skips, saying so, only where tmux is not installed (CI installs it).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{bin, connect, eventually, run_bounded, start_with_metrics, TIMEOUT};

/// A tmux server of our own (`-L`), killed on drop, so a user's tmux is
/// never touched.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("SKIP: tmux is not installed; reactor top was not tested in a terminal");
            return None;
        }
        // One tmux server per test: tests run in parallel.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let t = Tmux {
            socket: format!(
                "reactor-top-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ),
        };
        let out = t.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "110",
            "-y",
            "36",
            command,
        ]);
        assert!(out.status.success(), "{out:?}");
        Some(t)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn wait_for(&self, what: &str) -> String {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let last = self.screen();
            if last.contains(what) {
                return last;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the screen never showed {what:?}; last screen:\n{last}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn top_command(metrics: SocketAddr) -> String {
    format!("{} top {metrics} --interval 0.2", bin())
}

#[test]
fn top_shows_connections_live_and_quits_on_q() {
    let (server, metrics) = start_with_metrics(&[]);
    let Some(tmux) = Tmux::start(&top_command(metrics)) else {
        return;
    };
    tmux.wait_for(&format!("reactor top · {metrics}"));
    tmux.wait_for("0 open");
    let held: Vec<_> = (0..3).map(|_| connect(server.addr)).collect();
    let screen = tmux.wait_for("3 open");
    for label in [
        "msgs/s",
        "busy",
        "events per wake-up",
        "paused",
        "queued",
        "worker",
    ] {
        assert!(screen.contains(label), "no {label:?} on\n{screen}");
    }
    drop(held);
    tmux.wait_for("0 open");
    tmux.run(&["send-keys", "-t", "top", "q"]);
    eventually("top exits on q", || !tmux.alive());
}

#[test]
fn top_says_so_when_the_endpoint_is_not_there() {
    // A port nobody listens on: bound, then released.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let Some(tmux) = Tmux::start(&top_command(free)) else {
        return;
    };
    tmux.wait_for("scrape failed");
    tmux.run(&["send-keys", "-t", "top", "Escape"]);
    eventually("top exits on Esc", || !tmux.alive());
}

#[test]
fn top_once_prints_one_screen_as_text() {
    let (server, metrics) = start_with_metrics(&[]);
    let _held = connect(server.addr);
    let out = run_bounded(
        &["top", &metrics.to_string(), "--once", "--interval", "0.2"],
        b"",
        TIMEOUT,
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("1 open"), "{text}");
    assert!(text.contains("events per wake-up"), "{text}");
}

#[test]
fn top_shows_one_row_per_worker_adding_up_to_the_total() {
    let (server, metrics) = start_with_metrics(&["--workers", "3"]);
    let Some(tmux) = Tmux::start(&top_command(metrics)) else {
        return;
    };
    tmux.wait_for("0 open");
    let held: Vec<_> = (0..12).map(|_| connect(server.addr)).collect();
    // One row per worker, `│I  conns ...`; their connections add up.
    let rows = |screen: &str| -> Vec<(String, u64)> {
        screen
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix('│')?.split_whitespace();
                let worker = cells.next()?;
                worker.parse::<usize>().ok()?;
                Some((worker.to_string(), cells.next()?.parse().ok()?))
            })
            .collect()
    };
    let mut last = String::new();
    eventually("one row per worker, adding up to 12", || {
        last = tmux.screen();
        let r = rows(&last);
        last.contains("12 open")
            && r.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>() == ["0", "1", "2"]
            && r.iter().map(|(_, n)| n).sum::<u64>() == 12
    });
    assert!(
        rows(&last).iter().filter(|(_, n)| *n > 0).count() >= 2,
        "spread over workers:\n{last}"
    );
    drop(held);
    tmux.run(&["send-keys", "-t", "top", "q"]);
    eventually("top exits on q", || !tmux.alive());
}
