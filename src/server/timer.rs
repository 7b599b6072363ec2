//! Deadlines for idle connections and lingering closes, in one heap.
//!
//! There is no timer thread: the loop asks [`Timers::next`] how long `poll`
//! may sleep, and after each wake-up pops what is due. Entries are lazy: a
//! connection that received bytes since its entry was pushed is not
//! touched on every read; when the stale entry comes due the loop looks at
//! the connection, sees it is not idle after all and pushes its real
//! deadline. So each connection has at most two entries (idle and linger)
//! however busy it is.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use mio::Token;

/// A min-heap of (deadline in ms since start, token).
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(u64, usize)>>,
}

impl Timers {
    /// Asks to look at `token` again at `at_ms`.
    pub fn push(&mut self, at_ms: u64, token: Token) {
        self.heap.push(Reverse((at_ms, token.0)));
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes and returns one entry due at or before `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<Token> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now_ms => {
                self.heap.pop().map(|Reverse((_, t))| Token(t))
            }
            _ => None,
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_out_in_deadline_order_once_due() {
        let mut t = Timers::default();
        t.push(30, Token(3));
        t.push(10, Token(1));
        t.push(20, Token(2));
        assert_eq!(t.next(), Some(10));
        assert_eq!(t.pop_due(5), None);
        assert_eq!(t.pop_due(25), Some(Token(1)));
        assert_eq!(t.pop_due(25), Some(Token(2)));
        assert_eq!(t.pop_due(25), None);
        assert_eq!(t.len(), 1);
    }
}
