//! Opening connections: non-blocking connects, paced and windowed, and
//! what their failures mean (no descriptors, no ports, refused).

use std::os::fd::AsFd;

use super::*;

impl Worker {
    pub(super) fn open_more(&mut self, now: Instant) {
        while self.may_open() && self.connecting + self.unconfirmed < MAX_CONNECTING {
            if !self.connect_gap.is_zero() && now < self.next_connect {
                return;
            }
            let id = if self.plan.workload == Workload::Churn {
                // churn opens an endless stream of connections, at most
                // `slots` at a time.
                if self.conns.len() >= self.slots {
                    return;
                }
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(self.id_step);
                id
            } else {
                match self.to_open.pop_front() {
                    Some(id) => id,
                    None => return,
                }
            };
            if !self.connect_gap.is_zero() {
                // Catch up at most one gap behind, so a stall does not
                // turn into a burst.
                self.next_connect =
                    self.next_connect.max(now - self.connect_gap) + self.connect_gap;
            }
            match attempt(|| self.connect()) {
                Ok(Some(stream)) => {
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let mut conn = Conn {
                        stream,
                        id,
                        connecting: Some(now),
                        unsent: None,
                        next_seq: 0,
                        check: Checker::default(),
                        inflight: VecDeque::new(),
                        in_flight: 0,
                        behind: VecDeque::new(),
                        writable: true,
                        on_ready_list: false,
                    };
                    if let Err(e) = self.poll.registry().register(
                        &mut conn.stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        self.tally
                            .fail(Failure::Connect, || format!("register: {e}"));
                        continue;
                    }
                    entry.insert(conn);
                    self.connecting += 1;
                }
                // A Unix listener with a full backlog says EAGAIN: try
                // this id again on a later turn.
                Ok(None) => {
                    if self.plan.workload != Workload::Churn {
                        self.to_open.push_front(id);
                    }
                    return;
                }
                Err(e) => self.connect_failed(id, e),
            }
        }
    }

    pub(super) fn connect(&mut self) -> io::Result<Stream> {
        match &self.plan.target {
            Target::Unix(path) => Ok(Stream::Unix(mio::net::UnixStream::connect(path)?)),
            Target::Tcp(addr) => {
                // Non-blocking from the start (SOCK_NONBLOCK): two fcntl
                // calls fewer per connection than setting it afterwards.
                let socket = Socket::new(
                    Domain::for_address(*addr),
                    Type::STREAM.nonblocking(),
                    Some(Protocol::TCP),
                )?;
                socket.set_tcp_nodelay(true)?;
                if !self.sources.is_empty() {
                    let ip = self.sources[self.next_source % self.sources.len()];
                    self.next_source += 1;
                    crate::net::source::bind_source(&socket, ip)?;
                }
                match socket.connect(&(*addr).into()) {
                    Ok(()) => {}
                    // Not `attempt`: a non-blocking connect that has not
                    // finished yet is under way, not to be made again; it
                    // completes with a writable event.
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let std: std::net::TcpStream = socket.into();
                Ok(Stream::Tcp(mio::net::TcpStream::from_std(std)))
            }
        }
    }

    pub(super) fn connect_failed(&mut self, id: u32, e: io::Error) {
        let opened = self.progress.opened.load(Ordering::Relaxed);
        match e.raw_os_error() {
            // EMFILE, ENFILE: this process is out of descriptors.
            Some(libc::EMFILE) | Some(libc::ENFILE) => {
                self.stop_opening = true;
                self.tally.not_opened += 1 + self.to_open.len() as u64;
                self.to_open.clear();
                let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |l| l.0);
                self.tally.fail(Failure::FdLimit, || {
                    format!(
                        "out of file descriptors after about {opened} connections: this load \
                         process reached its open-file limit (RLIMIT_NOFILE = {limit}); the \
                         limit is the client's, not the server's ({e})"
                    )
                });
            }
            // EADDRNOTAVAIL: no free local port for this source address.
            Some(libc::EADDRNOTAVAIL) => self.tally.fail(Failure::Ports, || {
                format!(
                    "connection {id}: no local port left ({e}); spread connections over \
                     more source addresses with --source-ip 127.0.0.2,127.0.0.3,..."
                )
            }),
            _ => self.tally.fail(Failure::Connect, || {
                format!("connection {id}: connect failed: {e}")
            }),
        }
    }

    pub(super) fn established(&mut self, key: usize, now: Instant) {
        let sending = self.sending();
        let conn = &mut self.conns[key];
        let since = conn.connecting.take().expect("was connecting");
        self.connecting -= 1;
        if self.plan.workload == Workload::Hold {
            self.unconfirmed += 1;
        }
        self.tally.opened += 1;
        self.last_open = now;
        let measuring = self.plan.workload != Workload::Churn || self.phase == Phase::Measuring;
        if measuring {
            record(&mut self.tally.connect_latency, now - since);
        }
        // From now on WRITABLE is wanted only while output waits.
        conn.writable = false;
        let registry = self.poll.registry();
        if let Some(ring) = &mut self.ring {
            // From now on the ring carries its traffic: out of the epoll
            // set, and a multishot receive armed.
            let _ = registry.deregister(&mut conn.stream);
            if let Err(e) = ring.adopt(key, conn.stream.as_fd()) {
                let id = conn.id;
                let what = format!("connection {id}: cannot arm a receive: {e}");
                return self.close_failed(key, Failure::Closed, what);
            }
        } else {
            let _ = registry.reregister(&mut conn.stream, Token(key), Interest::READABLE);
        }
        let first = match self.plan.workload {
            Workload::Echo if self.plan.rate > 0.0 => {
                // Spread the connections' schedules over one period.
                let period = Duration::from_secs_f64(1.0 / self.plan.rate);
                let offset = period.mul_f64((conn.id % 1000) as f64 / 1000.0);
                self.due.push(Reverse((now + offset, key)));
                0
            }
            Workload::Echo => self.plan.pipeline,
            _ => 1,
        };
        if sending && first > 0 {
            self.send(key, first, now, now);
        }
    }
}
