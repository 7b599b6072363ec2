//! The two rules of a non-blocking system call, written once.
//!
//! - `WouldBlock`: the kernel has nothing for us now (or no room). Not an
//!   error: with edge-triggered readiness it means "drained", and the next
//!   change raises a new event. Also what a spurious wake-up looks like.
//! - `Interrupted`: a signal arrived during the call; nothing happened, so
//!   the call is simply made again.
//!
//! [`attempt`] turns both into plain values (`Ok(None)` for "not now"), so
//! the callers' loops read as what they mean: "until blocked", "until
//! empty". [`write_until_blocked`] is the one write loop of the project.

use std::io;

/// Makes a non-blocking call: `Ok(Some(value))` when it went through,
/// `Ok(None)` when it would block, retrying it while it is `Interrupted`.
/// Any other error is returned.
///
/// ```
/// use std::io;
/// use reactor::net::io::attempt;
///
/// let mut calls = 0;
/// let r = attempt(|| {
///     calls += 1;
///     match calls {
///         1 => Err(io::ErrorKind::Interrupted.into()),
///         _ => Ok(7),
///     }
/// });
/// assert_eq!(r.unwrap(), Some(7));
/// let blocked: io::Result<Option<()>> = attempt(|| Err(io::ErrorKind::WouldBlock.into()));
/// assert_eq!(blocked.unwrap(), None);
/// ```
pub fn attempt<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<Option<T>> {
    loop {
        match call() {
            Ok(value) => return Ok(Some(value)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// The write loop of a non-blocking socket: `write(done)` writes from byte
/// `done` of `total` on. Short writes go round again, `Interrupted` is
/// retried, `WouldBlock` stops with the count so far (the caller keeps the
/// rest and asks for `WRITABLE`); `Ok(0)` and any other error are errors.
pub fn write_until_blocked(
    total: usize,
    mut write: impl FnMut(usize) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    while done < total {
        match attempt(|| write(done))? {
            Some(0) => return Err(io::ErrorKind::WriteZero.into()),
            Some(n) => done += n,
            None => break,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_errors_are_returned_as_they_are() {
        let r: io::Result<Option<()>> = attempt(|| Err(io::ErrorKind::ConnectionReset.into()));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn a_write_loop_goes_round_short_writes_and_stops_when_blocked() {
        // Takes 3 bytes per call, then blocks after 10 bytes.
        let mut taken = 0;
        let n = write_until_blocked(100, |_| {
            if taken >= 10 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            taken += 3;
            Ok(3)
        })
        .unwrap();
        assert_eq!(n, 12);
    }

    #[test]
    fn a_write_of_zero_bytes_is_an_error_not_a_spin() {
        let r = write_until_blocked(5, |_| Ok(0));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::WriteZero);
    }
}
