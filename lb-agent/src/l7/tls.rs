//! TLS on an L7 VIP: [`server_config`] turns a service's `tls = { cert, key }` into a
//! rustls [`ServerConfig`] (ring provider, chosen explicitly rather than a process-wide
//! default; TLS 1.2 and 1.3; ALPN `h2` then `http/1.1`).
//!
//! TLS to the backends: [`client_config`] turns `backend_tls = { ca, server_name,
//! verify }` into a rustls [`ClientConfig`] offering the given ALPN protocols: the
//! certificate authorities of `ca` (default: the system bundle,
//! [`SYSTEM_CA_BUNDLE`]), or, with `verify = false`, any certificate (signatures still
//! checked, so the peer holds the key of the certificate it shows).
//! [`backend_server_name`] is the name sent in SNI and checked: `server_name`, or the
//! backend's IP address.
//!
//! The certificate file is a PEM chain (leaf first); the key file holds one PEM
//! private key, PKCS#8, PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`). Every
//! error names the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::{BackendTlsConfig, TlsConfig};

/// The certificate authorities trusted for backends when `backend_tls.ca` is not given
/// (Debian's `ca-certificates` bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or parsed.
    #[error("TLS certificate {}: {reason}", path.display())]
    Cert {
        /// The `tls.cert` file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file could not be read or parsed.
    #[error("TLS key {}: {reason}", path.display())]
    Key {
        /// The `tls.key` file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The certificate authorities for backend certificates could not be read.
    #[error("backend_tls.ca {}: {reason}", path.display())]
    Ca {
        /// The `backend_tls.ca` file (or the system bundle).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `backend_tls.server_name` is neither a DNS name nor an IP address.
    #[error("backend_tls.server_name \"{name}\" is not a valid DNS name or IP address")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// rustls refused the pair (for example the key does not match the certificate).
    #[error("TLS certificate {} with key {}: {reason}", cert.display(), key.display())]
    Pair {
        /// The `tls.cert` file.
        cert: PathBuf,
        /// The `tls.key` file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

fn pem_reason(e: &rustls_pki_types::pem::Error, what: &str) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls_pki_types::pem::Error::NoItemsFound => format!("no PEM {what} found"),
        other => format!("invalid PEM: {other}"),
    }
}

/// Read the PEM certificate chain at `path`.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(pem_reason(&e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(pem_reason(&e, "certificate")))?;
    if certs.is_empty() {
        return Err(err(
            "no PEM certificate (BEGIN CERTIFICATE) found".to_owned()
        ));
    }
    Ok(certs)
}

/// Read the PEM private key at `path` (PKCS#8, PKCS#1 or SEC1).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) found"
                    .to_owned()
            }
            other => pem_reason(&other, "private key"),
        },
    })
}

/// Build the server side TLS configuration of a service.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let pair_err = |reason: String| TlsError::Pair {
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| pair_err(e.to_string()))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The CA bundle `cfg` trusts: `ca`, else [`SYSTEM_CA_BUNDLE`].
fn ca_path(cfg: &BackendTlsConfig) -> PathBuf {
    cfg.ca
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE))
}

/// Build the client side TLS configuration towards a service's backends, offering
/// `alpn` (in order of preference).
pub fn client_config(
    cfg: &BackendTlsConfig,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    if let Some(name) = &cfg.server_name {
        ServerName::try_from(name.as_str())
            .map_err(|_| TlsError::ServerName { name: name.clone() })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Ca {
            path: ca_path(cfg),
            reason: e.to_string(),
        })?;
    let mut config = if cfg.verify {
        let path = ca_path(cfg);
        let err = |reason: String| TlsError::Ca {
            path: path.clone(),
            reason,
        };
        let certs = load_certs(&path).map_err(|e| match e {
            TlsError::Cert { reason, .. } => err(reason),
            other => other,
        })?;
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(err(format!(
                "no usable CA certificate ({ignored} could not be parsed)"
            )));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name sent in SNI to the backend at `addr` and checked against its certificate.
#[must_use]
pub fn backend_server_name(
    cfg: &BackendTlsConfig,
    addr: std::net::SocketAddr,
) -> ServerName<'static> {
    cfg.server_name
        .as_deref()
        .and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

/// `verify = false`: any certificate is accepted; the handshake's signatures are still
/// checked with the provider's algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_tls_errors_name_the_key() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let cfg = BackendTlsConfig {
            ca: Some(tmp.path().join("nope.pem")),
            ..BackendTlsConfig::default()
        };
        let e = client_config(&cfg, &[b"h2"])
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("backend_tls.ca") && e.contains("nope.pem"),
            "{e}"
        );
        let cfg = BackendTlsConfig {
            server_name: Some("bad name!".to_owned()),
            ..BackendTlsConfig::default()
        };
        let e = client_config(&cfg, &[b"h2"]).expect_err("name").to_string();
        assert!(e.contains("server_name"), "{e}");
        // verify = false needs no CA; the ALPN list is the one given.
        let cfg = BackendTlsConfig {
            ca: Some(tmp.path().join("nope.pem")),
            verify: false,
            ..BackendTlsConfig::default()
        };
        let c = client_config(&cfg, &[b"h2", b"http/1.1"]).expect("no verify");
        assert_eq!(c.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(
            backend_server_name(&cfg, addr),
            ServerName::IpAddress(addr.ip().into())
        );
    }

    #[test]
    fn loads_a_generated_pair_and_offers_h2_first() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let d = tmp.path();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        let cfg = TlsConfig {
            cert: d.join("c.pem"),
            key: d.join("k.pem"),
        };
        std::fs::write(&cfg.cert, ck.cert.pem()).expect("write");
        std::fs::write(&cfg.key, ck.key_pair.serialize_pem()).expect("write");
        let sc = server_config(&cfg).expect("config");
        assert_eq!(sc.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn errors_name_the_file() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let d = tmp.path();
        let cfg = TlsConfig {
            cert: d.join("missing.pem"),
            key: d.join("k.pem"),
        };
        let e = server_config(&cfg).expect_err("missing").to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );

        std::fs::write(&cfg.key, "not pem").expect("write");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        let cert = d.join("c.pem");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        let cfg = TlsConfig {
            cert: cert.clone(),
            key: d.join("k.pem"),
        };
        let e = server_config(&cfg).expect_err("no key").to_string();
        assert!(
            e.contains("k.pem") && e.contains("no PEM private key"),
            "{e}"
        );

        std::fs::write(&cert, "garbage").expect("write");
        let e = server_config(&cfg).expect_err("no cert").to_string();
        assert!(
            e.contains("c.pem") && e.contains("no PEM certificate"),
            "{e}"
        );

        // A key that does not match the certificate.
        let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).expect("rcgen");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&cfg.key, other.key_pair.serialize_pem()).expect("write");
        let e = server_config(&cfg).expect_err("mismatch").to_string();
        assert!(e.contains("c.pem") && e.contains("k.pem"), "{e}");
    }
}
