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
}

impl Listeners {
    /// Binds what `config` asks for.
    pub fn bind(config: &Config) -> Result<Listeners, ServeError> {
        let tcp = bind_tcp(config.addr)
            .map_err(|e| ServeError::Bind(format!("cannot listen on {}: {e}", config.addr)))?;
        let udp = match config.udp {
            Some(addr) => Some(
                UdpSocket::bind(addr)
                    .map_err(|e| ServeError::Bind(format!("cannot bind udp {addr}: {e}")))?,
            ),
            None => None,
        };
        let unix = match &config.unix {
            Some(path) => Some(bind_unix(path)?),
            None => None,
        };
        Ok(Listeners { tcp, unix, udp })
    }

    /// The TCP address actually bound (the real port when 0 was asked).
    pub fn tcp_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The UDP address actually bound, with `--udp`.
    pub fn udp_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.udp.as_ref().map(|u| u.local_addr()).transpose()
    }
}

/// A TCP listener with `SO_REUSEADDR` and a deep backlog.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
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
