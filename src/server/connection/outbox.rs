//! How a protocol's output reaches sockets while the loop handles one
//! connection: replies go straight to that connection's socket (queued
//! only when the kernel refuses them), broadcasts wait until the handler
//! is done and are then delivered recipient by recipient.

use std::io::{IoSlice, Write};
use std::rc::Rc;

use mio::Token;

use super::state::{State, Then};
use crate::buffer::OutQueue;
use crate::net::io::write_until_blocked;
use crate::net::Stream;
use crate::protocol::{Audience, Close, Outbox};
use crate::server::stats::Stats;
use crate::server::token::TokenName;

/// Most chunks in one vectored write of a broadcast batch.
const IOV_BATCH: usize = 256;

/// A broadcast waiting to be delivered once the current handler returns.
#[derive(Debug)]
pub(crate) struct Broadcast {
    /// The sender, left out when `to` is [`Audience::Others`].
    pub from: Token,
    /// The bytes, shared by every recipient.
    pub chunk: Rc<[u8]>,
    /// Who gets it.
    pub to: Audience,
}

/// The [`Outbox`] of the connection being handled: the parts of the
/// connection a reply touches, borrowed next to the protocol's session.
pub(crate) struct ConnOutbox<'a> {
    pub token: Token,
    pub stream: &'a Stream,
    pub out: &'a mut Option<Box<OutQueue>>,
    pub state: &'a mut State,
    /// `--max-buffer`.
    pub limit: usize,
    /// The loop's broadcast queue.
    pub broadcasts: &'a mut Vec<Broadcast>,
    pub stats: &'a mut Stats,
}

impl Outbox for ConnOutbox<'_> {
    fn reply(&mut self, bytes: &[u8]) {
        if self.state.is_closing() {
            return;
        }
        let queued = self.out.as_ref().is_some_and(|q| !q.is_empty());
        // Write straight from the caller's buffer when nothing is queued:
        // most writes never block, so most replies are never copied.
        let sent = if queued {
            0
        } else {
            match write_now(self.stream, bytes, self.stats) {
                Ok(n) => n,
                Err(_) => return self.state.failed(),
            }
        };
        log::trace!(
            "[{}] reply: {sent} of {} bytes written at once",
            TokenName(self.token),
            bytes.len()
        );
        if sent < bytes.len() {
            let limit = self.limit;
            let q = self
                .out
                .get_or_insert_with(|| Box::new(OutQueue::new(limit)));
            if q.push(&bytes[sent..]).is_err() {
                self.state.overflowed();
            }
        }
    }

    fn broadcast(&mut self, chunk: Rc<[u8]>, to: Audience) {
        if to == Audience::Everyone {
            // The sender's copy goes out now, in order with its replies;
            // the others get theirs when the handler returns.
            self.reply(&chunk);
        }
        self.broadcasts.push(Broadcast {
            from: self.token,
            chunk,
            to: Audience::Others,
        });
    }

    fn close(&mut self, how: Close) {
        self.state.protocol_close(match how {
            Close::AfterFlush => Then::Close,
            Close::Linger => Then::Linger,
        });
    }
}

/// The [`Outbox`] of a connection that is already gone: only its
/// broadcasts (chat's `* NAME left`) reach anyone.
pub(crate) struct GoneOutbox<'a> {
    pub token: Token,
    pub broadcasts: &'a mut Vec<Broadcast>,
}

impl Outbox for GoneOutbox<'_> {
    fn reply(&mut self, _bytes: &[u8]) {}
    fn broadcast(&mut self, chunk: Rc<[u8]>, _to: Audience) {
        self.broadcasts.push(Broadcast {
            from: self.token,
            chunk,
            to: Audience::Others,
        });
    }
    fn close(&mut self, _how: Close) {}
}

/// Writes as much of `bytes` as the socket takes now; the caller queues
/// the rest and asks for `WRITABLE`.
pub(crate) fn write_now(
    stream: &Stream,
    bytes: &[u8],
    stats: &mut Stats,
) -> std::io::Result<usize> {
    let mut w = stream;
    let done = write_until_blocked(bytes.len(), |done| w.write(&bytes[done..]))?;
    stats.bytes_out += done as u64;
    Ok(done)
}

/// Writes as much of `chunks` (in order) as the socket takes now, with
/// vectored writes of up to [`IOV_BATCH`] chunks each.
pub(super) fn write_chunks_now(
    stream: &Stream,
    chunks: &[&Rc<[u8]>],
    stats: &mut Stats,
) -> std::io::Result<usize> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut w = stream;
    let done = write_until_blocked(total, |done| {
        let mut slices = [IoSlice::new(&[]); IOV_BATCH];
        let mut count = 0;
        let mut skip = done;
        for c in chunks {
            if skip >= c.len() {
                skip -= c.len();
                continue;
            }
            slices[count] = IoSlice::new(&c[skip..]);
            skip = 0;
            count += 1;
            if count == IOV_BATCH {
                break;
            }
        }
        w.write_vectored(&slices[..count])
    })?;
    stats.bytes_out += done as u64;
    Ok(done)
}
