//! Socket plumbing that the server and the client tools both stand on.
//!
//! Nothing here knows about protocols or connections: [`stream`] is one
//! type for TCP and Unix-domain byte streams, [`io`] holds the two rules
//! of a non-blocking call (`WouldBlock` means "not now", `Interrupted`
//! means "again"), [`ready`] is the list of sockets a loop serves again
//! after their budget ran out, [`limits`] raises the open-file limit
//! that every socket counts against, and [`ring`] is the io_uring under
//! `--engine uring`: the crate's only `unsafe`, behind a safe interface,
//! here so that client code may use it too.

pub mod io;
pub mod limits;
pub mod ready;
pub mod ring;
pub mod source;
pub mod stream;

pub use stream::Stream;
