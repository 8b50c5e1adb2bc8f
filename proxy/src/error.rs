//! Errors of the data plane.
//!
//! Every error says which side failed ([`Side`]) and whether trying again (another endpoint, or
//! the same operation later) is safe ([`Error::is_retryable`]), in the spirit of pingora's
//! `ErrorSource`/`RetryType`. Hot-path variants carry a plain `io::Error` (no allocation for OS
//! errors) and are never boxed.

use std::{io, net::SocketAddr, time::Duration};

/// Which side of a proxied connection an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Side {
    /// The downstream client.
    Client,
    /// The upstream endpoint.
    Upstream,
    /// Ferry itself: binding, socket options, configuration.
    Local,
}

/// An error of the data plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frontend socket could not be bound. Retried with the next snapshot.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Accepting a client failed (for example `EMFILE`); the accept loop backs off and continues.
    #[error("accepting on {addr}: {source}")]
    Accept {
        /// The frontend address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Connecting to an endpoint failed; another endpoint may be tried.
    #[error("connecting to upstream {addr}: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Connecting to an endpoint did not finish in time; another endpoint may be tried.
    #[error("connecting to upstream {addr}: timed out after {timeout:?}")]
    ConnectTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The connect timeout that passed.
        timeout: Duration,
    },
    /// No endpoint was available (none configured, all ejected, or all already tried).
    #[error("no endpoint available")]
    NoEndpoint,
    /// Reading from or writing to the client failed.
    #[error("client: {0}")]
    Client(#[source] io::Error),
    /// Reading from or writing to the upstream failed after the connection was established.
    #[error("upstream: {0}")]
    Upstream(#[source] io::Error),
}

// === impl Error ===

impl Error {
    /// The side that failed.
    pub fn side(&self) -> Side {
        match self {
            Self::Bind { .. } | Self::Accept { .. } => Side::Local,
            Self::Connect { .. } | Self::ConnectTimeout { .. } | Self::NoEndpoint | Self::Upstream(_) => {
                Side::Upstream
            }
            Self::Client(_) => Side::Client,
        }
    }

    /// Whether trying again is safe: a failed connect may go to another endpoint (nothing was
    /// sent yet), a failed bind or accept may be retried later. Once bytes have flowed
    /// ([`Error::Client`], [`Error::Upstream`]) the connection cannot be replayed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Bind { .. } | Self::Accept { .. } | Self::Connect { .. } | Self::ConnectTimeout { .. } => {
                true
            }
            Self::NoEndpoint | Self::Client(_) | Self::Upstream(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_and_retry() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let e = Error::Connect { addr, source: io::ErrorKind::ConnectionRefused.into() };
        assert_eq!(e.side(), Side::Upstream);
        assert!(e.is_retryable());
        let e = Error::Client(io::ErrorKind::ConnectionReset.into());
        assert_eq!(e.side(), Side::Client);
        assert!(!e.is_retryable());
        assert_eq!(Error::Bind { addr, source: io::ErrorKind::AddrInUse.into() }.side(), Side::Local);
    }
}
