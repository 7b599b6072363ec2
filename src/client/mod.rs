//! The client tools: [`connect`], an `nc`-like client, [`load`], a load
//! generator, both mio poll loops like the server; and [`top`], a live
//! terminal view of a server's metrics endpoint.

pub mod connect;
pub mod load;
pub mod top;
