//! A private certificate authority for TLS tests.
//!
//! rustls refuses a lone self-signed certificate as a server's certificate,
//! so a TLS Redis gets a leaf for `127.0.0.1` (and `localhost`) signed by a
//! CA made for the test; clients trust that CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

/// A CA made for one test, its certificate written to a PEM file (e.g. for
/// `SSL_CERT_FILE`). The file is removed on drop.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    file: PathBuf,
    _dir: TempDir,
}

impl TestCa {
    /// Generates a CA.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "kvq test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, &pem).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            pem,
            file,
            _dir: dir,
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The file holding [`TestCa::pem`].
    pub fn pem_file(&self) -> &Path {
        &self.file
    }

    /// A server certificate for `127.0.0.1` and `localhost` signed by this
    /// CA: `(certificate PEM, private key PEM)`.
    pub fn server_cert(&self) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "kvq test redis");
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
