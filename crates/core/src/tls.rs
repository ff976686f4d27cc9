//! TLS towards clients, shared by every listener that offers it (the load balancer's HTTPS
//! listener, the pooler's SSLRequest): rustls with the ring provider and its safe defaults
//! (TLS 1.2 and 1.3, no client certificates), the certificate chain and key read from PEM
//! files. The files are watched: when either changes, the next handshakes use the new pair,
//! without a restart; a pair that does not load is reported and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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

/// The certificate in use, replaced when its files change.
#[derive(Debug)]
pub struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [Option<SystemTime>; 2])>,
}

impl Certificate {
    fn stamps(&self) -> [Option<SystemTime>; 2] {
        [modified(&self.cert), modified(&self.key)]
    }

    /// Loads the files again if either changed since the last load; true when the
    /// certificate was replaced.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = self.stamps();
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == stamps {
            return false;
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // A failed load is not retried until the files change again.
        current.1 = stamps;
        match load(&self.cert, &self.key) {
            Ok(certified) => {
                current.0 = certified;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "TLS certificate files changed but do not load; keeping the old pair");
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

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .clone(),
        )
    }
}

/// An acceptor for the chain and key in these PEM files, offering `alpn` protocols (most
/// preferred first), and the certificate handle to watch for changes.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<(TlsAcceptor, Arc<Certificate>), TlsError> {
    let certified = load(cert, key)?;
    let certificate = Arc::new(Certificate {
        cert: cert.to_owned(),
        key: key.to_owned(),
        current: RwLock::new((certified, [modified(cert), modified(key)])),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((TlsAcceptor::from(Arc::new(config)), certificate))
}
