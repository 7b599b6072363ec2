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
