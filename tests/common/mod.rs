//! Shared helpers: start the real `reactor` binary on 127.0.0.1:0 and talk
//! to it with blocking std sockets and timeouts.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Generous: the machine is shared and busy.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_reactor")
}

/// How long a server may take to print a `listening on` line before the
/// test gives up on it (a debug build on a busy machine starts in well
/// under a second).
const STARTUP: Duration = Duration::from_secs(120);

/// Reads one line of the server's stdout; a server that prints nothing
/// for [`STARTUP`] is killed, so the read ends (with an empty line, which
/// the caller reports) instead of the test hanging. The kill happens under
/// the lock the reader takes when its read returns, and the child is
/// reaped only after that (when the test drops it), so the pid killed is
/// always the server's.
fn read_line_or_kill(out: &mut impl BufRead, pid: u32) -> String {
    let done = Arc::new(Mutex::new(false));
    let seen = done.clone();
    thread::spawn(move || {
        let deadline = Instant::now() + STARTUP;
        loop {
            thread::sleep(Duration::from_millis(100));
            let seen = seen.lock().unwrap();
            if *seen {
                return;
            }
            if Instant::now() >= deadline {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                return;
            }
        }
    });
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    *done.lock().unwrap() = true;
    line
}

/// A running server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The first `listening on` line.
    pub first: String,
    stdout: BufReader<std::process::ChildStdout>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `reactor serve --addr 127.0.0.1:0 ARGS`.
    pub fn start(args: &[&str]) -> Server {
        Self::spawn(
            Command::new(bin())
                .arg("serve")
                .args(["--addr", "127.0.0.1:0"])
                .args(args),
        )
    }

    /// `reactor serve --engine ENGINE --addr 127.0.0.1:0 ARGS`.
    pub fn start_engine(engine: &str, args: &[&str]) -> Server {
        let mut all = vec!["--engine", engine];
        all.extend_from_slice(args);
        Self::start(&all)
    }

    /// The same, pinned to one CPU with taskset (for measurements).
    pub fn start_pinned(cpu: u32, args: &[&str]) -> Server {
        Self::spawn(
            Command::new("taskset")
                .args([
                    "-c",
                    &cpu.to_string(),
                    bin(),
                    "serve",
                    "--addr",
                    "127.0.0.1:0",
                ])
                .args(args),
        )
    }

    /// The same, under a lower soft open-file limit.
    pub fn start_with_fd_limit(limit: u32, args: &[&str]) -> Server {
        Self::start_engine_with_fd_limit("reactor", limit, args)
    }

    /// `--engine ENGINE` under a lower soft open-file limit.
    pub fn start_engine_with_fd_limit(engine: &str, limit: u32, args: &[&str]) -> Server {
        let script = format!(
            "ulimit -n {limit}; exec \"$0\" serve --engine {engine} --addr 127.0.0.1:0 \"$@\""
        );
        Self::spawn(
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .arg(bin())
                .args(args),
        )
    }

    fn spawn(cmd: &mut Command) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start reactor");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let first = read_line_or_kill(&mut out, child.id());
        let addr = first
            .strip_prefix("listening on ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| {
                panic!(
                    "no listening line, got {first:?}; stderr {:?}",
                    stderr.lock().unwrap()
                )
            })
            .parse()
            .expect("listening address");
        // The server writes nothing else to stdout but the other
        // `listening on` lines, so the pipe never fills.
        Server {
            child,
            addr,
            first: first.trim_end().to_string(),
            stdout: out,
            stderr,
        }
    }

    /// The next line on stdout (`listening on udp ...`, `... unix ...`).
    pub fn next_stdout_line(&mut self) -> String {
        read_line_or_kill(&mut self.stdout, self.child.id())
            .trim_end()
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    /// Sends SIGTERM (through kill(1): the crate forbids unsafe code).
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, at most `TIMEOUT`.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// CPU time (user + system) used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until stderr has a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.stderr_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {}",
                self.stderr_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs a test written as `fn name(engine: &str)` once per engine named,
/// as `name::ENGINE` (a module beside the function: modules and functions
/// have separate namespaces). List only engines that keep the promise the
/// test checks: `threads` queues no output of its own, so back-pressure,
/// `--max-buffer` and the shutdown flush are not its to keep.
///
/// ```ignore
/// fn eof_closes(engine: &str) { let server = Server::start_engine(engine, &[]); ... }
/// engines!(eof_closes: reactor, uring);
/// ```
#[macro_export]
macro_rules! engines {
    ($test:ident: $($engine:ident),+) => {
        mod $test {
            $(
                #[test]
                fn $engine() {
                    super::$test(stringify!($engine));
                }
            )+
        }
    };
}

/// Held by tests that open thousands of sockets: the test process has
/// one open-file limit (20,000 here), and two engines' runs of such a test
/// at once would pass it.
pub fn many_sockets() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blocking client with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads exactly `n` bytes or panics after the timeout.
pub fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read reply");
    buf
}

/// Reads until EOF, returning what came.
pub fn read_to_eof(s: &mut impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read to eof");
    buf
}

/// Deterministic bytes, different for every client and offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` on a second thread while reading the echo on this one,
/// so neither side can stall the other; returns what came back.
pub fn echo_roundtrip(s: &TcpStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let writer = thread::spawn(move || w.write_all(&d).unwrap());
    let mut r = s.try_clone().unwrap();
    let got = read_n(&mut r, data.len());
    writer.join().unwrap();
    got
}

/// Reads until EOF or an error (a reset after the data), returning
/// what came before it.
pub fn read_until_closed(s: &mut impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Polls `f` until it is true, at most `TIMEOUT`.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Long enough for `reactor load` on a loaded 2-core machine; the runs
/// themselves are short.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Runs `reactor load ARGS`, bounded by [`LOAD_LIMIT`].
pub fn load(args: &[&str]) -> std::process::Output {
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    run_bounded(&all, b"", LOAD_LIMIT)
}

/// Runs `reactor load ARGS --json` and returns its exit code and report;
/// fails the test if stdout is not one JSON object.
pub fn load_json(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = load(&all);
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

/// Runs `reactor ARGS` to completion with `input` on stdin, killing it
/// (and failing the test) if it outlives `limit`.
pub fn run_bounded(args: &[&str], input: &[u8], limit: Duration) -> std::process::Output {
    run_program_bounded(bin(), args, input, limit)
}

/// Runs `program ARGS` like [`run_bounded`].
pub fn run_program_bounded(
    program: &str,
    args: &[&str],
    input: &[u8],
    limit: Duration,
) -> std::process::Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reactor");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Written and read from threads: a large input and its echo would
    // otherwise fill both pipes and deadlock with us.
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    writer.join().unwrap();
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `reactor serve --addr 127.0.0.1:0 --metrics 127.0.0.1:0 ARGS`, and the
/// metrics address from its `listening on metrics` line (the last one).
pub fn start_with_metrics(args: &[&str]) -> (Server, SocketAddr) {
    let (server, metrics, _) = start_with_metrics_lines(args);
    (server, metrics)
}

/// [`start_with_metrics`], also returning the `listening on` lines read
/// between the first and the metrics line (`udp ...`, `unix ...`).
pub fn start_with_metrics_lines(args: &[&str]) -> (Server, SocketAddr, Vec<String>) {
    let mut all = vec!["--metrics", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut server = Server::start(&all);
    let mut others = Vec::new();
    loop {
        let line = server.next_stdout_line();
        if let Some(addr) = line.strip_prefix("listening on metrics ") {
            return (server, addr.parse().expect("metrics address"), others);
        }
        assert!(
            line.starts_with("listening on "),
            "unexpected stdout line {line:?}"
        );
        others.push(line);
    }
}

/// One HTTP/1.1 request with `Connection: close`; the status code and the
/// whole response (head and body) as text.
pub fn http(addr: SocketAddr, request_line: &str) -> (u16, String) {
    let mut s = connect(addr);
    write!(
        s,
        "{request_line}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let raw = String::from_utf8(read_until_closed(&mut s)).expect("UTF-8 response");
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    (code, raw)
}

/// `GET /metrics`, checked strictly: a 200 with the 0.0.4 content type,
/// a Content-Length that matches, and a body the strict parser accepts.
pub fn scrape(addr: SocketAddr) -> reactor::metrics::exposition::Exposition {
    let (code, raw) = http(addr, "GET /metrics HTTP/1.1");
    assert_eq!(code, 200, "{raw}");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
        "{head}"
    );
    reactor::metrics::exposition::parse(body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// Whether `reactor load --engine ENGINE` can run here: io_uring may be
/// refused (an old kernel, a seccomp filter); then this prints SKIP.
pub fn loader_available(engine: &str) -> bool {
    if engine != "uring" {
        return true;
    }
    let small = reactor::net::ring::PoolShape {
        buffers: 4,
        size: 4096,
        initial: 4,
    };
    match reactor::net::ring::Ring::new(8, 8, None, small) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: io_uring refused here ({e})");
            false
        }
    }
}

/// Runs a load test written as `fn name(engine: &str)` once per
/// `reactor load --engine` named, as `name::ENGINE`; a loader this kernel
/// cannot run prints SKIP (see [`loader_available`]).
///
/// ```ignore
/// fn counts(engine: &str) { load_json(&[addr, "--engine", engine]); ... }
/// loaders!(counts: reactor, uring);
/// ```
#[macro_export]
macro_rules! loaders {
    ($test:ident: $($engine:ident),+) => {
        mod $test {
            $(
                #[test]
                fn $engine() {
                    if $crate::common::loader_available(stringify!($engine)) {
                        super::$test(stringify!($engine));
                    }
                }
            )+
        }
    };
}
