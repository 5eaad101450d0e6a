//! TLS client settings shared by the registry's PostgreSQL connections and the object
//! store's `https://` requests: rustls (TLS 1.2 and 1.3, ring's primitives), trusting
//! the CA certificates of one PEM file.

use std::path::Path;
use std::sync::Arc;

use super::RepoError;

/// A client configuration that trusts exactly the CA certificates in the PEM file at
/// `roots` (`what` names the file in errors: the setting that gave it).
pub fn client_config(roots: &Path, what: &str) -> Result<rustls::ClientConfig, RepoError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let bad = |m: String| RepoError::InvalidArgument(format!("{what} {}: {m}", roots.display()));
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(roots).map_err(|e| bad(e.to_string()))? {
        store
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(store)
    .with_no_client_auth())
}
