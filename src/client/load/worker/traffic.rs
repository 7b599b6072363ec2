//! Traffic on open connections: queue and write messages, read and check
//! replies, time out what is late.

use super::*;

impl Worker {
    /// Queues `count` more messages on `key` and writes what it can.
    pub(super) fn send(&mut self, key: usize, count: u32, stamp: Instant) {
        let size = self.plan.size;
        let conn = &mut self.conns[key];
        for _ in 0..count {
            message::append(&mut conn.out, conn.id, conn.next_seq, size);
            conn.next_seq = conn.next_seq.wrapping_add(1);
            conn.inflight.push_back(stamp);
        }
        self.flush(key);
    }

    /// `--rate`: sends every message that has come due.
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
            if self.conns.contains(key) && self.conns[key].connecting.is_none() {
                // Latency counts from when the message was due, not when
                // it went out: a client that falls behind its schedule
                // must not hide the delay (coordinated omission).
                self.send(key, 1, due);
                self.due.push(Reverse((due + period, key)));
            }
        }
    }

    pub(super) fn flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        while conn.written < conn.out.len() {
            match (&conn.stream).write(&conn.out[conn.written..]) {
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !conn.writable {
                        conn.writable = true;
                        let _ = self.poll.registry().reregister(
                            &mut conn.stream,
                            Token(key),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let id = conn.id;
                    return self.lose(
                        key,
                        Failure::Closed,
                        format!("connection {id}: write failed: {e}"),
                    );
                }
            }
        }
        conn.out.clear();
        conn.written = 0;
        if conn.writable {
            conn.writable = false;
            let _ =
                self.poll
                    .registry()
                    .reregister(&mut conn.stream, Token(key), Interest::READABLE);
        }
    }

    pub(super) fn on_writable(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.connecting.is_some() {
            let id = conn.id;
            let result = match &conn.stream {
                Stream::Tcp(s) => s.take_error().and_then(|e| match e {
                    Some(e) => Err(e),
                    None => s.peer_addr().map(|_| ()),
                }),
                Stream::Unix(s) => s.take_error().and_then(|e| e.map_or(Ok(()), Err)),
            };
            match result {
                Ok(()) => self.established(key, Instant::now()),
                // Not connected yet: a spurious wake-up.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => {
                    self.connecting -= 1;
                    self.drop_conn(key);
                    self.connect_failed(id, e);
                }
            }
            return;
        }
        self.flush(key);
    }

    pub(super) fn on_readable(&mut self, key: usize) {
        if self.conns[key].connecting.is_some() {
            // A refused connect reports readable too; the writable side
            // (checked first) has already dealt with it.
            return;
        }
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                self.again.push(key);
                return;
            }
            let conn = &mut self.conns[key];
            let n = match (&conn.stream).read(&mut self.scratch) {
                Ok(0) => {
                    let id = conn.id;
                    return self.lose(
                        key,
                        Failure::Closed,
                        format!("connection {id}: closed by the server"),
                    );
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let id = conn.id;
                    return self.lose(key, Failure::Closed, format!("connection {id}: {e}"));
                }
            };
            budget = budget.saturating_sub(n);
            let id = conn.id;
            let completed = match conn.check.feed(id, self.plan.size, &self.scratch[..n]) {
                Ok(c) => c,
                Err(m) => return self.lose(key, Failure::Mismatch, m.to_string()),
            };
            let sent = conn.next_seq;
            if conn.check.seq.wrapping_sub(sent) as i32 > 0
                || (conn.check.seq == sent && conn.check.offset > 0)
            {
                return self.lose(
                    key,
                    Failure::Mismatch,
                    format!("connection {id}: received bytes that were never sent"),
                );
            }
            if completed > 0 {
                self.completed(key, completed);
                if !self.conns.contains(key) {
                    return;
                }
            }
        }
    }

    /// `n` messages on `key` came back whole and correct.
    pub(super) fn completed(&mut self, key: usize, n: u32) {
        let now = Instant::now();
        let counting = match self.plan.workload {
            Workload::Hold => true,
            _ => self.phase == Phase::Measure,
        };
        self.completions += u64::from(n);
        let conn = &mut self.conns[key];
        for _ in 0..n {
            let sent = conn
                .inflight
                .pop_front()
                .expect("checked: never more than sent");
            if counting {
                record(&mut self.tally.latency, now.saturating_duration_since(sent));
                self.tally.messages += 1;
                self.tally.bytes += self.plan.size as u64;
            }
        }
        match self.plan.workload {
            Workload::Echo if self.plan.rate <= 0.0 && self.sending() => self.send(key, n, now),
            Workload::Churn => {
                if counting {
                    self.tally.cycles += 1;
                }
                self.drop_conn(key);
            }
            _ => {}
        }
    }

    /// Checks the connects and replies in progress against `--timeout`.
    pub(super) fn sweep(&mut self, now: Instant) {
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
                (None, Some(&t)) if now.saturating_duration_since(t) > limit => Some((k, false)),
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

    pub(super) fn time_out_everything(&mut self) {
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
            self.drop_conn(key);
            self.tally.fail(Failure::Timeout, || {
                format!("connection {id}: connect took over {secs} s")
            });
        } else {
            self.lose(
                key,
                Failure::Timeout,
                format!("connection {id}: no reply within {secs} s"),
            );
        }
    }

    /// Counts a failure on an open connection and closes it.
    pub(super) fn lose(&mut self, key: usize, kind: Failure, what: String) {
        self.drop_conn(key);
        self.tally.fail(kind, || what);
    }

    pub(super) fn drop_conn(&mut self, key: usize) {
        let mut conn = self.conns.remove(key);
        // Deregister before the socket closes with the drop.
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }
}
