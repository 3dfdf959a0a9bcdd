//! The stand-in's TLS: a CA made per server (like the one kubeadm makes for a cluster) and a
//! serving certificate it signs for the names and addresses clients use
//! (`kubernetes.default.svc` and friends, `localhost`, 127.0.0.1, ::1, and the lab's API
//! addresses). Clients trust the CA through the kubeconfig's `certificate-authority-data` or,
//! in a pod, `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// DNS names of the API server's certificate in every cluster.
pub const SERVING_DNS_NAMES: &[&str] = &[
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// Why the TLS material could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the lab CA or the serving certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0:?} is neither an IP address nor a DNS name for the serving certificate")]
    Name(String),
}

/// The CA (PEM) clients trust, and the server's TLS configuration.
pub struct ServerTls {
    pub ca_pem: String,
    pub config: Arc<rustls::ServerConfig>,
}

/// Makes a CA and a serving certificate for `extra_names` (IPs or DNS names) besides the
/// defaults.
pub fn make(extra_names: &[String]) -> Result<ServerTls, TlsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kwire-lab kubernetes CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut params = CertificateParams::new(
        SERVING_DNS_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    )?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")];
    for n in extra_names {
        match n.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => params.subject_alt_names.push(SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|_| TlsError::Name(n.clone()))?,
            )),
        }
    }
    ips.sort();
    ips.dedup();
    params
        .subject_alt_names
        .extend(ips.into_iter().map(SanType::IpAddress));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    let chain = vec![
        CertificateDer::from(cert.der().to_vec()),
        CertificateDer::from(ca_cert.der().to_vec()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        ca_pem: ca_cert.pem(),
        config: Arc::new(config),
    })
}

/// A client configuration that trusts only `ca_pem` (for the lab's own calls).
pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for der in pem_blocks(ca_pem, "CERTIFICATE") {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
        found += 1;
    }
    if found == 0 {
        return Err("no CERTIFICATE block in the CA file".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The DER payloads of the `-----BEGIN LABEL-----` blocks of a PEM text.
pub fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let Some(j) = after.find(&end) else { break };
        let body: String = after[..j].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[j + end.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_signs_a_certificate_clients_accept() {
        let tls = make(&["192.0.2.254".into(), "api.lab".into()]).unwrap();
        assert_eq!(pem_blocks(&tls.ca_pem, "CERTIFICATE").len(), 1);
        client_config(&tls.ca_pem).unwrap();
        assert!(client_config("garbage").is_err());
    }
}
