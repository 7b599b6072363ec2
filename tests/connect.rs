//! `reactor connect` end to end, through pipes.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn connect_with(args: &[&str], input: &[u8]) -> Output {
    let mut all = vec!["connect"];
    all.extend_from_slice(args);
    run_bounded(&all, input, Duration::from_secs(60))
}

#[test]
fn lines_in_echoed_lines_out_exit_zero() {
    let server = Server::start(&["--log-level", "warn"]);
    let out = connect_with(&[&server.addr.to_string()], b"one\ntwo\r\nthree");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"one\ntwo\r\nthree");
}

#[test]
fn nothing_typed_is_lost_when_the_input_outruns_the_server() {
    let server = Server::start(&["--log-level", "warn", "--max-buffer", "4096"]);
    let data = pattern(3, 8 << 20);
    let out = connect_with(&[&server.addr.to_string()], &data);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout == data,
        "got {} of {} bytes",
        out.stdout.len(),
        data.len()
    );
}

#[test]
fn it_talks_chat_too() {
    let server = Server::start(&["--mode", "chat", "--log-level", "warn"]);
    let out = connect_with(&[&server.addr.to_string()], b"/who\n/nick bob\n");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "* welcome guest-1\n* online: guest-1\n* guest-1 is now bob\n"
    );
}

#[test]
fn no_server_exits_one_with_a_message() {
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = connect_with(&[&free.to_string()], b"hi\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
}

#[test]
fn a_reset_connection_exits_one_with_a_message() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut buf = [0; 1];
        // Wait for the client's first byte, then close with a reset.
        std::io::Read::read(&mut &s, &mut buf).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let mut child = Command::new(bin())
        .args(["connect", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep stdin open: the client must notice the reset by itself.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"x").unwrap();
    server.join().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the client did not notice the reset");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connection lost"));
}
