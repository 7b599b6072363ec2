//! Source addresses for many outgoing connections.
//!
//! A TCP connection is known by its four-tuple; to one destination, one
//! source address can open as many connections as there are ephemeral
//! ports (`net.ipv4.ip_local_port_range`, 28,232 by default). Beyond that,
//! a client needs more source addresses, and on loopback it has them: all
//! of 127.0.0.0/8 is this machine.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use socket2::Socket;

/// The ephemeral port range, from /proc.
pub fn local_port_range() -> Option<(u64, u64)> {
    let lo = super::limits::proc_number("/proc/sys/net/ipv4/ip_local_port_range", 0)?;
    let hi = super::limits::proc_number("/proc/sys/net/ipv4/ip_local_port_range", 1)?;
    Some((lo, hi))
}

/// Ephemeral ports per source address.
pub fn ports_per_address() -> Option<u64> {
    local_port_range().map(|(lo, hi)| hi.saturating_sub(lo) + 1)
}

/// Connections planned per source address: 40 % of its ports.
///
/// Not all of them, because Linux's `connect` looks for a free port among
/// the even ports of the range first (the odd ones are `bind`'s first
/// choice), and only then the odd ones. Once the even half is taken, every
/// further `connect` scans that whole half, under locks, before it finds
/// an odd port: measured here, opening fell from about 20,000 to about
/// 1,000 connections a second at 14,000 per address. 40 % stays below the
/// even half with room for other programs and TIME_WAIT leftovers.
pub fn planned_per_address() -> u64 {
    ports_per_address().map_or(10_000, |p| (p * 2 / 5).max(1))
}

/// `127.0.0.1`, `127.0.0.2`, ...: the first `n` loopback addresses.
pub fn loopback_sources(n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + i)))
        .collect()
}

/// Binds `socket` to `ip` without choosing its port yet
/// (`IP_BIND_ADDRESS_NO_PORT`): the port is picked at `connect`, when the
/// kernel knows the destination, so it needs to be unique only per
/// four-tuple, and the bind does not search the port space.
pub fn bind_source(socket: &Socket, ip: IpAddr) -> io::Result<()> {
    if ip.is_ipv4() {
        setsockopt(socket, IpBindAddressNoPort, &true).map_err(io::Error::from)?;
    }
    socket.bind(&SocketAddr::new(ip, 0).into())
}
