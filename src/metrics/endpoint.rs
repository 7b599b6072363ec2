//! The metrics endpoint's sockets: a listener and a few HTTP clients,
//! served by the server's own event loop.
//!
//! They live on a small `mio::Poll` of their own, which the loop
//! registers in its `Poll` as one more source (`token::METRICS`; epoll
//! can watch an epoll descriptor like a socket), and which the loop also
//! looks at once per millisecond of its time ([`Endpoint::serve`]); the
//! loop's `metrics.rs` says why a scrape must not queue behind every
//! busy client in epoll's ready list. That `Poll` has a token space of
//! its own: the listener is `Token(0)`, and each client's token
//! ([`fn client_token`](client_token)) holds a key into this module's own
//! small slab and a generation, so an event left over for a closed client
//! is ignored rather than handed to the next one.
//!
//! Every rule of the main server applies, in miniature:
//! - edge-triggered: each event is handled until `WouldBlock` (accepts,
//!   reads, writes), or no new event would come;
//! - a budget: a client gets at most [`IO_BUDGET`] system calls per
//!   event; one that still wants more is pipelining requests faster than
//!   any scraper would and is closed, so it can never hold the loop;
//! - bounded memory: at most [`MAX_CLIENTS`] clients, each with at most
//!   [`MAX_REQUEST`] bytes of request and one response;
//! - back-pressure: while a response is pending nothing is read, and
//!   `WRITABLE` is asked for only while output waits;
//! - a deadline: a client that has not completed a request within
//!   [`TIMEOUT`] of connecting (or of its previous response) is closed,
//!   so a slow trickle cannot hold a slot;
//! - a graceful close: when the server ends the exchange (an error status,
//!   `Connection: close`) while the client may still be sending, closing
//!   at once would answer its next bytes with a reset, and a reset can
//!   destroy the response still unread on the client's side. So the
//!   write side is shut (the client sees EOF after the response) and
//!   input is read and thrown away until the client closes too, for at
//!   most [`LINGER`] (chat's `* error: line too long` does the same).
//!
//! What to answer is [`super::http`]'s business; the text comes from a
//! closure the loop passes in, called only when a `GET /metrics` arrives.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use std::os::fd::{AsRawFd, RawFd};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::http::{Exchange, Want, MAX_REQUEST};
use crate::net::io::attempt;

/// On the endpoint's own `Poll`: the listener.
const LISTENER: Token = Token(0);

/// The token of the client at `key` of the endpoint's slab with
/// `generation`: key + 1 in the low 32 bits (0 is the listener), the
/// generation above. [`client_key`] is its inverse.
fn client_token(key: usize, generation: u32) -> Token {
    Token(((generation as usize) << 32) | ((key + 1) & 0xffff_ffff))
}

/// The key and generation in a client's token; `None` for the listener.
fn client_key(token: Token) -> Option<(usize, u32)> {
    let low = token.0 & 0xffff_ffff;
    low.checked_sub(1).map(|key| (key, (token.0 >> 32) as u32))
}

/// A client's token as the logs show it: `metrics client 2#5`.
struct ClientName(Token);

impl std::fmt::Display for ClientName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match client_key(self.0) {
            Some((key, generation)) => write!(f, "metrics client {key}#{generation}"),
            None => f.write_str("metrics listener"),
        }
    }
}

/// Most metrics clients held at once; more are accepted and closed.
pub const MAX_CLIENTS: usize = 16;
/// Longest a client may take to send one whole request.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a finished exchange waits for the client's own close.
pub const LINGER: Duration = Duration::from_secs(1);
/// Most system calls for one client per event.
pub const IO_BUDGET: usize = 32;
/// Most accepts per listener event.
const ACCEPT_BUDGET: usize = MAX_CLIENTS;

struct Client {
    stream: TcpStream,
    exchange: Exchange,
    generation: u32,
    /// Close if no request completes by then (ms on the loop's clock).
    deadline: u64,
    /// The registered interest, so it is changed only when it must be.
    interest: Interest,
    /// Write side shut; discarding input until EOF or the deadline.
    lingering: bool,
}

/// The metrics endpoint: its own small `Poll` (see the module docs),
/// the listener and its clients.
pub struct Endpoint {
    poll: mio::Poll,
    /// Kept between calls; taken out while its events are handled.
    events: Option<mio::Events>,
    inner: Clients,
}

/// The listener and its clients, on the endpoint's own `Poll`.
struct Clients {
    listener: TcpListener,
    clients: Slab<Client>,
    next_generation: u32,
    timeout: Duration,
    /// The read buffer, shared by all clients (one request at most).
    scratch: Box<[u8]>,
}

/// Binds the metrics listener (blocking std socket, as the other
/// listeners are bound before the loop starts).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

impl Endpoint {
    /// Takes the bound listener and registers it with the endpoint's own
    /// `Poll`; [`Endpoint::register`] then hooks that `Poll` into the
    /// server's.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = mio::Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Endpoint {
            poll,
            events: Some(mio::Events::with_capacity(MAX_CLIENTS * 2)),
            inner: Clients {
                listener,
                clients: Slab::with_capacity(MAX_CLIENTS),
                next_generation: 0,
                timeout: TIMEOUT,
                scratch: vec![0; MAX_REQUEST].into_boxed_slice(),
            },
        })
    }

    /// Registers the endpoint's `Poll` (an epoll descriptor, which epoll
    /// can watch like a socket) in `outer` under `token`: an idle server
    /// wakes up for a scrape.
    pub fn register(&self, outer: &Registry, token: Token) -> io::Result<()> {
        let fd = self.poll.as_raw_fd();
        outer.register(&mut SourceFd(&fd), token, Interest::READABLE)
    }

    /// Undoes [`Endpoint::register`].
    pub fn deregister(&self, outer: &Registry) -> io::Result<()> {
        let fd = self.poll.as_raw_fd();
        outer.deregister(&mut SourceFd(&fd))
    }

    /// Changes the request deadline from [`TIMEOUT`] (tests).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.inner.timeout = timeout;
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.listener.local_addr()
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.inner.clients.len()
    }

    /// Handles whatever is ready on the endpoint's sockets, without
    /// waiting. `now` is the loop's clock in ms; `metrics` renders the
    /// exposition when a `GET /metrics` asks for it.
    pub fn serve(&mut self, now: u64, metrics: &mut dyn FnMut() -> String) {
        let Some(mut events) = self.events.take() else {
            return;
        };
        loop {
            match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("metrics endpoint: poll failed: {e}");
                    break;
                }
            }
            let mut n = 0;
            for event in events.iter() {
                n += 1;
                self.inner
                    .on_event(self.poll.registry(), event.token(), now, metrics);
            }
            // A full batch may have left more behind.
            if n < events.capacity() {
                break;
            }
        }
        self.events = Some(events);
    }

    /// The earliest client deadline, for the loop's poll timeout.
    pub fn next_deadline(&self) -> Option<u64> {
        self.inner.next_deadline()
    }

    /// Closes clients past their deadline.
    pub fn expire(&mut self, now: u64) {
        self.inner.expire(self.poll.registry(), now);
    }

    /// Closes every client and stops listening (shutdown).
    pub fn close_all(&mut self) {
        self.inner.close_all(self.poll.registry());
    }
}

/// The endpoint's own `Poll` (an epoll descriptor): the uring engine polls
/// it for input, as the readiness loop registers it ([`Endpoint::register`]).
impl AsRawFd for Endpoint {
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}

impl Clients {
    fn on_event(
        &mut self,
        registry: &Registry,
        token: Token,
        now: u64,
        metrics: &mut dyn FnMut() -> String,
    ) {
        if token == LISTENER {
            self.accept(registry, now, metrics);
            return;
        }
        let Some((key, generation)) = client_key(token) else {
            return;
        };
        match self.clients.get(key) {
            Some(c) if c.generation == generation => self.drive(registry, key, now, metrics),
            // A stale event for a client already closed.
            _ => {}
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        self.clients.iter().map(|(_, c)| c.deadline).min()
    }

    fn expire(&mut self, registry: &Registry, now: u64) {
        // Called on every wake-up: nothing to walk in the common case.
        if self.clients.is_empty() {
            return;
        }
        let late: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            self.close(registry, key, "timed out");
        }
    }

    fn close_all(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(registry, key, "shutdown");
        }
    }

    fn accept(&mut self, registry: &Registry, now: u64, metrics: &mut dyn FnMut() -> String) {
        for _ in 0..ACCEPT_BUDGET {
            // Drain the backlog: the next client raises a new edge only
            // once this one is taken.
            let mut stream = match attempt(|| self.listener.accept()) {
                Ok(Some((s, _))) => s,
                Ok(None) => return,
                // EMFILE and friends: the main listener's pause handles
                // descriptor shortage; a scraper just retries later.
                Err(e) => {
                    log::debug!("metrics accept: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::debug!("metrics: {MAX_CLIENTS} clients already; closing a new one");
                continue; // dropped: closed at once
            }
            let entry = self.clients.vacant_entry();
            let key = entry.key();
            let generation = self.next_generation;
            self.next_generation = generation.wrapping_add(1);
            let token = client_token(key, generation);
            if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                log::debug!("metrics: cannot register a client: {e}");
                continue;
            }
            entry.insert(Client {
                stream,
                exchange: Exchange::default(),
                generation,
                deadline: now + self.timeout.as_millis() as u64,
                interest: Interest::READABLE,
                lingering: false,
            });
            log::debug!("[{}] open", ClientName(token));
            // The request usually follows the handshake at once and may
            // be waiting already: reading now saves a turn of the loop
            // (its edge, if it came before we registered, is not lost:
            // registering an edge-triggered socket that is readable
            // reports it, but only on the next poll).
            self.drive(registry, key, now, metrics);
        }
        // Budget spent: more than MAX_CLIENTS connecting in one go is not
        // a scraper. The rest wait for the next connect's edge.
    }

    /// Reads and writes for client `key` until it blocks, within budget.
    fn drive(
        &mut self,
        registry: &Registry,
        key: usize,
        now: u64,
        metrics: &mut dyn FnMut() -> String,
    ) {
        let c = &mut self.clients[key];
        let before = c.exchange.answered();
        let mut outcome = None;
        for _ in 0..IO_BUDGET {
            match c.exchange.wants() {
                Want::Close if c.exchange.peer_closed() => {
                    outcome = Some(Err("done".into()));
                    break;
                }
                Want::Close => {
                    if !c.lingering {
                        c.lingering = true;
                        c.deadline = now + LINGER.as_millis() as u64;
                        // FIN after the response: the client reads it all,
                        // then EOF.
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                    match attempt(|| c.stream.read(&mut self.scratch)) {
                        Ok(Some(0)) => c.exchange.on_eof(),
                        Ok(Some(_)) => {} // thrown away
                        Ok(None) => {
                            outcome = Some(Ok(Interest::READABLE));
                            break;
                        }
                        Err(e) => {
                            outcome = Some(Err(format!("read: {e}")));
                            break;
                        }
                    }
                }
                Want::Write => {
                    let pending = c.exchange.pending();
                    match attempt(|| c.stream.write(pending)) {
                        Ok(Some(0)) => {
                            outcome = Some(Err("write returned 0".into()));
                            break;
                        }
                        // A short write keeps the rest for the next try.
                        Ok(Some(n)) => c.exchange.on_written(n, metrics),
                        // Socket buffer full: wait for WRITABLE.
                        Ok(None) => {
                            outcome = Some(Ok(Interest::WRITABLE));
                            break;
                        }
                        Err(e) => {
                            outcome = Some(Err(format!("write: {e}")));
                            break;
                        }
                    }
                }
                Want::Read => {
                    let room = c.exchange.room();
                    let buf = &mut self.scratch[..room];
                    match attempt(|| c.stream.read(buf)) {
                        // Ok(0): the peer closed its side; finish what
                        // is owed (nothing, unless a response is due).
                        Ok(Some(0)) => c.exchange.on_eof(),
                        Ok(Some(n)) => c.exchange.on_bytes(&self.scratch[..n], metrics),
                        // Drained: a new edge comes with new bytes.
                        Ok(None) => {
                            outcome = Some(Ok(Interest::READABLE));
                            break;
                        }
                        Err(e) => {
                            outcome = Some(Err(format!("read: {e}")));
                            break;
                        }
                    }
                }
            }
        }
        let outcome = outcome.unwrap_or_else(|| {
            if self.clients[key].lingering {
                // Discarding a flood: the deadline ends it, and while it
                // keeps sending, its new bytes raise new edges.
                Ok(Interest::READABLE)
            } else {
                // Pipelining more than a budget's worth of requests in
                // one go is no scraper.
                Err("over budget".into())
            }
        });
        let c = &mut self.clients[key];
        if c.exchange.answered() != before && !c.lingering {
            // A request completed: the next one gets a fresh deadline.
            c.deadline = now + self.timeout.as_millis() as u64;
        }
        match outcome {
            Ok(interest) if interest != c.interest => {
                let token = client_token(key, c.generation);
                if let Err(e) = registry.reregister(&mut c.stream, token, interest) {
                    self.close(registry, key, &format!("reregister: {e}"));
                    return;
                }
                c.interest = interest;
            }
            Ok(_) => {}
            Err(why) => self.close(registry, key, &why),
        }
    }

    fn close(&mut self, registry: &Registry, key: usize, why: &str) {
        let mut c = self.clients.remove(key);
        // Deregister before the slab slot can be reused; the generation
        // makes any event still in flight for it harmless.
        let _ = registry.deregister(&mut c.stream);
        log::debug!(
            "[{}] closed ({why})",
            ClientName(client_token(key, c.generation))
        );
    }
}

/// The standalone loop's tokens: the endpoint's `Poll`, and the waker
/// that stops it.
const STANDALONE_ENDPOINT: Token = Token(0);
const STANDALONE_STOP: Token = Token(1);

/// An endpoint on a poll loop of its own, on its own thread: for a
/// process with no event loop to share, such as the `--workers`
/// supervisor, which serves the sum of its workers' snapshots
/// ([`super::render`] with one pair per worker). Stopped on drop.
pub struct Standalone {
    addr: SocketAddr,
    waker: std::sync::Arc<mio::Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Standalone {
    /// Serves `listener` on a new thread; `metrics` renders each scrape.
    pub fn spawn(
        listener: std::net::TcpListener,
        metrics: impl FnMut() -> String + Send + 'static,
    ) -> io::Result<Standalone> {
        Self::spawn_with_timeout(listener, TIMEOUT, metrics)
    }

    /// [`Standalone::spawn`] with another request deadline (tests).
    pub fn spawn_with_timeout(
        listener: std::net::TcpListener,
        timeout: Duration,
        mut metrics: impl FnMut() -> String + Send + 'static,
    ) -> io::Result<Standalone> {
        let addr = listener.local_addr()?;
        let mut poll = mio::Poll::new()?;
        let mut endpoint = Endpoint::new(listener)?;
        endpoint.set_timeout(timeout);
        endpoint.register(poll.registry(), STANDALONE_ENDPOINT)?;
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), STANDALONE_STOP)?);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let mut events = mio::Events::with_capacity(8);
                let started = std::time::Instant::now();
                loop {
                    let timeout = endpoint.next_deadline().map(|at| {
                        let now = started.elapsed().as_millis() as u64;
                        Duration::from_millis(at.saturating_sub(now) + 1)
                    });
                    match poll.poll(&mut events, timeout) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("metrics endpoint: poll failed: {e}");
                            return;
                        }
                    }
                    if events.iter().any(|e| e.token() == STANDALONE_STOP) {
                        endpoint.close_all();
                        return;
                    }
                    let now = started.elapsed().as_millis() as u64;
                    endpoint.serve(now, &mut metrics);
                    endpoint.expire(now);
                }
            })?;
        Ok(Standalone {
            addr,
            waker,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The endpoint alone on its own poll loop ([`Standalone`]), talked
    //! to over loopback with blocking sockets, as a scraper would.
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::thread;
    use std::time::Instant;

    struct Running {
        addr: SocketAddr,
        _endpoint: Standalone,
    }

    fn start(timeout: Duration, body: String) -> Running {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint =
            Standalone::spawn_with_timeout(listener, timeout, move || body.clone()).unwrap();
        Running {
            addr: endpoint.local_addr(),
            _endpoint: endpoint,
        }
    }

    fn connect(addr: SocketAddr) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// Reads one response: status line and body (by Content-Length).
    fn response(r: &mut BufReader<std::net::TcpStream>) -> (String, Vec<u8>) {
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.strip_prefix("Content-Length: ") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (status.trim_end().to_string(), body)
    }

    /// True once the server has closed: EOF or a reset.
    fn closed(s: &mut impl Read) -> bool {
        let mut b = [0; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn client_tokens_round_trip_and_never_name_the_listener() {
        for (key, generation) in [(0, 0), (15, u32::MAX), (3, 9)] {
            let t = client_token(key, generation);
            assert_ne!(t, LISTENER);
            assert_eq!(client_key(t), Some((key, generation)));
        }
        assert_eq!(client_key(LISTENER), None);
        assert_ne!(
            client_token(2, 1),
            client_token(2, 2),
            "a reused key gets a new token"
        );
        assert_eq!(
            ClientName(client_token(2, 5)).to_string(),
            "metrics client 2#5"
        );
    }

    #[test]
    fn get_metrics_twice_on_one_connection_then_404() {
        let ep = start(TIMEOUT, "reactor_x 1\n".into());
        let mut s = connect(ep.addr);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        for _ in 0..2 {
            let (status, body) = response(&mut r);
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert_eq!(body, b"reactor_x 1\n");
        }
        s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(response(&mut r).0, "HTTP/1.1 404 Not Found");
        assert!(closed(&mut r), "Connection: close is honoured");
    }

    #[test]
    fn an_endless_header_gets_431_and_the_connection_is_closed() {
        let ep = start(TIMEOUT, String::new());
        let s = connect(ep.addr);
        let mut w = s.try_clone().unwrap();
        // Keep sending header bytes until the server hangs up (it reads
        // and discards for LINGER after its 431), or 60 s pass.
        let writer = thread::spawn(move || {
            let _ = w.write_all(b"GET /metrics HTTP/1.1\r\nX-Endless: ");
            let junk = [b'a'; 4096];
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                if w.write(&junk).is_err() {
                    return true; // reset or broken pipe: it hung up
                }
            }
            false
        });
        let mut r = BufReader::new(s);
        let (status, _) = response(&mut r);
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
        assert!(closed(&mut r));
        assert!(
            writer.join().unwrap(),
            "the server hung up on the endless writer"
        );
    }

    #[test]
    fn a_request_not_finished_in_time_is_closed_unanswered() {
        let ep = start(Duration::from_millis(200), String::new());
        let mut s = connect(ep.addr);
        s.write_all(b"GET /metr").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "no response to half a request");
    }

    #[test]
    fn a_large_response_to_a_slow_reader_arrives_whole() {
        // Far more than the socket buffers hold: the endpoint must wait
        // for WRITABLE, repeatedly.
        let body = "x".repeat(8 << 20);
        let ep = start(TIMEOUT, body.clone());
        let mut s = connect(ep.addr);
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        thread::sleep(Duration::from_millis(100)); // let its buffers fill
        let mut r = BufReader::new(s);
        let (status, got) = response(&mut r);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(got.len(), body.len());
    }

    #[test]
    fn clients_past_the_cap_are_closed_and_the_others_still_served() {
        let ep = start(TIMEOUT, "ok\n".into());
        let held: Vec<_> = (0..MAX_CLIENTS).map(|_| connect(ep.addr)).collect();
        // Make sure all of them were accepted before the extra one.
        for s in &held {
            let mut s = s;
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let (status, _) = response(&mut BufReader::new(s.try_clone().unwrap()));
            assert_eq!(status, "HTTP/1.1 200 OK");
        }
        let mut extra = connect(ep.addr);
        assert!(closed(&mut extra), "one too many is closed at once");
        drop(held);
        // Slots free up as the closes are seen.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut s = connect(ep.addr);
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            if got.starts_with(b"HTTP/1.1 200 OK") {
                break;
            }
            assert!(Instant::now() < deadline, "never served again");
            thread::sleep(Duration::from_millis(20));
        }
    }
}
