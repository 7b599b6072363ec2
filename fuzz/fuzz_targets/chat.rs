//! The chat protocol, three clients sending arbitrary bytes cut anywhere,
//! with a small output budget so input is held back and resumed:
//! - it never panics;
//! - the output of any one call is bounded (budget plus one line's worth),
//!   and all output is bounded by the input times a small factor;
//! - every relayed line is exactly a line its sender sent, in order.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use reactor::protocol::{Chat, Protocol, Recorder};

const CLIENTS: usize = 3;
const MAX_LINE: usize = 40;
/// The most one line can cause: a `/who` of three 32-byte names, or a
/// relayed line with a name, or a rename, with room to spare.
const ONE_LINE: usize = 256;

fuzz_target!(|data: &[u8]| {
    let [budget, ops @ ..] = data else {
        return;
    };
    let budget = *budget as usize * 4 + 1;
    let mut chat = Chat::new(MAX_LINE).with_budget(budget);
    let mut out = Recorder::default();
    let mut sessions: Vec<_> = (0..CLIENTS).map(|_| chat.open(&mut out)).collect();
    let mut reference: Vec<Reference> = (0..CLIENTS).map(|_| Reference::default()).collect();
    let mut input = 0;
    let mut output = 0;
    // Each op: one byte picks the client and the length, the bytes follow.
    let mut rest = ops;
    while let [head, tail @ ..] = rest {
        let who = *head as usize % CLIENTS;
        let n = (*head as usize / CLIENTS).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        input += bytes.len();
        reference[who].feed(bytes);
        let mut calls = 0;
        let mut out = Recorder::default();
        chat.data(&mut sessions[who], bytes, &mut out);
        loop {
            let spent = out.replies.len() + out.broadcasts.iter().map(|b| b.0.len()).sum::<usize>();
            assert!(spent <= budget + ONE_LINE, "one call made {spent} bytes");
            output += spent;
            for (chunk, _) in &out.broadcasts {
                if chunk.starts_with(b"* ") {
                    continue; // the server's own notices
                }
                // `NAME: TEXT\n`; names have no ':' or ' '.
                let sep = chunk
                    .windows(2)
                    .position(|w| w == b": ")
                    .expect("relayed line");
                let text = &chunk[sep + 2..chunk.len() - 1];
                let want = reference[who]
                    .lines
                    .pop_front()
                    .expect("a line that was sent");
                assert_eq!(text, &want[..], "relayed exactly as sent");
            }
            if !chat.backlog(&sessions[who]) {
                break;
            }
            calls += 1;
            assert!(calls <= bytes.len() + 1, "held input always shrinks");
            out = Recorder::default();
            chat.resume(&mut sessions[who], &mut out);
        }
        // Everything complete that was sent has been relayed, unless the
        // client quit or was refused (the rest is discarded).
        if !reference[who].done {
            assert!(reference[who].lines.is_empty(), "a line went missing");
        }
    }
    assert!(
        output <= 32 * input + 1024,
        "{output} bytes out for {input} in"
    );
    for s in sessions {
        chat.close(s, &mut Recorder::default());
    }
});

/// What a client's lines should become, worked out independently.
#[derive(Default)]
struct Reference {
    partial: Vec<u8>,
    /// Lines to be relayed, in order.
    lines: VecDeque<Vec<u8>>,
    /// Quit, or refused for a too-long line.
    done: bool,
}

impl Reference {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b != b'\n' {
                self.partial.push(b);
                if self.partial.len() > MAX_LINE + 1 {
                    self.done = true;
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > MAX_LINE || line == b"/quit" || line == b"!DISCONNECT" {
                self.done = true;
            } else if !line.is_empty() && !line.starts_with(b"/") {
                self.lines.push_back(line);
            }
        }
    }
}
