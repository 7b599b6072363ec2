//! `--udp` on the uring engine: the datagram socket served the readiness
//! way, from a small `mio::Poll` of its own that the ring watches (as the
//! metrics endpoint is, see `metrics.rs`).
//!
//! Echo over UDP is [`UdpEcho`], the readiness loop's own code, unchanged:
//! `recvfrom` until `WouldBlock` or its budget, each datagram sent straight
//! back, a bounded queue for what the kernel will not take. Putting one
//! socket's datagrams through the ring as well would need a receive with a
//! peer address per datagram (`recvmsg` into a provided buffer) and a
//! `sendmsg` per reply: more code for one socket, and nothing the tests or
//! the load tool could tell apart. The inner `Poll` is edge-triggered like
//! every mio registration, so when the budget runs out with datagrams
//! possibly left, no new event would come: the engine serves the socket
//! again next turn on its own (`again`), waiting for nothing meanwhile.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use mio::{Events, Poll, Token};

use super::{Engine, UDP};
use crate::protocol::Protocol;
use crate::server::udp::{Next, UdpEcho};

/// The socket's token on its own `Poll` (the only one there).
const SOCKET: Token = Token(0);

/// The UDP echo socket, its `Poll`, and the readiness loop's scratch
/// buffer (datagrams are at most 64 KiB).
pub(super) struct UdpSide {
    poll: Poll,
    events: Events,
    echo: UdpEcho,
    scratch: Vec<u8>,
    /// The ring's one-shot poll on `poll` is armed.
    armed: bool,
    /// The receive budget ran out: serve again next turn without an event.
    pub(super) again: bool,
    /// Served by this turn's poll completion, so the turn's end does not
    /// serve it again (256 datagrams a turn at most).
    pub(super) served: bool,
}

impl AsRawFd for UdpSide {
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}

impl UdpSide {
    /// Wraps a bound socket: `limit` bounds its send queue (`--max-buffer`).
    pub(super) fn new(socket: std::net::UdpSocket, limit: usize) -> io::Result<UdpSide> {
        socket.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let mut echo = UdpEcho::new(mio::net::UdpSocket::from_std(socket), limit);
        echo.register(poll.registry(), SOCKET)?;
        Ok(UdpSide {
            poll,
            events: Events::with_capacity(4),
            echo,
            scratch: vec![0; 65_536],
            armed: false,
            again: false,
            served: false,
        })
    }
}

impl<P: Protocol> Engine<P> {
    /// Arms the ring's poll on the socket's `Poll` unless it is armed.
    pub(super) fn watch_udp(&mut self) -> io::Result<()> {
        if let Some(u) = self.udp.as_mut().filter(|u| !u.armed) {
            self.ring.poll_readable(&*u, UDP)?;
            u.armed = true;
        }
        Ok(())
    }

    /// Serves the socket: `fired` when the ring's poll completed. What
    /// its `Poll` reports is handled as the readiness loop does (queued
    /// datagrams first, then receiving); a failure is this socket's alone
    /// and is logged.
    pub(super) fn on_udp(&mut self, fired: bool) -> io::Result<()> {
        let Some(u) = self.udp.as_mut() else {
            return Ok(());
        };
        if fired {
            u.armed = false;
            u.served = true;
        }
        let (mut readable, mut writable) = (std::mem::take(&mut u.again), false);
        match u.poll.poll(&mut u.events, Some(Duration::ZERO)) {
            Ok(()) => {
                for e in u.events.iter() {
                    readable |= e.is_readable();
                    writable |= e.is_writable();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => readable = true,
            // Its events would stay unread and the re-armed poll fire at
            // once, every turn: give the socket up, as a metrics endpoint
            // that cannot be watched is (TCP clients go on).
            Err(e) => {
                log::warn!("udp: cannot poll the socket ({e}); UDP echo stops");
                return self.close_udp();
            }
        }
        if writable {
            u.echo.on_writable(&mut self.stats);
        }
        if readable {
            u.again = u.echo.on_readable(&mut u.scratch, &mut self.stats) == Next::MoreReady;
        }
        if let Err(e) = u.echo.update_interest(u.poll.registry(), SOCKET) {
            log::warn!("udp: cannot update interest: {e}");
        }
        self.watch_udp()
    }

    /// Shutdown: datagrams are no longer answered. The `Poll` stays open
    /// until the poll's cancel is submitted (see `retired` in `run`).
    pub(super) fn close_udp(&mut self) -> io::Result<()> {
        if let Some(u) = self.udp.take() {
            if u.armed {
                self.ring.cancel_poll(UDP)?;
            }
            self.retired_udp = Some(u);
        }
        Ok(())
    }
}
