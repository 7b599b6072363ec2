//! Unix-domain stream sockets on the same loop as TCP.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A fresh socket path in the temp directory, removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new() -> TempPath {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "reactor-test-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&p);
        TempPath(p)
    }
    fn as_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn unix_server(engine: &str, path: &TempPath, extra: &[&str]) -> Server {
    let mut args = vec!["--log-level", "info", "--unix", path.as_str()];
    args.extend_from_slice(extra);
    let mut server = Server::start_engine(engine, &args);
    assert_eq!(
        server.next_stdout_line(),
        format!("listening on unix {}", path.as_str())
    );
    server
}

fn unix_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect unix");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn echo_over_a_unix_socket(engine: &str) {
    let path = TempPath::new();
    let server = unix_server(engine, &path, &[]);
    let mut s = unix_client(&path.0);
    let data = pattern(11, 300_000);
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let got = read_to_eof(&mut s);
    writer.join().unwrap();
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    // TCP still served next to it.
    let tcp = Arc::new(pattern(2, 1000));
    assert!(echo_roundtrip(&server.connect(), tcp.clone()) == *tcp);
}
engines!(echo_over_a_unix_socket: reactor, uring);

fn line(r: &mut impl BufRead) -> String {
    let mut l = String::new();
    r.read_line(&mut l).expect("read line");
    l
}

fn chat_clients_on_tcp_and_unix_see_each_other(engine: &str) {
    let path = TempPath::new();
    let server = unix_server(engine, &path, &["--mode", "chat"]);
    let tcp = server.connect();
    let mut tcp_r = BufReader::new(tcp.try_clone().unwrap());
    assert_eq!(line(&mut tcp_r), "* welcome guest-1\n");
    let mut unix = unix_client(&path.0);
    let mut unix_r = BufReader::new(unix.try_clone().unwrap());
    assert_eq!(line(&mut unix_r), "* welcome guest-2\n");
    assert_eq!(line(&mut tcp_r), "* guest-2 joined\n");
    unix.write_all(b"hello from unix\n").unwrap();
    assert_eq!(line(&mut tcp_r), "guest-2: hello from unix\n");
    (&tcp).write_all(b"/nick tcp_side\nhi from tcp\n").unwrap();
    assert_eq!(line(&mut unix_r), "* guest-1 is now tcp_side\n");
    assert_eq!(line(&mut unix_r), "tcp_side: hi from tcp\n");
    unix.write_all(b"/who\n").unwrap();
    assert_eq!(line(&mut unix_r), "* online: tcp_side, guest-2\n");
}
engines!(chat_clients_on_tcp_and_unix_see_each_other: reactor, uring);

fn a_stale_socket_file_is_replaced(engine: &str) {
    let path = TempPath::new();
    // A listener that "crashed": its file stays, nobody accepts on it.
    drop(UnixListener::bind(&path.0).unwrap());
    assert!(path.0.exists());
    let _server = unix_server(engine, &path, &[]);
    let mut s = unix_client(&path.0);
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4), b"ping");
}
engines!(a_stale_socket_file_is_replaced: reactor, uring);

#[test]
fn a_path_held_by_a_live_server_is_refused() {
    let path = TempPath::new();
    let _first = unix_server("reactor", &path, &[]);
    let out = run_bounded(
        &["serve", "--addr", "127.0.0.1:0", "--unix", path.as_str()],
        b"",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(path.as_str()), "{err}");
    assert!(err.contains("another server is listening there"), "{err}");
    // The first server's socket still works.
    let mut s = unix_client(&path.0);
    s.write_all(b"ok?").unwrap();
    assert_eq!(read_n(&mut s, 3), b"ok?");
}

#[test]
fn a_path_that_is_not_a_socket_is_left_alone() {
    let path = TempPath::new();
    std::fs::write(&path.0, b"precious").unwrap();
    let out = run_bounded(
        &["serve", "--addr", "127.0.0.1:0", "--unix", path.as_str()],
        b"",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&path.0).unwrap(), b"precious");
}

fn the_socket_file_is_removed_on_sigterm(engine: &str) {
    let path = TempPath::new();
    let mut server = unix_server(engine, &path, &[]);
    assert!(path.0.exists());
    server.terminate();
    assert!(server.wait().success());
    assert!(!path.0.exists(), "socket file left behind");
}
engines!(the_socket_file_is_removed_on_sigterm: reactor, uring);

#[test]
fn connect_over_unix() {
    let path = TempPath::new();
    let _server = unix_server("reactor", &path, &[]);
    let out = run_bounded(
        &["connect", "--unix", path.as_str()],
        b"through a unix socket\n",
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"through a unix socket\n");
}

fn load_over_unix_runs_every_stream_workload(engine: &str) {
    let path = TempPath::new();
    let _server = unix_server(engine, &path, &[]);
    for workload in ["echo", "hold", "churn"] {
        let (code, v) = load_json(&[
            "--unix",
            path.as_str(),
            "--workload",
            workload,
            "-c",
            "50",
            "-d",
            "0.5",
            "--warmup",
            "0.2",
        ]);
        assert_eq!(code, Some(0), "{workload}: {v}");
        assert!(v["messages"].as_u64().unwrap() > 0, "{workload}: {v}");
        assert_eq!(v["settings"]["unix"], path.as_str());
    }
}
engines!(load_over_unix_runs_every_stream_workload: reactor, uring);

fn the_uring_loader_runs_echo_over_unix(engine: &str) {
    if !loader_available("uring") {
        return;
    }
    let path = TempPath::new();
    let _server = unix_server(engine, &path, &[]);
    for pipeline in ["1", "16"] {
        let (code, v) = load_json(&[
            "--unix",
            path.as_str(),
            "--engine",
            "uring",
            "--pipeline",
            pipeline,
            "-c",
            "20",
            "-d",
            "0.5",
            "--warmup",
            "0.2",
        ]);
        assert_eq!(code, Some(0), "{v}");
        assert!(v["messages"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["errors"]["total"], 0, "{v}");
    }
}
engines!(the_uring_loader_runs_echo_over_unix: reactor, uring);
