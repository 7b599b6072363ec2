//! Accepting: drain the listener's backlog, open connections, and pause
//! cleanly when the process runs out of descriptors (or the kernel out of
//! memory for sockets), instead of spinning on a listener it cannot serve.

use std::io::{self, Read};

use mio::{Interest, Token};

use super::{Accepting, EventLoop, ACCEPT_BUDGET, ACCEPT_RETRY};
use crate::net::io::attempt;
use crate::net::Stream;
use crate::protocol::Protocol;
use crate::server::connection::{write_now, ConnOutbox, Connection, Lists, State};
use crate::server::token::{
    connection_token, next_generation, TokenName, LISTENER_TCP, LISTENER_UNIX,
};
use crate::server::{turn_away, warn_accept_paused};

impl<P: Protocol> EventLoop<P> {
    /// A listener is readable: accept until `WouldBlock`, or until the
    /// budget is spent (then the ready list brings us back next turn).
    pub(super) fn accept(&mut self, token: Token) {
        if self.accepting != Accepting::On {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let accepted = attempt(|| match token {
                LISTENER_TCP => match &self.tcp {
                    Some(l) => l.accept().map(|(s, _)| Some(Stream::Tcp(s))),
                    None => Ok(None),
                },
                _ => match &self.unix {
                    Some((l, _)) => l.accept().map(|(s, _)| Some(Stream::Unix(s))),
                    None => Ok(None),
                },
            });
            match accepted {
                Ok(Some(Some(stream))) => self.open(stream),
                // The listener is gone (shutdown began this turn).
                Ok(Some(None)) => return,
                // Drained: the next connection raises a new edge.
                Ok(None) => {
                    log::trace!("[{}] accept: WouldBlock, drained", TokenName(token));
                    // Nobody is left waiting: any shortage of descriptors
                    // is over. (While clients still wait, each close lets
                    // one more in and the limit is hit again at once; that
                    // is one episode, not one warning per close.)
                    self.emfile_logged = false;
                    return;
                }
                // ECONNABORTED and friends concern that one connection,
                // which the client gave up on before we took it; it has
                // left the backlog, so going on cannot spin.
                Err(e) if concerns_one_connection(&e) => log::debug!("accept failed: {e}"),
                // Anything else (out of descriptors, out of memory, or an
                // error we do not expect) would fail again at once: stop
                // watching the listener for a while rather than spin.
                Err(e) => return self.pause_accepting(e),
            }
        }
        // Budget spent, maybe with more connections waiting in the backlog.
        self.push_ready(token);
    }

    /// Out of descriptors or socket memory (or an error that would repeat
    /// at once): stop watching the listeners
    /// (an edge-triggered listener would wake us for every new SYN and
    /// fail again: a busy loop) and look again when a connection closes or
    /// after [`ACCEPT_RETRY`]. Pending connects wait in the backlog.
    fn pause_accepting(&mut self, e: io::Error) {
        if !self.emfile_logged {
            warn_accept_paused(&e, self.conns.len());
            self.emfile_logged = true;
        }
        log::debug!("accepting paused ({e}) until a connection closes or {ACCEPT_RETRY:?} pass");
        self.stats.accept_paused += 1;
        self.accepting = Accepting::paused(self.now);
        let registry = self.poll.registry();
        // Deregistering can only fail if the listener was not registered;
        // either way it is not watched now, which is what we want.
        if let Some(l) = self.tcp.as_mut() {
            let _ = registry.deregister(l);
        }
        if let Some((l, _)) = self.unix.as_mut() {
            let _ = registry.deregister(l);
        }
    }

    /// Watches the listeners again after a pause. Connections that queued
    /// meanwhile raised their edges long ago, so the ready list makes us
    /// accept them now. A listener that cannot be registered (the kernel
    /// is short of memory too) stays paused for another [`ACCEPT_RETRY`].
    pub(super) fn resume_accepting(&mut self) {
        if !matches!(self.accepting, Accepting::PausedUntil(_)) {
            return;
        }
        let registry = self.poll.registry();
        let mut result = Ok(());
        if let Some(l) = self.tcp.as_mut() {
            result = result.and(registry.register(l, LISTENER_TCP, Interest::READABLE));
        }
        if let Some((l, _)) = self.unix.as_mut() {
            result = result.and(registry.register(l, LISTENER_UNIX, Interest::READABLE));
        }
        match result {
            Ok(()) => {
                self.accepting = Accepting::On;
                self.push_ready(LISTENER_TCP);
                if self.unix.is_some() {
                    self.push_ready(LISTENER_UNIX);
                }
            }
            Err(e) => {
                log::warn!("cannot watch the listeners again: {e}; retrying");
                self.pause_accepting(e);
            }
        }
    }

    /// A new client: admit it (register, store, greet) or, past
    /// `--max-connections`, turn it away at once.
    fn open(&mut self, mut stream: Stream) {
        self.stats.accepted += 1;
        if stream.is_unix() {
            self.stats.accepted_unix += 1;
        }
        if self.conns.len() >= self.max_connections {
            // Accept and close at once: leaving it in the backlog would
            // keep the client waiting on a server that has no room.
            let line = turn_away(&mut self.protocol, &mut self.stats, self.conns.len());
            if !line.is_empty() {
                let _ = write_now(&stream, line, &mut self.stats);
                // Closing with unread input sends a reset, which can
                // destroy the line before the client reads it: shut our
                // side, and take what the client already sent (a little;
                // a full server cannot linger for everyone it turns away).
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let mut sink = [0; 4096];
                for _ in 0..16 {
                    match attempt(|| (&stream).read(&mut sink)) {
                        Ok(Some(n)) if n > 0 => self.stats.bytes_discarded += n as u64,
                        _ => break,
                    }
                }
            }
            return;
        }
        if let Stream::Tcp(s) = &stream {
            // Echo and chat answer at once; Nagle would hold small replies
            // back waiting for an ACK the client delays.
            if let Err(e) = s.set_nodelay(true) {
                log::debug!("TCP_NODELAY: {e}");
            }
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
            return;
        }
        // The welcome (chat) goes out through the same outbox as every
        // later reply, before the connection is stored.
        let (mut out, mut state) = (None, State::Open);
        let session = self.protocol.open(&mut ConnOutbox {
            token,
            stream: &stream,
            out: &mut out,
            state: &mut state,
            limit: self.config.max_buffer,
            broadcasts: &mut self.broadcasts,
            stats: &mut self.stats,
        });
        entry.insert(Connection {
            stream,
            out,
            since: self.now,
            generation,
            state,
            registered: Interest::READABLE,
            lists: Lists::default(),
            session,
        });
        self.stats.active += 1;
        self.recount(key, 0);
        log::debug!("[{}] open ({} held)", TokenName(token), self.conns.len());
        self.arm_deadline(key);
        self.advance(key);
        self.deliver();
    }
}

/// An accept error that is about the connection being taken, not about
/// the listener or the process: the client reset or gave up before we took
/// it, or (Linux passes these on from the new socket, see accept(2)) a
/// network error already pending on it. That connection has left the
/// backlog, so accepting on cannot fail the same way for ever. Every other
/// error (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, or something we do not
/// expect) pauses accepting instead.
pub(crate) fn concerns_one_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ETIMEDOUT
        )
    )
}
