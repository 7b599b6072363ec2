//! Metrics: what the loop counts, and the Prometheus endpoint that shows it.
//!
//! - [`snapshot`]: the counters, one plain struct the loop bumps directly;
//!   snapshots add up (workers) and travel as one JSON line.
//! - [`render`]: snapshots → the Prometheus text format, encoded with
//!   `prometheus-client` only when a scrape arrives.
//! - [`http`]: the HTTP/1.1 exchange as sans-I/O code: bytes in, a
//!   response (or "need more", or an error) out. No sockets, so it is
//!   unit-tested and fuzzed.
//! - [`endpoint`]: the non-blocking socket side: the metrics listener and
//!   its few clients, on tokens of their own in the server's one `Poll`.
//! - [`exposition`]: a strict parser of the text format, for `reactor top`
//!   and the tests.

pub mod endpoint;
pub mod exposition;
pub mod http;
pub mod render;
pub mod snapshot;

pub use render::render;
pub use snapshot::Snapshot;
