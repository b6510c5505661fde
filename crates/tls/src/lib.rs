//! TLS for every connection (issue 17; shared by the runtime and MapReduce): one [`Security`]
//! value says whether a process speaks plain TCP or TLS, and its [`Security::dial`] /
//! [`Security::accept`] pair is the only way connections are made, so every protocol (Raft
//! peers, KV and shard clients, shard links, snapshot streams, MapReduce's coordinator, workers
//! and shuffle) gets TLS from the same few lines.
//!
//! The rules (rustls with the ring provider, TLS 1.3 only):
//! - a server given `--cert/--key/--ca` serves TLS only, and every connection must present a
//!   certificate signed by `--ca`: peers (mutual TLS between the nodes of a cluster) and
//!   clients alike, like etcd's `--client-cert-auth`. The TLS layer lets a connection without
//!   a certificate through so that the transport can answer it with a `Refusal` (a wire
//!   message) that says what to do (a client cannot be told anything once the handshake failed); a certificate
//!   that is presented but not valid (another CA, expired) fails the handshake;
//! - a node dials its peers with its own certificate and checks theirs against the same CA;
//! - a client checks the server's certificate against `--ca`; servers are dialed by IP address,
//!   so a server certificate must name the IP it is reached at (`shoal cert node --ip`);
//! - a plain-TCP caller on a TLS port is recognised by its first bytes (a Shoal frame, not a
//!   TLS record) and refused in plain words; a TLS caller on a plain port is logged as such.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The first byte of a TLS handshake record (RFC 8446 §5.1: `ContentType.handshake`).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The second byte of every TLS record: the major version (`0x03`). A Shoal frame starts with
/// its little-endian length, whose second byte is 0 for any handshake-sized frame.
const TLS_MAJOR_VERSION: u8 = 0x03;

/// Errors of loading TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the certificate, …).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Only some of `--cert`, `--key`, `--ca` were given.
    #[error("{0}")]
    Incomplete(String),
}

/// How a process's connections are made: plain TCP (the default) or TLS.
#[derive(Clone, Default)]
pub struct Security {
    tls: Option<Arc<TlsState>>,
}

struct TlsState {
    /// Present on servers (nodes): accepts TLS connections.
    acceptor: Option<TlsAcceptor>,
    /// Dials servers: checks their certificate, presents ours if we have one.
    connector: TlsConnector,
    /// Whether the dialing side presents a certificate (for error hints).
    has_client_cert: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            None => f.write_str("Security::Plain"),
            Some(t) if t.acceptor.is_some() => f.write_str("Security::TlsNode"),
            Some(_) => f.write_str("Security::TlsClient"),
        }
    }
}

/// The PEM files of a TLS setup, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// `--cert`: this process's certificate chain.
    pub cert: Option<PathBuf>,
    /// `--key`: the private key of `cert`.
    pub key: Option<PathBuf>,
    /// `--ca`: the cluster's CA certificate.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any TLS file was given.
    pub fn any(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// The security of a server: plain when no file is given, TLS when all three are.
    pub fn server(&self) -> Result<Security, TlsError> {
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) => Ok(Security::plain()),
            (Some(cert), Some(key), Some(ca)) => Security::node(cert, key, ca),
            _ => Err(TlsError::Incomplete(
                "a TLS server needs all of --cert, --key and --ca (its certificate, its key, and \
                 the cluster's CA that signed every node's and client's certificate); make them \
                 with `shoal cert init` and `shoal cert node`"
                    .into(),
            )),
        }
    }

    /// The security of a client: plain without `--ca`, TLS with it (and a client certificate
    /// when `--cert/--key` are given too).
    pub fn client(&self) -> Result<Security, TlsError> {
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) => Ok(Security::plain()),
            (cert, key, Some(ca)) => {
                let pair = match (cert, key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    (None, None) => None,
                    _ => {
                        return Err(TlsError::Incomplete(
                            "--cert and --key go together (a client certificate and its key)"
                                .into(),
                        ))
                    }
                };
                Security::client(ca, pair)
            }
            _ => Err(TlsError::Incomplete(
                "--cert/--key need --ca too: the CA that signed the servers' certificates".into(),
            )),
        }
    }
}

/// ring: pure Rust and C without cmake, the fastest provider to build here. rustls marks it
/// deprecated only for lacking post-quantum key exchange.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn load_roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs("CA certificate", ca)? {
        roots.add(cert).map_err(|e| TlsError::File {
            what: "CA certificate",
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

impl Security {
    /// Plain TCP.
    pub fn plain() -> Security {
        Security { tls: None }
    }

    /// A node (server): serves TLS with `cert`/`key`, requires every caller's certificate to
    /// be signed by `ca` (see the module docs), and dials its peers with the same certificate.
    pub fn node(cert: &Path, key: &Path, ca: &Path) -> Result<Security, TlsError> {
        let chain = load_certs("certificate", cert)?;
        let key = load_key(key)?;
        let roots = load_roots(ca)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .allow_unauthenticated()
                .build()
                .map_err(config_err)?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_err)?;
        Ok(Security {
            tls: Some(Arc::new(TlsState {
                acceptor: Some(TlsAcceptor::from(Arc::new(server))),
                connector: TlsConnector::from(Arc::new(client)),
                has_client_cert: true,
            })),
        })
    }

    /// A client: checks servers against `ca`, and presents `cert_key` when given.
    pub fn client(ca: &Path, cert_key: Option<(&Path, &Path)>) -> Result<Security, TlsError> {
        let roots = load_roots(ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots);
        let client = match cert_key {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs("certificate", cert)?, load_key(key)?)
                .map_err(config_err)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Security {
            tls: Some(Arc::new(TlsState {
                acceptor: None,
                connector: TlsConnector::from(Arc::new(client)),
                has_client_cert: cert_key.is_some(),
            })),
        })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `addr` within `timeout` (TCP connect and TLS handshake each), with
    /// `TCP_NODELAY` set. A TLS error names the likely cause.
    pub async fn dial(&self, addr: SocketAddr, timeout: Duration) -> io::Result<Stream> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = tokio::time::timeout(timeout, tls.connector.connect(name, tcp))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out (is the server running without TLS?)",
                )
            })?
            .map_err(|e| explain_dial_error(e, tls.has_client_cert))?;
        Ok(Stream::Tls(Box::new(stream.into())))
    }

    /// Takes an accepted TCP connection through the TLS handshake (or not, when plain).
    /// Sets `TCP_NODELAY`. The caller bounds the time this takes.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Stream, AcceptError> {
        let _ = tcp.set_nodelay(true);
        let first = peek_two(&tcp).await.map_err(AcceptError::Io)?;
        let looks_tls = first == [TLS_HANDSHAKE_RECORD, TLS_MAJOR_VERSION];
        let acceptor = self.tls.as_ref().and_then(|t| t.acceptor.as_ref());
        match acceptor {
            None if looks_tls => Err(AcceptError::TlsOnPlainPort),
            None => Ok(Stream::Plain(tcp)),
            Some(_) if !looks_tls => Err(AcceptError::PlainOnTlsPort(tcp)),
            Some(acceptor) => match acceptor.accept(tcp).await {
                Ok(s) => Ok(Stream::Tls(Box::new(s.into()))),
                Err(e) => Err(AcceptError::Handshake(e)),
            },
        }
    }
}

/// Waits for the first two bytes of a connection without consuming them. A caller that sends
/// fewer and then waits is bounded by the caller's handshake timeout.
async fn peek_two(tcp: &TcpStream) -> io::Result<[u8; 2]> {
    let mut buf = [0u8; 2];
    loop {
        let n = tcp.peek(&mut buf).await?;
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending anything",
                ))
            }
            2 => return Ok(buf),
            // One byte only so far: a caller that is not TLS is told apart by the first.
            _ if buf[0] != TLS_HANDSHAKE_RECORD => return Ok(buf),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

fn explain_dial_error(e: io::Error, has_client_cert: bool) -> io::Error {
    let text = e.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "the server's certificate is not signed by the CA given with --ca"
    } else if text.contains("NotValidForName") {
        "the server's certificate does not name this address (make it with `shoal cert node \
         --ip ADDR`)"
    } else if text.contains("Expired") || text.contains("expired") || text.contains("NotValidYet") {
        "the server's certificate has expired or is not valid yet"
    } else if text.contains("CertificateRequired") && !has_client_cert {
        "the server requires a client certificate: pass --cert and --key"
    } else if text.contains("alert") {
        "the server refused this process's certificate (signed by another CA, or expired?)"
    } else if e.kind() == io::ErrorKind::UnexpectedEof
        || e.kind() == io::ErrorKind::ConnectionReset
        || text.contains("InvalidContentType")
        || text.contains("corrupt message")
    {
        "the server closed the TLS handshake: is it running without TLS?"
    } else {
        ""
    };
    let message = if hint.is_empty() {
        format!("TLS handshake: {text}")
    } else {
        format!("TLS handshake: {text} ({hint})")
    };
    io::Error::new(e.kind(), message)
}

/// Why [`Security::accept`] did not produce a stream.
#[derive(Debug)]
pub enum AcceptError {
    /// The caller speaks plain TCP to this TLS port: the stream is handed back so that the
    /// transport can read its hello and refuse it in words.
    PlainOnTlsPort(TcpStream),
    /// The caller speaks TLS to this plain port.
    TlsOnPlainPort,
    /// The TLS handshake failed (an untrusted or expired certificate, …).
    Handshake(io::Error),
    /// The connection failed before it said anything.
    Io(io::Error),
}

impl std::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptError::PlainOnTlsPort(_) => {
                f.write_str("plain TCP on a TLS port (the caller was not given --ca)")
            }
            AcceptError::TlsOnPlainPort => f.write_str(
                "TLS on a plain port (this server was started without --cert/--key/--ca)",
            ),
            AcceptError::Handshake(e) => {
                let text = e.to_string();
                let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
                    " (the caller's certificate is not signed by this server's --ca)"
                } else if text.contains("Expired") || text.contains("expired") {
                    " (the caller's certificate has expired)"
                } else if text.contains("received fatal alert") {
                    " (the caller refused this server's certificate: was it given this \
                     cluster's CA as --ca?)"
                } else {
                    ""
                };
                write!(f, "TLS handshake failed: {text}{hint}")
            }
            AcceptError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A connection: plain TCP or TLS over TCP, behind one type that reads and writes.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (client or server side).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the other side presented a certificate that the TLS layer verified.
    pub fn peer_certified(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty()),
        }
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The underlying TCP stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => match Pin::new(s.as_mut()).poll_read(cx, buf) {
                // A peer that exits (or is killed) closes without TLS's close_notify. Shoal's
                // frames carry their length and a CRC, so a cut-off frame is still caught by
                // the codec: this end of stream is as clean as a plain TCP one.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(explain_alert(e))),
                other => other,
            },
        }
    }
}

/// In TLS 1.3 a client learns that the server refused its certificate only at its first read,
/// as an alert: name the cause there.
fn explain_alert(e: io::Error) -> io::Error {
    let Some(rustls::Error::AlertReceived(alert)) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return e;
    };
    use rustls::AlertDescription as A;
    let hint = match alert {
        A::UnknownCA | A::BadCertificate | A::DecryptError => {
            "the server refused this process's certificate: it is not signed by the server's CA"
        }
        A::CertificateExpired => "the server refused this process's certificate: it has expired",
        A::CertificateRequired => "the server requires a client certificate: pass --cert and --key",
        _ => "the server ended the TLS session",
    };
    io::Error::new(e.kind(), format!("TLS: received alert {alert:?} ({hint})"))
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Whether `addr` is a loopback address (127.0.0.0/8 or ::1), where a server may listen
/// without TLS; see [`check_listen_security`].
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Refuses to serve plain TCP on a non-loopback address unless `insecure` is set, so that no
/// one exposes a database unencrypted by accident. The error says which flags fix it.
pub fn check_listen_security(
    listen: SocketAddr,
    security: &Security,
    insecure: bool,
) -> Result<(), String> {
    if security.is_tls() || insecure || is_loopback(listen) {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {listen} without TLS: anyone who can reach it could read and \
         write the data. Give --cert, --key and --ca (make them with `shoal cert init` and \
         `shoal cert node`), listen on 127.0.0.1, or pass --insecure to serve plain TCP anyway"
    ))
}
