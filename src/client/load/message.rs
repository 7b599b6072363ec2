//! What a load message looks like, so every byte that comes back can be
//! checked against what was sent.
//!
//! Message `seq` of connection `conn` is `size` bytes: the connection id
//! (4 bytes, little-endian), the sequence number (4 bytes), then filler
//! that depends on both and on the offset. Messages shorter than the
//! header are all filler, so consecutive ones still differ. Any byte the peer changes, drops, duplicates or
//! reorders shows up as a mismatch at a known connection, message and
//! offset, and no table of sent bytes is kept: the expected byte is
//! recomputed.

/// Length of the header (connection id, sequence number).
pub const HEADER: usize = 8;

/// Byte `offset` of message `seq` (of `size` bytes) on connection `conn`.
#[inline]
pub fn byte(conn: u32, seq: u32, size: usize, offset: usize) -> u8 {
    match offset {
        0..=3 if size >= HEADER => conn.to_le_bytes()[offset],
        4..=7 if size >= HEADER => seq.to_le_bytes()[offset - 4],
        _ => {
            // Differs between consecutive messages at every offset (the
            // low byte of seq + c changes when seq does), and varies
            // along the message so a shifted stream does not match.
            let along = (offset as u32).wrapping_mul(0x9E37_79B1) >> 24;
            let x = seq
                .wrapping_add(conn.wrapping_mul(37))
                .wrapping_add(offset as u32);
            (x as u8) ^ (along as u8)
        }
    }
}

/// Appends message `seq` of connection `conn` to `out`.
pub fn append(out: &mut Vec<u8>, conn: u32, seq: u32, size: usize) {
    out.extend((0..size).map(|i| byte(conn, seq, size, i)));
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
/// use reactor::client::load::message::{append, Checker};
///
/// let mut sent = Vec::new();
/// append(&mut sent, 7, 0, 64);
/// append(&mut sent, 7, 1, 64);
/// let mut check = Checker::default();
/// // The echo may come back in any pieces.
/// assert_eq!(check.feed(7, 64, &sent[..100]).unwrap(), 1);
/// assert_eq!(check.feed(7, 64, &sent[100..]).unwrap(), 1);
/// // One changed byte is found, and named.
/// let mut bad = sent.clone();
/// bad[70] ^= 1;
/// let err = Checker::default().feed(7, 64, &bad).unwrap_err();
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
    pub fn feed(&mut self, conn: u32, size: usize, mut data: &[u8]) -> Result<u32, Mismatch> {
        let mut completed = 0;
        while !data.is_empty() {
            let take = data.len().min(size - self.offset);
            for (i, &got) in data[..take].iter().enumerate() {
                let expected = byte(conn, self.seq, size, self.offset + i);
                if got != expected {
                    return Err(Mismatch {
                        conn,
                        seq: self.seq,
                        offset: self.offset + i,
                        expected,
                        got,
                    });
                }
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
        let mut v = Vec::new();
        for seq in 0..n {
            append(&mut v, conn, seq, size);
        }
        v
    }

    #[test]
    fn messages_carry_connection_and_sequence() {
        let mut v = Vec::new();
        append(&mut v, 0x0102_0304, 9, 16);
        assert_eq!(&v[..8], &[4, 3, 2, 1, 9, 0, 0, 0]);
    }

    #[test]
    fn an_intact_stream_completes_every_message_however_it_is_cut() {
        let data = stream(5, 20, 37);
        for cut in [1, 7, 37, 64, 1000] {
            let mut c = Checker::default();
            let mut done = 0;
            for piece in data.chunks(cut) {
                done += c.feed(5, 37, piece).unwrap();
            }
            assert_eq!((done, c.seq, c.offset), (20, 20, 0), "cut {cut}");
        }
    }

    #[test]
    fn one_flipped_byte_is_found_where_it_is() {
        let mut data = stream(2, 4, 64);
        data[64 * 2 + 40] ^= 0x20;
        let err = Checker::default().feed(2, 64, &data).unwrap_err();
        assert_eq!((err.seq, err.offset), (2, 40));
    }

    #[test]
    fn another_connections_bytes_do_not_pass() {
        let data = stream(3, 1, 64);
        assert!(Checker::default().feed(4, 64, &data).is_err());
    }

    #[test]
    fn consecutive_messages_differ_even_when_tiny() {
        // A 1-byte echo that repeated an old byte would go unnoticed if
        // message n and n+1 were the same.
        let tiny: Vec<u8> = (0..100).map(|s| byte(7, s, 1, 0)).collect();
        assert!(tiny.windows(2).all(|w| w[0] != w[1]));
    }
}
