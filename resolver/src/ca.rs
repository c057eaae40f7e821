//! The mesh certificate authority: the registry signs each host's forwarder certificate.
//!
//! Kept in `<data-dir>/ca/`: `roots.pem` (the trust bundle: every root that peers trust, so a
//! new root can be staged beside the old one), `signer.crt` and `signer.key` (the root that
//! signs now; the key is 0600 and never leaves this directory), `join-token` (0600: the
//! secret a forwarder presents to be signed) and `trust-domain`. `waymark-resolver ca init`
//! creates them (`--rotate` adds a new root to the bundle and signs with it from the next
//! start); `serve` creates them on its first start.
//!
//! A forwarder sends a certificate signing request (its key stays on its host) with its host
//! name and the join token; it gets back a short-lived certificate (`[ca] cert_ttl`, 24 h by
//! default) whose identity is the SPIFFE-style URI `spiffe://<trust-domain>/host/<name>`
//! (also a DNS name `<name>`, which peers check as the TLS server name), usable for client
//! and server authentication, and the trust bundle. Whatever names the request asks for are
//! ignored: the CA decides the identity.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

const ROOTS: &str = "roots.pem";
const SIGNER_CERT: &str = "signer.crt";
const SIGNER_KEY: &str = "signer.key";
const JOIN_TOKEN: &str = "join-token";
const TRUST_DOMAIN: &str = "trust-domain";
/// Roots live this long.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start up to this long before they are signed, for clocks a little behind
/// (a tenth of a short certificate's life at most, so that half-life stays near the middle).
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Damaged { path: PathBuf, problem: String },
    #[error(
        "a mesh CA already exists in {0}: `ca init --rotate` adds a new root beside it, or use \
         another data dir"
    )]
    Exists(PathBuf),
    #[error("host name {0:?} is not a DNS label (1 to 63 letters, digits and '-')")]
    HostName(String),
    #[error("trust domain {0:?} is not a DNS name of lowercase letters, digits, '-' and '.'")]
    TrustDomain(String),
    #[error("the certificate signing request is not valid: {0}")]
    Csr(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A certificate issued to a host.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The host's certificate, PEM.
    pub certificate: String,
    /// Every root peers trust, PEM.
    pub trust_bundle: String,
    pub spiffe_id: String,
    pub not_after: SystemTime,
}

/// What `ca init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new CA: one root, a new join token.
    New,
    /// A new root added to the bundle; it signs from the next start.
    Rotated,
    /// It was there already: nothing changed.
    Existing,
}

/// The mesh CA, loaded.
pub struct MeshCa {
    dir: PathBuf,
    trust_domain: String,
    signer: Certificate,
    signer_key: KeyPair,
    bundle: String,
    join_token: String,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// The CA directory of a data dir.
    pub fn dir_of(data_dir: &Path) -> PathBuf {
        data_dir.join("ca")
    }

    /// Creates the CA in `dir` (or, with `rotate`, adds a new root to an existing one).
    /// Without `rotate`, an existing CA is left as it is.
    pub fn init(dir: &Path, trust_domain: &str, rotate: bool) -> Result<Created, CaError> {
        check_trust_domain(trust_domain)?;
        let exists = dir.join(SIGNER_KEY).exists();
        if exists && !rotate {
            return Ok(Created::Existing);
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let trust_domain = if exists {
            read(&dir.join(TRUST_DOMAIN))?.trim().to_string()
        } else {
            trust_domain.to_string()
        };
        let (root, key) = new_root(&trust_domain)?;
        let mut bundle = if exists {
            read(&dir.join(ROOTS))?
        } else {
            String::new()
        };
        bundle.push_str(&root.pem());
        // The bundle first, so that peers trust the new root before anything is signed by it.
        write_file(&dir.join(ROOTS), bundle.as_bytes(), 0o644)?;
        write_file(&dir.join(SIGNER_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&dir.join(SIGNER_CERT), root.pem().as_bytes(), 0o644)?;
        if !exists {
            write_file(&dir.join(TRUST_DOMAIN), trust_domain.as_bytes(), 0o644)?;
            write_file(&dir.join(JOIN_TOKEN), new_token()?.as_bytes(), 0o600)?;
            Ok(Created::New)
        } else {
            Ok(Created::Rotated)
        }
    }

    /// Loads the CA in `dir`, creating it first when there is none.
    pub fn open(dir: &Path, trust_domain: &str) -> Result<MeshCa, CaError> {
        if Self::init(dir, trust_domain, false)? == Created::New {
            tracing::info!(dir = %dir.display(), trust_domain, "created the mesh CA");
        }
        let key_pem = read(&dir.join(SIGNER_KEY))?;
        let cert_pem = read(&dir.join(SIGNER_CERT))?;
        let damaged = |path: &str, problem: String| CaError::Damaged {
            path: dir.join(path),
            problem,
        };
        let signer_key =
            KeyPair::from_pem(&key_pem).map_err(|e| damaged(SIGNER_KEY, e.to_string()))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| damaged(SIGNER_CERT, e.to_string()))?;
        // The issuer's name and key are what signing needs; re-signing the root's parameters
        // with its key gives them back.
        let signer = params
            .self_signed(&signer_key)
            .map_err(|e| damaged(SIGNER_CERT, e.to_string()))?;
        let bundle = read(&dir.join(ROOTS))?;
        if !bundle.contains("BEGIN CERTIFICATE") {
            return Err(damaged(ROOTS, "no certificate in the trust bundle".into()));
        }
        let join_token = read(&dir.join(JOIN_TOKEN))?.trim().to_string();
        if join_token.len() < 16 {
            return Err(damaged(JOIN_TOKEN, "the join token is too short".into()));
        }
        Ok(MeshCa {
            dir: dir.to_path_buf(),
            trust_domain: read(&dir.join(TRUST_DOMAIN))?.trim().to_string(),
            signer,
            signer_key,
            bundle,
            join_token,
        })
    }

    /// The join token of the CA in `dir`.
    pub fn read_join_token(dir: &Path) -> Result<String, CaError> {
        Ok(read(&dir.join(JOIN_TOKEN))?.trim().to_string())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn trust_bundle(&self) -> &str {
        &self.bundle
    }

    /// Whether `presented` is the join token (compared in constant time).
    pub fn is_join_token(&self, presented: &str) -> bool {
        let (a, b) = (presented.as_bytes(), self.join_token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }

    /// Signs `csr_pem` (PKCS#10, PEM) as host `host`'s certificate, valid for `ttl`.
    pub fn sign(&self, csr_pem: &str, host: &str, ttl: Duration) -> Result<Issued, CaError> {
        check_host(host)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let spiffe_id = spiffe_id(&self.trust_domain, host);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(
                spiffe_id
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ),
            SanType::DnsName(
                host.try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ),
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - BACKDATE.min(ttl / 10));
        let not_after = now + ttl;
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.signer, &self.signer_key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued {
            certificate: cert.pem(),
            trust_bundle: self.bundle.clone(),
            spiffe_id,
            not_after,
        })
    }
}

/// `spiffe://<trust-domain>/host/<name>`.
pub fn spiffe_id(trust_domain: &str, host: &str) -> String {
    format!("spiffe://{trust_domain}/host/{}", host.to_ascii_lowercase())
}

fn new_root(trust_domain: &str) -> Result<(Certificate, KeyPair), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Waymark mesh");
    // Every root's name is its own, so verifiers that look issuers up by name (OpenSSL)
    // never pick the other root of a staged rotation.
    let id: String = (0..6)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect();
    dn.push(
        DnType::CommonName,
        format!("Waymark mesh CA {trust_domain} {id}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + ROOT_LIFETIME);
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((cert, key))
}

fn random_serial() -> SerialNumber {
    let mut bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// 32 random bytes from the kernel's generator, hex.
fn new_token() -> Result<String, CaError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 32];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(io(path))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn check_host(host: &str) -> Result<(), CaError> {
    let ok = !host.is_empty()
        && host.len() <= 63
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !host.starts_with('-');
    ok.then_some(())
        .ok_or_else(|| CaError::HostName(host.to_string()))
}

fn check_trust_domain(td: &str) -> Result<(), CaError> {
    let ok = !td.is_empty()
        && td.len() <= 253
        && td.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    ok.then_some(())
        .ok_or_else(|| CaError::TrustDomain(td.to_string()))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(io(path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    waymark_shared::files::write_atomic(path, bytes, mode).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(host_key: &KeyPair, names: &[&str]) -> String {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serialize_request(host_key).unwrap().pem().unwrap()
    }

    #[test]
    fn init_open_sign_and_rotate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        assert_eq!(
            MeshCa::init(&dir, "mesh.test", false).unwrap(),
            Created::New
        );
        assert_eq!(
            MeshCa::init(&dir, "mesh.test", false).unwrap(),
            Created::Existing
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(SIGNER_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the signing key is private");

        let ca = MeshCa::open(&dir, "ignored.once.created").unwrap();
        assert_eq!(ca.trust_domain(), "mesh.test");
        let token = MeshCa::read_join_token(&dir).unwrap();
        assert!(ca.is_join_token(&token));
        assert!(!ca.is_join_token("wrong"));
        assert!(!ca.is_join_token(&token[1..]));

        // The request asks for another name: the CA decides the identity.
        let host_key = KeyPair::generate().unwrap();
        let issued = ca
            .sign(
                &csr(&host_key, &["evil.example"]),
                "host-a",
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://mesh.test/host/host-a");
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let sans = format!(
            "{:?}",
            cert.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(sans.contains("spiffe://mesh.test/host/host-a"), "{sans}");
        assert!(sans.contains("host-a") && !sans.contains("evil"), "{sans}");
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 66, "60 s of life, back-dated by a tenth of it");
        // Signed by the root in the bundle.
        let (_, root_pem) = x509_parser::pem::parse_x509_pem(ca.trust_bundle().as_bytes()).unwrap();
        let root = root_pem.parse_x509().unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();

        // Bad input: a host that is no label, a CSR that is not one.
        assert!(matches!(
            ca.sign(&csr(&host_key, &[]), "a.b", Duration::from_secs(60)),
            Err(CaError::HostName(_))
        ));
        assert!(matches!(
            ca.sign(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "h",
                Duration::from_secs(60)
            ),
            Err(CaError::Csr(_))
        ));

        // Rotation: the bundle holds both roots; the new one signs after a reload.
        assert_eq!(
            MeshCa::init(&dir, "mesh.test", true).unwrap(),
            Created::Rotated
        );
        let rotated = MeshCa::open(&dir, "mesh.test").unwrap();
        assert_eq!(
            rotated.trust_bundle().matches("BEGIN CERTIFICATE").count(),
            2
        );
        assert!(
            rotated.is_join_token(&token),
            "rotation keeps the join token"
        );
        let issued = rotated
            .sign(&csr(&host_key, &[]), "host-a", Duration::from_secs(60))
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert!(
            cert.verify_signature(Some(root.public_key())).is_err(),
            "not the old root"
        );
    }

    #[test]
    fn bad_trust_domains_and_damaged_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for td in ["", "UPPER.case", "a..b", "spaces here"] {
            assert!(matches!(
                MeshCa::init(&tmp.path().join("x"), td, false),
                Err(CaError::TrustDomain(_))
            ));
        }
        let dir = tmp.path().join("ca");
        MeshCa::init(&dir, "mesh.test", false).unwrap();
        fs::write(dir.join(SIGNER_KEY), "not a key").unwrap();
        let err = MeshCa::open(&dir, "mesh.test").unwrap_err().to_string();
        assert!(err.contains("signer.key"), "{err}");
    }
}
