//! The load tool's reply checker: arbitrary bytes never panic it; the
//! right bytes, cut anywhere, complete exactly the messages sent; one
//! changed byte is found at exactly its place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reactor::client::load::message::{byte, Checker, Template};

fuzz_target!(|data: &[u8]| {
    let [size, conn, count, flip_at, rest @ ..] = data else {
        return;
    };
    let size = *size as usize % 100 + 1;
    let conn = u32::from(*conn) * 0x0101_0101;
    let t = Template::new(size);
    // Anything at all: no panic, and no more messages than bytes allow.
    let mut c = Checker::default();
    if let Ok(n) = c.feed(&t, conn, rest) {
        assert!(n as usize <= rest.len() / size);
    }
    // The real stream, cut where `rest` says.
    let count = *count as u32 % 16;
    let mut sent = Vec::new();
    for seq in 0..count {
        t.append(&mut sent, conn, seq);
    }
    // The template builds exactly what `byte` describes.
    for (i, &b) in sent.iter().enumerate() {
        assert_eq!(b, byte(conn, (i / size) as u32, size, i % size));
    }
    let mut c = Checker::default();
    let mut done = 0;
    let mut at = 0;
    for &cut in rest.iter().chain(std::iter::once(&255)) {
        let end = (at + cut as usize % 37).min(sent.len());
        done += c
            .feed(&t, conn, &sent[at..end])
            .expect("the right bytes pass");
        at = end;
    }
    done += c.feed(&t, conn, &sent[at..]).expect("the right bytes pass");
    assert_eq!(done, count);
    // One flipped bit is found where it is.
    if !sent.is_empty() {
        let i = *flip_at as usize % sent.len();
        sent[i] ^= 1 << (flip_at % 8);
        let err = Checker::default().feed(&t, conn, &sent).unwrap_err();
        assert_eq!(err.seq as usize * size + err.offset, i);
    }
});
