//! The rustls client configuration of a `rediss://` endpoint: the trusted CAs (the system
//! trust store, or the CA given) and the optional client certificate, with the ring provider;
//! and, on a Redis Cluster, the name each node's certificate is checked against.

use std::net::IpAddr;
use std::sync::Arc;

use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::endpoint::{Pem, Tls};

/// fred's TLS settings for `tls`, or why they cannot be made (a message without key material).
///
/// `cluster_seed_name` is, for a Redis Cluster found from a seed node named by a DNS name,
/// that name: the nodes are reached at the addresses `CLUSTER SLOTS` announces, usually IP
/// addresses, which certificates made for a DNS name do not list. A certificate shown at an
/// IP address that does not name that address is then also accepted if it names the seed
/// (signed by a trusted CA all the same: what the seed itself showed). A certificate that names
/// the node's address passes as before, so per-node certificates with IP addresses keep
/// working; nodes announced by a hostname, and every node of a cluster whose seed is an IP
/// address, are checked against their own address only.
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
    let seed = cluster_seed_name.and_then(|name| ServerName::try_from(name.to_string()).ok());
    let versions = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match seed {
        Some(seed @ ServerName::DnsName(_)) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS setup failed: {e}"))?;
            versions
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(OrSeedName { webpki, seed }))
        }
        _ => versions.with_root_certificates(roots),
    };
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

/// The standard (webpki) check, where a certificate shown at an IP address that does not
/// name it may name the cluster's seed instead. Everything else (chain, CA, validity, the
/// handshake signatures) is the standard check's.
#[derive(Debug)]
struct OrSeedName {
    webpki: Arc<WebPkiServerVerifier>,
    /// The seed's DNS name.
    seed: ServerName<'static>,
}

impl ServerCertVerifier for OrSeedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verify = |name: &ServerName<'_>| {
            self.webpki
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
        };
        match verify(server_name) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if matches!(server_name, ServerName::IpAddress(_)) => verify(&self.seed),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
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

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, Issuer, KeyPair,
    };

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
    }

    fn leaf(names: &[&str], ca: &Issuer<'_, KeyPair>) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("params");
        let key = KeyPair::generate().expect("key");
        params.signed_by(&key, ca).expect("cert").der().clone()
    }

    /// The check of `cert` at `at` by the verifier of a cluster seeded by `seed`.
    fn check(
        ca: &CertifiedIssuer<'static, KeyPair>,
        seed: Option<&str>,
        cert: &CertificateDer<'static>,
        at: &str,
    ) -> Result<(), String> {
        let tls = Tls {
            ca: Some(Pem::Bytes(ca.pem().into_bytes().into())),
            client: None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
        // What fred_config builds (it must accept these settings)...
        fred_config(&tls, seed).expect("config");
        let name = ServerName::try_from(at.to_string()).expect("name");
        let now = UnixTime::now();
        let result = match seed.and_then(|s| ServerName::try_from(s.to_string()).ok()) {
            // ...and the verifier it installs for a seed named by DNS.
            Some(seed @ ServerName::DnsName(_)) => {
                OrSeedName { webpki, seed }.verify_server_cert(cert, &[], &name, &[], now)
            }
            _ => webpki.verify_server_cert(cert, &[], &name, &[], now),
        };
        result.map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_node_certificate_names_its_address_or_the_dns_named_seed() {
        let trusted = ca("trusted");
        let seed = Some("redis.example.com");
        // A shared certificate for the cluster's DNS name, shown at a node's IP address.
        let shared = leaf(&["redis.example.com"], &trusted);
        assert_eq!(check(&trusted, seed, &shared, "10.0.0.2"), Ok(()));
        // Not without a DNS-named seed, and not for another DNS name.
        assert!(check(&trusted, None, &shared, "10.0.0.2").is_err());
        assert!(check(&trusted, Some("10.0.0.1"), &shared, "10.0.0.2").is_err());
        assert!(check(&trusted, seed, &shared, "other.example.com").is_err());
        // Per-node certificates naming the node's address pass as before.
        let own = leaf(&["node2.example.com", "10.0.0.2"], &trusted);
        assert_eq!(check(&trusted, seed, &own, "10.0.0.2"), Ok(()));
        // A certificate naming neither fails, as does one from another CA with the right name.
        let neither = leaf(&["elsewhere.example.com"], &trusted);
        let err = check(&trusted, seed, &neither, "10.0.0.2").expect_err("neither name");
        assert!(err.contains("not valid for name"), "{err}");
        let foreign = leaf(&["redis.example.com", "10.0.0.2"], &ca("other"));
        let err = check(&trusted, seed, &foreign, "10.0.0.2").expect_err("another CA");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn the_seed_name_is_the_first_dns_name() {
        assert_eq!(cluster_seed_name(["127.0.0.1", "::1", "[::1]"]), None);
        assert_eq!(
            cluster_seed_name(["10.0.0.1", "redis.example.com", "b.example.com"]),
            Some("redis.example.com")
        );
    }
}
