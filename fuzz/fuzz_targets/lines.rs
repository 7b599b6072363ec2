//! The line splitter, fed a stream cut anywhere: it never panics, never
//! holds more than `max + 1` bytes, hands out only lines of at most `max`
//! bytes, and gives the same lines however the stream is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reactor::protocol::lines::LineSplitter;

fuzz_target!(|data: &[u8]| {
    let [max, cut_seed, stream @ ..] = data else {
        return;
    };
    let max = *max as usize % 64 + 1;
    let whole = split(&[stream], max);
    // Cut points from the seed: a small generator, so libFuzzer explores
    // cuts by mutating one byte.
    let mut pieces = Vec::new();
    let mut rest = stream;
    let mut x = *cut_seed as usize | 1;
    while !rest.is_empty() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
        let n = (x % 9).min(rest.len());
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    let cut = split(&pieces, max);
    assert_eq!(whole.0, cut.0, "the same lines however the stream is cut");
    assert_eq!(whole.1, cut.1, "the same verdict on a too-long line");
});

fn split(pieces: &[&[u8]], max: usize) -> (Vec<Vec<u8>>, bool) {
    let mut s = LineSplitter::default();
    let mut lines = Vec::new();
    for p in pieces {
        let r = s.push(p, max, |l| {
            assert!(l.len() <= max);
            assert!(!l.contains(&b'\n'));
            lines.push(l.to_vec());
        });
        assert!(s.pending() <= max + 1);
        if r.is_err() {
            return (lines, false);
        }
    }
    (lines, true)
}
