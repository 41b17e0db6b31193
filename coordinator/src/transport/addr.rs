//! Peer addresses: a socket address, or a host name resolved at every dial.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;

/// Where a peer listens: a socket address, or a host name and a port.
///
/// A name is resolved each time the transport dials the peer (for every
/// connection, and again on every reconnect), never once and for all: a
/// peer whose name does not resolve yet (its container is not up) is
/// dialed again with the usual backoff, and a peer that comes back at
/// another address is found there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// A socket address, dialed as it is.
    Ip(SocketAddr),
    /// A host name and port, resolved at every dial.
    Name {
        /// The host name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl PeerAddr {
    /// The socket address, if this is one (not a name).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Ip(a) => Some(*a),
            PeerAddr::Name { .. } => None,
        }
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> Self {
        PeerAddr::Ip(a)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Ip(a) => write!(f, "{a}"),
            PeerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A peer address that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not host:port (an IP address or a host name, and a port from 1 to 65535)")]
pub struct InvalidPeerAddr(pub String);

/// Longest host name accepted (DNS allows 253 characters).
const MAX_HOST_LEN: usize = 253;

impl FromStr for PeerAddr {
    type Err = InvalidPeerAddr;

    /// Parses `ip:port`, `[ipv6]:port` or `name:port`. A name is made of
    /// letters, digits, `-`, `_` and `.`; it is not looked up here.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPeerAddr(s.chars().take(300).collect());
        if let Ok(a) = s.parse::<SocketAddr>() {
            return if a.port() == 0 {
                Err(bad())
            } else {
                Ok(PeerAddr::Ip(a))
            };
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name_ok = !host.is_empty()
            && host.len() <= MAX_HOST_LEN
            && !host.starts_with(['-', '.'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if port == 0 || !name_ok {
            return Err(bad());
        }
        Ok(PeerAddr::Name {
            host: host.to_string(),
            port,
        })
    }
}

/// A boxed future, as [`Resolve`] returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Looks up the addresses of a peer given by name. The transport calls it at
/// every dial of such a peer; [`SystemResolver`] (the default) asks the
/// operating system. Tests inject their own.
pub trait Resolve: Send + Sync + 'static {
    /// The socket addresses of `host` with `port`, best first. An empty list
    /// counts as a failed lookup.
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

/// The operating system's resolver (`getaddrinfo`, through
/// `tokio::net::lookup_host`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_names() {
        assert_eq!(
            "127.0.0.1:7000".parse::<PeerAddr>(),
            Ok(PeerAddr::Ip("127.0.0.1:7000".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:7000".parse::<PeerAddr>(),
            Ok(PeerAddr::Ip("[::1]:7000".parse().unwrap()))
        );
        let gw = "gw-1.example_net:7000".parse::<PeerAddr>().unwrap();
        assert_eq!(
            gw,
            PeerAddr::Name {
                host: "gw-1.example_net".into(),
                port: 7000
            }
        );
        assert_eq!(gw.to_string(), "gw-1.example_net:7000");
        assert_eq!(gw.socket_addr(), None);
        for bad in [
            "",
            "gw1",
            ":7000",
            "gw1:",
            "gw1:0",
            "127.0.0.1:0",
            "gw1:70000",
            "gw 1:7000",
            "-gw:7000",
            "gw/1:7000",
            "::1:7000",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad:?} was accepted");
        }
    }
}
