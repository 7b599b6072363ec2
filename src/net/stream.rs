//! One type for the two kinds of byte-stream socket: TCP and Unix-domain.
//!
//! The server accepts both on one loop and the client tools connect with
//! both, so the type lives below either of them. [`Stream`] holds mio's
//! non-blocking sockets (the reactor and the client tools);
//! [`BlockingStream`] holds std's blocking ones (the one-thread-per-client
//! engine). Both are one generic enum, so reading, writing and shutting
//! down are written once: a socket is shared state in the kernel, so
//! `&stream` reads and writes like the sockets themselves, and socket
//! options go through socket2's view of the descriptor.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::time::Duration;

use mio::event::Source;
use mio::{Interest, Registry, Token};
use socket2::SockRef;

/// A TCP or a Unix-domain stream socket. The enum costs four bytes next to
/// the descriptor.
#[derive(Debug)]
pub enum AnyStream<T, U> {
    /// A TCP socket.
    Tcp(T),
    /// A Unix-domain stream socket.
    Unix(U),
}

/// A non-blocking socket, for poll loops.
pub type Stream = AnyStream<mio::net::TcpStream, mio::net::UnixStream>;

/// A blocking socket, for one thread per client.
pub type BlockingStream = AnyStream<std::net::TcpStream, std::os::unix::net::UnixStream>;

impl<T: AsFd, U: AsFd> AnyStream<T, U> {
    /// socket2's view of the descriptor, for what std and mio both lack.
    fn socket(&self) -> SockRef<'_> {
        match self {
            AnyStream::Tcp(s) => SockRef::from(s),
            AnyStream::Unix(s) => SockRef::from(s),
        }
    }

    /// Shuts down one or both directions of the socket.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.socket().shutdown(how)
    }

    /// True for a Unix-domain socket.
    pub fn is_unix(&self) -> bool {
        matches!(self, AnyStream::Unix(_))
    }

    /// The error pending on the socket (`SO_ERROR`), such as a reset that
    /// arrived while we were not reading; clears it.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.socket().take_error()
    }
}

impl<T: AsFd, U: AsFd> AsFd for AnyStream<T, U> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            AnyStream::Tcp(s) => s.as_fd(),
            AnyStream::Unix(s) => s.as_fd(),
        }
    }
}

impl Stream {
    /// Reads without consuming (`MSG_PEEK`): the same bytes come again on
    /// the next read. TCP only (`None` for a Unix socket, which std offers
    /// no stable peek for).
    pub fn peek(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match self {
            AnyStream::Tcp(s) => Some(s.peek(buf)),
            AnyStream::Unix(_) => None,
        }
    }
}

impl<T, U> Read for &AnyStream<T, U>
where
    for<'a> &'a T: Read,
    for<'a> &'a U: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            AnyStream::Tcp(s) => (&*s).read(buf),
            AnyStream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl<T, U> Write for &AnyStream<T, U>
where
    for<'a> &'a T: Write,
    for<'a> &'a U: Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            AnyStream::Tcp(s) => (&*s).write(buf),
            AnyStream::Unix(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            AnyStream::Tcp(s) => (&*s).write_vectored(bufs),
            AnyStream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}

impl BlockingStream {
    /// A second handle on the same socket (one thread reads, others write).
    pub fn try_clone(&self) -> io::Result<BlockingStream> {
        Ok(match self {
            AnyStream::Tcp(s) => AnyStream::Tcp(s.try_clone()?),
            AnyStream::Unix(s) => AnyStream::Unix(s.try_clone()?),
        })
    }

    /// How long a read may block (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    /// How long a write may block (`None`: for ever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocking_pair_reads_writes_and_shuts_down_through_one_type() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a, b): (BlockingStream, BlockingStream) = (AnyStream::Unix(a), AnyStream::Unix(b));
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&a).write_all(b"ping").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        (&b).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        assert!(b.is_unix());
    }
}
