//! TLS on an L7 VIP: [`server_config`] turns a service's `tls = { cert, key }` into a
//! rustls [`ServerConfig`] (ring provider, chosen explicitly rather than a process-wide
//! default; TLS 1.2 and 1.3; ALPN `h2` then `http/1.1`).
//!
//! The certificate file is a PEM chain (leaf first); the key file holds one PEM
//! private key, PKCS#8, PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`). Every
//! error names the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

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

#[cfg(test)]
mod tests {
    use super::*;

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
