//! Echo (RFC 862): every byte comes back to its sender, unchanged.

use super::{Outbox, Protocol};

/// The echo protocol. It has no state at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Protocol for Echo {
    type Session = ();

    const MIRRORS_INPUT: bool = true;

    fn open(&mut self, _out: &mut impl Outbox) {}

    fn reject(&mut self) -> &'static [u8] {
        // RFC 862 sends nothing but the client's own bytes.
        b""
    }

    fn data(&mut self, _session: &mut (), input: &[u8], out: &mut impl Outbox) {
        out.reply(input);
    }

    fn close(&mut self, _session: (), _out: &mut impl Outbox) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Close, Recorder};

    #[test]
    fn every_byte_comes_back_in_order() {
        let mut echo = Echo;
        let mut out = Recorder::default();
        echo.open(&mut out);
        echo.data(&mut (), b"hello ", &mut out);
        echo.data(&mut (), &[0, 255, b'\n'], &mut out);
        assert_eq!(out.replies, b"hello \x00\xff\n");
        assert!(out.broadcasts.is_empty());
    }

    #[test]
    fn eof_closes_after_the_echo_is_flushed() {
        let mut out = Recorder::default();
        Echo.eof(&mut (), &mut out);
        assert_eq!(out.closed, Some(Close::AfterFlush));
    }

    #[test]
    fn a_rejected_client_is_sent_nothing() {
        assert!(Echo.reject().is_empty());
    }
}
