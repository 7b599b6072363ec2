//! Protocols: what the server says, kept apart from how bytes move.
//!
//! A protocol never touches a socket. The loop hands it the bytes a client
//! sent and an [`Outbox`]; the protocol answers through the outbox (a reply
//! to the sender, a broadcast to others, a request to close). The event
//! loop, the one-thread-per-client engine and the unit tests each provide
//! their own outbox, so the same protocol code runs under all three.
//!
//! Adding a protocol is one new file with a type that implements
//! [`Protocol`], plus one line where the CLI picks the mode.

use std::rc::Rc;

pub mod chat;
pub mod echo;
pub mod lines;

pub use chat::Chat;
pub use echo::Echo;

/// Who receives a broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every open client, the sender included.
    Everyone,
    /// Every open client but the sender.
    Others,
}

/// How a protocol asks to end the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Send everything queued so far, then close.
    AfterFlush,
    /// Send everything queued so far, shut the write side, and discard
    /// input for a short while before closing, so that a client still
    /// sending does not turn the close into a reset that loses the last
    /// reply (chat's `* error: line too long`, and `* bye` after `/quit`).
    Linger,
}

/// What the server does when the output queued for all clients together
/// reaches `--max-memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtMemoryCap {
    /// Stop reading from clients whose input would queue more, and read
    /// from them again, in turn, as memory frees (echo: nothing is lost).
    Pause,
    /// Disconnect the client with the most queued output, as a slow
    /// consumer (chat: one reader must not hold the room's memory).
    DropLargest,
}

/// Where a protocol sends its output.
pub trait Outbox {
    /// Bytes for the client whose input is being handled, after any
    /// earlier reply.
    fn reply(&mut self, bytes: &[u8]);
    /// One shared chunk for many clients; implementations queue the same
    /// allocation on every recipient rather than copying it.
    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience);
    /// Ends this client's connection once its replies are written.
    fn close(&mut self, how: Close);
}

/// A protocol served over a byte stream.
///
/// The server keeps one `Self` for all clients (chat's list of names) and
/// one [`Protocol::Session`] per client (chat's partial line).
pub trait Protocol {
    /// Per-connection state. Echo needs none (`()`), which keeps an idle
    /// echo connection as small as the socket itself.
    type Session;

    /// See [`AtMemoryCap`].
    const AT_MEMORY_CAP: AtMemoryCap = AtMemoryCap::Pause;

    /// True when the protocol's only output is its input, to the sender,
    /// unchanged, byte for byte (echo). The server may then serve such a
    /// client at the memory cap without queueing anything: look at the
    /// input without taking it, write it back, and take only what the
    /// socket accepted.
    const MIRRORS_INPUT: bool = false;

    /// A client connected.
    fn open(&mut self, out: &mut impl Outbox) -> Self::Session;

    /// A client was accepted and at once turned away because the server is
    /// full. Returns the line to send it before the close (may be empty).
    fn reject(&mut self) -> &'static [u8];

    /// The client sent `input`.
    fn data(&mut self, session: &mut Self::Session, input: &[u8], out: &mut impl Outbox);

    /// True when the last [`Protocol::data`] or [`Protocol::resume`] left
    /// input it has not acted on yet, because that read's output budget ran
    /// out (see [`chat`]'s "Amplification"). The server then calls
    /// [`Protocol::resume`] on a later turn, after other clients had theirs,
    /// and reads nothing more from this client until this is false again.
    fn backlog(&self, _session: &Self::Session) -> bool {
        false
    }

    /// Acts on (part of) the input held back; see [`Protocol::backlog`].
    fn resume(&mut self, _session: &mut Self::Session, _out: &mut impl Outbox) {}

    /// The client half-closed: no more input will come. Replies are still
    /// delivered; the default closes once they are written.
    fn eof(&mut self, _session: &mut Self::Session, out: &mut impl Outbox) {
        out.close(Close::AfterFlush);
    }

    /// The client is gone, for whatever reason. Only broadcasts can reach
    /// anyone now.
    fn close(&mut self, session: Self::Session, out: &mut impl Outbox);
}

/// An [`Outbox`] that records what a protocol did, for tests.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Everything sent to the current client.
    pub replies: Vec<u8>,
    /// Every broadcast, in order.
    pub broadcasts: Vec<(Vec<u8>, Audience)>,
    /// The close requested, if any.
    pub closed: Option<Close>,
}

impl Outbox for Recorder {
    fn reply(&mut self, bytes: &[u8]) {
        self.replies.extend_from_slice(bytes);
    }
    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience) {
        self.broadcasts.push((chunk.to_vec(), to));
    }
    fn close(&mut self, how: Close) {
        self.closed = Some(how);
    }
}
