//! Splitting a byte stream into `\n`-terminated lines with a length limit.
//!
//! Reads cut a stream anywhere, so a line may arrive in pieces. The
//! splitter keeps only the unfinished tail of the stream, and never more
//! than `max + 1` bytes of it (`max` bytes of text plus a `\r`), so a
//! client that never sends `\n` cannot grow the server's memory. Complete
//! lines inside one read are handed out as slices of that read, with no
//! copy.

use memchr::memchr;

/// The stream held a line longer than the limit. The splitter should not
/// be used again.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong;

/// Cuts a byte stream into lines of at most `max` bytes each.
///
/// ```
/// use reactor::protocol::lines::{LineSplitter, TooLong};
///
/// let mut splitter = LineSplitter::default();
/// let mut lines = Vec::new();
/// // A read may end in the middle of a line...
/// splitter.push(b"hello\r\nwor", 16, |l| lines.push(l.to_vec())).unwrap();
/// assert_eq!(splitter.pending(), 3);
/// // ...and the next read completes it.
/// splitter.push(b"ld\n", 16, |l| lines.push(l.to_vec())).unwrap();
/// assert_eq!(lines, [b"hello".to_vec(), b"world".to_vec()]);
/// // Past the limit the stream is refused, however it is cut.
/// assert_eq!(splitter.push(&[b'x'; 100], 16, |_| {}), Err(TooLong));
/// ```
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Bytes of an unfinished line held so far.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Feeds `input`, calling `line` for each complete line, without its
    /// `\n` and without one `\r` just before it. Stops at the first line
    /// longer than `max` bytes and returns [`TooLong`]; lines before it
    /// have been handed out.
    pub fn push(
        &mut self,
        input: &[u8],
        max: usize,
        mut line: impl FnMut(&[u8]),
    ) -> Result<(), TooLong> {
        self.feed(input, max, |l| {
            line(l);
            true
        })
        .map(|_| ())
    }

    /// Like [`LineSplitter::push`], but `line` may say "enough for now" by
    /// returning `false`: the splitter then stops right after that line
    /// and returns how many bytes of `input` it consumed. The caller keeps
    /// the rest and feeds it again later; nothing of it was looked at.
    pub fn feed(
        &mut self,
        input: &[u8],
        max: usize,
        mut line: impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, TooLong> {
        let mut rest = input;
        while let Some(nl) = memchr(b'\n', rest) {
            let head = &rest[..nl];
            rest = &rest[nl + 1..];
            let go_on = if self.partial.is_empty() {
                line(check(strip_cr(head), max)?)
            } else {
                if self.partial.len() + head.len() > max + 1 {
                    return Err(TooLong);
                }
                self.partial.extend_from_slice(head);
                // `take` leaves an empty Vec that owns nothing, so the
                // allocation is kept only while lines keep arriving in
                // pieces.
                let whole = std::mem::take(&mut self.partial);
                line(check(strip_cr(&whole), max)?)
            };
            if !go_on {
                return Ok(input.len() - rest.len());
            }
        }
        // `max` text bytes plus a `\r` may still be waiting for their `\n`.
        if self.partial.len() + rest.len() > max + 1 {
            return Err(TooLong);
        }
        self.partial.extend_from_slice(rest);
        Ok(input.len())
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn check(line: &[u8], max: usize) -> Result<&[u8], TooLong> {
    if line.len() > max {
        Err(TooLong)
    } else {
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_all(pieces: &[&[u8]], max: usize) -> (Vec<Vec<u8>>, Result<(), TooLong>) {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        for p in pieces {
            if let Err(e) = s.push(p, max, |l| lines.push(l.to_vec())) {
                return (lines, Err(e));
            }
        }
        (lines, Ok(()))
    }

    #[test]
    fn lines_in_one_read_are_split() {
        let (lines, r) = split_all(&[b"a\nbb\n\nccc\n"], 10);
        assert_eq!(
            lines,
            vec![b"a".to_vec(), b"bb".to_vec(), b"".to_vec(), b"ccc".to_vec()]
        );
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn one_cr_before_the_newline_is_dropped() {
        let (lines, _) = split_all(&[b"x\r\n", b"y\r\r\n", b"\rz\n"], 10);
        assert_eq!(lines, vec![b"x".to_vec(), b"y\r".to_vec(), b"\rz".to_vec()]);
    }

    #[test]
    fn a_line_cut_across_reads_is_joined() {
        let (lines, _) = split_all(&[b"hel", b"lo wo", b"rld\nnext"], 20);
        assert_eq!(lines, vec![b"hello world".to_vec()]);
    }

    #[test]
    fn exactly_max_bytes_is_accepted_and_one_more_is_not() {
        let ok = [b'a'; 8];
        let (lines, r) = split_all(&[&ok, b"\r\n"], 8);
        assert_eq!((lines.len(), r), (1, Ok(())));
        let long = [b'a'; 9];
        let (_, r) = split_all(&[&long[..4], &long[4..], b"\n"], 8);
        assert_eq!(r, Err(TooLong));
        let (_, r) = split_all(&[&long, b"\n"], 8);
        assert_eq!(r, Err(TooLong));
    }

    #[test]
    fn an_unfinished_line_is_refused_once_it_passes_max_plus_one() {
        let mut s = LineSplitter::default();
        assert_eq!(
            s.push(&[b'a'; 9], 8, |_| ()),
            Ok(()),
            "8 bytes + a possible \\r"
        );
        assert_eq!(s.push(b"a", 8, |_| ()), Err(TooLong));
    }

    #[test]
    fn memory_never_passes_the_limit() {
        let mut s = LineSplitter::default();
        let chunk = [b'x'; 1000];
        let mut refused = false;
        for _ in 0..10_000 {
            if s.push(&chunk, 4096, |_| ()).is_err() {
                refused = true;
                break;
            }
            assert!(s.pending() <= 4097);
        }
        assert!(refused);
    }

    #[test]
    fn feed_stops_after_the_line_that_says_enough() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        let input = b"a\nbb\ncc";
        let used = s
            .feed(input, 8, |l| {
                lines.push(l.to_vec());
                false
            })
            .unwrap();
        assert_eq!((used, s.pending()), (2, 0));
        let used = s
            .feed(&input[2..], 8, |l| {
                lines.push(l.to_vec());
                true
            })
            .unwrap();
        assert_eq!(
            (used, s.pending()),
            (5, 2),
            "the tail waits for its newline"
        );
        assert_eq!(lines, vec![b"a".to_vec(), b"bb".to_vec()]);
    }

    proptest! {
        /// However the stream is cut into reads, the same lines come out.
        #[test]
        fn cutting_the_stream_anywhere_gives_the_same_lines(
            text in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..20),
            max in 1usize..40,
        ) {
            let whole = split_all(&[&text], max);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(&text[at..c]);
                at = c;
            }
            pieces.push(&text[at..]);
            let cut = split_all(&pieces, max);
            prop_assert_eq!(&whole.0, &cut.0);
            // The verdict on a too-long line may come earlier when a tail
            // arrives before its newline, never later and never differently
            // for the lines already handed out.
            prop_assert_eq!(whole.1.is_ok(), cut.1.is_ok());
        }
    }
}
