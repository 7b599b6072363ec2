//! Binding the listening sockets.
//!
//! mio's own `TcpListener::bind` listens with a backlog of 128, which a
//! connect storm (`reactor load -c 10000`) overflows: the kernel then drops
//! SYNs and clients wait a second or more for a retransmit. So the TCP
//! listener is built with socket2 and the largest backlog the kernel will
//! take (Linux silently caps it at `net.core.somaxconn`), then handed to mio.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;

use socket2::{Domain, Protocol, Socket, Type};

use super::{Config, ServeError};

/// The backlog asked for; the kernel lowers it to its own maximum.
const BACKLOG: i32 = 65535;

/// A Unix-domain socket's file, removed when this is dropped (when the
/// listener closes at shutdown).
#[derive(Debug)]
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A Unix-domain listener and the file it owns.
#[derive(Debug)]
pub struct UnixListen {
    /// The listener.
    pub listener: UnixListener,
    /// Its file, removed on drop.
    pub file: SocketFile,
}

/// Every socket the server accepts or receives on, as blocking std
/// sockets: each engine sets them up its own way (the event loop makes
/// them non-blocking and hands them to mio).
#[derive(Debug)]
pub struct Listeners {
    /// The TCP listener.
    pub tcp: TcpListener,
    /// The Unix-domain listener, with `--unix`.
    pub unix: Option<UnixListen>,
    /// The UDP echo socket, with `--udp`.
    pub udp: Option<UdpSocket>,
    /// The metrics endpoint's listener, with `--metrics`.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` asks for.
    pub fn bind(config: &Config) -> Result<Listeners, ServeError> {
        // A worker shares the port with its siblings (see `supervisor`).
        let shared = config.worker.is_some();
        let tcp = bind_tcp(config.addr, shared)
            .map_err(|e| ServeError::Bind(format!("cannot listen on {}: {e}", config.addr)))?;
        let udp = match config.udp {
            Some(addr) => Some(
                bind_udp(addr, shared)
                    .map_err(|e| ServeError::Bind(format!("cannot bind udp {addr}: {e}")))?,
            ),
            None => None,
        };
        let unix = match &config.unix {
            Some(path) => Some(bind_unix(path)?),
            None => None,
        };
        let metrics =
            match config.metrics {
                Some(addr) => Some(bind_tcp(addr, false).map_err(|e| {
                    ServeError::Bind(format!("cannot listen on metrics {addr}: {e}"))
                })?),
                None => None,
            };
        Ok(Listeners {
            tcp,
            unix,
            udp,
            metrics,
        })
    }

    /// The TCP address actually bound (the real port when 0 was asked).
    pub fn tcp_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The metrics address actually bound, with `--metrics`.
    pub fn metrics_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.metrics.as_ref().map(|m| m.local_addr()).transpose()
    }

    /// The UDP address actually bound, with `--udp`.
    pub fn udp_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.udp.as_ref().map(|u| u.local_addr()).transpose()
    }
}

/// A TCP listener with `SO_REUSEADDR` and a deep backlog; with `shared`
/// also `SO_REUSEPORT`: every socket bound
/// to the port with that option (by the same user) gets its own accept
/// queue, and the kernel spreads new connections over the listening ones
/// by a hash of the connection's addresses and ports.
pub fn bind_tcp(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = tcp_socket(addr, shared)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn tcp_socket(addr: SocketAddr, shared: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// A UDP socket, in the port's `SO_REUSEPORT` group when `shared`
/// (datagrams are then spread by a hash of their source).
pub fn bind_udp(addr: SocketAddr, shared: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Claims a TCP `addr` for a group of workers without listening on it: a
/// socket bound with `SO_REUSEPORT` that never calls `listen`, so the
/// kernel never hands it a connection (only listening sockets are looked
/// up for an incoming SYN), yet it holds the port, port 0 resolved to a
/// real one, for as long as it lives. Workers then bind the real port with
/// `SO_REUSEPORT` and listen. Kept for the supervisor's whole life, it
/// means the port is never free between a worker's death and its
/// replacement's bind, so no other program can take it.
///
/// With `udp`, the same for a UDP port, but a bound UDP socket does
/// receive its share of datagrams: the caller drops that claim as soon as
/// it has read the port, before any worker binds.
pub fn claim_port(addr: SocketAddr, udp: bool) -> io::Result<(Socket, SocketAddr)> {
    let socket = if udp {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s
    } else {
        tcp_socket(addr, true)?
    };
    socket.bind(&addr.into())?;
    let bound = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound address is not an IP address"))?;
    Ok((socket, bound))
}

/// Binds a Unix-domain listener at `path`, replacing a stale socket file
/// left by a server that crashed, but never a live server's.
fn bind_unix(path: &Path) -> Result<UnixListen, ServeError> {
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::Bind(format!(
                "cannot listen on unix {shown}: the path exists and is not a socket"
            )));
        }
        // Someone answering means a live server owns it; a refusal means
        // the file outlived its server.
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(ServeError::Bind(format!(
                    "cannot listen on unix {shown}: another server is listening there"
                )))
            }
            Err(_) => {
                log::info!("removing stale socket file {shown}");
                std::fs::remove_file(path).map_err(|e| {
                    ServeError::Bind(format!("cannot remove stale socket {shown}: {e}"))
                })?;
            }
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| ServeError::Bind(format!("cannot listen on unix {shown}: {e}")))?;
    Ok(UnixListen {
        listener,
        file: SocketFile(path.to_owned()),
    })
}
