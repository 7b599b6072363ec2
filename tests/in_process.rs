//! The server run in-process: `Server::spawn` binds on a thread of this
//! test, a `StopHandle` ends it, and the final counters come back as a
//! value, not a log line. The binary's own behaviour (flags, exit codes,
//! signals, stdout) is tested through the binary in the other files.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

use common::{connect, pattern};
use reactor::server::{Config, Mode, Server};

fn config(mode: Mode) -> Config {
    Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        mode,
        ..Config::default()
    }
}

#[test]
fn echo_in_process_counts_what_it_served() {
    let server = Server::spawn(config(Mode::Echo)).unwrap();
    let data = pattern(1, 100_000);
    let mut c = connect(server.addr);
    let writer = {
        let mut w = c.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "the echo differs from what was sent");
    let stats = server.stop().unwrap();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.bytes_in, data.len() as u64);
    assert_eq!(stats.bytes_out, data.len() as u64);
    assert_eq!((stats.active, stats.closed), (0, 1));
}

#[test]
fn stopping_flushes_everything_already_read_then_closes() {
    let mut cfg = config(Mode::Echo);
    cfg.max_buffer = 256 * 1024;
    let server = Server::spawn(cfg).unwrap();
    let c = connect(server.addr);
    // Send more than the kernel buffers and the server's queue hold,
    // reading nothing: the server pauses this client, its queue full.
    let data = pattern(2, 16 << 20);
    let sent = {
        let mut w = c.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || {
            let mut sent = 0;
            for chunk in data.chunks(64 * 1024) {
                if w.write_all(chunk).is_err() {
                    break; // the server closed after the stop
                }
                sent += chunk.len();
            }
            sent
        })
    };
    // Let the writer fill the pipe before stopping (the outcome does not
    // depend on when: whatever the server read must come back).
    thread::sleep(std::time::Duration::from_millis(300));
    server.stop_handle.stop();
    let mut back = Vec::new();
    let mut r = c.try_clone().unwrap();
    let _ = r.read_to_end(&mut back);
    let stats = server.wait().unwrap();
    let _ = c.shutdown(Shutdown::Both);
    let sent = sent.join().unwrap();
    assert!(stats.bytes_in > 0, "the server read something");
    assert!(stats.bytes_discarded > 0, "the writer was still sending");
    assert_eq!(
        back.len() as u64,
        stats.bytes_in - stats.bytes_discarded,
        "every byte the server read (and did not throw away lingering) came back"
    );
    assert!(back[..] == data[..back.len()], "in order and unchanged");
    assert!(back.len() <= sent);
}

#[test]
fn chat_in_process_relays_and_says_bye() {
    let server = Server::spawn(config(Mode::Chat)).unwrap();
    let a = connect(server.addr);
    let mut ar = BufReader::new(a.try_clone().unwrap());
    let line = |r: &mut BufReader<TcpStream>| {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l
    };
    assert_eq!(line(&mut ar), "* welcome guest-1\n");
    let b = connect(server.addr);
    let mut br = BufReader::new(b.try_clone().unwrap());
    assert_eq!(line(&mut br), "* welcome guest-2\n");
    assert_eq!(line(&mut ar), "* guest-2 joined\n");
    (&b).write_all(b"hi\n/quit\n").unwrap();
    assert_eq!(line(&mut ar), "guest-2: hi\n");
    assert_eq!(line(&mut br), "* bye\n");
    assert_eq!(line(&mut ar), "* guest-2 left\n");
    let stats = server.stop().unwrap();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.closed, 2, "b left, a closed at the stop");
}
