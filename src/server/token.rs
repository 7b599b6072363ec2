//! The server's token layout: which `mio::Token` stands for which socket.
//!
//! One `Poll` watches everything, and an event carries only its token, so
//! the token says what the socket is:
//!
//! ```text
//!   0  LISTENER_TCP     3  SIGNALS
//!   1  LISTENER_UNIX    4  METRICS (the metrics endpoint's own Poll)
//!   2  UDP              5  STOP        6..15 free for the server's own
//!  16.. connections:  slab key + 16 in the low 32 bits, generation above
//! ```
//!
//! A connection closed while one event of a batch is handled frees its
//! slab key, and an accept later in the same batch may reuse it. A later
//! event of the batch still carries the old generation, so it no longer
//! matches the connection under that key and is ignored instead of being
//! handed to the newcomer. The same check makes stale ready-list entries
//! and timer entries harmless.

use std::fmt;

use mio::Token;

/// The TCP listener.
pub const LISTENER_TCP: Token = Token(0);
/// The Unix-domain listener.
pub const LISTENER_UNIX: Token = Token(1);
/// The UDP echo socket.
pub const UDP: Token = Token(2);
/// SIGINT and SIGTERM, delivered through a self-pipe by signal-hook-mio.
pub const SIGNALS: Token = Token(3);
/// The metrics listener (`--metrics`).
pub const METRICS: Token = Token(4);
/// The stop handle's `mio::Waker`: another thread asks for a graceful
/// shutdown (tests that run the server in-process).
pub const STOP: Token = Token(5);
/// Tokens below this are the server's own sockets; connections start here.
const FIRST_CONNECTION: usize = 16;
/// Generations wrap at 31 bits, so a connection token never collides with
/// the fixed tokens above, whatever the key.
const GENERATION_MASK: u32 = 0x7fff_ffff;

/// The token of the connection at slab `key` with `generation`.
/// The one place where keys become tokens; [`connection_key`] is its inverse.
pub fn connection_token(key: usize, generation: u32) -> Token {
    Token((((generation & GENERATION_MASK) as usize) << 32) | (key + FIRST_CONNECTION))
}

/// The slab key and generation in a connection token; `None` for the
/// server's own tokens.
pub fn connection_key(token: Token) -> Option<(usize, u32)> {
    let low = token.0 & 0xffff_ffff;
    (low >= FIRST_CONNECTION).then(|| (low - FIRST_CONNECTION, (token.0 >> 32) as u32))
}

/// The generation after `g`, wrapping within the bits a token carries.
pub fn next_generation(g: u32) -> u32 {
    g.wrapping_add(1) & GENERATION_MASK
}

/// A token as the logs show it: `conn 3#17` is slab key 3, generation 17.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenName(pub Token);

impl fmt::Display for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            LISTENER_TCP => f.write_str("tcp listener"),
            LISTENER_UNIX => f.write_str("unix listener"),
            UDP => f.write_str("udp socket"),
            SIGNALS => f.write_str("signals"),
            METRICS => f.write_str("metrics listener"),
            STOP => f.write_str("stop handle"),
            t => match connection_key(t) {
                Some((key, generation)) => write!(f, "conn {key}#{generation}"),
                None => write!(f, "token {}", t.0),
            },
        }
    }
}

/// A set of the server's own tokens (listeners, UDP, signals: those below
/// the first connection token), such as "already on the ready list".
/// Every fixed token has a bit, so no token can index past it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedTokens(u16);

impl FixedTokens {
    /// Adds `token`; false if it was there already. `token` must be one of
    /// the server's own (callers check with [`connection_key`]).
    pub fn insert(&mut self, token: Token) -> bool {
        debug_assert!(token.0 < FIRST_CONNECTION);
        let bit = 1u16 << (token.0 % FIRST_CONNECTION);
        let new = self.0 & bit == 0;
        self.0 |= bit;
        new
    }

    /// Removes `token`.
    pub fn remove(&mut self, token: Token) {
        self.0 &= !(1u16 << (token.0 % FIRST_CONNECTION));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_round_trip_and_never_collide_with_fixed_ones() {
        for (key, generation) in [
            (0, 0),
            (0, 1),
            (12345, GENERATION_MASK),
            (u32::MAX as usize - 16, 7),
        ] {
            let t = connection_token(key, generation);
            assert!(t.0 >= FIRST_CONNECTION);
            assert_eq!(connection_key(t), Some((key, generation)));
        }
        for fixed in [LISTENER_TCP, LISTENER_UNIX, UDP, SIGNALS, Token(15)] {
            assert_eq!(connection_key(fixed), None);
        }
        assert_ne!(
            connection_token(3, 1),
            connection_token(3, 2),
            "a reused key gets a new token"
        );
    }

    #[test]
    fn generations_wrap_within_31_bits() {
        assert_eq!(next_generation(GENERATION_MASK), 0);
        assert_eq!(next_generation(5), 6);
    }

    #[test]
    fn a_fixed_token_is_in_the_set_once() {
        let mut set = FixedTokens::default();
        assert!(set.insert(UDP));
        assert!(!set.insert(UDP));
        assert!(set.insert(Token(15)), "every fixed token has a bit");
        set.remove(UDP);
        assert!(set.insert(UDP));
    }

    #[test]
    fn logs_name_tokens_by_what_they_are() {
        assert_eq!(TokenName(UDP).to_string(), "udp socket");
        assert_eq!(TokenName(connection_token(3, 17)).to_string(), "conn 3#17");
    }
}
