//! The rustls client configuration of a `rediss://` endpoint: the trusted CAs (the system
//! trust store, or the CA given) and the optional client certificate, with the ring provider;
//! and, on a Redis Cluster, the name each node's certificate is checked against.

use std::net::IpAddr;
use std::sync::Arc;

use fred::types::config::{HostMapping, TlsConfig, TlsConnector, TlsHostMapping};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::endpoint::{Pem, Tls};

/// fred's TLS settings for `tls`, or why they cannot be made (a message without key material).
///
/// `cluster_seed_name` is, for a Redis Cluster found from a seed node named by a DNS name,
/// that name: the nodes are reached at the addresses `CLUSTER SLOTS` announces, usually IP
/// addresses, which certificates made for a DNS name do not list. A node announced by an IP
/// address is then checked against the seed's name instead (by the same CA: a certificate
/// for that name signed by the trusted CA is what the seed itself showed). Nodes announced by
/// a hostname, and every node of a cluster whose seed is an IP address, are checked against
/// their own address.
pub(crate) fn fred_config(tls: &Tls, cluster_seed_name: Option<&str>) -> Result<TlsConfig, String> {
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
    let hostnames = match cluster_seed_name {
        Some(name) => TlsHostMapping::Custom(Arc::new(SeedName(name.to_string()))),
        None => TlsHostMapping::None,
    };
    Ok(TlsConfig {
        connector: TlsConnector::from(config),
        hostnames,
    })
}

/// The DNS name of a cluster's seed node, for the certificate check of the nodes announced by
/// IP address (fred asks only for those).
#[derive(Debug)]
struct SeedName(String);

impl HostMapping for SeedName {
    fn map(&self, _announced: &IpAddr, _answered_by: &str) -> Option<String> {
        Some(self.0.clone())
    }
}

/// The first seed host of a cluster that is a DNS name rather than an IP address.
pub(crate) fn cluster_seed_name<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    hosts
        .into_iter()
        .find(|host| host.trim_matches(['[', ']']).parse::<IpAddr>().is_err())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_name_is_the_first_dns_name() {
        assert_eq!(cluster_seed_name(["127.0.0.1", "::1", "[::1]"]), None);
        assert_eq!(
            cluster_seed_name(["10.0.0.1", "redis.example.com", "b.example.com"]),
            Some("redis.example.com")
        );
        let mapping = SeedName("redis.example.com".into());
        let ip: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(
            mapping.map(&ip, "10.0.0.1").as_deref(),
            Some("redis.example.com")
        );
    }
}
