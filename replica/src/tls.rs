//! Mutual TLS on the internal plane: who a caller is, and what it may do.
//!
//! Every internal connection (replica to replica, RM to replica, LFD to GFD, RM to GFD,
//! the admin CLI to the RM) is mutual TLS under one certificate authority per group
//! (locally) or per operator (Kubernetes). A certificate names its holder in a URI
//! subject alternative name, e.g. `tandem://replica/r1`; handlers check that the name
//! matches what a message claims (the leader of an Append is the caller), so a member
//! cannot impersonate another one, and anyone without a certificate of the group cannot
//! even finish the handshake.
//!
//! A process has one identity, loaded once at start (`install`): the dialling and
//! serving code in `wire` then use it for every internal connection. Without one the
//! internal plane is plaintext and unchecked, which only in-process tests do.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};

/// The DNS name in every internal certificate, and the name clients verify: being
/// signed by the group's CA is what makes a server a member, not its address (pods
/// change addresses).
pub const SERVER_NAME: &str = "tandem-internal";

const URI_SCHEME: &str = "tandem://";

/// The certificate files of one holder, as in a Kubernetes TLS Secret.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The CA's own key: only the issuer (`tandem up`, the operator) reads it.
pub const CA_KEY_FILE: &str = "ca.key";

/// Who holds a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A replica: its id in the group.
    Replica(String),
    /// The LFD of the replica with this id.
    Lfd(String),
    Gfd,
    /// The RM (the operator, or `tandem up`) and the administrator's CLI.
    Manager,
}

impl Identity {
    /// Replica `id` of `group`: on Kubernetes one CA serves every group of an operator,
    /// so the name carries the group (`namespace/service/r1`) and a member of one group
    /// is nobody in another; locally the group is "" and the name is the id.
    pub fn replica(group: &str, id: &str) -> Self {
        if group.is_empty() { Self::Replica(id.to_owned()) } else { Self::Replica(format!("{group}/{id}")) }
    }

    pub fn uri(&self) -> String {
        match self {
            Self::Replica(id) => format!("{URI_SCHEME}replica/{id}"),
            Self::Lfd(id) => format!("{URI_SCHEME}lfd/{id}"),
            Self::Gfd => format!("{URI_SCHEME}gfd"),
            Self::Manager => format!("{URI_SCHEME}manager"),
        }
    }

    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_SCHEME)?;
        match rest.split_once('/') {
            Some(("replica", id)) if !id.is_empty() => Some(Self::Replica(id.to_owned())),
            Some(("lfd", id)) if !id.is_empty() => Some(Self::Lfd(id.to_owned())),
            None if rest == "gfd" => Some(Self::Gfd),
            None if rest == "manager" => Some(Self::Manager),
            _ => None,
        }
    }

    /// A file-system-safe name (directories of `tandem up`, Secret keys).
    pub fn file_name(&self) -> String {
        let safe = |id: &str| id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        match self {
            Self::Replica(id) => format!("replica-{}", safe(id)),
            Self::Lfd(id) => format!("lfd-{}", safe(id)),
            Self::Gfd => "gfd".into(),
            Self::Manager => "manager".into(),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source} (a TLS directory holds ca.crt, tls.crt and tls.key)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{what} is not a usable certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

/// One holder's certificate chain material, PEM-encoded.
#[derive(Clone)]
pub struct Material {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").field("identity", &self.identity().ok()).finish_non_exhaustive()
    }
}

impl Material {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        let material = Self { ca: read(CA_FILE)?, cert: read(CERT_FILE)?, key: read(KEY_FILE)? };
        material.identity()?;
        Ok(material)
    }

    /// Writes the three files into `dir` (created), readable by the owner only. The key
    /// goes last: a process watching it for a change (the GFD) then finds a whole set.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.into(), source })?;
        for (name, text) in [(CA_FILE, &self.ca), (CERT_FILE, &self.cert), (KEY_FILE, &self.key)] {
            write_private(&dir.join(name), text)?;
        }
        Ok(())
    }

    /// The identity the certificate names.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        let der = pem_der(&self.cert, "tls.crt")?;
        identity_of(&der).ok_or_else(|| TlsError::BadCertificate {
            what: "tls.crt".into(),
            reason: format!("it names no {URI_SCHEME}… identity"),
        })
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// TLS for the client port: this certificate, no client certificate asked for
    /// (clients prove themselves with the token, when the group has one).
    pub fn server_config_for_clients(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .domain_name(SERVER_NAME)
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
    }
}

/// A new client token: 256 random bits, hex.
pub fn new_token() -> String {
    format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>())
}

/// Writes `text` to `path`, readable by the owner only, whole or not at all.
pub fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let error = |source| TlsError::Write { path: path.into(), source };
    // Written whole under another name, then renamed: never a half-written key.
    let partial = path.with_extension("partial");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&partial).map_err(error)?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(error)?;
    std::fs::rename(&partial, path).map_err(error)
}

fn pem_der(pem: &str, what: &str) -> Result<Vec<u8>, TlsError> {
    let bad = |reason: String| TlsError::BadCertificate { what: what.into(), reason };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    Ok(parsed.contents)
}

/// The `tandem://` identity a DER certificate names, if any.
pub fn identity_of(der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    names.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => Identity::from_uri(uri),
        _ => None,
    })
}

static INSTALLED: OnceLock<Material> = OnceLock::new();

/// Makes `material` this process's identity on the internal plane (once; a second call
/// keeps the first).
pub fn install(material: Material) -> Result<Identity, TlsError> {
    let identity = material.identity()?;
    let _ = INSTALLED.set(material);
    Ok(identity)
}

/// This process's internal-plane material, when it has one.
pub fn installed() -> Option<&'static Material> {
    INSTALLED.get()
}

/// Who called: an identity from the caller's verified certificate. `Unchecked` when
/// this process serves plaintext (no identity installed: in-process tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Unchecked,
    Known(Identity),
    Anonymous,
}

pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    if installed().is_none() {
        return Caller::Unchecked;
    }
    request
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|der| identity_of(der)))
        .map_or(Caller::Anonymous, Caller::Known)
}

/// Refuses the call unless its caller is `allowed` (always allowed when unchecked).
/// `what`: the operation, for the error.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    what: &str,
    allowed: impl Fn(&Identity) -> bool,
) -> Result<(), tonic::Status> {
    caller(request).permit(what, allowed)
}

impl Caller {
    /// Refuses unless the caller is `allowed` (always allowed when unchecked).
    pub fn permit(&self, what: &str, allowed: impl Fn(&Identity) -> bool) -> Result<(), tonic::Status> {
        match self {
            Caller::Unchecked => Ok(()),
            Caller::Known(identity) if allowed(identity) => Ok(()),
            Caller::Known(identity) => {
                tracing::warn!(caller = %identity, what, "refused a call its caller may not make");
                Err(tonic::Status::permission_denied(format!("{identity} may not {what}")))
            }
            Caller::Anonymous => {
                Err(tonic::Status::unauthenticated(format!("{what} needs a certificate of the group")))
            }
        }
    }

    /// Refuses unless the caller is replica `id` of `group` (what a peer message claims).
    pub fn must_be_replica(&self, group: &str, id: &str, what: &str) -> Result<(), tonic::Status> {
        let claimed = Identity::replica(group, id);
        self.permit(&format!("{what} as replica {id}"), |caller| *caller == claimed)
    }
}

/// A certificate authority: issues the certificates of one group (locally) or of the
/// groups of one operator (Kubernetes).
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    ca: String,
    key: String,
    /// How long the certificates it issues are valid (`VALIDITY` unless set).
    validity: Duration,
}

/// How long an issued certificate is valid by default (the operator's
/// `--certificate-validity-s` changes it). The issuer renews at two thirds of it.
pub const VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Authority {
    /// A new CA named after what it serves (e.g. the directory or the operator).
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("tandem CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_VALIDITY);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(params, key), ca: cert.pem(), key: key_pem, validity: VALIDITY })
    }

    /// The CA as stored: its certificate and key, PEM.
    pub fn from_pem(ca: &str, key: &str) -> Result<Self, TlsError> {
        let bad = |e: rcgen::Error| TlsError::BadCertificate { what: "the CA".into(), reason: e.to_string() };
        let key_pair = KeyPair::from_pem(key).map_err(bad)?;
        let issuer = Issuer::from_ca_cert_pem(ca, key_pair).map_err(bad)?;
        Ok(Self { issuer, ca: ca.to_owned(), key: key.to_owned(), validity: VALIDITY })
    }

    /// The same CA, issuing certificates valid for `validity`.
    pub fn with_validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`), created there the first time.
    pub fn load_or_generate(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (dir.join(CA_FILE), dir.join(CA_KEY_FILE));
        if cert_path.exists() || key_path.exists() {
            let read = |path: &Path| {
                std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.into(), source })
            };
            return Self::from_pem(&read(&cert_path)?, &read(&key_path)?);
        }
        let authority = Self::generate(name)?;
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.into(), source })?;
        write_private(&key_path, &authority.key)?;
        write_private(&cert_path, &authority.ca)?;
        Ok(authority)
    }

    /// The TLS directory of `identity` under `dir` (`dir/<identity file name>`), with a
    /// certificate of this CA: issued when missing, from another CA, or in the last
    /// third of its validity.
    pub fn issue_into(&self, dir: &Path, identity: &Identity) -> Result<PathBuf, TlsError> {
        let holder = dir.join(identity.file_name());
        let current = Material::load(&holder).ok().filter(|m| {
            m.ca == self.ca
                && m.identity().ok().as_ref() == Some(identity)
                && seconds_left(&m.cert).is_ok_and(|left| left > (self.validity.as_secs() / 3) as i64)
        });
        if current.is_none() {
            self.issue(identity)?.write(&holder)?;
        }
        Ok(holder)
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca
    }

    pub fn key_pem(&self) -> &str {
        &self.key
    }

    /// A certificate for `identity`, valid for this CA's validity, as a server and a client.
    pub fn issue(&self, identity: &Identity) -> Result<Material, TlsError> {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
        params.distinguished_name.push(DnType::CommonName, identity.uri());
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        set_validity(&mut params, self.validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Material { ca: self.ca.clone(), cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// Backdated by an hour, so a clock a little behind still accepts a new certificate.
fn set_validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + valid_for).into();
}

/// Seconds until `cert` (PEM) expires; negative when it has.
pub fn seconds_left(cert: &str) -> Result<i64, TlsError> {
    let now = crate::wire::unix_ms() as i64 / 1000;
    Ok(not_after(cert)? - now)
}

/// When `cert` (PEM) expires, unix seconds.
pub fn not_after(cert: &str) -> Result<i64, TlsError> {
    let der = pem_der(cert, "the certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| TlsError::BadCertificate { what: "the certificate".into(), reason: e.to_string() })?;
    Ok(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for identity in [
            Identity::Replica("r1".into()),
            Identity::Replica("default/kv-3".into()),
            Identity::Lfd("r2".into()),
            Identity::Gfd,
            Identity::Manager,
        ] {
            assert_eq!(Identity::from_uri(&identity.uri()), Some(identity));
        }
        for junk in ["", "tandem://", "tandem://replica/", "tandem://boss", "https://replica/r1"] {
            assert_eq!(Identity::from_uri(junk), None, "{junk}");
        }
    }

    #[test]
    fn an_issued_certificate_names_its_holder_and_survives_a_reload() {
        let authority = Authority::generate("test").expect("CA");
        let material = authority.issue(&Identity::Replica("r7".into())).expect("issue");
        assert_eq!(material.identity().expect("identity"), Identity::Replica("r7".into()));
        let dir = tempfile_dir();
        material.write(&dir).expect("write");
        let loaded = Material::load(&dir).expect("load");
        assert_eq!(loaded.identity().expect("identity"), Identity::Replica("r7".into()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEY_FILE)).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the key is the owner's only");
        }
        let left = seconds_left(&material.cert).expect("validity");
        assert!(left > 80 * 24 * 3600 && left <= VALIDITY.as_secs() as i64, "{left}");
        let reloaded = Authority::from_pem(authority.ca_pem(), authority.key_pem()).expect("CA reload");
        let again = reloaded.issue(&Identity::Gfd).expect("issue");
        assert_eq!(again.ca, material.ca, "one CA");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn an_authority_with_a_short_validity_issues_certificates_that_say_so() {
        let authority = Authority::generate("test").expect("CA").with_validity(Duration::from_secs(90));
        let material = authority.issue(&Identity::Gfd).expect("issue");
        let left = seconds_left(&material.cert).expect("validity");
        assert!((80..=90).contains(&left), "{left}");
        let now = crate::wire::unix_ms() as i64 / 1000;
        assert_eq!(not_after(&material.cert).expect("not after") - now, left, "one clock, one certificate");
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-tls-test-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        dir
    }
}
