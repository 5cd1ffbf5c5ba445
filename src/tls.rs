//! HTTPS with rustls (through tokio-rustls, on the `ring` provider): the server's certificate and
//! key from PEM files, optional mutual TLS (`--tls-client-ca`), and a reload on SIGHUP.
//!
//! A reload builds a whole new `ServerConfig` from the files and swaps it in; connections already
//! open keep the configuration they were accepted with, so nothing is dropped, and every connection
//! accepted after the swap gets the new one. A reload that fails (a missing file, a key that does
//! not match its certificate) changes nothing and is logged: a typo during a certificate rotation
//! must not take the server down.
//!
//! With `--tls-client-ca`, a client must present a certificate that chains to one of those CAs and
//! is within its validity period, or the handshake fails before any HTTP is read. The subject's
//! common name of a verified certificate is handed to the HTTP layer, where an API key bound to a
//! certificate (`tallyd keys create --client-cert-cn`) is only accepted from that certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} from {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the TLS configuration is refused: {0}")]
    Config(String),
}

/// Where the PEM files are, re-read on every reload.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The TLS configuration in force, and where to reload it from.
pub struct Tls {
    files: TlsFiles,
    /// Swapped whole by [`Tls::reload`]; each accept clones the `Arc` (a std lock held for that
    /// clone only, never across an await).
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = build(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Re-reads the files; on any error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        TlsAcceptor::from(config)
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(error.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = read_certs("certificate chain", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| TlsError::File {
        what: "private key",
        path: files.key.clone(),
        reason: error.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("CA certificates", path)? {
                roots
                    .add(ca)
                    .map_err(|error| TlsError::Config(format!("a CA in {}: {error}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| TlsError::Config(error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    // tallyd speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The subject common name of the client's (already verified) certificate, if it sent one.
pub fn client_cert_cn(connection: &rustls::ServerConnection) -> Option<String> {
    let leaf = connection.peer_certificates()?.first()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let common_name = certificate.subject().iter_common_name().next()?;
    common_name.as_str().ok().map(str::to_owned)
}
