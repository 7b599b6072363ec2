//! The client tools: [`connect`], an `nc`-like client, and [`load`], a
//! load generator. Both are mio poll loops like the server.

pub mod connect;
pub mod load;
