//! Delivering broadcasts: a protocol's output for many clients (chat's
//! relayed lines, joins and leaves), handed over once the handler that
//! made it has returned.

use std::rc::Rc;

use super::EventLoop;
use crate::protocol::{Audience, Protocol};
use crate::server::token::connection_token;

impl<P: Protocol> EventLoop<P> {
    /// Delivers queued broadcasts to their recipients, then advances every
    /// recipient whose state changed (a slow consumer is closed, and its
    /// departure may broadcast more, delivered by the next round).
    pub(super) fn deliver(&mut self) {
        loop {
            self.deliver_queued();
            // Chat at `--max-memory`: drop the biggest reader; its `left`
            // line is one more broadcast to deliver.
            if !self.drop_largest_over_cap() {
                return;
            }
        }
    }

    fn deliver_queued(&mut self) {
        while !self.broadcasts.is_empty() {
            let batch = std::mem::take(&mut self.broadcasts);
            if self.shutdown_deadline.is_some() {
                // Shutting down: flush what was already queued, start
                // nothing new.
                continue;
            }
            // Recipient by recipient, every chunk of the batch meant for
            // it in one go: one vectored write each, not one per line.
            let mut mine: Vec<&Rc<[u8]>> = Vec::with_capacity(batch.len());
            for (key, conn) in self.conns.iter_mut() {
                let token = connection_token(key, conn.generation);
                if !conn.state.talks() {
                    continue;
                }
                mine.clear();
                mine.extend(
                    batch
                        .iter()
                        .filter(|b| !(b.to == Audience::Others && token == b.from))
                        .map(|b| &b.chunk),
                );
                if mine.is_empty() {
                    continue;
                }
                let before = (conn.queued(), conn.state);
                let held = conn.footprint();
                conn.send_shared(&mine, self.config.max_buffer, &mut self.stats);
                self.memory.recount(held, conn.footprint());
                if conn.state != before.1 || (before.0 == 0 && conn.queued() > 0) {
                    self.to_advance.push(token);
                }
            }
            let mut to_advance = std::mem::take(&mut self.to_advance);
            for &token in &to_advance {
                if let Some(key) = self.key_of(token) {
                    self.advance(key);
                }
            }
            to_advance.clear();
            self.to_advance = to_advance;
        }
    }
}
