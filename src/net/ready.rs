//! The ready list: sockets that still had work when their budget ran out.
//!
//! mio's readiness is edge-triggered: an event means "something changed",
//! and no new event comes until the socket has been drained to
//! `WouldBlock`. Draining one very busy socket to the end could starve all
//! the others, so a loop gives each socket a budget (bytes per event,
//! accepts per wake-up). A socket whose budget ran out is still ready and
//! no event will say so again, so it goes on this list and is served again
//! on the next turn, after the others had theirs (redis does the same with
//! `NET_MAX_WRITES_PER_EVENT`). While the list is not empty, the loop polls
//! with a zero timeout.
//!
//! Keeping an entry off the list twice is the caller's business (a flag on
//! the connection is cheaper than a search); an entry for a socket closed
//! since must be harmless to the caller.

use std::io;
use std::time::Duration;

use mio::event::Source;
use mio::{Interest, Registry, Token};

/// Brings a socket's interest to "readable, and writable only while output
/// waits": asking for `WRITABLE` with nothing to send makes an
/// edge-triggered loop wake for nothing. `registered` is what the caller
/// last registered; nothing is asked of the kernel when `want` equals it.
pub fn want_writable(
    registry: &Registry,
    source: &mut impl Source,
    token: Token,
    registered: &mut bool,
    want: bool,
) -> io::Result<()> {
    if *registered == want {
        return Ok(());
    }
    let interest = if want {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    registry.reregister(source, token, interest)?;
    *registered = want;
    Ok(())
}

/// Size of a loop's one shared read buffer: every connection reads into it
/// in turn, so an idle connection owns no read buffer.
pub const SCRATCH: usize = 64 * 1024;

/// Most bytes read from one socket per event before the others get a turn.
pub const READ_BUDGET: usize = 4 * SCRATCH;

/// Most bytes written to one socket per event.
pub const WRITE_BUDGET: usize = 4 * SCRATCH;

/// Entries for this turn and the next, in two vectors that trade places
/// each turn, so neither is reallocated in steady state.
#[derive(Debug)]
pub struct ReadyList<T> {
    next: Vec<T>,
    spare: Vec<T>,
}

impl<T> Default for ReadyList<T> {
    fn default() -> Self {
        ReadyList {
            next: Vec::new(),
            spare: Vec::new(),
        }
    }
}

impl<T> ReadyList<T> {
    /// Serve `entry` again on the next turn.
    pub fn push(&mut self, entry: T) {
        self.next.push(entry);
    }

    /// True when nothing waits for the next turn (the loop may sleep).
    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    /// How long `poll` may sleep: zero while anything waits (its readiness
    /// will raise no event), else `otherwise`.
    pub fn poll_timeout(&self, otherwise: Duration) -> Duration {
        if self.is_empty() {
            otherwise
        } else {
            Duration::ZERO
        }
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.next.len()
    }

    /// Starts a turn: takes what was pushed so far. Entries pushed while
    /// the turn is served wait for the next one, so everything else runs
    /// before a socket gets more. Hand the vector back with
    /// [`ReadyList::end_turn`].
    pub fn begin_turn(&mut self) -> Vec<T> {
        std::mem::replace(&mut self.next, std::mem::take(&mut self.spare))
    }

    /// Ends a turn, keeping the served vector's allocation for later.
    pub fn end_turn(&mut self, mut served: Vec<T>) {
        served.clear();
        self.spare = served;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_pushed_during_a_turn_wait_for_the_next() {
        let mut list = ReadyList::default();
        list.push(1);
        list.push(2);
        let turn = list.begin_turn();
        assert_eq!(turn, [1, 2]);
        assert!(list.is_empty());
        list.push(3);
        list.end_turn(turn);
        assert_eq!(list.len(), 1);
        assert_eq!(list.begin_turn(), [3]);
    }

    #[test]
    fn poll_does_not_sleep_while_anything_waits() {
        let mut list = ReadyList::default();
        let second = Duration::from_secs(1);
        assert_eq!(list.poll_timeout(second), second);
        list.push(7_usize);
        assert_eq!(list.poll_timeout(second), Duration::ZERO);
    }

    #[test]
    fn steady_state_reuses_both_allocations() {
        let mut list = ReadyList::default();
        for _ in 0..3 {
            list.push(7u32);
            let turn = list.begin_turn();
            list.end_turn(turn);
        }
        list.push(7);
        let turn = list.begin_turn();
        assert!(turn.capacity() >= 1 && list.next.capacity() >= 1);
    }
}
