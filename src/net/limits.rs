//! The open-file limit: every socket is a descriptor, and a process may
//! hold at most `RLIMIT_NOFILE` of them.

/// Raises the soft open-file limit to the hard one and returns it.
///
/// The soft limit is often 1,024 while the hard one is much higher; a
/// server or load generator that holds thousands of sockets asks for all
/// it may have, once, at start.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            log::warn!("could not raise the open-file limit: {e}");
            fd_limit()
        }
    }
}

/// The soft open-file limit in force now.
pub fn fd_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The hard open-file limit: how far [`raise_fd_limit`] can go.
pub fn fd_hard_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard)
}

/// Kernel memory one idle TCP socket costs, measured on this machine (see
/// docs/scale.md): its `tcp_sock`, inode, file, dentry and epoll entry in
/// the slab. Buffers come on top only while data is queued.
pub const KERNEL_BYTES_PER_SOCKET: u64 = 5120;

/// Runs at or above this many connections get the warnings, not just the
/// errors.
pub const LARGE: u64 = 10_000;

/// What a run is about to ask of the machine.
#[derive(Debug, Clone, Default)]
pub struct Need {
    /// Connections the run will hold at once.
    pub connections: u64,
    /// Processes they are spread over.
    pub processes: u64,
    /// Descriptors each process will need.
    pub per_process_fds: u64,
    /// Sockets per connection on this machine: 2 when both ends are here
    /// (a load run against loopback), else 1.
    pub sockets_per_connection: u64,
    /// Connections per source address to one destination (a load run;
    /// 0 = not a client).
    pub per_source: u64,
    /// A server's listen backlog wish (0 = not a server).
    pub listen_backlog: u64,
}

/// What [`check`] found: each line names the limit, its setting and what
/// to do.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The run can go on, but will likely meet these.
    pub warnings: Vec<String>,
    /// The run would fail part-way.
    pub errors: Vec<String>,
}

/// A number from a /proc file (the `field`-th whitespace-separated one).
pub fn proc_number(path: &str, field: usize) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().nth(field)?.parse().ok()
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Checks `need` against every limit that would stop a run part-way:
/// descriptors per process, `fs.nr_open`, `fs.file-max`, ports per source
/// address, `net.core.somaxconn`, and memory for the sockets.
pub fn check(need: &Need) -> Verdict {
    let mut v = Verdict::default();
    let large = need.connections >= LARGE;
    let hard = fd_hard_limit();
    if need.per_process_fds > hard {
        v.errors.push(format!(
            "each process needs about {} descriptors but may open only {hard} \
             (hard RLIMIT_NOFILE): spread the connections over more processes, or raise \
             the hard limit (`ulimit -Hn`, `nofile` in /etc/security/limits.conf; at most \
             fs.nr_open = {})",
            need.per_process_fds,
            proc_number("/proc/sys/fs/nr_open", 0).unwrap_or(0)
        ));
    }
    let sockets = need.connections * need.sockets_per_connection.max(1);
    if let (Some(used), Some(max)) = (
        proc_number("/proc/sys/fs/file-nr", 0),
        proc_number("/proc/sys/fs/file-max", 0),
    ) {
        if used + sockets > max {
            v.errors.push(format!(
                "{sockets} sockets would pass the system-wide open-file limit: \
                 fs.file-max = {max}, {used} open already; raise it \
                 (`sysctl -w fs.file-max={}`) or hold fewer connections",
                (used + sockets) * 11 / 10
            ));
        }
    }
    if need.per_source > 0 {
        if let Some(ports) = super::source::ports_per_address() {
            if need.per_source > ports {
                v.errors.push(format!(
                    "{} connections from one source address to one destination, but \
                     net.ipv4.ip_local_port_range gives {ports} ports: add source addresses \
                     (--source-ip 127.0.0.2,...; automatic for a loopback destination) or \
                     widen the range (`sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"`)",
                    need.per_source
                ));
            }
        }
    }
    if let Some(avail) = mem_available() {
        let kernel = sockets * KERNEL_BYTES_PER_SOCKET;
        if kernel > avail * 9 / 10 {
            v.errors.push(format!(
                "{sockets} sockets need about {} MiB of kernel memory ({} B each, measured), \
                 but only {} MiB is available (MemAvailable): hold fewer connections",
                kernel >> 20,
                KERNEL_BYTES_PER_SOCKET,
                avail >> 20
            ));
        } else if large && kernel > avail / 2 {
            v.warnings.push(format!(
                "{sockets} sockets need about {} MiB of kernel memory of {} MiB available",
                kernel >> 20,
                avail >> 20
            ));
        }
    }
    if large && need.listen_backlog > 0 {
        if let Some(max) = proc_number("/proc/sys/net/core/somaxconn", 0) {
            if max < 4096 {
                v.warnings.push(format!(
                    "net.core.somaxconn = {max} caps every listener's accept queue; a burst \
                     of connects beyond it is dropped and retried a second later: \
                     `sysctl -w net.core.somaxconn=65535`"
                ));
            }
        }
    }
    v
}
