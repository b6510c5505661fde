//! TLS on the command line (issue 17): the `--ca/--cert/--key` flags of clients and servers,
//! `--insecure`, and `shoal cert`, which makes a CA and certificates for a cluster (rcgen).
//!
//! Files `shoal cert` writes into its `--dir`: `ca.pem` and `ca-key.pem` (the cluster's CA),
//! then `NAME.pem` and `NAME-key.pem` for each node or client certificate. Keys are ECDSA
//! P-256, written with mode 0600.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use shoal_runtime::tls::{Security, TlsFiles};

/// `--ca/--cert/--key` of client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTlsArgs {
    /// The cluster's CA certificate (PEM): connect with TLS and accept only servers whose
    /// certificate it signed. Servers started with --cert/--key/--ca need it, and need
    /// --cert/--key too.
    #[arg(long = "ca", id = "tls_ca", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), signed by the cluster's CA (`shoal cert client`):
    /// TLS servers refuse clients without one.
    #[arg(long = "cert", id = "tls_cert", global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long = "key", id = "tls_key", global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The client's security: plain without --ca. When none is given, and `dir` holds the
    /// `tls/` directory of a cluster started with `--tls`, its CA and client certificate.
    pub fn security(&self, dir: Option<&Path>) -> Result<Security> {
        let mut files = TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        };
        if !files.any() {
            if let Some(local) = dir.map(local_tls_dir).filter(|d| d.join(CA_CERT).exists()) {
                files = TlsFiles {
                    cert: Some(local.join(cert_file(LOCAL_CLIENT))),
                    key: Some(local.join(key_file(LOCAL_CLIENT))),
                    ca: Some(local.join(CA_CERT)),
                };
            }
        }
        files
            .client()
            .context("TLS settings of the client (--ca, --cert, --key)")
    }
}

/// `--cert/--key/--ca` and `--insecure` of servers.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerTlsArgs {
    /// This server's certificate (PEM), signed by the cluster's CA, naming the IP address
    /// the others reach it at (`shoal cert node --ip`). With --key and --ca: serve TLS.
    #[arg(long = "cert", id = "tls_cert", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long = "key", id = "tls_key", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM): every peer and client must present a certificate
    /// it signed.
    #[arg(long = "ca", id = "tls_ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Serve plain TCP on a non-loopback address anyway (anyone who can reach the port can
    /// read and write the data). Without TLS, a server refuses any address but 127.0.0.1/::1.
    #[arg(long)]
    pub insecure: bool,
}

impl ServerTlsArgs {
    /// The server's security, refusing plain TCP on a non-loopback `listen` without
    /// --insecure.
    pub fn security(&self, listen: SocketAddr) -> Result<Security> {
        let security = TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
        .server()
        .context("TLS settings of the server (--cert, --key, --ca)")?;
        if let Err(message) =
            shoal_runtime::tls::check_listen_security(listen, &security, self.insecure)
        {
            bail!(message);
        }
        Ok(security)
    }

    /// The flags that give a child server these settings (for `kv up --tls`).
    pub fn for_node(dir: &Path, name: &str) -> Vec<std::ffi::OsString> {
        vec![
            "--cert".into(),
            dir.join(cert_file(name)).into(),
            "--key".into(),
            dir.join(key_file(name)).into(),
            "--ca".into(),
            dir.join(CA_CERT).into(),
        ]
    }
}

/// The CA certificate's file name in a `shoal cert` directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca-key.pem";
/// The client certificate `kv up --tls` and `shard up --tls` make (`DIR/tls/client.pem`).
pub const LOCAL_CLIENT: &str = "client";

/// `NAME.pem`.
pub fn cert_file(name: &str) -> String {
    format!("{name}.pem")
}

/// `NAME-key.pem`.
pub fn key_file(name: &str) -> String {
    format!("{name}-key.pem")
}

/// Where `kv up --tls` keeps a local cluster's certificates: `DIR/tls`.
pub fn local_tls_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("tls")
}

/// `shoal cert`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "A 3-host cluster with TLS (run where the CA key is kept, then copy \
each host its files):\n  \
    shoal cert init --dir certs\n  \
    shoal cert node --dir certs --name n1 --ip 10.0.0.1\n  \
    shoal cert node --dir certs --name n2 --ip 10.0.0.2\n  \
    shoal cert node --dir certs --name n3 --ip 10.0.0.3\n  \
    shoal cert client --dir certs --name alice\n  \
    # on host 1 (and likewise 2, 3):\n  \
    shoal kv server --id 1 --listen 10.0.0.1:7001 --peers 1=10.0.0.1:7001,2=10.0.0.2:7001,3=10.0.0.3:7001 \\\n      \
    --data n1 --cert certs/n1.pem --key certs/n1-key.pem --ca certs/ca.pem\n  \
    # a client:\n  \
    shoal kv --endpoints 10.0.0.1:7001,10.0.0.2:7001,10.0.0.3:7001 \\\n      \
    --ca certs/ca.pem --cert certs/alice.pem --key certs/alice-key.pem put k v\n\
Servers are reached by IP address: a node certificate must name every IP its peers and \
clients use (--ip, repeatable). Every certificate signed by the CA is trusted by every \
server, as a client and as a peer: keep ca-key.pem off the servers. `shoal kv up --tls` and \
`shoal shard up --tls` do all this for a local cluster."
)]
pub struct CertArgs {
    #[command(subcommand)]
    command: CertSub,
}

#[derive(Debug, clap::Subcommand)]
enum CertSub {
    /// Make the cluster's CA: DIR/ca.pem (give it to every server and client as --ca) and
    /// DIR/ca-key.pem (keep it secret: it signs certificates).
    Init {
        /// Directory of the certificates (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Make a server's certificate DIR/NAME.pem and key DIR/NAME-key.pem, signed by the CA in
    /// DIR. It serves TLS and also authenticates the server to its peers.
    Node {
        /// Directory holding the CA (`shoal cert init`).
        #[arg(long)]
        dir: PathBuf,
        /// The file name (and certificate common name), e.g. n1.
        #[arg(long)]
        name: String,
        /// An IP address the server is reached at (repeat for several; at least one).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// A DNS name the certificate also names (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Make a client's certificate DIR/NAME.pem and key DIR/NAME-key.pem, signed by the CA in
    /// DIR (clients pass them as --cert and --key).
    Client {
        /// Directory holding the CA (`shoal cert init`).
        #[arg(long)]
        dir: PathBuf,
        /// The file name (and certificate common name), e.g. alice.
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Make it expired already (valid until yesterday): for testing that servers refuse
        /// it.
        #[arg(long, hide = true)]
        expired: bool,
    },
}

/// Runs `shoal cert`.
pub fn run(args: CertArgs) -> Result<ExitCode> {
    match args.command {
        CertSub::Init { dir, days } => {
            init_ca(&dir, days)?;
            println!(
                "made {} (give it to every server and client as --ca) and {} (keep it secret)",
                dir.join(CA_CERT).display(),
                dir.join(CA_KEY).display()
            );
        }
        CertSub::Node {
            dir,
            name,
            ips,
            dns,
            days,
        } => {
            make_cert(
                &dir,
                &name,
                Kind::Node {
                    ips: &ips,
                    dns: &dns,
                },
                days,
                false,
            )?;
            print_made(&dir, &name);
        }
        CertSub::Client {
            dir,
            name,
            days,
            expired,
        } => {
            make_cert(&dir, &name, Kind::Client, days, expired)?;
            print_made(&dir, &name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_made(dir: &Path, name: &str) {
    println!(
        "made {} and {}",
        dir.join(cert_file(name)).display(),
        dir.join(key_file(name)).display()
    );
}

/// Makes everything a local cluster needs in `tls_dir` (if not there yet): the CA, one node
/// certificate per `nodes` name for 127.0.0.1, ::1 and localhost, and the `client` one.
pub fn make_local(tls_dir: &Path, nodes: &[String]) -> Result<()> {
    if !tls_dir.join(CA_CERT).exists() {
        init_ca(tls_dir, 3650)?;
    }
    let ips = [
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ];
    let dns = ["localhost".to_string()];
    for name in nodes {
        if !tls_dir.join(cert_file(name)).exists() {
            let kind = Kind::Node {
                ips: &ips,
                dns: &dns,
            };
            make_cert(tls_dir, name, kind, 825, false)?;
        }
    }
    if !tls_dir.join(cert_file(LOCAL_CLIENT)).exists() {
        make_cert(tls_dir, LOCAL_CLIENT, Kind::Client, 825, false)?;
    }
    Ok(())
}

enum Kind<'a> {
    Node {
        ips: &'a [IpAddr],
        dns: &'a [String],
    },
    Client,
}

fn validity(params: &mut CertificateParams, days: u32, expired: bool) -> Result<()> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let now = time::OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
    } else {
        // An hour back: a host whose clock is slightly behind still accepts it.
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days));
    }
    Ok(())
}

/// The CA's distinguished name, derived from its key so that a CA rebuilt from `ca-key.pem`
/// to sign has exactly the subject of `ca.pem`, and two clusters' CAs differ.
fn ca_name(key: &KeyPair) -> DistinguishedName {
    let id: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Shoal");
    dn.push(DnType::CommonName, format!("Shoal cluster CA {id}"));
    dn
}

fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(key);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn init_ca(dir: &Path, days: u32) -> Result<()> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if cert_path.exists() || key_path.exists() {
        bail!(
            "{} already holds a CA: certificates it signed would stop working if it were \
             replaced; use another --dir, or remove {} and {} first",
            dir.display(),
            cert_path.display(),
            key_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = ca_params(&key);
    validity(&mut params, days, false)?;
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

fn make_cert(dir: &Path, name: &str, kind: Kind<'_>, days: u32, expired: bool) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("--name {name:?}: use letters, digits, '-', '_' and '.' only (it names the files)");
    }
    let ca_key_path = dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).with_context(|| {
        format!(
            "reading the CA key {} (make a CA first: shoal cert init --dir {})",
            ca_key_path.display(),
            dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a PEM private key", ca_key_path.display()))?;
    // The issuer: the CA's subject and key, exactly as in ca.pem.
    let ca = ca_params(&ca_key)
        .self_signed(&ca_key)
        .context("loading the CA")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match kind {
        Kind::Node { ips, dns } => {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
            for d in dns {
                let name = d
                    .clone()
                    .try_into()
                    .with_context(|| format!("--dns {d:?} is not a DNS name"))?;
                params.subject_alt_names.push(SanType::DnsName(name));
            }
        }
        Kind::Client => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    validity(&mut params, days, expired)?;
    let key = KeyPair::generate().context("generating a key")?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("signing the certificate")?;
    write_file(
        &dir.join(key_file(name)),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&dir.join(cert_file(name)), cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Writes `path` whole (a temporary file, fsynced, renamed, the directory fsynced), with mode
/// 0600 for a private key.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent.display()))?;
    }
    Ok(())
}
