//! Deadlines for idle connections and lingering closes, in one heap.
//!
//! There is no timer thread: the loop asks [`Timers::next`] how long `poll`
//! may sleep, and after each wake-up pops what is due. Entries are lazy: a
//! connection that received bytes since its entry was pushed is not
//! touched on every read; when the stale entry comes due the loop looks at
//! the connection, sees it is not idle after all and pushes its real
//! deadline. So each connection has at most two entries (idle and linger)
//! however busy it is.
//!
//! # Closed connections cost nothing
//! A close does not search the heap for the connection's entries: its
//! token carries a generation, so an entry that outlived its connection is
//! recognised and skipped when it comes due. Left alone, though, those
//! entries would pile up until their deadline: at 14,000 connections a
//! second and `--idle-timeout 3600`, tens of millions of them. So
//! [`Timers::tidy`], called once per loop turn, drops every dead entry as
//! soon as they could outnumber the live ones: the heap never holds more
//! than `4 × live connections + TIDY_FLOOR` entries, and since each tidy
//! removes at least half of what it scans, its cost is O(1) per push
//! spread over time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use mio::Token;

/// Below this many entries the heap is never tidied: a handful of dead
/// entries is cheaper to skip when due than to sweep for.
const TIDY_FLOOR: usize = 1024;

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

    /// Drops the entries of closed connections once the heap holds more
    /// than `4 × live + TIDY_FLOOR` entries (a live connection has at most
    /// two). `is_live` says whether a token still names an open
    /// connection. Returns how many entries were dropped.
    pub fn tidy(&mut self, live: usize, mut is_live: impl FnMut(Token) -> bool) -> usize {
        let bound = live.saturating_mul(4).saturating_add(TIDY_FLOOR);
        if self.heap.len() <= bound {
            return 0;
        }
        let before = self.heap.len();
        self.heap.retain(|Reverse((_, t))| is_live(Token(*t)));
        // Give the memory back too: a burst of connections must not leave
        // a heap sized for it behind.
        if self.heap.capacity() > 2 * self.heap.len() + TIDY_FLOOR {
            self.heap.shrink_to(self.heap.len() + TIDY_FLOOR);
        }
        before - self.heap.len()
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Room allocated, in entries.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.heap.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

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

    /// Churn with a one-hour timeout: a million connections open and close
    /// with 100 open at any time, and nothing comes due. Without tidying
    /// the heap would hold a million entries.
    #[test]
    fn entries_of_closed_connections_do_not_accumulate() {
        let mut t = Timers::default();
        let mut open: HashSet<usize> = HashSet::new();
        let hour = 3_600_000;
        let mut peak = 0;
        for n in 0..1_000_000usize {
            // Tokens are never reused here, like generations in the loop.
            open.insert(n);
            t.push(n as u64 + hour, Token(n));
            if n >= 100 {
                open.remove(&(n - 100));
            }
            t.tidy(open.len(), |tok| open.contains(&tok.0));
            peak = peak.max(t.len());
        }
        assert!(peak <= 4 * 100 + TIDY_FLOOR + 1, "peak {peak}");
        assert!(t.capacity() <= 2 * (4 * 100 + TIDY_FLOOR) + TIDY_FLOOR);
        // The live ones are all still there and come due in order.
        let mut due = Vec::new();
        while let Some(tok) = t.pop_due(u64::MAX) {
            if open.contains(&tok.0) {
                due.push(tok.0);
            }
        }
        let mut want: Vec<usize> = open.into_iter().collect();
        want.sort_unstable();
        assert_eq!(due, want);
    }

    #[test]
    fn a_tidy_keeps_every_live_entry() {
        let mut t = Timers::default();
        for n in 0..10_000usize {
            t.push(n as u64, Token(n));
        }
        // Only the even tokens are live.
        let dropped = t.tidy(10, |tok| tok.0 % 2 == 0);
        assert_eq!(dropped, 5_000);
        assert_eq!(t.len(), 5_000);
        assert_eq!(t.pop_due(u64::MAX), Some(Token(0)));
        assert_eq!(t.pop_due(u64::MAX), Some(Token(2)));
    }

    #[test]
    fn a_small_heap_is_left_alone() {
        let mut t = Timers::default();
        for n in 0..TIDY_FLOOR {
            t.push(n as u64, Token(n));
        }
        assert_eq!(t.tidy(0, |_| false), 0);
        assert_eq!(t.len(), TIDY_FLOOR);
    }
}
