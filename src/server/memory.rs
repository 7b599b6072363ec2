//! `--max-memory`'s bookkeeping, shared by both engines: one running count
//! of the bytes the server holds for its clients, the cap, and the queue of
//! connections waiting for room.
//!
//! What an engine counts, and how it stops taking input, is its own
//! business (the readiness engine stops reading, `event_loop/memory.rs`;
//! the uring engine cancels the receive, `uring/memory.rs`); the arithmetic
//! of the cap and the order in which waiting connections go again are the
//! same, and live here:
//! - [`MemoryCap::room`]: how much one read may still take;
//! - [`MemoryCap::wait`] and [`MemoryCap::resume`]: once the count has
//!   fallen to three quarters of the cap, waiting connections go again in
//!   the order they began to wait, as many as the room allows, so nobody
//!   waits behind a newer arrival and nobody starves;
//! - [`MemoryCap::tidy`]: entries of connections that closed (or stopped
//!   waiting) while queued are dropped once they could outnumber the live
//!   connections, so a client that connects, writes until it waits and
//!   closes, over and over while others hold the cap, cannot grow the
//!   queue without bound;
//! - [`MemoryCap::victim`]: which client chat drops at the cap, if the
//!   count is over it: the one furthest behind, by what the server holds
//!   for it and, where the engine asks, what the kernel still holds
//!   unsent for it (see there why the uring engine must ask).

use std::collections::VecDeque;
use std::fmt::Display;

/// A waiting connection is not woken for less room than this; below it a
/// read waits for memory rather than take a few bytes at a time.
pub const MIN_READ: usize = 4096;

/// Below this many entries the waiting queue is never tidied: a few stale
/// entries are cheaper to skip in [`MemoryCap::resume`] than to sweep for.
const TIDY_FLOOR: usize = 64;

/// The running count of bytes held for clients under `--max-memory`, and
/// the connections (named by `T`: a token or a tag) waiting for room.
#[derive(Debug)]
pub struct MemoryCap<T> {
    used: usize,
    cap: usize,
    /// The room one woken connection is reckoned to take.
    per_reader: usize,
    /// What a queue may occupy beyond the bytes put in it.
    slack: usize,
    waiting: VecDeque<T>,
    /// The last judgement over the cap found nobody behind (see
    /// [`MemoryCap::victim`]): the next one, if over the cap again with
    /// nobody behind, drops the biggest holder.
    undecided: bool,
}

impl<T: Copy> MemoryCap<T> {
    /// Nothing counted yet, under `cap` bytes. The engine says what its
    /// reads cost: `per_reader`, the room one connection woken from the
    /// queue is reckoned to take (one read's worth of input and what its
    /// queue may grow by); `slack`, what a queue may occupy beyond the
    /// bytes put in it (kept free by [`MemoryCap::room`]).
    pub fn new(cap: usize, per_reader: usize, slack: usize) -> Self {
        MemoryCap {
            used: 0,
            cap,
            per_reader,
            slack,
            waiting: VecDeque::new(),
            undecided: false,
        }
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// True when the count has passed the cap.
    pub fn over(&self) -> bool {
        self.used > self.cap
    }

    /// One connection's holding went from `before` to `after` bytes.
    pub fn recount(&mut self, before: usize, after: usize) {
        self.used = self.used + after - before;
    }

    /// How many bytes a read may take now without the count passing the
    /// cap (with its queue's growth slack).
    pub fn room(&self) -> usize {
        if self.used == 0 {
            // Nothing held anywhere: one read may always go, or a cap
            // below one read's worth would stop everyone for good.
            return usize::MAX;
        }
        self.cap.saturating_sub(self.used + self.slack)
    }

    /// `who` cannot take input without passing the cap: it joins the
    /// back of the queue.
    pub fn wait(&mut self, who: T) {
        self.waiting.push_back(who);
    }

    /// The waiting queue's entries, oldest first (stale ones included).
    pub fn in_line(&self) -> impl Iterator<Item = T> + '_ {
        self.waiting.iter().copied()
    }

    /// Connections queued (stale entries included).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Once the count has fallen to three quarters of the cap, offers
    /// waiting connections their turn, oldest first, as many as the room
    /// allows (the engine's `per_reader` each, and at least one). `wake` returns
    /// false for an entry that is stale (closed, or no longer waiting),
    /// which costs no room.
    pub fn resume(&mut self, mut wake: impl FnMut(T) -> bool) {
        if self.waiting.is_empty() || self.used > self.cap - self.cap / 4 {
            return;
        }
        let mut room = (self.cap - self.used).max(self.per_reader);
        while room >= MIN_READ {
            let Some(who) = self.waiting.pop_front() else {
                break;
            };
            if wake(who) {
                room = room.saturating_sub(self.per_reader);
            }
        }
    }

    /// Drops the stale entries (connections closed, or no longer waiting)
    /// once the queue holds more than `2 × live + TIDY_FLOOR` entries
    /// (`live`: connections open; each waits in the queue at most once).
    /// `keep` says whether an entry still names a waiting connection; the
    /// engine undoes its own "queued" mark for a live one it answers false
    /// for. Stale entries are otherwise only popped by [`MemoryCap::resume`],
    /// which does nothing while the cap is held, so without this the queue
    /// would grow by one entry per client that waited and closed. Each tidy
    /// removes at least half of what it scans: O(1) per entry over time.
    /// Returns how many entries were dropped.
    pub fn tidy(&mut self, live: usize, mut keep: impl FnMut(T) -> bool) -> usize {
        let bound = live.saturating_mul(2).saturating_add(TIDY_FLOOR);
        if self.waiting.len() <= bound {
            return 0;
        }
        let before = self.waiting.len();
        self.waiting.retain(|&who| keep(who));
        if self.waiting.capacity() > 2 * self.waiting.len() + TIDY_FLOOR {
            self.waiting.shrink_to(self.waiting.len() + TIDY_FLOOR);
        }
        before - self.waiting.len()
    }

    /// Chat at the cap, if the count is over it: of `(who, bytes held,
    /// bytes unsent)`, the one furthest behind, logged as the slow consumer
    /// it is (`name` says who it is, for the log). The engine closes it.
    /// `bytes unsent` is what the kernel still holds in that client's send
    /// queue, or `None` when the engine does not ask (the readiness engine:
    /// then the one holding the most, the last of equals).
    ///
    /// The uring engine must ask. What it holds for a reader is no sign
    /// that the reader is slow: a wake-up's receives are relayed to every
    /// queue before any is sent, and a send the kernel has already taken
    /// counts until its completion is handled, which may come after a
    /// wake-up's worth of receives. A reader that keeps up and one that
    /// reads nothing then hold the same, byte for byte or nearly (a short
    /// line still in flight to one of them), for as long as the kernel's
    /// send buffer toward the latter (megabytes) takes what it is sent;
    /// the difference is only in the kernel. So a client the kernel holds
    /// nothing for, having taken all it was sent, is not a slow consumer;
    /// of the others, the one with the most not yet taken (held here and
    /// unsent there) goes. If the kernel holds nothing for anyone holding
    /// output (nothing was sent to them yet, or all of it was taken),
    /// nobody is dropped now: the engine's next sends tell them apart, and
    /// the count stays over the cap meanwhile by what it took in before
    /// sending. Only once in a row: if the next judgement is over the cap
    /// with nobody behind again (every reader keeping up, and still more
    /// queued than the cap allows), the biggest holder goes, as without
    /// the kernel, so the cap holds whatever clients do.
    pub fn victim<K, D: Display>(
        &mut self,
        held: impl Iterator<Item = (K, usize, Option<usize>)>,
        name: impl FnOnce(&K) -> D,
    ) -> Option<(K, usize)> {
        if !self.over() {
            self.undecided = false;
            return None;
        }
        let (who, bytes, unsent) = match furthest_behind(held) {
            Behind::Nobody => return None,
            Behind::Undecided { holders, .. } if !self.undecided => {
                log::debug!(
                    "{} bytes queued in all passed --max-memory, but the kernel holds \
                     nothing unsent for any of the {holders} readers holding output: \
                     none is dropped yet",
                    self.used
                );
                self.undecided = true;
                return None;
            }
            Behind::Undecided { biggest, .. } => {
                let (who, bytes) = biggest;
                (who, bytes, Some(0))
            }
            Behind::One(who, bytes, unsent) => (who, bytes, unsent),
        };
        self.undecided = false;
        let kernel = unsent.map_or(String::new(), |u| {
            format!("; {u} more unsent in the kernel")
        });
        log::warn!(
            "[{}] slow consumer: {} bytes queued in all passed --max-memory; \
             disconnecting the biggest reader ({bytes} bytes{kernel})",
            name(&who),
            self.used
        );
        Some((who, bytes))
    }

    /// Debug builds: the running count equals the sum it stands for.
    pub fn check(&self, sum: impl FnOnce() -> usize) {
        if cfg!(debug_assertions) {
            assert_eq!(self.used, sum(), "memory count drifted");
        }
    }
}

/// What [`furthest_behind`] found.
#[derive(Debug, PartialEq)]
enum Behind<K> {
    /// Nobody holds anything.
    Nobody,
    /// The one to drop, what it holds, and what the kernel holds for it.
    One(K, usize, Option<usize>),
    /// `holders` hold output, and the kernel holds nothing for any; the
    /// one holding the most (the last of equals).
    Undecided { holders: usize, biggest: (K, usize) },
}

/// Chat at the cap: of `(who, bytes held, bytes unsent)`, the one furthest
/// behind (see [`MemoryCap::victim`]); the last of equals.
fn furthest_behind<K>(held: impl Iterator<Item = (K, usize, Option<usize>)>) -> Behind<K> {
    let mut best: Option<(K, usize, Option<usize>, usize)> = None;
    let mut keeping_up = 0;
    let mut biggest: Option<(K, usize)> = None;
    for (who, n, unsent) in held {
        let behind = match unsent {
            _ if n == 0 => continue,
            // It took all it was sent: what it holds is not yet sent.
            Some(0) => {
                keeping_up += 1;
                if biggest.as_ref().map_or(true, |&(_, most)| n >= most) {
                    biggest = Some((who, n));
                }
                continue;
            }
            Some(u) => n.saturating_add(u),
            None => n,
        };
        if best.as_ref().map_or(true, |&(.., most)| behind >= most) {
            best = Some((who, n, unsent, behind));
        }
    }
    match best {
        Some((who, n, unsent, _)) => Behind::One(who, n, unsent),
        None => match biggest {
            Some(biggest) => Behind::Undecided {
                holders: keeping_up,
                biggest,
            },
            None => Behind::Nobody,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::buffer::GROWTH_SLACK;
    use crate::net::ready::SCRATCH;

    /// The readiness engine's figures.
    const PER_READER: usize = SCRATCH + GROWTH_SLACK;

    impl<T: Copy> MemoryCap<T> {
        fn with_cap(cap: usize) -> Self {
            MemoryCap::new(cap, PER_READER, GROWTH_SLACK)
        }
    }

    #[test]
    fn with_nothing_held_one_read_may_always_go() {
        let m = MemoryCap::<u32>::with_cap(10);
        assert_eq!(m.room(), usize::MAX);
    }

    #[test]
    fn room_is_what_is_left_under_the_cap_less_the_slack() {
        let mut m = MemoryCap::<u32>::with_cap(1 << 20);
        m.recount(0, 1000);
        assert_eq!(m.room(), (1 << 20) - 1000 - GROWTH_SLACK);
        m.recount(1000, 1 << 20);
        assert_eq!(m.room(), 0);
        assert!(!m.over());
        m.recount(0, 1);
        assert!(m.over());
    }

    #[test]
    fn waiting_connections_go_again_only_at_three_quarters_of_the_cap() {
        let cap = 16 * PER_READER;
        let mut m = MemoryCap::with_cap(cap);
        m.recount(0, cap);
        m.wait(1);
        let mut woken = Vec::new();
        m.resume(|t| {
            woken.push(t);
            true
        });
        assert!(woken.is_empty(), "still at the cap");
        m.recount(cap, cap - cap / 4);
        m.resume(|t| {
            woken.push(t);
            true
        });
        assert_eq!(woken, vec![1]);
    }

    #[test]
    fn waiting_connections_go_again_oldest_first_as_room_allows() {
        let cap = 8 * PER_READER;
        let mut m = MemoryCap::with_cap(cap);
        m.recount(0, cap - 2 * PER_READER);
        for t in 1..=5 {
            m.wait(t);
        }
        let mut woken = Vec::new();
        m.resume(|t| {
            woken.push(t);
            true
        });
        assert_eq!(woken, vec![1, 2], "two readers' worth of room");
        m.recount(cap - 2 * PER_READER, 1);
        m.resume(|t| {
            woken.push(t);
            true
        });
        assert_eq!(woken, vec![1, 2, 3, 4, 5]);
        assert_eq!(m.waiting(), 0);
    }

    #[test]
    fn stale_entries_cost_no_room_and_at_least_one_goes() {
        let mut m = MemoryCap::with_cap(PER_READER / 2);
        m.recount(0, 1);
        for t in 1..=4 {
            m.wait(t);
        }
        let mut woken = Vec::new();
        m.resume(|t| {
            if t % 2 == 1 {
                return false;
            }
            woken.push(t);
            true
        });
        assert_eq!(woken, vec![2], "one, though the cap is below a read");
        assert_eq!(m.waiting(), 2);
    }

    #[test]
    fn stale_entries_are_tidied_while_the_cap_is_held() {
        // A few connections hold the cap; others connect, wait and close,
        // round after round. `resume` pops nothing while the cap is held,
        // so only `tidy` keeps the queue bounded.
        let cap = 16 * PER_READER;
        let mut m = MemoryCap::with_cap(cap);
        m.recount(0, cap);
        let holders = [1u32, 2, 3];
        for &t in &holders {
            m.wait(t);
        }
        for round in 100..100_000u32 {
            m.wait(round);
            // Open now: the holders, and this round's client (it closes
            // right after).
            let live = |t: u32| holders.contains(&t) || t == round;
            m.resume(|_| unreachable!("the cap is held"));
            m.tidy(holders.len() + 1, live);
            assert!(m.waiting() <= 2 * (holders.len() + 1) + TIDY_FLOOR + 1);
        }
        // The live waiters are still queued, in their order.
        let kept: Vec<u32> = m.waiting.iter().copied().filter(|t| *t < 100).collect();
        assert_eq!(kept, holders);
    }

    #[test]
    fn a_small_queue_is_not_tidied() {
        let mut m = MemoryCap::with_cap(PER_READER);
        for t in 0..10u32 {
            m.wait(t);
        }
        assert_eq!(m.tidy(0, |_| panic!("not scanned")), 0);
        assert_eq!(m.waiting(), 10);
    }

    #[test]
    fn each_engine_sets_what_a_reader_costs() {
        let mut m = MemoryCap::new(100_000, 10_000, 5_000);
        m.recount(0, 1000);
        assert_eq!(m.room(), 100_000 - 1000 - 5_000, "its slack");
        for t in 1..=20u32 {
            m.wait(t);
        }
        let mut woken = 0;
        m.resume(|_| {
            woken += 1;
            true
        });
        // 99,000 bytes of room, 10,000 each while a read's worth is left.
        assert_eq!(woken, 10, "its per-reader room");
    }

    #[test]
    fn nobody_is_a_victim_within_the_cap() {
        let mut m = MemoryCap::<u32>::with_cap(100);
        m.recount(0, 100);
        let held = || [(1, 40, None), (2, 60, None)].into_iter();
        assert_eq!(m.victim(held(), |k| *k), None);
        m.recount(0, 1);
        assert_eq!(m.victim(held(), |k| *k), Some((2, 60)));
    }

    #[test]
    fn without_the_kernel_the_biggest_holder_is_chosen_and_nobody_for_empty_queues() {
        // The readiness engine: it does not ask the kernel.
        let held = [(1, 5, None), (2, 9, None), (3, 0, None)];
        assert_eq!(furthest_behind(held.into_iter()), Behind::One(2, 9, None));
        let held = [(1, 0, None), (2, 0, None)];
        assert_eq!(furthest_behind(held.into_iter()), Behind::Nobody);
        let held = [(1, 9, None), (2, 9, None), (3, 2, None)];
        assert_eq!(
            furthest_behind(held.into_iter()),
            Behind::One(2, 9, None),
            "the last of equals"
        );
    }

    #[test]
    fn a_reader_the_kernel_holds_nothing_for_is_not_dropped() {
        // Chat at the cap on the uring engine: the sink (key 0, reads
        // nothing) and the watcher (key 1, reads everything) hold the same
        // 523 relayed lines, or the watcher 17 bytes more (a `joined` line
        // whose send's completion is not yet handled); the kernel holds
        // 1.5 MB unsent for the sink, nothing for the watcher. By what the
        // server holds alone, the watcher was dropped.
        let mut m = MemoryCap::<usize>::with_cap(1 << 20);
        m.recount(0, 2 * 528_230);
        let held = [
            (0, 528_230, Some(1_500_000)),
            (1, 528_230, Some(0)),
            (2, 0, Some(0)),
        ];
        assert_eq!(m.victim(held.into_iter(), |k| *k), Some((0, 528_230)));
        m.recount(0, 17);
        let held = [(0, 528_230, Some(1_500_000)), (1, 528_247, Some(0))];
        assert_eq!(m.victim(held.into_iter(), |k| *k), Some((0, 528_230)));
    }

    #[test]
    fn of_readers_behind_the_one_with_the_most_not_taken_goes() {
        // Held here plus unsent there: 100 + 900 against 600 + 100.
        let held = [(1, 100, Some(900)), (2, 600, Some(100)), (3, 50, Some(0))];
        assert_eq!(
            furthest_behind(held.into_iter()),
            Behind::One(1, 100, Some(900))
        );
    }

    #[test]
    fn with_nothing_unsent_for_anyone_nobody_is_dropped_yet() {
        // The first wake-up's lines, relayed to both before anything was
        // sent to either: nobody has shown it reads slower.
        let mut m = MemoryCap::<u32>::with_cap(1 << 19);
        m.recount(0, 2 * 263_610);
        let held = [(1, 263_610, Some(0)), (2, 263_610, Some(0))];
        assert_eq!(m.victim(held.into_iter(), |k| *k), None);
        assert_eq!(
            furthest_behind(held.into_iter()),
            Behind::Undecided {
                holders: 2,
                biggest: (2, 263_610)
            }
        );
        // Once the kernel holds something for one of them, it goes.
        let held = [(1, 263_610, Some(250_000)), (2, 263_610, Some(0))];
        assert_eq!(m.victim(held.into_iter(), |k| *k), Some((1, 263_610)));
    }

    #[test]
    fn over_the_cap_with_nobody_behind_twice_in_a_row_the_biggest_holder_goes() {
        // Every reader keeping up, and still more queued than the cap:
        // one judgement waits for the sends, the next one drops.
        let mut m = MemoryCap::<u32>::with_cap(1000);
        m.recount(0, 1500);
        let held = || [(1, 700, Some(0)), (2, 800, Some(0))].into_iter();
        assert_eq!(m.victim(held(), |k| *k), None);
        assert_eq!(m.victim(held(), |k| *k), Some((2, 800)));
        // A judgement that decides (or finds the count within the cap)
        // starts the count of undecided ones again.
        assert_eq!(m.victim(held(), |k| *k), None);
        m.recount(1500, 900);
        assert_eq!(m.victim(held(), |k| *k), None);
        m.recount(900, 1500);
        assert_eq!(m.victim(held(), |k| *k), None, "waits once again");
    }
}
