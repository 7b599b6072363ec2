//! A connection's life as a state machine, with no socket in sight.
//!
//! ```text
//!            output full                  queue ≤ half
//!   Open ───────────────────▶ Paused ─────────────────▶ Open
//!   Open ── --max-memory reached ─▶ Waiting ── its turn in the FIFO ─▶ Open
//!    │  protocol: close / EOF / shutdown      │
//!    ▼                                        ▼
//!   Flushing(Close) ── queue empty ─▶ closed ("done")
//!   Flushing(Linger) ─ queue empty ─▶ Lingering ─ EOF or deadline ─▶ closed
//!   (shutdown: Open, Paused, Flushing ─▶ Flushing(Linger))
//!   any state ── I/O error, slow consumer ─▶ Closing(reason) ─▶ closed
//! ```
//!
//! The loop reports what happened ([`State::output_full`],
//! [`State::protocol_close`], [`State::read_eof`], [`State::failed`], ...)
//! and, once its handler is done, asks [`State::advance`] what to do about
//! it: close, start lingering, resume reading, or nothing. The interest to
//! register follows from the state alone ([`State::interest`]), after
//! rustls' `tlsserver-mio`. Everything here is pure, so each transition is
//! unit-tested below, grouped by the state it starts from.

use mio::Interest;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Reading and writing.
    Open,
    /// Not reading: the output queue reached its limit (back-pressure).
    /// Reading resumes once the queue has drained to half, not as soon as
    /// a byte fits, so a client that reads slowly is not read from one
    /// byte at a time.
    Paused,
    /// Not reading: the output of all connections together reached
    /// `--max-memory`. Not this client's fault, so not this client's
    /// queue: the loop keeps waiting connections in a FIFO and reads from
    /// them again in that order as memory frees ([`State::memory_freed`]).
    Waiting,
    /// No more reading; once the output queue is empty, `Then` happens.
    Flushing(Then),
    /// The last words are written and our write side is shut; input is
    /// read and thrown away until the peer's EOF or the linger deadline,
    /// so that a client still sending does not turn our close into a
    /// reset that destroys those last words before it reads them.
    Lingering,
    /// To be closed at once, for this reason.
    Closing(CloseReason),
}

/// What follows a flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// Close.
    Close,
    /// Shut the write side and linger (see [`State::Lingering`]).
    Linger,
}

/// Why a connection was closed: for the logs and the metrics' `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Its output was flushed after the protocol, the peer's EOF or a
    /// shutdown ended the conversation.
    Done,
    /// The peer closed while we lingered.
    PeerClosed,
    /// A read or a write failed (reset, broken pipe, ...).
    Error,
    /// Chat: its queued output would have passed `--max-buffer`.
    SlowConsumer,
    /// Nothing received for `--idle-timeout`.
    Idle,
    /// The linger time ran out before the peer closed.
    LingerOver,
}

impl CloseReason {
    /// Every reason, for metrics that list them all.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::Done,
        CloseReason::PeerClosed,
        CloseReason::Error,
        CloseReason::SlowConsumer,
        CloseReason::Idle,
        CloseReason::LingerOver,
    ];

    /// The reason as logs and metric labels show it.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Error => "error",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Idle => "idle",
            CloseReason::LingerOver => "linger_over",
        }
    }
}

/// What the loop must do after a handler, as [`State::advance`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing beyond bringing the registered interest up to date.
    Stay,
    /// Deregister and close the connection.
    Close(CloseReason),
    /// Shut our write side, arm the linger deadline, and read on the next
    /// turn: input may already be waiting, its edge consumed.
    Linger,
    /// Reading resumes after a pause. Read on the next turn rather than
    /// wait for an event: the edge for bytes that arrived while paused is
    /// long gone.
    Resume,
}

impl State {
    /// True while input is read (and, lingering, thrown away).
    pub(crate) fn reads(self) -> bool {
        matches!(self, State::Open | State::Lingering)
    }

    /// True while input goes to the protocol.
    pub(crate) fn talks(self) -> bool {
        matches!(self, State::Open | State::Paused | State::Waiting)
    }

    /// True once the connection is only waiting to be closed.
    pub(crate) fn is_closing(self) -> bool {
        matches!(self, State::Closing(_))
    }

    /// The output queue has no room: stop reading until it drains.
    pub(crate) fn output_full(&mut self) {
        if *self == State::Open {
            *self = State::Paused;
        }
    }

    /// Memory for all connections is at `--max-memory`: stop reading until
    /// the loop says it freed up.
    pub(crate) fn memory_full(&mut self) {
        if *self == State::Open {
            *self = State::Waiting;
        }
    }

    /// Memory freed up and it is this connection's turn: read again. True
    /// when it was waiting (a waiting entry may be stale: the connection
    /// may have been closed by the protocol or shutdown since).
    pub(crate) fn memory_freed(&mut self) -> bool {
        let was = *self == State::Waiting;
        if was {
            *self = State::Open;
        }
        was
    }

    /// The protocol ended the conversation: flush, then close or linger.
    pub(crate) fn protocol_close(&mut self, then: Then) {
        if self.talks() {
            *self = State::Flushing(then);
        }
    }

    /// The peer closed its side (a read returned 0). Called after the
    /// protocol heard of it: a protocol that did not close itself has
    /// nothing more to read either, so the connection flushes and closes.
    pub(crate) fn read_eof(&mut self) {
        match self {
            State::Open | State::Paused | State::Waiting => *self = State::Flushing(Then::Close),
            State::Lingering => *self = State::Closing(CloseReason::PeerClosed),
            State::Flushing(_) | State::Closing(_) => {}
        }
    }

    /// A read or a write failed: nothing more can be done with the socket.
    pub(crate) fn failed(&mut self) {
        if !self.is_closing() {
            *self = State::Closing(CloseReason::Error);
        }
    }

    /// Chat: output would pass the queue's limit; the client is dropped.
    pub(crate) fn overflowed(&mut self) {
        if !self.is_closing() {
            *self = State::Closing(CloseReason::SlowConsumer);
        }
    }

    /// The server is shutting down: no more reading; flush, then linger.
    /// Lingering, not closing: a client may still be sending, and closing a
    /// socket with unread input sends a reset that destroys whatever of
    /// our output it has not read yet, the very bytes the shutdown is
    /// meant to deliver. A lingering connection stays as it is.
    pub(crate) fn shutdown(&mut self) {
        match self {
            State::Open | State::Paused | State::Waiting | State::Flushing(_) => {
                *self = State::Flushing(Then::Linger)
            }
            State::Lingering | State::Closing(_) => {}
        }
    }

    /// After a handler: what the loop must do, given `queued` bytes of
    /// output and the queue size `resume_at` at which a paused connection
    /// reads again.
    pub(crate) fn advance(&mut self, queued: usize, resume_at: usize) -> Action {
        match *self {
            State::Closing(reason) => Action::Close(reason),
            State::Flushing(Then::Close) if queued == 0 => Action::Close(CloseReason::Done),
            State::Flushing(Then::Linger) if queued == 0 => {
                *self = State::Lingering;
                Action::Linger
            }
            State::Paused if queued <= resume_at => {
                *self = State::Open;
                Action::Resume
            }
            _ => Action::Stay,
        }
    }

    /// The interest the connection needs in this state with `queued` bytes
    /// of output: readable while it reads, writable only while output is
    /// pending (asking for `WRITABLE` with nothing to write makes an
    /// edge-triggered loop wake for nothing). `None` when it needs nothing:
    /// [`State::advance`] closes such a connection first.
    pub(crate) fn interest(self, queued: usize) -> Option<Interest> {
        // A waiting connection stays registered for both: it is not
        // finished, read edges meanwhile are harmless, and a writable
        // edge says its own client has read, which may let it be served
        // without memory (see the loop's `mirror`).
        if self == State::Waiting {
            return Some(Interest::READABLE | Interest::WRITABLE);
        }
        match (self.reads(), queued > 0) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        }
    }

    /// When the connection must be looked at again (ms since start), given
    /// `since` (the last byte read, or when lingering began), the time
    /// `now`, the idle timeout and the linger time. `None`: no deadline.
    pub(crate) fn deadline(
        self,
        since: u64,
        now: u64,
        idle: Option<u64>,
        linger: u64,
    ) -> Option<u64> {
        match self {
            State::Lingering => Some(since + linger),
            // Waiting for the client to read is not being idle: look again
            // a whole timeout from now.
            State::Paused | State::Waiting => idle.map(|idle| now + idle),
            _ => idle.map(|idle| since + idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod open {
        use super::*;

        #[test]
        fn reads_and_asks_for_writable_only_with_output_pending() {
            let s = State::Open;
            assert!(s.reads() && s.talks());
            assert_eq!(s.interest(0), Some(Interest::READABLE));
            assert_eq!(s.interest(5), Some(Interest::READABLE | Interest::WRITABLE));
        }

        #[test]
        fn a_full_queue_pauses_reading() {
            let mut s = State::Open;
            s.output_full();
            assert_eq!(s, State::Paused);
            assert!(!s.reads());
        }

        #[test]
        fn eof_flushes_then_closes() {
            let mut s = State::Open;
            s.read_eof();
            assert_eq!(s, State::Flushing(Then::Close));
            assert_eq!(s.advance(10, 0), Action::Stay, "output still pending");
            assert_eq!(s.advance(0, 0), Action::Close(CloseReason::Done));
        }

        #[test]
        fn an_error_closes_at_once_whatever_is_queued() {
            let mut s = State::Open;
            s.failed();
            assert_eq!(s.advance(100, 0), Action::Close(CloseReason::Error));
        }

        #[test]
        fn a_slow_consumer_is_closed_with_its_reason() {
            let mut s = State::Open;
            s.overflowed();
            assert_eq!(s.advance(100, 0), Action::Close(CloseReason::SlowConsumer));
        }

        #[test]
        fn has_an_idle_deadline_only_with_a_timeout() {
            assert_eq!(State::Open.deadline(100, 120, Some(50), 1000), Some(150));
            assert_eq!(State::Open.deadline(100, 120, None, 1000), None);
        }

        #[test]
        fn nothing_to_do_after_an_ordinary_event() {
            let mut s = State::Open;
            assert_eq!(s.advance(10, 5), Action::Stay);
            assert_eq!(s, State::Open);
        }
    }

    mod paused {
        use super::*;

        #[test]
        fn does_not_read_but_keeps_writing() {
            let s = State::Paused;
            assert!(!s.reads() && s.talks());
            assert_eq!(s.interest(100), Some(Interest::WRITABLE));
        }

        #[test]
        fn resumes_only_once_the_queue_drained_to_half() {
            let mut s = State::Paused;
            assert_eq!(s.advance(51, 50), Action::Stay, "above half: still paused");
            assert_eq!(s, State::Paused);
            assert_eq!(s.advance(50, 50), Action::Resume);
            assert_eq!(s, State::Open);
        }

        #[test]
        fn is_never_idle() {
            let since_last_read = 100;
            let now = 1_000;
            assert_eq!(
                State::Paused.deadline(since_last_read, now, Some(50), 1000),
                Some(1_050),
                "looked at again a whole timeout from now, not closed"
            );
        }

        #[test]
        fn shutdown_stops_reading_and_lingers_once_flushed() {
            let mut s = State::Paused;
            s.shutdown();
            assert!(!s.reads());
            assert_eq!(
                s.advance(10, 50),
                Action::Stay,
                "not while output is queued"
            );
            assert_eq!(s.advance(0, 50), Action::Linger);
        }

        #[test]
        fn the_protocol_may_still_close_it() {
            let mut s = State::Paused;
            s.protocol_close(Then::Linger);
            assert_eq!(s, State::Flushing(Then::Linger));
        }
    }

    mod waiting {
        use super::*;

        #[test]
        fn does_not_read_until_its_turn_comes() {
            let mut s = State::Open;
            s.memory_full();
            assert_eq!(s, State::Waiting);
            assert!(!s.reads() && s.talks());
            // Registered for something, or mio would have nothing to watch
            // and the loop would take it for finished.
            assert_eq!(s.interest(0), Some(Interest::READABLE | Interest::WRITABLE));
            assert_eq!(
                s.advance(0, 10),
                Action::Stay,
                "an empty queue is not enough"
            );
            assert!(s.memory_freed());
            assert_eq!(s, State::Open);
            assert!(!s.memory_freed(), "a second turn changes nothing");
        }

        #[test]
        fn a_paused_connection_does_not_wait_for_memory_too() {
            let mut s = State::Paused;
            s.memory_full();
            assert_eq!(s, State::Paused);
        }

        #[test]
        fn is_never_idle_and_shutdown_flushes_it() {
            let mut s = State::Waiting;
            assert_eq!(s.deadline(0, 500, Some(100), 1000), Some(600));
            s.shutdown();
            assert_eq!(s, State::Flushing(Then::Linger));
            assert!(!s.memory_freed());
        }
    }

    mod flushing {
        use super::*;

        #[test]
        fn reads_nothing_and_writes_what_is_left() {
            let s = State::Flushing(Then::Close);
            assert!(!s.reads() && !s.talks());
            assert_eq!(s.interest(3), Some(Interest::WRITABLE));
        }

        #[test]
        fn a_second_close_request_changes_nothing() {
            let mut s = State::Flushing(Then::Linger);
            s.protocol_close(Then::Close);
            assert_eq!(s, State::Flushing(Then::Linger));
        }

        #[test]
        fn lingers_once_flushed_when_asked_to() {
            let mut s = State::Flushing(Then::Linger);
            assert_eq!(s.advance(1, 0), Action::Stay);
            assert_eq!(s.advance(0, 0), Action::Linger);
            assert_eq!(s, State::Lingering);
        }

        #[test]
        fn shutdown_lingers_after_the_flush_even_when_the_protocol_would_close() {
            let mut s = State::Flushing(Then::Close);
            s.shutdown();
            assert_eq!(s.advance(0, 0), Action::Linger);
        }
    }

    mod lingering {
        use super::*;

        #[test]
        fn reads_to_throw_input_away_but_never_talks() {
            let s = State::Lingering;
            assert!(s.reads() && !s.talks());
            assert_eq!(s.interest(0), Some(Interest::READABLE));
        }

        #[test]
        fn the_peers_eof_ends_it() {
            let mut s = State::Lingering;
            s.read_eof();
            assert_eq!(s.advance(0, 0), Action::Close(CloseReason::PeerClosed));
        }

        #[test]
        fn has_the_linger_deadline_not_the_idle_one() {
            assert_eq!(
                State::Lingering.deadline(100, 200, Some(5), 1000),
                Some(1100)
            );
        }

        #[test]
        fn shutdown_leaves_it_lingering() {
            let mut s = State::Lingering;
            s.shutdown();
            assert_eq!(s, State::Lingering);
            assert_eq!(s.advance(0, 0), Action::Stay);
        }
    }

    mod closing {
        use super::*;

        #[test]
        fn keeps_its_first_reason() {
            let mut s = State::Closing(CloseReason::SlowConsumer);
            s.failed();
            s.read_eof();
            s.shutdown();
            s.output_full();
            s.protocol_close(Then::Close);
            assert_eq!(s.advance(0, 0), Action::Close(CloseReason::SlowConsumer));
        }

        #[test]
        fn wants_no_interest() {
            assert_eq!(State::Closing(CloseReason::Error).interest(0), None);
        }
    }

    #[test]
    fn every_reason_indexes_its_own_counter() {
        // `Stats::closed_by` is indexed by `reason as usize`.
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{}", reason.as_str());
        }
    }

    #[test]
    fn the_state_fits_in_two_bytes() {
        // The connection struct is kept small (see
        // `an_idle_echo_connection_is_small`): a tag and a payload byte.
        assert!(std::mem::size_of::<State>() <= 2);
    }
}
