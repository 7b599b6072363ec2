//! reactor: a single-threaded, mio-based event-loop TCP server, and the
//! client tools that go with it.
//!
//! # Module map, in reading order
//!
//! 1. [`protocol`]: what the server says. Echo and chat behind one small
//!    trait; bytes in, replies and broadcasts out, no sockets.
//!    [`protocol::lines`] splits a stream into bounded lines.
//! 2. [`buffer`]: the bounded output queue a connection keeps only while
//!    the kernel cannot take more.
//! 3. [`server`]: configuration and binding; then
//!    - [`server::connection`]: one client's state and its interest;
//!    - [`server::event_loop`]: the reactor itself, one `mio::Poll`;
//!    - [`server::timer`], [`server::stats`], [`server::udp`],
//!      [`server::stream`], [`server::listen`]: its helpers;
//!    - [`server::threads`]: one thread per client, for comparison.
//! 4. [`client`]: `reactor connect` and `reactor load`.
//! 5. [`cli`]: the command line, shared by the binary and the tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod buffer;
pub mod cli;
pub mod client;
pub mod net;
pub mod protocol;
pub mod server;
