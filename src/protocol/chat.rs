//! Line-based chat: every line a client sends goes to every other client.
//!
//! The rules are those of `INTERFACE.md`: clients start as `guest-N`, get
//! `* welcome guest-N`, see `* NAME joined` / `* NAME left` for others, and
//! relay lines as `NAME: TEXT`. Commands: `/nick NAME`, `/who`, `/quit`
//! and the tutorial's `!DISCONNECT`.
//!
//! Every relayed line is built once into an `Rc<[u8]>` and handed to the
//! outbox as a broadcast, so fan-out to N clients shares one allocation.
//!
//! # Amplification
//! Some lines cost far more output than input: a 5-byte `/who` answers
//! with every name online (about 200 KiB with 20,000 clients), so one
//! 64 KiB read full of them would make the server build gigabytes while
//! everyone else waits. So the output one call to [`Chat::data`] (or
//! [`Chat::resume`]) may cause is metered: replies and broadcast chunks
//! count their bytes (a broadcast once, as the chunk built here, since
//! recipients share it), and once a call has spent [`OUTPUT_BUDGET`] it
//! stops after the current line and keeps the rest of the read in the
//! session. The server sees [`Protocol::backlog`], serves everyone else,
//! and calls [`Chat::resume`] next turn; it reads nothing more from this
//! client meanwhile, so the held input is at most one read. Nothing is
//! dropped; the flood is only spread over turns. One call's output is at
//! most the budget plus one line's worth (a `/who`, or a line of
//! `--max-line` bytes with its name).

use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use super::lines::{LineSplitter, TooLong};
use super::{AtMemoryCap, Audience, Close, Outbox, Protocol};

/// Longest accepted nickname, in bytes.
pub const MAX_NICK: usize = 32;

/// Most output bytes one read of input may cause before the rest of that
/// read waits for the next turn (see "Amplification" above).
pub const OUTPUT_BUDGET: usize = 256 * 1024;

/// Chat's shared state: who is online, by connection number.
#[derive(Debug)]
pub struct Chat {
    max_line: usize,
    /// Counts every accepted connection, rejected ones included.
    accepted: u64,
    /// Online clients by connection number, which is also `/who` order.
    online: BTreeMap<u64, Box<[u8]>>,
    /// The same names, for "is it taken" in O(1).
    taken: HashSet<Box<[u8]>>,
    /// Output bytes one call may cause; [`OUTPUT_BUDGET`] unless a test
    /// says otherwise.
    budget: usize,
}

/// One chat client's state.
#[derive(Debug)]
pub struct Session {
    number: u64,
    lines: LineSplitter,
    /// Set after `/quit` or a too-long line: input is no longer read.
    done: bool,
    /// Input received but not acted on yet: the rest of a read whose
    /// output budget ran out.
    held: Vec<u8>,
}

impl Chat {
    /// A chat room whose lines may be at most `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Chat {
            max_line,
            accepted: 0,
            online: BTreeMap::new(),
            taken: HashSet::new(),
            budget: OUTPUT_BUDGET,
        }
    }

    /// The same room with another output budget per call (tests, fuzzing).
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes.max(1);
        self
    }

    /// Acts on lines of `input` until it ends or the output budget is
    /// spent; keeps what is left in `s.held`.
    fn run(&mut self, s: &mut Session, input: &[u8], out: &mut impl Outbox) {
        let max = self.max_line;
        let budget = self.budget;
        let mut out = Metered { out, spent: 0 };
        // The splitter borrows the session while `line` needs it too, so
        // take it out for the duration of the call.
        let mut lines = std::mem::take(&mut s.lines);
        let result = lines.feed(input, max, |line| {
            if s.done {
                return false;
            }
            self.line(s, line, &mut out);
            out.spent < budget
        });
        s.lines = lines;
        match result {
            Ok(used) if !s.done => s.held.extend_from_slice(&input[used..]),
            Ok(_) => {}
            Err(TooLong) if !s.done => {
                out.reply(b"* error: line too long\n");
                out.close(Close::Linger);
                s.done = true;
                s.lines = LineSplitter::default();
            }
            Err(TooLong) => {}
        }
    }

    fn name(&self, s: &Session) -> &[u8] {
        // A session is in `online` from `open` until `close`, and only
        // sessions in between are handed back to us.
        &self.online[&s.number]
    }

    fn line(&mut self, s: &mut Session, line: &[u8], out: &mut impl Outbox) {
        match line {
            b"" => {}
            b"/quit" | b"!DISCONNECT" => {
                out.reply(b"* bye\n");
                // The client may still be sending: linger, so the input
                // after the quit does not turn the close into a reset
                // that destroys `* bye` before the client reads it.
                out.close(Close::Linger);
                s.done = true;
                s.held = Vec::new();
            }
            b"/who" => {
                let mut msg = b"* online: ".to_vec();
                for (i, name) in self.online.values().enumerate() {
                    if i > 0 {
                        msg.extend_from_slice(b", ");
                    }
                    msg.extend_from_slice(name);
                }
                msg.push(b'\n');
                out.reply(&msg);
            }
            _ if line.starts_with(b"/nick ") || line == b"/nick" => {
                let new = line.get(6..).unwrap_or_default();
                self.nick(s, new, out);
            }
            _ if line.starts_with(b"/") => out.reply(b"* error: unknown command\n"),
            text => {
                let msg = concat(&[self.name(s), b": ", text, b"\n"]);
                out.broadcast(msg, Audience::Others);
            }
        }
    }

    fn nick(&mut self, s: &Session, new: &[u8], out: &mut impl Outbox) {
        if new.is_empty() {
            out.reply(b"* error: usage: /nick NAME\n");
        } else if !valid_nick(new) {
            out.reply(b"* error: invalid name (1-32 bytes of A-Z a-z 0-9 _ -)\n");
        } else if self.taken.contains(new) {
            out.reply(b"* error: name taken\n");
        } else {
            let new: Box<[u8]> = new.into();
            self.taken.insert(new.clone());
            // `open` inserted this number; see `name`.
            let old = self
                .online
                .insert(s.number, new.clone())
                .expect("session is online");
            self.taken.remove(&old);
            let msg = concat(&[b"* ", &old, b" is now ", &new, b"\n"]);
            out.broadcast(msg, Audience::Everyone);
        }
    }
}

impl Protocol for Chat {
    type Session = Session;

    const AT_MEMORY_CAP: AtMemoryCap = AtMemoryCap::DropLargest;

    fn open(&mut self, out: &mut impl Outbox) -> Session {
        self.accepted += 1;
        let number = self.accepted;
        let mut name = format!("guest-{number}").into_bytes();
        // A client may already have taken this name with /nick; the
        // suffix keeps guest names unique without refusing the client.
        while self.taken.contains(&name[..]) {
            name.push(b'_');
        }
        let name: Box<[u8]> = name.into();
        out.reply(&concat(&[b"* welcome ", &name, b"\n"]));
        out.broadcast(concat(&[b"* ", &name, b" joined\n"]), Audience::Others);
        self.taken.insert(name.clone());
        self.online.insert(number, name);
        Session {
            number,
            lines: LineSplitter::default(),
            done: false,
            held: Vec::new(),
        }
    }

    fn reject(&mut self) -> &'static [u8] {
        self.accepted += 1;
        b"* error: server full\n"
    }

    fn data(&mut self, s: &mut Session, input: &[u8], out: &mut impl Outbox) {
        if s.done {
            return;
        }
        if s.held.is_empty() {
            self.run(s, input, out);
        } else {
            // Servers wait for `backlog` to clear before reading again; if
            // one does not, the order of the input is still kept.
            let mut held = std::mem::take(&mut s.held);
            held.extend_from_slice(input);
            self.run(s, &held, out);
        }
    }

    fn backlog(&self, s: &Session) -> bool {
        !s.held.is_empty()
    }

    fn resume(&mut self, s: &mut Session, out: &mut impl Outbox) {
        let held = std::mem::take(&mut s.held);
        if !s.done {
            self.run(s, &held, out);
        }
    }

    fn close(&mut self, s: Session, out: &mut impl Outbox) {
        if let Some(name) = self.online.remove(&s.number) {
            self.taken.remove(&name);
            out.broadcast(concat(&[b"* ", &name, b" left\n"]), Audience::Others);
        }
    }
}

/// 1 to 32 bytes of `[A-Za-z0-9_-]`.
pub fn valid_nick(name: &[u8]) -> bool {
    (1..=MAX_NICK).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An outbox that counts the bytes a call sends through it.
struct Metered<'a, O> {
    out: &'a mut O,
    spent: usize,
}

impl<O: Outbox> Outbox for Metered<'_, O> {
    fn reply(&mut self, bytes: &[u8]) {
        self.spent += bytes.len();
        self.out.reply(bytes);
    }
    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience) {
        self.spent += chunk.len();
        self.out.broadcast(chunk, to);
    }
    fn close(&mut self, how: Close) {
        self.out.close(how);
    }
}

fn concat(parts: &[&[u8]]) -> Rc<[u8]> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    v.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Recorder;

    fn room() -> (Chat, Session, Session) {
        let mut chat = Chat::new(16);
        let a = chat.open(&mut Recorder::default());
        let b = chat.open(&mut Recorder::default());
        (chat, a, b)
    }

    fn say(chat: &mut Chat, s: &mut Session, input: &[u8]) -> Recorder {
        let mut out = Recorder::default();
        chat.data(s, input, &mut out);
        out
    }

    mod joining {
        use super::*;

        #[test]
        fn a_new_client_is_welcomed_and_announced() {
            let mut chat = Chat::new(16);
            let mut out = Recorder::default();
            chat.open(&mut out);
            assert_eq!(out.replies, b"* welcome guest-1\n");
            assert_eq!(
                out.broadcasts,
                vec![(b"* guest-1 joined\n".to_vec(), Audience::Others)]
            );
        }

        #[test]
        fn rejected_clients_use_up_a_guest_number() {
            let mut chat = Chat::new(16);
            assert_eq!(chat.reject(), b"* error: server full\n");
            let mut out = Recorder::default();
            chat.open(&mut out);
            assert_eq!(out.replies, b"* welcome guest-2\n");
        }

        #[test]
        fn a_guest_name_taken_by_nick_is_not_handed_out_twice() {
            let (mut chat, mut a, _b) = room();
            say(&mut chat, &mut a, b"/nick guest-3\n");
            let mut out = Recorder::default();
            chat.open(&mut out);
            assert_eq!(out.replies, b"* welcome guest-3_\n");
        }
    }

    mod relaying {
        use super::*;

        #[test]
        fn a_line_goes_to_the_others_with_the_name() {
            let (mut chat, mut a, _b) = room();
            let out = say(&mut chat, &mut a, b"hi there\r\n");
            assert_eq!(
                out.broadcasts,
                vec![(b"guest-1: hi there\n".to_vec(), Audience::Others)]
            );
            assert!(out.replies.is_empty());
        }

        #[test]
        fn empty_lines_are_ignored() {
            let (mut chat, mut a, _b) = room();
            let out = say(&mut chat, &mut a, b"\n\r\n");
            assert!(out.broadcasts.is_empty() && out.replies.is_empty());
        }

        #[test]
        fn bytes_need_not_be_utf8() {
            let (mut chat, mut a, _b) = room();
            let out = say(&mut chat, &mut a, b"\xff\xfe\n");
            assert_eq!(out.broadcasts[0].0, b"guest-1: \xff\xfe\n");
        }

        #[test]
        fn a_line_in_pieces_is_relayed_once_complete() {
            let (mut chat, mut a, _b) = room();
            assert!(say(&mut chat, &mut a, b"par").broadcasts.is_empty());
            let out = say(&mut chat, &mut a, b"tial\n");
            assert_eq!(out.broadcasts[0].0, b"guest-1: partial\n");
        }
    }

    mod commands {
        use super::*;

        #[test]
        fn nick_renames_and_tells_everyone() {
            let (mut chat, mut a, _b) = room();
            let out = say(&mut chat, &mut a, b"/nick alice\n");
            assert_eq!(
                out.broadcasts,
                vec![(b"* guest-1 is now alice\n".to_vec(), Audience::Everyone)]
            );
            let out = say(&mut chat, &mut a, b"hello\n");
            assert_eq!(out.broadcasts[0].0, b"alice: hello\n");
        }

        #[test]
        fn nick_refuses_taken_names_including_ones_own() {
            let (mut chat, mut a, _b) = room();
            let out = say(&mut chat, &mut a, b"/nick guest-2\n");
            assert_eq!(out.replies, b"* error: name taken\n");
            let out = say(&mut chat, &mut a, b"/nick guest-1\n");
            assert_eq!(out.replies, b"* error: name taken\n");
            assert!(out.broadcasts.is_empty());
        }

        #[test]
        fn nick_refuses_invalid_and_empty_names() {
            let (mut chat, mut a, _b) = room();
            for bad in [
                &b"/nick \n"[..],
                b"/nick a b\n",
                b"/nick \xff\n",
                b"/nick\n",
            ] {
                let out = say(&mut chat, &mut a, bad);
                assert!(out.replies.starts_with(b"* error: "), "{bad:?}");
                assert!(out.broadcasts.is_empty());
            }
            let long = [b'n'; 33];
            let mut chat = Chat::new(100);
            let mut s = chat.open(&mut Recorder::default());
            let out = say(&mut chat, &mut s, &[&b"/nick "[..], &long, b"\n"].concat());
            assert!(out.replies.starts_with(b"* error: invalid name"));
            let out = say(
                &mut chat,
                &mut s,
                &[&b"/nick "[..], &long[..32], b"\n"].concat(),
            );
            assert_eq!(out.broadcasts.len(), 1, "32 bytes is fine");
        }

        #[test]
        fn a_freed_name_can_be_taken() {
            let (mut chat, mut a, b) = room();
            chat.close(b, &mut Recorder::default());
            let out = say(&mut chat, &mut a, b"/nick guest-2\n");
            assert_eq!(out.broadcasts.len(), 1);
        }

        #[test]
        fn who_lists_names_in_connection_order() {
            let (mut chat, mut a, mut b) = room();
            say(&mut chat, &mut a, b"/nick zed\n");
            let out = say(&mut chat, &mut b, b"/who\n");
            assert_eq!(out.replies, b"* online: zed, guest-2\n");
        }

        #[test]
        fn quit_and_disconnect_say_bye_then_close() {
            for cmd in [&b"/quit\n"[..], b"!DISCONNECT\r\n"] {
                let (mut chat, mut a, _b) = room();
                let out = say(&mut chat, &mut a, &[cmd, b"ignored\n"].concat());
                assert_eq!(out.replies, b"* bye\n");
                assert_eq!(out.closed, Some(Close::Linger), "lingers");
                assert!(
                    out.broadcasts.is_empty(),
                    "nothing after the quit is relayed"
                );
            }
        }

        #[test]
        fn commands_are_case_sensitive_and_whole_lines() {
            let (mut chat, mut a, _b) = room();
            for line in [&b"/QUIT\n"[..], b"/who \n", b"/nickname x\n"] {
                let out = say(&mut chat, &mut a, line);
                assert_eq!(out.replies, b"* error: unknown command\n");
            }
            let out = say(&mut chat, &mut a, b"!disconnect\n");
            assert_eq!(out.broadcasts.len(), 1, "relayed as text");
        }
    }

    mod limits {
        use super::*;

        #[test]
        fn a_too_long_line_is_refused_and_closes() {
            let (mut chat, mut a, _b) = room();
            let out = say(&mut chat, &mut a, &[b'x'; 17]);
            assert!(out.replies.is_empty(), "17 bytes may still end in \\r\\n");
            let out = say(&mut chat, &mut a, b"y");
            assert_eq!(out.replies, b"* error: line too long\n");
            assert_eq!(out.closed, Some(Close::Linger));
            let out = say(&mut chat, &mut a, b"more\n");
            assert!(out.replies.is_empty() && out.broadcasts.is_empty());
        }

        #[test]
        fn lines_before_the_long_one_are_still_relayed() {
            let (mut chat, mut a, _b) = room();
            let out = say(
                &mut chat,
                &mut a,
                &[&b"ok\n"[..], &[b'x'; 30], b"\n"].concat(),
            );
            assert_eq!(out.broadcasts.len(), 1);
            assert_eq!(out.replies, b"* error: line too long\n");
        }
    }

    mod amplification {
        use super::*;

        /// A room of `n` clients with 32-byte names, so a `/who` answer is
        /// about 34 bytes per client.
        fn crowd(n: usize, budget: usize) -> (Chat, Session) {
            let mut chat = Chat::new(64).with_budget(budget);
            for i in 0..n {
                let mut s = chat.open(&mut Recorder::default());
                let nick = format!("/nick {:0>32}\n", i);
                say(&mut chat, &mut s, nick.as_bytes());
            }
            let me = chat.open(&mut Recorder::default());
            (chat, me)
        }

        #[test]
        fn a_who_flood_is_spread_over_turns_and_nothing_is_lost() {
            let (mut chat, mut me) = crowd(1000, OUTPUT_BUDGET);
            let who_len = say(&mut chat, &mut me, b"/who\n").replies.len();
            assert!(who_len > 34 * 1000);
            // One 64 KiB read of `/who`: 13,107 of them, 450 MB of answers.
            let flood = b"/who\n".repeat(64 * 1024 / 5);
            let mut out = Recorder::default();
            chat.data(&mut me, &flood, &mut out);
            let mut answers = out.replies.len() / who_len;
            let mut calls = 1;
            assert!(out.replies.len() <= OUTPUT_BUDGET + who_len);
            while chat.backlog(&me) {
                let mut out = Recorder::default();
                chat.resume(&mut me, &mut out);
                assert!(
                    out.replies.len() <= OUTPUT_BUDGET + who_len,
                    "one call's output is bounded"
                );
                answers += out.replies.len() / who_len;
                calls += 1;
            }
            assert_eq!(answers, flood.len() / 5, "every /who answered");
            assert!(calls > 1000);
        }

        #[test]
        fn held_input_keeps_its_order_and_its_partial_line() {
            let (mut chat, mut me) = crowd(3, 1);
            // A budget of one byte: one line per call.
            let out = say(&mut chat, &mut me, b"one\ntwo\nthr");
            assert_eq!(out.broadcasts.len(), 1);
            assert!(chat.backlog(&me));
            let mut seen = vec![out.broadcasts[0].0.clone()];
            while chat.backlog(&me) {
                let mut out = Recorder::default();
                chat.resume(&mut me, &mut out);
                seen.extend(out.broadcasts.into_iter().map(|b| b.0));
            }
            let out = say(&mut chat, &mut me, b"ee\n");
            seen.extend(out.broadcasts.into_iter().map(|b| b.0));
            let name = "guest-4";
            let want: Vec<Vec<u8>> = ["one", "two", "three"]
                .iter()
                .map(|t| format!("{name}: {t}\n").into_bytes())
                .collect();
            assert_eq!(seen, want);
        }

        #[test]
        fn quit_drops_the_held_input() {
            let (mut chat, mut me) = crowd(1, 1);
            say(&mut chat, &mut me, b"a\n/quit\nb\nc\n");
            let mut out = Recorder::default();
            chat.resume(&mut me, &mut out);
            assert_eq!(out.replies, b"* bye\n");
            assert!(!chat.backlog(&me));
        }
    }

    mod leaving {
        use super::*;

        #[test]
        fn the_others_are_told() {
            let (mut chat, a, _b) = room();
            let mut out = Recorder::default();
            chat.close(a, &mut out);
            assert_eq!(
                out.broadcasts,
                vec![(b"* guest-1 left\n".to_vec(), Audience::Others)]
            );
        }
    }
}
