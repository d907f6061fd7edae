//! The rustls client configuration of a `rediss://` endpoint: the trusted CAs (the system
//! trust store, or the CA given) and the optional client certificate, with the ring provider.

use std::sync::Arc;

use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::endpoint::{Pem, Tls};

/// fred's TLS settings for `tls`, or why they cannot be made (a message without key material).
pub(crate) fn fred_config(tls: &Tls) -> Result<TlsConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &tls.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "CA certificate")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("the CA certificate {ca:?} is not usable: {e}"))?;
            }
            roots
        }
        None => system_roots()?,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots);
    let config = match &tls.client {
        Some((cert, key)) => {
            let chain = certificates(cert, "client certificate")?;
            let key = private_key(key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!("the client certificate {cert:?} and its key do not fit: {e}")
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConfig {
        connector: TlsConnector::from(config),
        hostnames: TlsHostMapping::None,
    })
}

/// The system trust store, as `rustls-native-certs` finds it (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` first). Unreadable entries are skipped as long as some certificate loads.
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "no trusted CA certificate found in the system trust store ({}); set SSL_CERT_FILE \
             or give the server's CA with Config::tls_ca_file",
            if errors.is_empty() {
                "it is empty".to_string()
            } else {
                errors.join("; ")
            }
        ));
    }
    Ok(roots)
}

/// The certificates in `pem`; at least one.
fn certificates(pem: &Pem, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = match pem {
        Pem::Bytes(bytes) => CertificateDer::pem_slice_iter(bytes).collect(),
        Pem::File(path) => CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?
            .collect(),
    };
    let certs = certs.map_err(|e| format!("the {what} {pem:?} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("the {what} {pem:?} holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// The private key in `pem`. Errors name the file, never the key.
fn private_key(pem: &Pem) -> Result<PrivateKeyDer<'static>, String> {
    let key = match pem {
        Pem::Bytes(bytes) => PrivateKeyDer::from_pem_slice(bytes),
        Pem::File(path) => PrivateKeyDer::from_pem_file(path),
    };
    key.map_err(|e| {
        // pki-types' error names the section kind or the I/O failure, not the bytes.
        let kind = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block found".to_string(),
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "not a valid PEM private key".to_string(),
        };
        format!("the client key {pem:?} is not usable: {kind}")
    })
}
