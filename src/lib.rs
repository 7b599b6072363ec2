//! reactor: a single-threaded, mio-based event-loop TCP server, and the
//! client tools that go with it.
//!
//! # Module map, in reading order
//!
//! Imports only run down this list's layers: [`cli`] uses [`server`] and
//! [`client`]; those use [`metrics`], [`protocol`], [`buffer`] and
//! [`net`]; the client tools never import the server, and [`metrics`]
//! knows nothing of it either (the server fills in its snapshots). `docs/ARCHITECTURE.md` walks the files.
//!
//! 1. [`net`]: socket plumbing under everything: one stream type for TCP
//!    and Unix ([`net::stream`]), the `WouldBlock`/`Interrupted` rules
//!    written once ([`net::io`]), the ready list ([`net::ready`]), the
//!    open-file limit and the checks made before a large run
//!    ([`net::limits`]), source addresses for many connections
//!    ([`net::source`]).
//! 2. [`protocol`]: what the server says. Echo and chat behind one small
//!    trait; bytes in, replies and broadcasts out, no sockets.
//!    [`protocol::lines`] splits a stream into bounded lines.
//! 3. [`buffer`]: the bounded output queue a connection keeps only while
//!    the kernel cannot take more.
//! 4. [`metrics`]: the loop's counters as a plain summable snapshot, the
//!    Prometheus endpoint the event loop serves (sans-I/O HTTP on a small
//!    `Poll` of its own), and a strict parser of the text format.
//! 5. [`server`]: configuration, binding, the engines, and [`server::Server`]
//!    to run the reactor in-process. Inside (private, read the source):
//!    `token` (which token is which socket), `connection` (one client's
//!    state machine, `state.rs`, and its writes), `event_loop` (the reactor
//!    itself, one `mio::Poll`, split by idea: accept, connections,
//!    broadcast, timers, shutdown), `timer`, `udp`, `listen`,
//!    `threads` (one thread per client, for comparison), and `uring` (one
//!    thread around one io_uring: completions, not readiness; the ring
//!    itself is [`net::ring`], the crate's only `unsafe`);
//!    [`server::supervisor`] runs N worker processes on one port.
//! 6. [`client`]: `reactor connect`, `reactor load` (past one process:
//!    [`client::load::processes`], [`client::load::merge`]) and `reactor top`.
//! 7. [`cli`]: every clap definition, turned into the plain configurations
//!    above; shared by the binary and its tests.
// `deny`, not `forbid`: the io_uring engine's one module
// (`net::ring`) allows unsafe code, and nothing else may.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod buffer;
pub mod cli;
pub mod client;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod server;
