//! `reactor connect --udp`'s cutting of standard input into datagrams:
//! every byte but line ends goes out, in order, no datagram passes the
//! limit, and no more than one datagram's worth is ever held.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use reactor::client::connect::{Datagrams, MAX_DATAGRAM};

fuzz_target!(|data: &[u8]| {
    let [fill, rest @ ..] = data else {
        return;
    };
    // A long run of filler first, so the limit is reached too.
    let mut input = vec![b'f'; *fill as usize * 300];
    input.extend_from_slice(rest);
    let mut d = Datagrams::default();
    let mut out = VecDeque::new();
    for piece in input.chunks(4096) {
        d.push(piece, &mut out);
        assert!(d.pending() <= MAX_DATAGRAM);
    }
    d.finish(&mut out);
    assert!(out.iter().all(|g| g.len() <= MAX_DATAGRAM));
    // Without line ends (and the `\r` just before one), the bytes match.
    let sent: Vec<u8> = out.iter().flatten().copied().collect();
    let mut want = Vec::new();
    for line in input.split(|&b| b == b'\n') {
        want.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
    }
    if input.last() != Some(&b'\n') {
        // The last piece had no newline: its `\r` (if any) is kept.
        let tail = input.rsplit(|&b| b == b'\n').next().unwrap_or(&[]);
        if tail.ends_with(b"\r") {
            want.push(b'\r');
        }
    }
    assert_eq!(sent, want);
});
