//! Loopback ports for gateways that must know each other's addresses before
//! any of them starts (shared by the multi-gateway tests and benches).

use std::net::SocketAddr;

/// `n` distinct loopback addresses, picked by the OS (bind port 0) and
/// released when this returns, for the gateways to bind again right away.
pub fn reserve_ports(n: usize) -> Vec<SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter().map(|l| l.local_addr().expect("addr")).collect()
}
