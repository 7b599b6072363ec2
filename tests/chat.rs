//! Chat mode over real sockets: every rule of INTERFACE.md's chat section.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

use common::*;

/// A chat client reading whole lines.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn join(server: &Server) -> Client {
        let s = server.connect();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// Joins and reads the welcome, returning the name.
    fn joined(server: &Server) -> (Client, String) {
        let mut c = Client::join(server);
        let welcome = c.line();
        let name = welcome
            .strip_prefix("* welcome ")
            .expect("welcome line")
            .to_string();
        (c, name)
    }

    fn say(&mut self, text: &str) {
        self.w.write_all(text.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.r.read_line(&mut l).expect("read a line");
        assert!(n > 0, "connection closed while waiting for a line");
        assert!(l.ends_with('\n'));
        l.pop();
        l
    }

    /// True when the server closes (EOF or reset) with nothing more sent.
    /// A read that times out means the server never closed: false, so a
    /// test that asserts a close fails against a server that keeps the
    /// connection open (the read timeout is `TIMEOUT`, set by `connect`).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.r.read_to_end(&mut rest) {
            Ok(_) => rest.is_empty(),
            Err(e) if is_timeout(&e) => false,
            // A reset after the last line is a close too.
            Err(_) => rest.is_empty(),
        }
    }
}

/// A read that gave up waiting (`SO_RCVTIMEO`): Linux says `WouldBlock`,
/// other systems `TimedOut`.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn chat(engine: &str, args: &[&str]) -> Server {
    let mut all = vec!["--mode", "chat", "--log-level", "warn"];
    all.extend_from_slice(args);
    Server::start_engine(engine, &all)
}

/// Joins `n` clients, each having read every later `joined` line, so the
/// room is quiet afterwards.
fn room(server: &Server, n: usize) -> Vec<(Client, String)> {
    let mut people: Vec<(Client, String)> = Vec::new();
    for _ in 0..n {
        let (c, name) = Client::joined(server);
        for (other, _) in people.iter_mut() {
            assert_eq!(other.line(), format!("* {name} joined"));
        }
        people.push((c, name));
    }
    people
}

fn welcome_joined_and_guest_numbers(engine: &str) {
    let server = chat(engine, &[]);
    let mut p = room(&server, 3);
    assert_eq!(p[0].1, "guest-1");
    assert_eq!(p[2].1, "guest-3");
    p[0].0.say("/who\n");
    assert_eq!(p[0].0.line(), "* online: guest-1, guest-2, guest-3");
}
engines!(welcome_joined_and_guest_numbers: reactor, uring);

fn a_line_reaches_everyone_but_the_sender_in_order(engine: &str) {
    let server = chat(engine, &[]);
    let mut p = room(&server, 4);
    for i in 0..20 {
        p[1].0.say(&format!("message {i}\r\n"));
    }
    p[1].0.say("/who\n");
    for (k, (c, _)) in p.iter_mut().enumerate() {
        if k == 1 {
            // The sender sees none of its own lines: the next is /who's answer.
            assert!(c.line().starts_with("* online: "));
            continue;
        }
        for i in 0..20 {
            assert_eq!(c.line(), format!("guest-2: message {i}"));
        }
    }
}
engines!(a_line_reaches_everyone_but_the_sender_in_order: reactor, uring);

fn empty_lines_are_ignored_and_bytes_need_not_be_utf8(engine: &str) {
    let server = chat(engine, &[]);
    let mut p = room(&server, 2);
    p[0].0.w.write_all(b"\n\r\n\xff\xfe ok\n").unwrap();
    let mut raw = Vec::new();
    p[1].0.r.read_until(b'\n', &mut raw).unwrap();
    assert_eq!(raw, b"guest-1: \xff\xfe ok\n");
}
engines!(empty_lines_are_ignored_and_bytes_need_not_be_utf8: reactor, uring);

fn nick_rules(engine: &str) {
    let server = chat(engine, &[]);
    let mut p = room(&server, 2);
    p[0].0.say("/nick alice\n");
    assert_eq!(p[0].0.line(), "* guest-1 is now alice");
    assert_eq!(p[1].0.line(), "* guest-1 is now alice");
    p[1].0.say("/nick alice\n");
    assert_eq!(p[1].0.line(), "* error: name taken");
    p[0].0.say("/nick alice\n");
    assert_eq!(
        p[0].0.line(),
        "* error: name taken",
        "your own name counts as taken"
    );
    for bad in ["/nick \n", "/nick bad name\n", "/nick caf\u{e9}\n"] {
        p[1].0.say(bad);
        assert!(p[1].0.line().starts_with("* error: "), "{bad:?}");
    }
    let long = "n".repeat(33);
    p[1].0.say(&format!("/nick {long}\n"));
    assert!(p[1].0.line().starts_with("* error: "));
    p[1].0.say(&format!("/nick {}\n", &long[..32]));
    assert_eq!(p[1].0.line(), format!("* guest-2 is now {}", &long[..32]));
    p[0].0.say("hi\n");
    assert_eq!(p[0].0.line(), format!("* guest-2 is now {}", &long[..32]));
    assert_eq!(p[1].0.line(), "alice: hi");
}
engines!(nick_rules: reactor, uring);

fn unknown_commands_are_refused_to_the_sender_only(engine: &str) {
    let server = chat(engine, &[]);
    let mut p = room(&server, 2);
    p[0].0.say("/shout hi\n");
    assert_eq!(p[0].0.line(), "* error: unknown command");
    p[0].0.say("/WHO\n");
    assert_eq!(p[0].0.line(), "* error: unknown command");
    p[0].0.say("after\n");
    assert_eq!(
        p[1].0.line(),
        "guest-1: after",
        "nothing else reached the other client"
    );
}
engines!(unknown_commands_are_refused_to_the_sender_only: reactor, uring);

fn quit_and_disconnect_say_bye_then_close_and_others_see_left(engine: &str) {
    for cmd in ["/quit\n", "!DISCONNECT\n", "!DISCONNECT\r\n"] {
        let server = chat(engine, &[]);
        let mut p = room(&server, 2);
        p[0].0.say(cmd);
        assert_eq!(p[0].0.line(), "* bye");
        assert!(p[0].0.closed(), "{cmd:?} closes");
        assert_eq!(p[1].0.line(), "* guest-1 left");
    }
}
engines!(quit_and_disconnect_say_bye_then_close_and_others_see_left: reactor, uring);

fn eof_and_reset_are_announced_as_left(engine: &str) {
    let server = chat(engine, &[]);
    let mut p = room(&server, 3);
    p[0].0.w.shutdown(Shutdown::Write).unwrap();
    assert_eq!(p[2].0.line(), "* guest-1 left");
    assert_eq!(p[1].0.line(), "* guest-1 left");
    drop(p.remove(1));
    assert_eq!(p[1].0.line(), "* guest-2 left");
}
engines!(eof_and_reset_are_announced_as_left: reactor, uring);

fn max_line_exactly_is_accepted_and_one_more_closes_with_an_error(engine: &str) {
    let server = chat(engine, &["--max-line", "10"]);
    let mut p = room(&server, 2);
    p[0].0.say("0123456789\r\n");
    assert_eq!(p[1].0.line(), "guest-1: 0123456789");
    p[0].0.say("01234567890\n");
    assert_eq!(p[0].0.line(), "* error: line too long");
    assert!(p[0].0.closed());
    assert_eq!(p[1].0.line(), "* guest-1 left");
}
engines!(max_line_exactly_is_accepted_and_one_more_closes_with_an_error: reactor, uring);

fn ten_mebibytes_without_a_newline_is_cut_off_and_memory_stays_bounded(engine: &str) {
    let server = chat(engine, &[]);
    let before = server.rss_kib();
    let (mut c, _) = Client::joined(&server);
    let mut w = c.w.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let junk = vec![b'x'; 64 * 1024];
        for _ in 0..160 {
            if w.write_all(&junk).is_err() {
                break;
            }
        }
    });
    assert_eq!(c.line(), "* error: line too long");
    assert!(c.closed());
    writer.join().unwrap();
    let grown = server.rss_kib().saturating_sub(before);
    assert!(grown < 4096, "server grew by {grown} KiB");
}
engines!(ten_mebibytes_without_a_newline_is_cut_off_and_memory_stays_bounded: reactor, uring);

fn a_slow_consumer_is_dropped_while_ten_others_keep_chatting(engine: &str) {
    let server = chat(engine, &["--max-buffer", "65536"]);
    // The slow client asks for a small receive buffer so that the kernel
    // does not soak up megabytes for it before the server has to decide.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let slow_stream: TcpStream = sock.into();
    let mut slow = Client {
        w: slow_stream.try_clone().unwrap(),
        r: BufReader::new(slow_stream),
    };
    assert_eq!(slow.line(), "* welcome guest-1");
    // Ten others join; the slow client reads nothing from here on.
    let mut p = room(&server, 10);
    let line = "y".repeat(4000);
    let mut left_seen = vec![false; p.len()];
    let mut round = 0;
    while left_seen.iter().any(|s| !s) {
        assert!(
            round < 5000,
            "20 MB broadcast and the slow client is still online"
        );
        let k = round % p.len();
        round += 1;
        p[k].0.say(&format!("{line}\n"));
        let expect = format!("{}: {line}", p[k].1);
        for (j, (c, _)) in p.iter_mut().enumerate() {
            if j == k {
                continue;
            }
            // Everyone else gets every line, and at some point the slow
            // client's `left` notice.
            let mut got = c.line();
            if got == "* guest-1 left" {
                left_seen[j] = true;
                got = c.line();
            }
            assert_eq!(got, expect);
        }
        if left_seen[k] {
            continue;
        }
        // The sender learns of it too; it is not sent its own lines, so
        // look for the notice without blocking.
        c_nonblocking_check(&mut p[k].0, &mut left_seen[k]);
    }
    server.wait_for_log("slow consumer");
    drop(slow);
}
engines!(a_slow_consumer_is_dropped_while_ten_others_keep_chatting: reactor, uring);

/// Reads a pending `* guest-1 left` line if one is waiting.
fn c_nonblocking_check(c: &mut Client, seen: &mut bool) {
    c.r.get_ref().set_nonblocking(true).unwrap();
    let mut l = String::new();
    if c.r.read_line(&mut l).is_ok() && !l.is_empty() {
        assert_eq!(l, "* guest-1 left\n");
        *seen = true;
    }
    c.r.get_ref().set_nonblocking(false).unwrap();
}

fn a_thousand_clients_receive_a_broadcast(engine: &str) {
    let server = chat(engine, &[]);
    let mut clients: Vec<Client> = (0..1000).map(|_| Client::join(&server)).collect();
    // Each client reads its welcome and every later join notice.
    let n = clients.len();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.line(), format!("* welcome guest-{}", i + 1));
        for j in i + 1..n {
            assert_eq!(c.line(), format!("* guest-{} joined", j + 1));
        }
    }
    clients[0].say("hello, everyone\n");
    for c in clients.iter_mut().skip(1) {
        assert_eq!(c.line(), "guest-1: hello, everyone");
    }
}
engines!(a_thousand_clients_receive_a_broadcast: reactor, uring);

fn a_full_server_says_so_and_counts_the_rejected_guest(engine: &str) {
    let server = chat(engine, &["--max-connections", "1"]);
    let (_a, name) = Client::joined(&server);
    assert_eq!(name, "guest-1");
    let mut b = Client::join(&server);
    assert_eq!(b.line(), "* error: server full");
    assert!(b.closed());
}
engines!(a_full_server_says_so_and_counts_the_rejected_guest: reactor, uring);
