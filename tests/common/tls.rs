//! Certificates made in the test with rcgen (a CA, server and client certificates, an expired one),
//! written as PEM files for `tallyd serve --tls-*`, and a client that connects over rustls.

#![allow(dead_code)] // each test binary uses part of the helper

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::common::Client;

/// A certificate and its private key, as DER and PEM.
pub struct Leaf {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_der: Vec<u8>,
    pub key_pem: String,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "tallyd test server");
        self.sign(params)
    }

    /// A client certificate whose subject common name is `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        self.sign(params)
    }

    /// A client certificate that expired in 2001.
    pub fn expired_client(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.sign(params)
    }
}

/// The files `serve` is given: `--tls-cert`, `--tls-key`, and the client CA.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    /// Writes `server` (and `client_ca`, if any) into `dir`.
    pub fn write(dir: &Path, server: &Leaf, client_ca: Option<&Ca>) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("client-ca.pem"),
        };
        files.replace(server);
        if let Some(ca) = client_ca {
            std::fs::write(&files.client_ca, &ca.cert_pem).unwrap();
        }
        files
    }

    /// Replaces the certificate and key (for a reload), each file by an atomic rename.
    pub fn replace(&self, server: &Leaf) {
        for (path, text) in [(&self.cert, &server.cert_pem), (&self.key, &server.key_pem)] {
            let temporary = path.with_extension("new");
            std::fs::write(&temporary, text).unwrap();
            std::fs::rename(&temporary, path).unwrap();
        }
    }

    /// `--tls-cert C --tls-key K`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }

    /// The same and `--tls-client-ca`.
    pub fn mutual_args(&self) -> Vec<String> {
        let mut args = self.args();
        args.extend(["--tls-client-ca".into(), self.client_ca.display().to_string()]);
        args
    }
}

/// A rustls client configuration trusting `ca`, presenting `identity` if given.
pub fn client_config(ca: &Ca, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der.clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// An HTTPS keep-alive connection to `addr`, verifying the server as `localhost` against `ca`.
pub async fn connect(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<Client, Box<dyn std::error::Error>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = TlsConnector::from(client_config(ca, identity));
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    Client::over(stream, addr).await
}
