//! The tutorial's design: one blocking thread per client.
//!
//! Kept so the two designs can be compared on the same protocols and
//! measured with the same load tool (`reactor serve --engine threads`).
//! Each client gets a thread that blocks in `read`, hands the bytes to the
//! protocol under one lock, and then writes the replies with blocking
//! writes. It is simple and it works; what it costs (a stack and a kernel
//! thread per client, a lock on every message) is what
//! `docs/threads-vs-reactor.md` measures.
//!
//! Differences from the reactor, by the nature of blocking I/O: output is
//! not queued by the server (`--max-buffer` does not apply; a blocking
//! write waits for the kernel), a chat client that does not read for
//! [`WRITE_TIMEOUT`] is dropped as a slow consumer, and shutdown flushes
//! only what the kernel already holds.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, UdpSocket};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::listen::Listeners;
use super::stats::Stats;
use super::{turn_away, Config, Mode, LINGER};
use crate::net::stream::{AnyStream, BlockingStream};
use crate::protocol::{Audience, Chat, Close, Echo, Outbox, Protocol};

/// A chat recipient that blocks a sender this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read size per call.
const READ_BUF: usize = 16 * 1024;

/// The writing half of a client, shared with every thread that may
/// broadcast to it. The mutex keeps two broadcasts from interleaving.
type Peer = Arc<Mutex<BlockingStream>>;

struct State<P> {
    protocol: P,
    peers: BTreeMap<u64, Peer>,
    next_id: u64,
    stats: Stats,
}

struct Shared<P> {
    state: Mutex<State<P>>,
    max_connections: usize,
    idle: Option<Duration>,
}

impl<P> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // A client thread that panicked cannot leave the state half-done
        // in a way the others care about, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a protocol call produced, delivered after the lock is released.
#[derive(Default)]
struct Replies {
    replies: Vec<u8>,
    broadcasts: Vec<Rc<[u8]>>,
    close: Option<Close>,
}

impl Outbox for Replies {
    fn reply(&mut self, bytes: &[u8]) {
        self.replies.extend_from_slice(bytes);
    }
    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience) {
        if to == Audience::Everyone {
            self.replies.extend_from_slice(&chunk);
        }
        self.broadcasts.push(chunk);
    }
    fn close(&mut self, how: Close) {
        self.close.get_or_insert(how);
    }
}

/// Serves `mode` with one thread per client until SIGINT or SIGTERM.
///
/// `announce` prints the `listening on` lines; it is called once signals
/// are handled.
pub fn run(
    config: Config,
    mode: Mode,
    max_connections: usize,
    l: Listeners,
    announce: Announce,
) -> io::Result<()> {
    match mode {
        Mode::Echo => run_with(Echo, config, max_connections, l, announce),
        Mode::Chat => run_with(
            Chat::new(config.max_line),
            config,
            max_connections,
            l,
            announce,
        ),
    }
}

/// Prints the `listening on` lines.
pub type Announce = Box<dyn FnOnce() -> io::Result<()>>;

fn run_with<P>(
    protocol: P,
    config: Config,
    max_connections: usize,
    l: Listeners,
    announce: Announce,
) -> io::Result<()>
where
    P: Protocol + Send + 'static,
    P::Session: Send,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            protocol,
            peers: BTreeMap::new(),
            next_id: 0,
            stats: Stats::default(),
        }),
        max_connections,
        idle: config.idle_timeout,
    });
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    announce()?;
    let tcp = l.tcp;
    let s = shared.clone();
    thread::spawn(move || {
        for conn in tcp.incoming() {
            match conn {
                Ok(c) => {
                    let _ = c.set_nodelay(true);
                    admit(&s, AnyStream::Tcp(c), false);
                }
                Err(e) => accept_failed(e),
            }
        }
    });
    // Held until we return, so the socket file is removed at shutdown.
    let _unix_file = l.unix.map(|u| {
        let s = shared.clone();
        let listener = u.listener;
        thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => admit(&s, AnyStream::Unix(c), true),
                    Err(e) => accept_failed(e),
                }
            }
        });
        u.file
    });
    if let Some(udp) = l.udp {
        let s = shared.clone();
        thread::spawn(move || udp_echo(&s, udp));
    }
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: shutting down");
    }
    let stats = shared.lock().stats.clone();
    log::info!("final {stats}");
    Ok(())
}

fn accept_failed(e: io::Error) {
    log::warn!("accept: {e}");
    // Out of descriptors: a blocking accept would fail at once again.
    thread::sleep(Duration::from_millis(100));
}

fn admit<P>(shared: &Arc<Shared<P>>, sock: BlockingStream, unix: bool)
where
    P: Protocol + Send + 'static,
    P::Session: Send,
{
    let mut st = shared.lock();
    st.stats.accepted += 1;
    if unix {
        st.stats.accepted_unix += 1;
    }
    if st.peers.len() >= shared.max_connections {
        let held = st.peers.len();
        let State {
            protocol, stats, ..
        } = &mut *st;
        let line = turn_away(protocol, stats, held);
        drop(st);
        let _ = (&sock).write_all(line);
        return;
    }
    let writer = match sock.try_clone() {
        Ok(w) => w,
        Err(e) => return log::warn!("cannot clone a client socket: {e}"),
    };
    let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
    let id = st.next_id;
    st.next_id += 1;
    let peer: Peer = Arc::new(Mutex::new(writer));
    st.peers.insert(id, peer.clone());
    st.stats.active += 1;
    drop(st);
    let s = shared.clone();
    let spawned = thread::Builder::new()
        .name(format!("client-{id}"))
        .spawn(move || client(&s, id, sock, peer));
    if let Err(e) = spawned {
        log::warn!("cannot start a thread for a client: {e}");
        let mut st = shared.lock();
        st.peers.remove(&id);
        st.stats.active -= 1;
    }
}

/// One client's whole life, on its own thread.
fn client<P: Protocol>(shared: &Shared<P>, id: u64, sock: BlockingStream, me: Peer) {
    let _ = sock.set_read_timeout(shared.idle);
    let mut out = Replies::default();
    let mut session = shared.lock().protocol.open(&mut out);
    let mut buf = vec![0; READ_BUF];
    let mut ok = deliver(shared, id, &me, &mut out);
    while ok && out.close.is_none() {
        let n = match (&sock).read(&mut buf) {
            Ok(0) => {
                shared.lock().protocol.eof(&mut session, &mut out);
                ok = deliver(shared, id, &me, &mut out);
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The read timeout is the idle timeout.
            Err(_) => break,
        };
        let mut st = shared.lock();
        st.stats.bytes_in += n as u64;
        st.protocol.data(&mut session, &buf[..n], &mut out);
        drop(st);
        ok = deliver(shared, id, &me, &mut out);
        // A read whose output budget ran out left input behind: act on it
        // before reading more, delivering between steps, so the lock is
        // never held for one huge answer.
        while ok && out.close.is_none() {
            let mut st = shared.lock();
            if !st.protocol.backlog(&session) {
                break;
            }
            st.protocol.resume(&mut session, &mut out);
            drop(st);
            ok = deliver(shared, id, &me, &mut out);
        }
    }
    if ok && out.close == Some(Close::Linger) {
        // Let the error line arrive before the close: shut our side and
        // drain what the client still sends for a moment.
        let _ = sock.shutdown(Shutdown::Write);
        let _ = sock.set_read_timeout(Some(LINGER));
        while matches!((&sock).read(&mut buf), Ok(n) if n > 0) {}
    }
    let mut st = shared.lock();
    st.peers.remove(&id);
    st.stats.active -= 1;
    st.stats.closed += 1;
    st.protocol.close(session, &mut out);
    drop(st);
    out.replies.clear();
    deliver(shared, id, &me, &mut out);
}

/// Writes replies to the client and broadcasts to the others, with no
/// lock on the shared state held. False when the client's socket failed.
fn deliver<P>(shared: &Shared<P>, id: u64, me: &Peer, out: &mut Replies) -> bool {
    let mut ok = true;
    if !out.replies.is_empty() {
        let sock = me.lock().unwrap_or_else(|p| p.into_inner());
        ok = (&*sock).write_all(&out.replies).is_ok();
        drop(sock);
        if ok {
            shared.lock().stats.bytes_out += out.replies.len() as u64;
        }
        out.replies.clear();
    }
    if !out.broadcasts.is_empty() {
        let peers: Vec<(u64, Peer)> = shared
            .lock()
            .peers
            .iter()
            .filter(|(&pid, _)| pid != id)
            .map(|(&pid, p)| (pid, p.clone()))
            .collect();
        for chunk in out.broadcasts.drain(..) {
            for (pid, peer) in &peers {
                let sock = peer.lock().unwrap_or_else(|p| p.into_inner());
                if (&*sock).write_all(&chunk).is_err() {
                    // A slow or vanished recipient: shut it down; its own
                    // thread sees the error, leaves and says so.
                    log::warn!("[client-{pid}] cannot take a broadcast: disconnecting");
                    let _ = sock.shutdown(Shutdown::Both);
                }
            }
        }
    }
    ok
}

/// UDP echo: receive a datagram, send it back.
fn udp_echo<P>(shared: &Shared<P>, udp: UdpSocket) {
    let mut buf = vec![0; 65536];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => continue,
        };
        let sent = udp.send_to(&buf[..n], peer).is_ok();
        let mut st = shared.lock();
        st.stats.udp_in += 1;
        if sent {
            st.stats.udp_out += 1;
        } else {
            st.stats.udp_dropped += 1;
        }
    }
}
