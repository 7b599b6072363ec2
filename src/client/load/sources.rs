//! Spreading connections over loopback source addresses automatically.

use super::worker::Target;
use super::Plan;
use crate::net::source::{loopback_sources, planned_per_address, ports_per_address};

impl Plan {
    /// True when the connections go to this machine over TCP loopback.
    pub fn target_is_loopback(&self) -> bool {
        match &self.target {
            Target::Tcp(addr) => addr.ip().is_loopback(),
            Target::Unix(_) => true,
        }
    }

    /// Connections each source address will open.
    pub fn per_source(&self) -> u64 {
        match self.target {
            Target::Tcp(_) => {
                u64::from(self.connections).div_ceil(self.source_ips.len().max(1) as u64)
            }
            Target::Unix(_) => 0,
        }
    }
}

/// With no `--source-ip` and an IPv4 loopback destination, spreads the
/// connections over 127.0.0.1, 127.0.0.2, ... when one address's ports
/// would not do; returns what it did, to be said. Deterministic, so every
/// load process of a run computes the same list.
pub fn spread(plan: &mut Plan) -> Option<String> {
    let Target::Tcp(addr) = plan.target else {
        return None;
    };
    if !plan.source_ips.is_empty() || !addr.ip().is_loopback() || !addr.is_ipv4() {
        return None;
    }
    let per = planned_per_address();
    let n = u64::from(plan.connections).div_ceil(per);
    if n <= 1 {
        return None;
    }
    plan.source_ips = loopback_sources(n as u32);
    Some(format!(
        "{} connections from {n} source addresses (127.0.0.1 to {}): one address has {} \
         ephemeral ports (net.ipv4.ip_local_port_range), {per} planned per address",
        plan.connections,
        plan.source_ips[plan.source_ips.len() - 1],
        ports_per_address().unwrap_or(0),
    ))
}
