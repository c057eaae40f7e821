//! A host's mesh identity, as its forwarder holds it: a key made here and kept in the state
//! dir (it never leaves the host: the CA gets a signing request), the certificate the
//! registry's CA signs for `spiffe://<trust-domain>/host/<name>`, the trust bundle, and the
//! TLS configs made from them: a server config for the inbound listener that accepts only
//! peers with a certificate from the bundle, and a client config for calls to peers, which
//! checks that the peer is the host it meant to call.
//!
//! The certificate is renewed at half its life (with a new key), and the configs are swapped
//! atomically: handshakes from then on use the new certificate and bundle, and connections
//! already open are not touched. A certificate in the state dir that still has more than half
//! its life left is used as it is after a restart, without asking the CA.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;

const KEY: &str = "host.key";
const CERT: &str = "host.crt";
const BUNDLE: &str = "bundle.pem";
/// The ALPN protocol of forwarder-to-forwarder connections.
pub const ALPN: &[u8] = b"waymark-mesh/1";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the registry at {url} refused the join token (403): check --join-token")]
    Token { url: String },
    #[error("the registry at {url} refused to sign ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach the registry at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("unusable certificate material: {0}")]
    Material(String),
}

/// Where the identity comes from and where it is kept.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// The registry's HTTP address (`http://127.0.0.1:8500`).
    pub registry: String,
    /// This host's name: its identity in the mesh.
    pub host: String,
    pub join_token: String,
    pub state_dir: PathBuf,
}

/// The certificate, key and bundle in use, and the TLS configs made of them.
pub struct Material {
    pub not_after: SystemTime,
    /// When it was signed (so renewal can happen at half-life).
    pub not_before: SystemTime,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The PEM certificate, for display and tests.
    pub certificate: String,
}

impl Material {
    /// When this material should be renewed: at half its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// A host's identity, renewed in place.
pub struct Identity {
    settings: IdentitySettings,
    http: reqwest::Client,
    current: ArcSwap<Material>,
}

#[derive(Deserialize)]
struct Signed {
    #[serde(rename = "Certificate")]
    certificate: String,
    #[serde(rename = "TrustBundle")]
    trust_bundle: String,
}

impl Identity {
    /// The identity as the state dir has it, when its certificate has more than half its life
    /// left; otherwise a new key and a certificate from the registry's CA.
    pub async fn obtain(settings: IdentitySettings) -> Result<Arc<Identity>, IdentityError> {
        let dir = &settings.state_dir;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| IdentityError::Material(e.to_string()))?;
        let stored = load_stored(dir, &settings.host)
            .ok()
            .filter(|m| m.renew_at() > SystemTime::now());
        let material = match stored {
            Some(m) => {
                tracing::info!(
                    host = settings.host,
                    "using the certificate in the state dir"
                );
                m
            }
            None => fetch(&http, &settings).await?,
        };
        Ok(Arc::new(Identity {
            settings,
            http,
            current: ArcSwap::from_pointee(material),
        }))
    }

    /// The material in use now.
    pub fn current(&self) -> Arc<Material> {
        self.current.load_full()
    }

    pub fn host(&self) -> &str {
        &self.settings.host
    }

    /// A new key and certificate from the CA, swapped in for new handshakes.
    pub async fn renew(&self) -> Result<(), IdentityError> {
        let material = fetch(&self.http, &self.settings).await?;
        tracing::info!(
            host = self.settings.host,
            not_after = secs(material.not_after),
            "certificate renewed"
        );
        self.current.store(Arc::new(material));
        Ok(())
    }

    /// Renews at half-life, forever; a failed renewal is retried every `retry` (or sooner when
    /// the certificate is about to expire), logged each time.
    pub async fn keep_renewed(self: Arc<Self>, retry: Duration) {
        loop {
            // Never back to back, whatever the certificate's dates say.
            let wait = self
                .current()
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(500));
            tokio::time::sleep(wait).await;
            while let Err(e) = self.renew().await {
                let left = self
                    .current()
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::warn!(error = %e, left_s = left.as_secs(), "certificate renewal failed");
                tokio::time::sleep(retry.min(left / 4).max(Duration::from_millis(100))).await;
            }
        }
    }
}

/// Asks the CA for a certificate for a new key, keeps all three in the state dir, and makes
/// the TLS configs.
async fn fetch(
    http: &reqwest::Client,
    settings: &IdentitySettings,
) -> Result<Material, IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Material(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(vec![settings.host.clone()])
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| IdentityError::Material(e.to_string()))?;
    let url = format!("{}/v1/mesh/sign", settings.registry.trim_end_matches('/'));
    let unreachable = |e: reqwest::Error| IdentityError::Unreachable {
        url: url.clone(),
        message: e.to_string(),
    };
    let resp = http
        .post(&url)
        .bearer_auth(&settings.join_token)
        .json(&serde_json::json!({"Host": settings.host, "CSR": csr}))
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    if status == 403 {
        return Err(IdentityError::Token { url });
    }
    if status != 200 {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        return Err(IdentityError::Refused {
            url,
            status,
            message: body["error"].as_str().unwrap_or("").to_string(),
        });
    }
    let signed: Signed = resp.json().await.map_err(unreachable)?;
    let dir = &settings.state_dir;
    let key_pem = key.serialize_pem();
    // The key first: a certificate on disk always has its key beside it.
    write_file(&dir.join(KEY), key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join(CERT), signed.certificate.as_bytes(), 0o644)?;
    write_file(&dir.join(BUNDLE), signed.trust_bundle.as_bytes(), 0o644)?;
    material(
        &signed.certificate,
        &key_pem,
        &signed.trust_bundle,
        &settings.host,
    )
}

fn load_stored(dir: &Path, host: &str) -> Result<Material, IdentityError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(io(&path))
    };
    material(&read(CERT)?, &read(KEY)?, &read(BUNDLE)?, host)
}

/// The TLS configs for a certificate, its key and the trust bundle. Checks that the
/// certificate is this host's and chains to the bundle.
pub fn material(
    cert_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
    host: &str,
) -> Result<Material, IdentityError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| IdentityError::Material(format!("{what}: {e}"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", &e))?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| IdentityError::Material("no certificate".into()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
    let mut roots = RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots
            .add(root.map_err(|e| bad("trust bundle", &e))?)
            .map_err(|e| bad("trust bundle", &e))?;
    }
    if roots.is_empty() {
        return Err(IdentityError::Material("an empty trust bundle".into()));
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| bad("client verifier", &e))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("server config", &e))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| bad("server certificate", &e))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("client config", &e))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad("client certificate", &e))?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    // Validity, and that the certificate is this host's and from this bundle: the same
    // check a peer makes of us.
    let (not_before, not_after) = validity(&leaf)?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots,
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| bad("server verifier", &e))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| bad("host name", &e))?;
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
        .map_err(|e| bad("certificate does not verify for this host", &e))?;
    Ok(Material {
        not_before,
        not_after,
        server: Arc::new(server),
        client: Arc::new(client),
        certificate: cert_pem.to_string(),
    })
}

/// The host a verified peer certificate names: its `spiffe://<td>/host/<name>` URI.
pub fn peer_host(certs: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once("/host/"))
            .map(|(_, host)| host.to_string()),
        _ => None,
    })
}

fn validity(leaf: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| IdentityError::Material(format!("certificate: {e}")))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    waymark_shared::files::write_atomic(path, bytes, mode).map_err(io(path))
}
