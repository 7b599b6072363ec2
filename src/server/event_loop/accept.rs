//! Accepting: drain the listener's backlog, open connections, and pause
//! cleanly when the process runs out of descriptors.

use std::io;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::{Accepting, EventLoop, ACCEPT_BUDGET, ACCEPT_RETRY};
use crate::net::Stream;
use crate::protocol::Protocol;
use crate::server::connection::{flag, write_now, ConnOutbox, Connection, Phase};
use crate::server::token::{
    connection_token, next_generation, TokenName, LISTENER_TCP, LISTENER_UNIX,
};

impl<P: Protocol> EventLoop<P> {
    pub(super) fn accept(&mut self, token: Token) -> io::Result<()> {
        if self.accepting != Accepting::On {
            return Ok(());
        }
        for _ in 0..ACCEPT_BUDGET {
            let accepted = match token {
                LISTENER_TCP => match &self.tcp {
                    Some(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                    None => return Ok(()),
                },
                _ => match &self.unix {
                    Some((l, _)) => l.accept().map(|(s, _)| Stream::Unix(s)),
                    None => return Ok(()),
                },
            };
            match accepted {
                Ok(stream) => self.open(stream)?,
                // Drained: the next connection raises a new edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::trace!("[{}] accept: WouldBlock, drained", TokenName(token));
                    // Nobody is left waiting: any shortage of descriptors
                    // is over. (While clients still wait, each close lets
                    // one more in and the limit is hit again at once; that
                    // is one episode, not one warning per close.)
                    self.emfile_logged = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_out_of_fds(&e) => return self.pause_accepting(e),
                // ECONNABORTED and friends concern that one connection,
                // which the client gave up on before we took it.
                Err(e) => log::debug!("accept failed: {e}"),
            }
        }
        // Budget spent, maybe with more connections waiting in the backlog.
        self.push_ready(token);
        Ok(())
    }

    /// Out of descriptors: stop watching the listeners (an edge-triggered
    /// listener would wake us for every new SYN and fail again: a busy
    /// loop) and look again when a connection closes or after
    /// [`ACCEPT_RETRY`]. Pending connects wait in the backlog meanwhile.
    pub(super) fn pause_accepting(&mut self, e: io::Error) -> io::Result<()> {
        if !self.emfile_logged {
            log::warn!(
                "accept: {e} (open-file limit reached with {} clients); \
                 serving them and accepting again once descriptors free up",
                self.conns.len()
            );
            self.emfile_logged = true;
        }
        self.accepting = Accepting::PausedUntil(self.now + ACCEPT_RETRY.as_millis() as u64);
        let registry = self.poll.registry();
        if let Some(l) = self.tcp.as_mut() {
            registry.deregister(l)?;
        }
        if let Some((l, _)) = self.unix.as_mut() {
            registry.deregister(l)?;
        }
        Ok(())
    }

    pub(super) fn resume_accepting(&mut self) -> io::Result<()> {
        if !matches!(self.accepting, Accepting::PausedUntil(_)) {
            return Ok(());
        }
        self.accepting = Accepting::On;
        // Connections that queued while we were not looking raised their
        // edges long ago; the ready list makes us accept them now.
        if let Some(l) = self.tcp.as_mut() {
            self.poll
                .registry()
                .register(l, LISTENER_TCP, Interest::READABLE)?;
            self.push_ready(LISTENER_TCP);
        }
        if let Some((l, _)) = self.unix.as_mut() {
            self.poll
                .registry()
                .register(l, LISTENER_UNIX, Interest::READABLE)?;
            self.push_ready(LISTENER_UNIX);
        }
        Ok(())
    }

    pub(super) fn open(&mut self, mut stream: Stream) -> io::Result<()> {
        self.stats.accepted += 1;
        if stream.is_unix() {
            self.stats.accepted_unix += 1;
        }
        if self.conns.len() >= self.max_connections {
            // Accept and close at once: leaving it in the backlog would
            // keep the client waiting on a server that has no room.
            self.stats.rejected += 1;
            let line = self.protocol.reject();
            if !line.is_empty() {
                let _ = write_now(&stream, line, &mut self.stats);
            }
            log::debug!("rejected a client: {} connections held", self.conns.len());
            return Ok(());
        }
        if let Stream::Tcp(s) = &stream {
            set_nodelay(s);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let generation = self.next_generation;
        self.next_generation = next_generation(generation);
        let token = connection_token(key, generation);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
        {
            log::warn!("cannot register a new client: {e}");
            return Ok(());
        }
        // The welcome (chat) goes out through the same outbox as every
        // later reply, before the connection is stored.
        let (mut out, mut flags, mut phase) = (None, flag::REG_READABLE, Phase::Open);
        let session = self.protocol.open(&mut ConnOutbox {
            token,
            stream: &stream,
            out: &mut out,
            flags: &mut flags,
            phase: &mut phase,
            limit: self.config.max_buffer,
            broadcasts: &mut self.broadcasts,
            stats: &mut self.stats,
        });
        entry.insert(Connection {
            stream,
            out,
            stamp: self.now,
            generation,
            phase,
            flags,
            session,
        });
        self.stats.active += 1;
        log::debug!("[{}] open ({} held)", TokenName(token), self.conns.len());
        if let Some(idle) = self.config.idle_timeout {
            self.timers.push(self.now + idle.as_millis() as u64, token);
        }
        self.settle(key);
        self.deliver();
        Ok(())
    }
}

fn set_nodelay(s: &TcpStream) {
    // Echo and chat answer at once; Nagle would hold small replies back
    // waiting for an ACK the client delays.
    if let Err(e) = s.set_nodelay(true) {
        log::debug!("TCP_NODELAY: {e}");
    }
}

fn is_out_of_fds(e: &io::Error) -> bool {
    // EMFILE (24): this process's limit; ENFILE (23): the system's.
    matches!(e.raw_os_error(), Some(23 | 24))
}
