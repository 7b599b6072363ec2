//! Traffic on open connections: build and write messages, read and check
//! replies, time out what is late.
//!
//! What one message costs is what the load tool adds to every figure it
//! measures, so the hot path is kept to the system calls the exchange
//! needs: one `write` per batch of messages (a pipeline's worth, or every
//! message a read completed), one `read` per readable event (a read that
//! fills less than the buffer has drained the socket), the clock read once
//! per 16 events rather than per message (see `Worker::clock`), one
//! histogram update per batch, and two slice comparisons per message to
//! check it.

use super::*;

impl Worker {
    /// Queues `count` more messages on `key`, due at `due` (their latency
    /// counts from there), and writes them with one call if nothing is
    /// waiting before them.
    pub(super) fn send(&mut self, key: usize, count: u32, due: Instant, now: Instant) {
        let conn = &mut self.conns[key];
        self.outgoing.clear();
        for _ in 0..count {
            self.template
                .append(&mut self.outgoing, conn.id, conn.next_seq);
            conn.next_seq = conn.next_seq.wrapping_add(1);
        }
        conn.in_flight += count;
        match conn.inflight.back_mut() {
            // Sent at the same moment as the batch before: one batch.
            Some(b) if b.due == due && b.sent == now => b.count += count,
            _ => conn.inflight.push_back(Batch {
                due,
                sent: now,
                count,
            }),
        }
        if let Some(ring) = &mut self.ring {
            // Handed to the ring at the end of the turn, together with
            // whatever else this turn adds for the connection.
            return ring.queue(key, &mut self.outgoing);
        }
        if let Some(queue) = &mut conn.unsent {
            // Bytes are waiting already; these go behind them. The queue
            // is bounded by what may be in flight: `--pipeline` messages
            // in closed loop, and in open loop what `--timeout` lets pile
            // up before the connection is counted as timed out.
            let _ = queue.push(&self.outgoing);
            return self.flush(key);
        }
        let stream = &conn.stream;
        let bytes = &self.outgoing;
        match crate::net::io::write_until_blocked(bytes.len(), |from| {
            (&mut &*stream).write(&bytes[from..])
        }) {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => {
                // A short write: keep the rest and ask for WRITABLE.
                let mut queue = OutQueue::new(usize::MAX);
                let _ = queue.push(&bytes[n..]);
                conn.unsent = Some(queue);
                self.want_writable(key, true);
            }
            Err(e) => {
                let id = conn.id;
                self.close_failed(
                    key,
                    Failure::Closed,
                    format!("connection {id}: write failed: {e}"),
                );
            }
        }
    }

    /// `--rate`: sends every message that has come due, or with
    /// `--pipeline` messages in flight already, keeps it for later (as wrk2
    /// does with its one request per connection).
    pub(super) fn send_due(&mut self, now: Instant) {
        if self.plan.rate <= 0.0 {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / self.plan.rate);
        while let Some(&Reverse((due, key))) = self.due.peek() {
            if due > now || !self.sending() {
                return;
            }
            self.due.pop();
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.connecting.is_none() {
                // Latency counts from when the message was due, not when
                // it went out: a client that falls behind its schedule
                // must not hide the delay (coordinated omission). The
                // uncorrected latency counts from `now`, the actual send.
                if conn.in_flight < self.plan.pipeline {
                    self.send(key, 1, due, now);
                } else {
                    conn.behind.push_back(due);
                }
                self.due.push(Reverse((due + period, key)));
            }
        }
    }

    /// Writes what waits in `key`'s queue; drops the queue and `WRITABLE`
    /// interest once it is empty.
    pub(super) fn flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Some(queue) = &mut conn.unsent else {
            return;
        };
        if let Err(e) = queue.write_to(&mut &conn.stream, usize::MAX) {
            let id = conn.id;
            return self.close_failed(
                key,
                Failure::Closed,
                format!("connection {id}: write failed: {e}"),
            );
        }
        if queue.is_empty() {
            conn.unsent = None;
            self.want_writable(key, false);
        } else {
            self.want_writable(key, true);
        }
    }

    /// Adds or drops `WRITABLE` interest: wanted only while bytes wait.
    /// A failed reregister leaves the flag as it was, so the next call
    /// tries again (a socket that broken fails its next read or write).
    fn want_writable(&mut self, key: usize, want: bool) {
        let conn = &mut self.conns[key];
        let registry = self.poll.registry();
        let _ = crate::net::ready::want_writable(
            registry,
            &mut conn.stream,
            Token(key),
            &mut conn.writable,
            want,
        );
    }

    pub(super) fn on_writable(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.connecting.is_some() {
            let id = conn.id;
            // A connecting TCP socket (SYN_SENT) polls as neither readable
            // nor writable on Linux, so a writable or error event means the
            // connect has ended, and SO_ERROR alone says how; mio's
            // portable recipe adds a `peer_addr` call per connection to
            // rule out a spurious wake-up that epoll does not produce.
            let result = match &conn.stream {
                Stream::Tcp(s) => s.take_error(),
                Stream::Unix(s) => s.take_error(),
            }
            .and_then(|e| e.map_or(Ok(()), Err));
            match result {
                Ok(()) => self.established(key, Instant::now()),
                Err(e) => {
                    self.connecting -= 1;
                    self.close_conn(key);
                    self.connect_failed(id, e);
                }
            }
            return;
        }
        self.flush(key);
    }

    /// Reads and checks what arrived on `key`. With `to_end` false a read
    /// that fills less than the buffer ends it: the socket is empty, and
    /// anything arriving later raises a new edge (this saves the read that
    /// would only say `WouldBlock`). With `to_end`, reads go on until
    /// `WouldBlock` or EOF.
    pub(super) fn on_readable(&mut self, key: usize, to_end: bool) {
        if self.conns[key].connecting.is_some() {
            // A refused connect reports readable too; the writable side
            // (checked first) has already dealt with it.
            return;
        }
        let mut budget = READ_BUDGET;
        let mut completed = 0;
        loop {
            if budget == 0 {
                // Still readable, but the others get a turn first; no new
                // edge will come for what is left, so the ready list it is.
                let conn = &mut self.conns[key];
                if !conn.on_ready_list {
                    conn.on_ready_list = true;
                    self.ready.push(key);
                }
                break;
            }
            let conn = &mut self.conns[key];
            let n = match attempt(|| (&conn.stream).read(&mut self.scratch)) {
                Ok(Some(0)) => {
                    let id = conn.id;
                    return self.close_failed(
                        key,
                        Failure::Closed,
                        format!("connection {id}: closed by the server"),
                    );
                }
                Ok(Some(n)) => n,
                // Drained: wait for the next edge (also what a spurious
                // wake-up looks like).
                Ok(None) => break,
                Err(e) => {
                    let id = conn.id;
                    return self.close_failed(
                        key,
                        Failure::Closed,
                        format!("connection {id}: {e}"),
                    );
                }
            };
            budget = budget.saturating_sub(n);
            match conn.check_reply(&self.template, &self.scratch[..n]) {
                Ok(c) => completed += c,
                Err(m) => return self.close_failed(key, Failure::Mismatch, m),
            }
            if n < self.scratch.len() && !to_end {
                break;
            }
        }
        if completed > 0 {
            // Stamped with the events' clock, not a clock read of its own.
            self.completed(key, completed, self.clock);
        }
    }

    /// `n` messages on `key` came back whole and correct at `now`.
    pub(super) fn completed(&mut self, key: usize, n: u32, now: Instant) {
        let counting = match self.plan.workload {
            Workload::Hold => true,
            _ => self.phase == Phase::Measuring,
        };
        let open_loop = self.plan.rate > 0.0;
        self.completions += u64::from(n);
        let conn = &mut self.conns[key];
        if self.plan.workload == Workload::Hold && conn.check.seq == n {
            self.unconfirmed -= 1; // its first round trip: the server has it
        }
        let mut left = n;
        while left > 0 {
            let batch = conn
                .inflight
                .front_mut()
                .expect("checked: never more than sent");
            let take = batch.count.min(left);
            let latency = now.saturating_duration_since(batch.due);
            let uncorrected = now.saturating_duration_since(batch.sent);
            let k = u64::from(take);
            if counting {
                record_n(&mut self.tally.latency, latency, k);
                if open_loop {
                    record_n(&mut self.tally.latency_uncorrected, uncorrected, k);
                }
                self.tally.messages += k;
                self.tally.bytes += k * self.plan.size as u64;
            }
            if let Some(live) = &mut self.live {
                live.current.messages += k;
                record_n(&mut live.current.latency, latency, k);
                if open_loop {
                    record_n(&mut live.current.uncorrected, uncorrected, k);
                }
            }
            batch.count -= take;
            if batch.count == 0 {
                conn.inflight.pop_front();
            }
            left -= take;
        }
        conn.in_flight -= n;
        match self.plan.workload {
            Workload::Echo if !open_loop && self.sending() => self.send(key, n, now, now),
            Workload::Echo if open_loop && self.sending() => {
                // Messages that came due while the window was full go now.
                while let Some(conn) = self.conns.get_mut(key) {
                    if conn.in_flight >= self.plan.pipeline {
                        break;
                    }
                    let Some(due) = conn.behind.pop_front() else {
                        break;
                    };
                    self.send(key, 1, due, now);
                }
            }
            Workload::Churn => {
                if counting {
                    self.tally.cycles += 1;
                }
                self.close_conn(key);
            }
            _ => {}
        }
    }

    /// Checks the connects and replies in progress against `--timeout`.
    pub(super) fn check_timeouts(&mut self, now: Instant) {
        let limit = self.plan.timeout;
        let mut stalled = false;
        let late: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match (c.connecting, c.inflight.front()) {
                (Some(t), _) if now - t > limit => {
                    stalled |= self.last_open <= t;
                    Some((k, true))
                }
                (None, Some(b)) if now.saturating_duration_since(b.due) > limit => Some((k, false)),
                _ => None,
            })
            .collect();
        if stalled {
            self.stalled();
        }
        for (key, connecting) in late {
            self.time_out(key, connecting);
        }
    }

    pub(super) fn time_out_in_flight(&mut self) {
        let late: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connecting.is_some() || !c.inflight.is_empty())
            .map(|(k, c)| (k, c.connecting.is_some()))
            .collect();
        for (key, connecting) in late {
            self.time_out(key, connecting);
        }
    }

    pub(super) fn time_out(&mut self, key: usize, connecting: bool) {
        let id = self.conns[key].id;
        let secs = self.plan.timeout.as_secs_f64();
        if connecting {
            self.connecting -= 1;
            self.close_conn(key);
            self.tally.fail(Failure::Timeout, || {
                format!("connection {id}: connect took over {secs} s")
            });
        } else {
            self.close_failed(
                key,
                Failure::Timeout,
                format!("connection {id}: no reply within {secs} s"),
            );
        }
    }

    /// Counts a failure on an open connection and closes it.
    pub(super) fn close_failed(&mut self, key: usize, kind: Failure, what: String) {
        self.close_conn(key);
        self.tally.fail(kind, || what);
    }

    /// Closes connection `key` (churn's normal end, or after a failure).
    pub(super) fn close_conn(&mut self, key: usize) {
        let conn = self.conns.remove(key);
        if self.plan.workload == Workload::Hold && conn.connecting.is_none() && conn.check.seq == 0
        {
            self.unconfirmed -= 1;
        }
        if let Some(ring) = &mut self.ring {
            // The ring holds the socket while a receive or send is armed
            // on it: it is closed once the cancel is submitted.
            return ring.forget(key, conn.stream);
        }
        // No `deregister` (an `epoll_ctl` per connection): closing the
        // socket, which the drop does, takes it out of the epoll set, as
        // no other descriptor refers to it. An event for it already
        // fetched in this batch finds the key vacant and is skipped (keys
        // are only reused by `open_more`, between batches).
        drop(conn);
    }
}
