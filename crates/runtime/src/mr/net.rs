//! Connections of MapReduce (coordinator ↔ workers, shuffle, input fetches) through one
//! [`Security`]: plain TCP, or mutual TLS with the cluster's CA (`--cert/--key/--ca`, the same
//! rules as the KV servers; see `shoal_tls`).
//!
//! A server accepts a caller without a certificate (plain TCP on its TLS port, or TLS without
//! a client certificate) far enough to read its handshake and answer it with a refusal that
//! says what to do, rather than closing a connection the caller cannot explain.

use std::io;
use std::time::Duration;

pub use shoal_tls::{AcceptError, Security, Stream};
use tokio::net::TcpStream;

/// Connects to `addr` (`host:port`) within `timeout` through `security`.
pub async fn dial(security: &Security, addr: &str, timeout: Duration) -> io::Result<Stream> {
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "name lookup timed out"))??
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name has no address"))?;
    security.dial(resolved, timeout).await
}

/// An accepted connection and, when its caller is not authenticated on a TLS server, the
/// reason to refuse it with (the caller's handshake is still read, and answered with it).
pub struct Accepted {
    /// The connection.
    pub stream: Stream,
    /// Why the caller must be refused, if it must.
    pub refusal: Option<String>,
}

/// Takes an accepted connection through `security` within `timeout`. `None` when the
/// connection cannot even be answered (a failed TLS handshake: logged at warn with its cause);
/// `server` names this process in the refusal ("coordinator", "worker's shuffle server").
pub async fn accept(
    security: &Security,
    tcp: TcpStream,
    timeout: Duration,
    server: &str,
) -> Option<Accepted> {
    let peer = tcp.peer_addr().ok();
    let result = match tokio::time::timeout(timeout, security.accept(tcp)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                ?peer,
                "no TLS handshake within {timeout:?}: closing connection"
            );
            return None;
        }
    };
    match result {
        Ok(stream) if security.is_tls() && !stream.peer_certified() => Some(Accepted {
            stream,
            refusal: Some(format!(
                "this {server} requires a certificate signed by the cluster's CA: give the \
                 worker --cert and --key (make them with `shoal cert node`)"
            )),
        }),
        Ok(stream) => Some(Accepted {
            stream,
            refusal: None,
        }),
        Err(AcceptError::PlainOnTlsPort(tcp)) => Some(Accepted {
            stream: Stream::Plain(tcp),
            refusal: Some(format!(
                "this {server} serves TLS only: give the worker --cert, --key and --ca (the \
                 cluster's certificates, made with `shoal cert init` and `shoal cert node`)"
            )),
        }),
        Err(e) => {
            tracing::warn!(?peer, error = %e, "refusing a connection");
            None
        }
    }
}
