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

use std::collections::VecDeque;
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
use crate::net::ready::want_writable;
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

/// Longest datagram `connect --udp` sends: the most a UDP/IPv4 datagram
/// can carry. A line longer than this (or standard input with no newline
/// at all) is sent in pieces of this size, each one datagram, so the
/// client holds at most this much of an unfinished line.
pub const MAX_DATAGRAM: usize = 65_507;

/// Cuts standard input into datagrams: one per line (without its `\n` and
/// one `\r` before it), and one per [`MAX_DATAGRAM`] bytes of a line that
/// is longer than that. Holds at most [`MAX_DATAGRAM`] bytes in between.
#[derive(Debug, Default)]
pub struct Datagrams {
    partial: Vec<u8>,
}

impl Datagrams {
    /// Adds `chunk` and appends every datagram it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut VecDeque<Vec<u8>>) {
        while !chunk.is_empty() {
            let room = MAX_DATAGRAM - self.partial.len();
            // A newline right after a full piece still ends that line.
            match memchr::memchr(b'\n', &chunk[..chunk.len().min(room + 1)]) {
                Some(nl) => {
                    self.partial.extend_from_slice(&chunk[..nl]);
                    let mut line = std::mem::take(&mut self.partial);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push_back(line);
                    chunk = &chunk[nl + 1..];
                }
                None => {
                    let take = chunk.len().min(room);
                    self.partial.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    // Full, and text (not a newline) follows: send it.
                    if !chunk.is_empty() {
                        out.push_back(std::mem::take(&mut self.partial));
                    }
                }
            }
        }
    }

    /// Standard input ended: what is held goes out as a last datagram.
    pub fn finish(&mut self, out: &mut VecDeque<Vec<u8>>) {
        if !self.partial.is_empty() {
            out.push_back(std::mem::take(&mut self.partial));
        }
    }

    /// Bytes held of an unfinished line.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// Sends each line of `input` as one datagram to `addr` and prints every
/// reply as a line. Ends a moment after `input` does.
///
/// When the socket's send buffer is full, datagrams wait (and so does the
/// stdin reader, through its bounded channel) until the socket is
/// writable again: nothing is dropped on our side, and nothing sleeps.
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
    let mut writable = false;
    // The loop keeps its own handle on the waker: if the reader thread
    // held the only one, its exit after EOF would close the eventfd, and
    // closing an fd drops its pending event from epoll, losing the very
    // wake-up that says "EOF".
    let chunks = spawn_reader(input, waker.clone());
    let mut events = Events::with_capacity(16);
    let mut lines = Datagrams::default();
    let mut outgoing: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = vec![0; 65536];
    let mut input_done = false;
    loop {
        // Once everything is sent, wait a moment for the last replies.
        let timeout = (input_done && outgoing.is_empty()).then_some(UDP_LINGER);
        attempt(|| poll.poll(&mut events, timeout))?;
        if events.is_empty() && timeout.is_some() {
            return Ok(());
        }
        send_datagrams(&socket, &mut outgoing)?;
        // Take more from stdin only while nothing waits for the socket,
        // so the channel's bound reaches back to the reader.
        while !input_done && outgoing.is_empty() {
            match chunks.try_recv() {
                Ok(chunk) if chunk.is_empty() => {
                    input_done = true;
                    lines.finish(&mut outgoing);
                }
                Ok(chunk) => lines.push(&chunk, &mut outgoing),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    input_done = true;
                    lines.finish(&mut outgoing);
                }
            }
            send_datagrams(&socket, &mut outgoing)?;
        }
        // Ask for WRITABLE only while datagrams wait, or the loop spins.
        want_writable(
            poll.registry(),
            &mut socket,
            SOCKET,
            &mut writable,
            !outgoing.is_empty(),
        )?;
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

/// Sends queued datagrams in order until the queue is empty or the
/// socket's buffer is full (`WouldBlock`: the rest waits for `WRITABLE`).
fn send_datagrams(socket: &UdpSocket, queue: &mut VecDeque<Vec<u8>>) -> io::Result<()> {
    while let Some(d) = queue.front() {
        match attempt(|| socket.send(d)) {
            Ok(Some(_)) => {
                queue.pop_front();
            }
            Ok(None) => return Ok(()),
            // A connected UDP socket reports an earlier datagram's ICMP
            // "port unreachable" on a later call; like the old client,
            // that ends the run.
            Err(e) => return Err(io::Error::new(e.kind(), format!("udp send: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(pieces: &[&[u8]]) -> (Vec<Vec<u8>>, usize) {
        let mut d = Datagrams::default();
        let mut out = VecDeque::new();
        let mut peak = 0;
        for p in pieces {
            d.push(p, &mut out);
            peak = peak.max(d.pending());
        }
        d.finish(&mut out);
        (out.into_iter().collect(), peak)
    }

    #[test]
    fn each_line_is_one_datagram_without_its_line_end() {
        let (out, _) = cut(&[b"a\r\nbb", b"b\n\nc"]);
        assert_eq!(
            out,
            vec![b"a".to_vec(), b"bbb".to_vec(), vec![], b"c".to_vec()]
        );
    }

    #[test]
    fn input_without_a_newline_is_sent_in_pieces_of_the_limit() {
        let chunk = vec![b'x'; 16 * 1024];
        let pieces: Vec<&[u8]> = vec![&chunk[..]; 20];
        let (out, peak) = cut(&pieces);
        assert!(peak <= MAX_DATAGRAM, "held {peak}");
        let total: usize = out.iter().map(|d| d.len()).sum();
        assert_eq!(total, 20 * 16 * 1024, "every byte sent");
        assert!(out.iter().all(|d| d.len() <= MAX_DATAGRAM));
        assert_eq!(out[0].len(), MAX_DATAGRAM);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_one_datagram() {
        let mut line = vec![b'y'; MAX_DATAGRAM];
        line.push(b'\n');
        let (out, _) = cut(&[&line[..100], &line[100..]]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_DATAGRAM);
        let (out, _) = cut(&[&line[..MAX_DATAGRAM], b"z\n"]);
        assert_eq!(out, vec![line[..MAX_DATAGRAM].to_vec(), b"z".to_vec()]);
    }
}
