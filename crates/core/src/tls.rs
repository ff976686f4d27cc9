//! TLS towards clients, shared by every listener that offers it (the load balancer's HTTPS
//! listener, the pooler's SSLRequest): rustls with the ring provider and its safe defaults
//! (TLS 1.2 and 1.3, no client certificates), the certificate chain and key read from PEM
//! files. The files are watched: when either changes, the next handshakes use the new pair,
//! without a restart; a pair that does not load is reported and the old one kept.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
pub use tokio_rustls::client::TlsStream as ClientTlsStream;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
pub use tokio_rustls::server::TlsStream;
pub use tokio_rustls::TlsAcceptor;

use crate::Shutdown;

/// How often the files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The chain and key in these PEM files, ready to sign handshakes.
fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read_error = |path: &Path, reason: String| TlsError::Read {
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(read_error(cert, "no certificate in it".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, e.to_string()))?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider())?;
    Ok(Arc::new(certified))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A value built from files, built again when one of them changes; a build that fails
/// keeps the old value (and is not retried until the files change again).
pub struct Reloading<T> {
    files: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    current: RwLock<(T, Vec<Option<SystemTime>>)>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> Reloading<T> {
    fn build_from(
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let value = build()?;
        let stamps = files.iter().map(|f| modified(f)).collect();
        Ok(Arc::new(Self {
            files,
            build: Box::new(build),
            current: RwLock::new((value, stamps)),
        }))
    }

    /// The value in use.
    pub fn get(&self) -> T {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Builds the value again if a file changed since the last build; true when replaced.
    pub fn reload_if_changed(&self) -> bool {
        let stamps: Vec<_> = self.files.iter().map(|f| modified(f)).collect();
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == stamps {
            return false;
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.1 = stamps;
        let first = self.files.first().map(|f| f.display().to_string());
        match (self.build)() {
            Ok(value) => {
                current.0 = value;
                tracing::info!(file = first, "TLS files reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "TLS files changed but do not load; keeping the old ones");
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_CHECK`] until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_CHECK) => {}
                () = shutdown.requested() => return,
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }
}

/// The certificate a listener presents, replaced when its files change.
pub type Certificate = Reloading<Arc<CertifiedKey>>;

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// An acceptor for the chain and key in these PEM files, offering `alpn` protocols (most
/// preferred first), and the certificate handle to watch for changes.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<(TlsAcceptor, Arc<Certificate>), TlsError> {
    let (cert, key) = (cert.to_owned(), key.to_owned());
    let files = vec![cert.clone(), key.clone()];
    let certificate = Certificate::build_from(files, move || load(&cert, &key))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((TlsAcceptor::from(Arc::new(config)), certificate))
}

/// TLS towards servers (a backend or an origin at an `https://` URL): the CAs their
/// certificates must chain to, and this side's own certificate when they ask for one
/// (mutual TLS). The files are watched like a listener's: new connections use new files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    /// PEM file of the CAs that sign the servers' certificates (default: the system's).
    pub ca_file: PathBuf,
    /// This side's certificate chain and key (PEM), for servers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for ClientTls {
    fn default() -> Self {
        Self {
            ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            cert_file: None,
            key_file: None,
        }
    }
}

impl ClientTls {
    /// Checks what serde cannot; `at` names the section.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(format!("{at}: cert_file and key_file go together"));
        }
        Ok(())
    }
}

/// Makes TLS connections to servers with a [`ClientTls`]'s files, reloaded when they change.
pub type Connector = Reloading<Arc<rustls::ClientConfig>>;

impl Connector {
    /// A connector for `settings` offering `alpn` protocols; an error names the file that
    /// does not load.
    pub fn new(settings: &ClientTls, alpn: &[&[u8]]) -> Result<Arc<Self>, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let files = [
            Some(&settings.ca_file),
            settings.cert_file.as_ref(),
            settings.key_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        let settings = settings.clone();
        Self::build_from(files, move || client_config(&settings, &alpn))
    }

    /// A TLS session over `stream` with the server `name` (a host name or an address),
    /// whose certificate must be valid for it.
    pub async fn connect<S>(
        &self,
        name: &str,
        stream: S,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = rustls_pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(self.get())
            .connect(name, stream)
            .await
    }
}

fn client_config(
    settings: &ClientTls,
    alpn: &[Vec<u8>],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let read_error = |path: &Path, reason: String| TlsError::Read {
        path: path.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&settings.ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read_error(&settings.ca_file, e.to_string()))?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(read_error(
            &settings.ca_file,
            "no CA certificate in it".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| read_error(cert, e.to_string()))?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, e.to_string()))?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// A connection to a server: TCP, or TLS over TCP.
#[derive(Debug)]
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream<TcpStream>>),
}

impl ClientStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether the idle connection has nothing to say: a server that closed it, or sent
    /// anything (a FATAL on shutdown), makes it unfit to lend. The socket is only peeked, so
    /// a TLS record stays for the TLS session to read.
    pub fn is_quiet(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let tcp = self.tcp();
        if tcp.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
