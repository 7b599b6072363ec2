//! The metrics endpoint's HTTP handling, fed any bytes cut anywhere, with
//! the socket taking any number of bytes per write: it never panics, never
//! buffers more than one request's worth of input, answers only with well
//! formed status lines, and once it says "close" it takes no more input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reactor::metrics::http::{Exchange, Want, MAX_REQUEST};

fuzz_target!(|data: &[u8]| {
    let [cut_seed, write_seed, stream @ ..] = data else {
        return;
    };
    let mut ex = Exchange::default();
    let mut metrics = || "reactor_up 1\n".to_string();
    let mut out = Vec::new();
    let mut rest = stream;
    let (mut x, mut y) = (*cut_seed as usize | 1, *write_seed as usize | 1);
    let mut closed = false;
    // Bounded: every turn either takes input, writes output or ends.
    for _ in 0..(stream.len() * 2 + 64) {
        match ex.wants() {
            Want::Close => {
                closed = true;
                break;
            }
            Want::Write => {
                assert_eq!(ex.room(), 0, "no input while a response is pending");
                y = y.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
                let n = (y % 97 + 1).min(ex.pending().len());
                out.extend_from_slice(&ex.pending()[..n]);
                ex.on_written(n, &mut metrics);
            }
            Want::Read if rest.is_empty() => {
                ex.on_eof();
            }
            Want::Read => {
                let room = ex.room();
                assert!(room <= MAX_REQUEST);
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
                let n = (x % 300 + 1).min(rest.len()).min(room);
                if n == 0 {
                    // A full buffer with no complete request must have
                    // been answered (431) already.
                    panic!("no room and nothing to write: the exchange is stuck");
                }
                ex.on_bytes(&rest[..n], &mut metrics);
                rest = &rest[n..];
            }
        }
    }
    assert!(closed || rest.is_empty() || ex.wants() != Want::Read);
    // Every response starts with a status line of ours.
    let text = String::from_utf8_lossy(&out);
    for (i, _) in text.match_indices("HTTP/1.1 ") {
        let code = &text[i + 9..(i + 12).min(text.len())];
        assert!(
            matches!(code, "200" | "400" | "404" | "405" | "431"),
            "unexpected status {code:?}"
        );
    }
    if !out.is_empty() {
        assert!(out.starts_with(b"HTTP/1.1 "), "output starts with a status line");
    }
});
