//! UDP echo on the same poll loop.
//!
//! Each datagram goes back to its sender unchanged (RFC 862). A send that
//! would block is queued, but only up to `--max-buffer` bytes: UDP promises
//! no delivery, so past that the datagram is dropped and counted rather
//! than letting a flood grow the server's memory.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::stats::Stats;
use crate::net::io::attempt;
use crate::net::ready::want_writable;

/// Datagrams handled per readiness event before yielding to other sockets.
const RECV_BUDGET: usize = 256;

/// What the loop should do after a call.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next event.
    Wait,
    /// The budget ran out with datagrams possibly left: call again soon.
    MoreReady,
}

/// The UDP echo socket and its bounded send queue.
#[derive(Debug)]
pub struct UdpEcho {
    socket: UdpSocket,
    queue: VecDeque<(SocketAddr, Box<[u8]>)>,
    queued_bytes: usize,
    limit: usize,
    writable_registered: bool,
}

impl UdpEcho {
    /// Wraps a bound socket; `limit` bounds the queued bytes.
    pub fn new(socket: UdpSocket, limit: usize) -> Self {
        UdpEcho {
            socket,
            queue: VecDeque::new(),
            queued_bytes: 0,
            limit,
            writable_registered: false,
        }
    }

    /// Registers for `READABLE` under `token`.
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.socket, token, Interest::READABLE)
    }

    /// Bytes waiting to be sent.
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Receives until `WouldBlock` (or the budget), echoing each datagram.
    /// A receive error other than those of one peer is logged, and the
    /// socket waits for its next datagram: one UDP socket's trouble never
    /// ends the server.
    pub fn on_readable(&mut self, scratch: &mut [u8], stats: &mut Stats) -> Next {
        for _ in 0..RECV_BUDGET {
            let (n, peer) = match attempt(|| self.socket.recv_from(scratch)) {
                Ok(Some(r)) => r,
                Ok(None) => return Next::Wait,
                // An ICMP error from an earlier send to a closed port
                // surfaces here on Linux; it concerns that peer only.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    log::warn!("udp: receive failed: {e}");
                    return Next::Wait;
                }
            };
            stats.udp_in += 1;
            stats.bytes_in += n as u64;
            self.echo(peer, &scratch[..n], stats);
        }
        Next::MoreReady
    }

    fn echo(&mut self, peer: SocketAddr, data: &[u8], stats: &mut Stats) {
        if self.queue.is_empty() && send(&self.socket, peer, data) {
            stats.udp_out += 1;
            stats.bytes_out += data.len() as u64;
            return;
        }
        self.queue_or_drop(peer, data, stats);
    }

    /// Keeps a datagram the socket would not take, unless that would
    /// queue more than the limit: then it is dropped and counted.
    fn queue_or_drop(&mut self, peer: SocketAddr, data: &[u8], stats: &mut Stats) {
        if self.queued_bytes + data.len() > self.limit {
            stats.udp_dropped += 1;
        } else {
            self.queued_bytes += data.len();
            self.queue.push_back((peer, data.into()));
        }
    }

    /// Sends queued datagrams until the queue is empty or the socket would block.
    pub fn on_writable(&mut self, stats: &mut Stats) {
        while let Some((peer, data)) = self.queue.front() {
            if !send(&self.socket, *peer, data) {
                break;
            }
            stats.udp_out += 1;
            stats.bytes_out += data.len() as u64;
            self.queued_bytes -= data.len();
            self.queue.pop_front();
        }
        if self.queue.is_empty() {
            // Release the queue's memory after a burst.
            self.queue = VecDeque::new();
        }
    }

    /// Asks for `WRITABLE` only while datagrams are queued.
    pub fn update_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let want = !self.queue.is_empty();
        want_writable(
            registry,
            &mut self.socket,
            token,
            &mut self.writable_registered,
            want,
        )
    }

    /// Stops receiving (shutdown): deregisters the socket.
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut self.socket)
    }
}

/// Sends one datagram; false when the socket would block (keep it).
fn send(socket: &UdpSocket, peer: SocketAddr, data: &[u8]) -> bool {
    match attempt(|| socket.send_to(data, peer)) {
        Ok(Some(_)) => true,
        Ok(None) => false,
        // A peer that went away or an oversized reply affects only that
        // datagram (it is gone); the socket keeps serving the others.
        Err(e) => {
            log::debug!("udp send to {peer} failed: {e}");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_with_limit(limit: usize) -> (UdpEcho, std::net::UdpSocket) {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        (UdpEcho::new(socket, limit), peer)
    }

    #[test]
    fn the_queue_never_holds_more_than_its_limit() {
        let (mut udp, peer) = echo_with_limit(100);
        let to = peer.local_addr().unwrap();
        let mut stats = Stats::default();
        udp.queue_or_drop(to, &[1; 60], &mut stats);
        udp.queue_or_drop(to, &[2; 60], &mut stats);
        udp.queue_or_drop(to, &[3; 40], &mut stats);
        assert_eq!(udp.queued_bytes(), 100);
        assert_eq!(stats.udp_dropped, 1);
    }

    #[test]
    fn queued_datagrams_go_out_whole_and_in_order_on_writable() {
        let (mut udp, peer) = echo_with_limit(1000);
        let to = peer.local_addr().unwrap();
        let mut stats = Stats::default();
        udp.queue_or_drop(to, b"first", &mut stats);
        udp.queue_or_drop(to, b"second", &mut stats);
        udp.on_writable(&mut stats);
        assert_eq!(udp.queued_bytes(), 0);
        assert_eq!(stats.udp_out, 2);
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0; 16];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
    }
}
