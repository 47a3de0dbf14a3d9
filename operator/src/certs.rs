//! The operator's certificate authority on Kubernetes: one CA for every group it runs,
//! kept in the Secret `tandem-ca` of the operator's namespace (created by the first
//! operator that finds none). Members' names carry their group (`namespace/service/id`),
//! so one group's certificate is nobody in another. The operator issues each replica pod
//! its own certificates in a Secret of the service's namespace (`pods::tls_secret`), new
//! keys for every pod, and its own and its GFD's at start. Certificates are renewed by
//! replacing what holds them (processes load them once): replica pods one at a time
//! (`rotation`), the operator and its GFD by restarting (cli/operator.rs).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use tandem_replica::tls::{self, Authority, CA_FILE, CA_KEY_FILE, Identity, Material, TlsError};
use tracing::info;

pub const CA_SECRET: &str = "tandem-ca";

/// Bounds of the certificates' validity (`--certificate-validity-s`). Under a day or so
/// is for tests only: every replica pod is replaced, and the operator and its GFD
/// restart, every two thirds of it, and the kubelet's restart back-off grows for
/// containers that ran less than 10 minutes. The upper bound stays well inside the CA's
/// own ten years.
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);
pub const MAX_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API call on the CA Secret in {namespace} failed: {source}")]
    Kube { namespace: String, source: kube::Error },
    #[error(
        "Secret {namespace}/{name} holds no usable CA ({reason}): it needs ca.crt and ca.key, or tls.crt and tls.key of a CA (a cert-manager Certificate with isCA: true and a PKCS#8 ECDSA key); for the operator's own CA, delete it to have a new one made (every replica pod then needs recreating)"
    )]
    BadSecret { namespace: String, name: String, reason: String },
    #[error(
        "the CA Secret {namespace}/{name} (tls.caSecret) does not exist: create it (e.g. examples/cert-manager-ca.yaml with your issuer), or unset tls.caSecret to have the operator make its own CA"
    )]
    Missing { namespace: String, name: String },
    #[error(
        "a certificate validity of {seconds} s is out of bounds ({}..={} s)",
        MIN_VALIDITY.as_secs(),
        MAX_VALIDITY.as_secs()
    )]
    Validity { seconds: u64 },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The validity to issue certificates with, if `seconds` is within bounds.
pub fn check_validity(seconds: u64) -> Result<Duration, CertError> {
    let validity = Duration::from_secs(seconds);
    if (MIN_VALIDITY..=MAX_VALIDITY).contains(&validity) {
        Ok(validity)
    } else {
        Err(CertError::Validity { seconds })
    }
}

/// The CA in `namespace`'s `tandem-ca` Secret, made and stored there if there is none.
/// `given`: the CA is the user's, in that Secret of `namespace` (made by cert-manager
/// from the user's issuer, say: `kubernetes.io/tls` keys `tls.crt`, `tls.key`), not one
/// the operator makes.
pub async fn operator_authority(
    client: &kube::Client,
    namespace: &str,
    given: Option<&str>,
) -> Result<Authority, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube_error = |source| CertError::Kube { namespace: namespace.to_owned(), source };
    if let Some(name) = given {
        let secret = secrets
            .get_opt(name)
            .await
            .map_err(kube_error)?
            .ok_or_else(|| CertError::Missing { namespace: namespace.to_owned(), name: name.to_owned() })?;
        info!(%namespace, secret = name, "using the CA the user gave");
        return authority_of(&secret, namespace);
    }
    if let Some(secret) = secrets.get_opt(CA_SECRET).await.map_err(kube_error)? {
        return authority_of(&secret, namespace);
    }
    let authority = Authority::generate(&format!("operator {namespace}"))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                crate::pods::MANAGED_BY.into(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CA_FILE.into(), ByteString(authority.ca_pem().as_bytes().to_vec())),
            (CA_KEY_FILE.into(), ByteString(authority.key_pem().as_bytes().to_vec())),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(%namespace, "made the operator's CA (Secret {CA_SECRET})");
            Ok(authority)
        }
        // Another operator made it first: use that one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            authority_of(&secrets.get(CA_SECRET).await.map_err(kube_error)?, namespace)
        }
        Err(error) => Err(kube_error(error)),
    }
}

/// The CA in `secret`: `ca.crt` and `ca.key` (the operator's own), or `tls.crt` and
/// `tls.key` (a `kubernetes.io/tls` Secret, as cert-manager writes for a Certificate with
/// `isCA: true`; its `ca.crt` is then the issuer's, not this CA).
pub fn authority_of(secret: &Secret, namespace: &str) -> Result<Authority, CertError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let bad =
        |reason: String| CertError::BadSecret { namespace: namespace.to_owned(), name: name.clone(), reason };
    let data = secret.data.clone().unwrap_or_default();
    let field = |key: &str| {
        let bytes = data.get(key).ok_or_else(|| bad(format!("no {key}")))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| bad(format!("{key} is not PEM text")))
    };
    let (cert, key) =
        if data.contains_key(CA_KEY_FILE) { (CA_FILE, CA_KEY_FILE) } else { ("tls.crt", "tls.key") };
    Authority::from_pem(&field(cert)?, &field(key)?).map_err(|e| bad(e.to_string()))
}

/// At the operator's start: its own certificate (the manager's) installed for every
/// internal call, and its GFD sidecar's written into `gfd_dir` (a volume they share),
/// where the GFD waits for it.
pub fn install_operator_identity(authority: &Authority, gfd_dir: Option<&Path>) -> Result<(), CertError> {
    tls::install(authority.issue(&Identity::Manager)?)?;
    if let Some(dir) = gfd_dir {
        authority.issue(&Identity::Gfd)?.write(dir)?;
        info!(dir = %dir.display(), "wrote the GFD's certificate");
    }
    Ok(())
}

/// The two certificates of a replica pod: the replica's and its LFD's.
pub fn issue_pod(
    authority: &Authority,
    group: &str,
    id: &str,
    detector_id: &str,
) -> Result<(Material, Material), TlsError> {
    Ok((
        authority.issue(&Identity::replica(group, id))?,
        authority.issue(&Identity::Lfd(detector_id.into()))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_bounded_and_the_default_is_within_bounds() {
        assert_eq!(check_validity(tls::VALIDITY.as_secs()).ok(), Some(tls::VALIDITY));
        assert!(check_validity(MIN_VALIDITY.as_secs()).is_ok());
        assert!(check_validity(MAX_VALIDITY.as_secs()).is_ok());
        let error = check_validity(59).expect_err("59 s accepted").to_string();
        assert!(error.contains("59 s") && error.contains("60..="), "{error}");
        assert!(check_validity(MAX_VALIDITY.as_secs() + 1).is_err());
    }

    fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
            data: Some(
                data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn a_ca_is_read_from_the_operators_secret_or_from_a_cert_manager_one() {
        let ca = Authority::generate("test").expect("CA");
        let own = secret(CA_SECRET, &[(CA_FILE, ca.ca_pem()), (CA_KEY_FILE, ca.key_pem())]);
        // cert-manager's Secret for an isCA Certificate: tls.crt is the CA, ca.crt its issuer.
        let managed = secret(
            "from-cert-manager",
            &[("tls.crt", ca.ca_pem()), ("tls.key", ca.key_pem()), ("ca.crt", "the issuer")],
        );
        for secret in [own, managed] {
            let read = authority_of(&secret, "tandem-system").expect("a usable CA");
            assert_eq!(read.ca_pem(), ca.ca_pem());
            let issued = read.issue(&Identity::Gfd).expect("it issues");
            assert_eq!(issued.ca, ca.ca_pem(), "pods trust this CA");
        }
        let broken = secret("broken", &[("tls.crt", ca.ca_pem())]);
        let error = authority_of(&broken, "ns").err().expect("no key").to_string();
        assert!(error.contains("ns/broken") && error.contains("tls.key"), "{error}");
    }
}
