//! What a load message looks like, so every byte that comes back can be
//! checked against what was sent.
//!
//! Message `seq` of connection `conn` is `size` bytes: the connection id
//! (4 bytes, little-endian), the sequence number (4 bytes), then filler.
//! Filler byte `offset` is `FILL[(seq + 37 conn + offset) mod 256]`, where
//! `FILL` is a fixed permutation of the 256 byte values in which
//! neighbours always differ. So consecutive messages differ at every
//! offset (messages shorter than the header are all filler, and still
//! differ), a stream shifted by a byte does not match, and any byte the
//! peer changes, drops, duplicates or reorders shows up as a mismatch at a
//! known connection, message and offset.
//!
//! No table of sent bytes is kept. Because the filler only depends on
//! `(seq + 37 conn + offset) mod 256`, every message's filler is a window
//! of one string, `FILL` repeated to `size + 256` bytes: a [`Template`].
//! Building a message is two slice copies, and checking a reply is two
//! slice comparisons (`memcmp`), not a computed byte and a branch per byte.

/// Length of the header (connection id, sequence number).
pub const HEADER: usize = 8;

/// The filler alphabet: `x -> 167 x XOR 0x5a` is a bijection on bytes (167
/// is odd), and `FILL[x] != FILL[x + 1]` because `167 != 0 mod 256`.
const fn fill(x: usize) -> u8 {
    ((x as u8).wrapping_mul(167)) ^ 0x5a
}

/// Where message `seq` of connection `conn` starts in the filler string.
#[inline]
fn phase(conn: u32, seq: u32) -> usize {
    (seq.wrapping_add(conn.wrapping_mul(37)) & 0xff) as usize
}

/// Byte `offset` of message `seq` (of `size` bytes) on connection `conn`.
#[inline]
pub fn byte(conn: u32, seq: u32, size: usize, offset: usize) -> u8 {
    match offset {
        0..=3 if size >= HEADER => conn.to_le_bytes()[offset],
        4..=7 if size >= HEADER => seq.to_le_bytes()[offset - 4],
        _ => fill(phase(conn, seq) + offset),
    }
}

/// Every message of one size, precomputed: the header is built from
/// `conn` and `seq`, the filler is a slice of a shared string.
///
/// ```
/// use reactor::client::load::message::{byte, Template};
///
/// let t = Template::new(64);
/// let mut m = Vec::new();
/// t.append(&mut m, 7, 3);
/// assert!(m.iter().enumerate().all(|(i, &b)| b == byte(7, 3, 64, i)));
/// ```
#[derive(Debug, Clone)]
pub struct Template {
    size: usize,
    /// `FILL` repeated: `size + 256` bytes.
    filler: Vec<u8>,
}

impl Template {
    /// The template for `size`-byte messages.
    pub fn new(size: usize) -> Template {
        Template {
            size,
            filler: (0..size + 256).map(fill).collect(),
        }
    }

    /// Bytes per message.
    pub fn size(&self) -> usize {
        self.size
    }

    fn header(&self, conn: u32, seq: u32) -> [u8; HEADER] {
        let mut h = [0; HEADER];
        h[..4].copy_from_slice(&conn.to_le_bytes());
        h[4..].copy_from_slice(&seq.to_le_bytes());
        h
    }

    /// True when `data` is exactly bytes `from..from + data.len()` of
    /// message `seq` on `conn`.
    #[inline]
    pub fn matches(&self, conn: u32, seq: u32, from: usize, data: &[u8]) -> bool {
        let to = from + data.len();
        let head_end = if self.size >= HEADER { HEADER } else { 0 };
        let mut data = data;
        let mut at = from;
        if at == 0 && head_end == HEADER && data.len() >= HEADER {
            // The common case, a whole header: one integer comparison
            // rather than a call to memcmp for 8 bytes.
            let got = u64::from_le_bytes(data[..HEADER].try_into().expect("8 bytes"));
            if got != u64::from(conn) | u64::from(seq) << 32 {
                return false;
            }
            data = &data[HEADER..];
            at = HEADER;
        }
        if at < head_end {
            let n = head_end.min(to) - at;
            if data[..n] != self.header(conn, seq)[at..at + n] {
                return false;
            }
            data = &data[n..];
            at += n;
        }
        let start = phase(conn, seq) + at;
        data == &self.filler[start..start + data.len()]
    }

    /// Appends message `seq` of connection `conn` to `out`.
    #[inline]
    pub fn append(&self, out: &mut Vec<u8>, conn: u32, seq: u32) {
        let start = phase(conn, seq);
        if self.size >= HEADER {
            out.extend_from_slice(&self.header(conn, seq));
            out.extend_from_slice(&self.filler[start + HEADER..start + self.size]);
        } else {
            out.extend_from_slice(&self.filler[start..start + self.size]);
        }
    }
}

/// The first byte that differs from what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Connection id.
    pub conn: u32,
    /// Message number on that connection.
    pub seq: u32,
    /// Offset in the message.
    pub offset: usize,
    /// The byte sent.
    pub expected: u8,
    /// The byte that came back.
    pub got: u8,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection {} message {} byte {}: sent 0x{:02x}, got 0x{:02x}",
            self.conn, self.seq, self.offset, self.expected, self.got
        )
    }
}

/// Checks a reply stream as it arrives, message by message.
///
/// ```
/// use reactor::client::load::message::{Checker, Template};
///
/// let t = Template::new(64);
/// let mut sent = Vec::new();
/// t.append(&mut sent, 7, 0);
/// t.append(&mut sent, 7, 1);
/// let mut check = Checker::default();
/// // The echo may come back in any pieces.
/// assert_eq!(check.feed(&t, 7, &sent[..100]).unwrap(), 1);
/// assert_eq!(check.feed(&t, 7, &sent[100..]).unwrap(), 1);
/// // One changed byte is found, and named.
/// let mut bad = sent.clone();
/// bad[70] ^= 1;
/// let err = Checker::default().feed(&t, 7, &bad).unwrap_err();
/// assert_eq!((err.seq, err.offset), (1, 6));
/// ```
#[derive(Debug, Default)]
pub struct Checker {
    /// The message being received.
    pub seq: u32,
    /// Bytes of it received so far.
    pub offset: usize,
}

impl Checker {
    /// Feeds received bytes and returns how many messages they completed.
    /// Stops at the first wrong byte.
    pub fn feed(&mut self, t: &Template, conn: u32, mut data: &[u8]) -> Result<u32, Mismatch> {
        let size = t.size;
        let mut completed = 0;
        while !data.is_empty() {
            let take = data.len().min(size - self.offset);
            if !t.matches(conn, self.seq, self.offset, &data[..take]) {
                // The slow path, once per failed run: find the byte.
                let (i, expected, got) = (0..take)
                    .map(|i| (i, byte(conn, self.seq, size, self.offset + i), data[i]))
                    .find(|(_, e, g)| e != g)
                    .expect("a slice that does not match has a differing byte");
                return Err(Mismatch {
                    conn,
                    seq: self.seq,
                    offset: self.offset + i,
                    expected,
                    got,
                });
            }
            self.offset += take;
            data = &data[take..];
            if self.offset == size {
                completed += 1;
                self.seq = self.seq.wrapping_add(1);
                self.offset = 0;
            }
        }
        Ok(completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(conn: u32, n: u32, size: usize) -> Vec<u8> {
        let t = Template::new(size);
        let mut v = Vec::new();
        for seq in 0..n {
            t.append(&mut v, conn, seq);
        }
        v
    }

    #[test]
    fn messages_carry_connection_and_sequence() {
        let v = stream(0x0102_0304, 10, 16);
        assert_eq!(&v[16 * 9..16 * 9 + 8], &[4, 3, 2, 1, 9, 0, 0, 0]);
    }

    #[test]
    fn the_template_builds_the_bytes_byte_describes() {
        for size in [1, 7, 8, 9, 64, 300] {
            let t = Template::new(size);
            for (conn, seq) in [(0, 0), (3, 255), (1000, 70_000), (u32::MAX, u32::MAX)] {
                let mut m = Vec::new();
                t.append(&mut m, conn, seq);
                let want: Vec<u8> = (0..size).map(|i| byte(conn, seq, size, i)).collect();
                assert_eq!(m, want, "size {size} conn {conn} seq {seq}");
                for from in [0, size / 3, size - 1] {
                    assert!(t.matches(conn, seq, from, &want[from..]));
                }
            }
        }
    }

    #[test]
    fn an_intact_stream_completes_every_message_however_it_is_cut() {
        let t = Template::new(37);
        let data = stream(5, 20, 37);
        for cut in [1, 7, 37, 64, 1000] {
            let mut c = Checker::default();
            let mut done = 0;
            for piece in data.chunks(cut) {
                done += c.feed(&t, 5, piece).unwrap();
            }
            assert_eq!((done, c.seq, c.offset), (20, 20, 0), "cut {cut}");
        }
    }

    #[test]
    fn one_flipped_byte_is_found_where_it_is() {
        let t = Template::new(64);
        for at in [3, 6, 40, 63] {
            let mut data = stream(2, 4, 64);
            data[64 * 2 + at] ^= 0x20;
            let err = Checker::default().feed(&t, 2, &data).unwrap_err();
            assert_eq!((err.seq, err.offset), (2, at));
            assert_eq!(err.got, err.expected ^ 0x20);
        }
    }

    #[test]
    fn a_dropped_or_duplicated_byte_is_found() {
        let t = Template::new(64);
        let data = stream(2, 4, 64);
        let mut dropped = data.clone();
        dropped.remove(100);
        assert!(Checker::default().feed(&t, 2, &dropped).is_err());
        let mut doubled = data.clone();
        doubled.insert(100, data[100]);
        assert!(Checker::default().feed(&t, 2, &doubled).is_err());
    }

    #[test]
    fn another_connections_bytes_do_not_pass() {
        let t = Template::new(64);
        let data = stream(3, 1, 64);
        assert!(Checker::default().feed(&t, 4, &data).is_err());
    }

    #[test]
    fn consecutive_messages_differ_even_when_tiny() {
        // A 1-byte echo that repeated an old byte would go unnoticed if
        // message n and n+1 were the same.
        let tiny: Vec<u8> = (0..600).map(|s| byte(7, s, 1, 0)).collect();
        assert!(tiny.windows(2).all(|w| w[0] != w[1]));
        let all: std::collections::HashSet<u8> = (0..256).map(fill).collect();
        assert_eq!(all.len(), 256);
    }
}
