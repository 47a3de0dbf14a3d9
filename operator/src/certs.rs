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
    #[error("Kubernetes API call on Secret {namespace}/{CA_SECRET} failed: {source}")]
    Kube { namespace: String, source: kube::Error },
    #[error(
        "Secret {namespace}/{CA_SECRET} holds no usable CA ({reason}); delete it to have a new CA made (every replica pod then needs recreating)"
    )]
    BadSecret { namespace: String, reason: String },
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
pub async fn operator_authority(client: &kube::Client, namespace: &str) -> Result<Authority, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let kube_error = |source| CertError::Kube { namespace: namespace.to_owned(), source };
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

fn authority_of(secret: &Secret, namespace: &str) -> Result<Authority, CertError> {
    let bad = |reason: String| CertError::BadSecret { namespace: namespace.to_owned(), reason };
    let field = |key: &str| {
        let bytes = secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| bad(format!("no {key}")))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| bad(format!("{key} is not PEM text")))
    };
    Authority::from_pem(&field(CA_FILE)?, &field(CA_KEY_FILE)?).map_err(|e| bad(e.to_string()))
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
}
