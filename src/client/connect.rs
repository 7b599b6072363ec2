//! `reactor connect`: standard input to the server, the server to
//! standard output, like `nc`.
//!
//! It is itself a small mio loop with one stream socket. Standard input is
//! the odd one out: epoll refuses regular files and `/dev/null` (`EPERM`),
//! and making a terminal's stdin non-blocking would change it for every
//! process sharing the terminal (the shell, after we exit). So a helper
//! thread does plain blocking reads of stdin and hands each chunk to the
//! loop through a bounded channel, then wakes the loop with a
//! [`mio::Waker`], which is an eventfd registered in the same `Poll`.
//! The bound means a fast typist (or a large file piped in) waits for a
//! slow server instead of filling our memory; nothing is dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::buffer::OutQueue;
use crate::net::io::attempt;
use crate::net::Stream;

const SOCKET: Token = Token(0);
const STDIN: Token = Token(1);
/// Chunks of stdin waiting for the loop; the reader blocks beyond this.
const STDIN_CHUNKS: usize = 16;
/// After stdin ends in UDP mode, how long to wait for the last replies.
const UDP_LINGER: Duration = Duration::from_secs(1);

/// Where `reactor connect` talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A TCP server.
    Tcp(SocketAddr),
    /// A Unix-domain stream socket.
    Unix(PathBuf),
    /// A UDP echo server: one datagram per line of input.
    Udp(SocketAddr),
}

/// Runs `reactor connect` and returns its exit code.
pub fn run(target: &Target) -> ExitCode {
    let result = match target {
        Target::Unix(path) => connect_unix(path).and_then(|s| relay(s, io::stdin(), io::stdout())),
        Target::Udp(addr) => udp(*addr, io::stdin(), io::stdout()),
        Target::Tcp(addr) => connect_tcp(*addr).and_then(|s| relay(s, io::stdin(), io::stdout())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reactor connect: {e}");
            ExitCode::FAILURE
        }
    }
}

fn connect_tcp(addr: SocketAddr) -> io::Result<Stream> {
    // A blocking connect is the simplest correct thing for one socket;
    // the stream becomes non-blocking for the loop afterwards.
    let s = std::net::TcpStream::connect(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")))?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(Stream::Tcp(mio::net::TcpStream::from_std(s)))
}

fn connect_unix(path: &Path) -> io::Result<Stream> {
    let s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )
    })?;
    s.set_nonblocking(true)?;
    Ok(Stream::Unix(mio::net::UnixStream::from_std(s)))
}

/// Starts the stdin reader thread. Each message is a chunk; an empty one
/// means EOF.
fn spawn_reader<R: Read + Send + 'static>(mut input: R, waker: Arc<Waker>) -> Receiver<Vec<u8>> {
    let (tx, rx) = sync_channel(STDIN_CHUNKS);
    thread::spawn(move || {
        let mut buf = vec![0; 16 * 1024];
        loop {
            // A blocking read: it never says WouldBlock, and an error ends
            // the input like EOF.
            let n = attempt(|| input.read(&mut buf)).ok().flatten().unwrap_or(0);
            if tx.send(buf[..n].to_vec()).is_err() || waker.wake().is_err() || n == 0 {
                return;
            }
        }
    });
    rx
}

/// Relays between `input`/`output` and a connected stream until the
/// server closes. EOF on `input` half-closes the connection.
pub fn relay<R, W>(mut stream: Stream, input: R, mut output: W) -> io::Result<()>
where
    R: Read + Send + 'static,
    W: Write,
{
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), STDIN)?);
    poll.registry()
        .register(&mut stream, SOCKET, Interest::READABLE | Interest::WRITABLE)?;
    // The loop keeps its own handle on the waker: if the reader thread
    // held the only one, its exit after EOF would close the eventfd, and
    // closing an fd drops its pending event from epoll, losing the very
    // wake-up that says "EOF".
    let chunks = spawn_reader(input, waker.clone());
    let mut events = Events::with_capacity(16);
    let mut pending = OutQueue::new(usize::MAX);
    let mut input_done = false;
    let mut shut = false;
    let mut buf = vec![0; 64 * 1024];
    loop {
        attempt(|| poll.poll(&mut events, None))?;
        // Only take more from stdin while the socket keeps up, so the
        // channel's bound reaches back to the reader. Registered for both
        // directions all along: with one socket there is nothing to gain
        // from toggling WRITABLE, and writing whenever anything is
        // pending is correct for an edge-triggered writable event.
        loop {
            let mut more_waiting = false;
            while !input_done {
                if pending.len() >= 1 << 20 {
                    more_waiting = true;
                    break;
                }
                match chunks.try_recv() {
                    Ok(chunk) if chunk.is_empty() => input_done = true,
                    Ok(chunk) => {
                        let _ = pending.push(&chunk);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => input_done = true,
                }
            }
            pending.write_to(&mut &stream, usize::MAX)?;
            // The reader's wake-up for the chunks left in the channel was
            // spent already: keep pumping while the socket takes them.
            if !(more_waiting && pending.is_empty()) {
                break;
            }
        }
        if input_done && pending.is_empty() && !shut {
            // Half-close: the server sees EOF, and may still answer.
            stream.shutdown(Shutdown::Write)?;
            shut = true;
        }
        loop {
            match attempt(|| (&stream).read(&mut buf)) {
                Ok(Some(0)) => {
                    output.flush()?;
                    return Ok(());
                }
                Ok(Some(n)) => {
                    output.write_all(&buf[..n])?;
                    output.flush()?;
                }
                // Drained: wait for the next edge.
                Ok(None) => break,
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("connection lost: {e}")));
                }
            }
        }
    }
}

/// Sends each line of `input` as one datagram to `addr` and prints every
/// reply as a line. Ends a moment after `input` does.
pub fn udp<R, W>(addr: SocketAddr, input: R, mut output: W) -> io::Result<()>
where
    R: Read + Send + 'static,
    W: Write,
{
    let local: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let mut socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), STDIN)?);
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    // The loop keeps its own handle on the waker: if the reader thread
    // held the only one, its exit after EOF would close the eventfd, and
    // closing an fd drops its pending event from epoll, losing the very
    // wake-up that says "EOF".
    let chunks = spawn_reader(input, waker.clone());
    let mut events = Events::with_capacity(16);
    let mut partial = Vec::new();
    let mut buf = vec![0; 65536];
    let mut input_done = false;
    loop {
        let timeout = input_done.then_some(UDP_LINGER);
        attempt(|| poll.poll(&mut events, timeout))?;
        if events.is_empty() && input_done {
            return Ok(());
        }
        while !input_done {
            match chunks.try_recv() {
                Ok(chunk) if chunk.is_empty() => {
                    input_done = true;
                    if !partial.is_empty() {
                        send_datagram(&socket, &std::mem::take(&mut partial))?;
                    }
                }
                Ok(chunk) => {
                    partial.extend_from_slice(&chunk);
                    while let Some(nl) = memchr::memchr(b'\n', &partial) {
                        let line: Vec<u8> = partial.drain(..=nl).collect();
                        let line = line.strip_suffix(b"\n").unwrap_or(&line);
                        send_datagram(&socket, line.strip_suffix(b"\r").unwrap_or(line))?;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => input_done = true,
            }
        }
        loop {
            match attempt(|| socket.recv(&mut buf)) {
                Ok(Some(n)) => {
                    output.write_all(&buf[..n])?;
                    output.write_all(b"\n")?;
                    output.flush()?;
                }
                Ok(None) => break,
                Err(e) => return Err(io::Error::new(e.kind(), format!("udp: {e}"))),
            }
        }
    }
}

fn send_datagram(socket: &UdpSocket, data: &[u8]) -> io::Result<()> {
    // A datagram socket's send buffer rarely fills; when it does, wait a
    // moment rather than drop the user's line.
    for _ in 0..1000 {
        match attempt(|| socket.send(data)) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(io::Error::new(e.kind(), format!("udp send: {e}"))),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "udp send kept blocking",
    ))
}
