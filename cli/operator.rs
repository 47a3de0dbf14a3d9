//! `tandem operator`: the Kubernetes operator (the RM), normally run by the helm chart
//! beside its GFD sidecar. It waits for the leader lease, then reconciles every
//! ReplicatedService in the cluster.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tandem_operator::certs;
use tandem_operator::controller::{self, Context};
use tandem_operator::crd::Defaults;
use tandem_operator::leader::{self, LeaseSettings};
use tandem_operator::pods::PodSettings;
use tandem_operator::rm::Spec;
use tandem_operator::rotation;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::replica::stop_on_signal;
use tandem_replica::pb::Mode;

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Image of the replica pods when a ReplicatedService names none.
    #[arg(long, env = "TANDEM_DEFAULT_IMAGE")]
    pub image: String,
    /// This pod's IP: the LFDs reach the GFD sidecar at POD_IP:GFD_PORT.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: String,
    #[arg(long, env = "TANDEM_GFD_PORT", default_value_t = 7100)]
    pub gfd_port: u16,
    /// Namespace of the leader-election lease (this pod's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This operator's identity in the lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Elect a leader among operator replicas (turn off only with a single replica).
    #[arg(long, env = "TANDEM_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Log filter for the replica pods.
    #[arg(long, env = "TANDEM_REPLICA_LOG", default_value = "info")]
    pub replica_log_level: String,
    /// How long the replicas remember an idle client session, ms (1000..604800000).
    #[arg(long, env = "TANDEM_REPLICA_SESSION_EXPIRY_MS", default_value_t = tandem_replica::state::DEFAULT_SESSION_EXPIRY_MS)]
    pub replica_session_expiry_ms: u64,
    /// Defaults for what a ReplicatedService leaves out.
    #[arg(long, env = "TANDEM_DEFAULT_REPLICAS", default_value_t = 3)]
    pub default_replicas: u32,
    #[arg(long, env = "TANDEM_DEFAULT_MODE", value_enum, default_value = "passive")]
    pub default_mode: Mode,
    #[arg(long, env = "TANDEM_DEFAULT_HEARTBEAT_INTERVAL_MS", default_value_t = 100)]
    pub default_heartbeat_interval_ms: u64,
    #[arg(long, env = "TANDEM_DEFAULT_FAILURE_THRESHOLD", default_value_t = 3)]
    pub default_failure_threshold: u32,
    #[arg(long, env = "TANDEM_DEFAULT_CHECKPOINT_INTERVAL_MS", default_value_t = 2000)]
    pub default_checkpoint_interval_ms: u64,
    /// Mutual TLS on the internal plane: a CA in the Secret `tandem-ca` of this
    /// namespace (made if missing), a certificate per replica pod. Off: plaintext, for
    /// measuring what TLS costs only.
    #[arg(long, env = "TANDEM_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls: bool,
    /// Serve the replicas' client ports over TLS (needs --tls): clients verify them
    /// with `ca.crt` from the Secret `<service>-client` in the service's namespace.
    #[arg(long, env = "TANDEM_CLIENT_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub client_tls: bool,
    /// Require a token on the replicas' client ports: `token` in the Secret
    /// `<service>-client` (made once per service).
    #[arg(long, env = "TANDEM_CLIENT_TOKEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub client_token: bool,
    /// Take the CA from this Secret of the operator's namespace (`tls.crt` and `tls.key`
    /// of a CA, as cert-manager writes for a Certificate with `isCA: true` from your
    /// issuer) instead of making one in `tandem-ca`.
    #[arg(long, env = "TANDEM_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// Where to write the GFD sidecar's certificate (a volume both containers mount).
    #[arg(long, env = "TANDEM_GFD_TLS_DIR")]
    pub gfd_tls_dir: Option<std::path::PathBuf>,
    /// How long the certificates it issues are valid, seconds (60..=31536000; default 90
    /// days). Each is renewed at two thirds of it: replica pods are replaced one at a
    /// time, the operator and its GFD restart. Under a day is for tests.
    #[arg(long, env = "TANDEM_CERTIFICATE_VALIDITY_S", default_value_t = tandem_replica::tls::VALIDITY.as_secs())]
    pub certificate_validity_s: u64,
}

pub async fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    let defaults = Defaults {
        image: args.image,
        spec: Spec {
            replicas: args.default_replicas,
            mode: args.default_mode,
            heartbeat_interval_ms: args.default_heartbeat_interval_ms,
            failure_threshold: args.default_failure_threshold,
            checkpoint_interval_ms: args.default_checkpoint_interval_ms,
            recreate_lost_epoch: None,
            // Replica pods have no persistent volume yet: their data lives in memory.
            durability: tandem_operator::rm::Durability::Memory,
        },
    };
    let problems = defaults.spec.problems();
    anyhow::ensure!(problems.is_empty(), "bad defaults: {}", problems.join("; "));
    tandem_replica::state::check_session_expiry(args.replica_session_expiry_ms)
        .map_err(|invalid| anyhow::anyhow!("--replica-session-expiry-ms: {}", invalid.reason))?;
    let identity = args
        .identity
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| format!("tandem-operator-{}", std::process::id()));
    let client = kube::Client::try_default().await.context("cannot reach the Kubernetes API")?;
    let validity = certs::check_validity(args.certificate_validity_s)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    // Before the lease: a standby's GFD needs its certificate as much as the leader's.
    let authority = if args.tls {
        let authority = certs::operator_authority(&client, &args.namespace, args.ca_secret.as_deref())
            .await?
            .with_validity(validity);
        certs::install_operator_identity(&authority, args.gfd_tls_dir.as_deref())?;
        tokio::spawn(stop_to_renew_certificates(validity, shutdown.clone()));
        Some(Arc::new(authority))
    } else {
        tracing::warn!(
            "--tls=false: the replicas' internal ports are plaintext; anyone who reaches them can change a group"
        );
        None
    };
    let lease = args.leader_election.then(|| LeaseSettings {
        namespace: args.namespace.clone(),
        name: "tandem-operator".into(),
        identity: identity.clone(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(3),
    });
    if let Some(lease) = &lease {
        tokio::select! {
            led = leader::lead(client.clone(), lease.clone(), shutdown.clone()) => led.context("leader election")?,
            () = shutdown.cancelled() => return Ok(()),
        }
    }
    let pdb_v1 = controller::serves_pdb_v1(&client).await;
    info!(%identity, pdb = if pdb_v1 { "policy/v1" } else { "policy/v1beta1" }, "operator starting");
    let pod_settings = PodSettings {
        gfd_address: format!("{}:{}", args.pod_ip, args.gfd_port),
        log_level: args.replica_log_level,
        tls: authority.is_some(),
        client_tls: args.client_tls && authority.is_some(),
        client_token: args.client_token,
        session_expiry_ms: args.replica_session_expiry_ms,
    };
    let gfd_local = format!("127.0.0.1:{}", args.gfd_port);
    let ctx = Arc::new(Context::new(
        client.clone(),
        defaults,
        pod_settings,
        gfd_local,
        pdb_v1,
        identity,
        authority,
    ));
    controller::run(ctx, shutdown.clone()).await;
    if let Some(lease) = &lease {
        // A successor takes over at once instead of waiting out the lease.
        if let Err(error) = leader::release(client, lease).await {
            tracing::warn!(%error, "could not give the operator lease up; a successor waits for it to expire");
        }
    }
    info!("operator stopped");
    // Stopped on a signal, lost the lease, or renewing its certificates: exit, so a
    // restart competes for the lease afresh (with new certificates).
    Ok(())
}

/// The operator's certificate (and its GFD's, issued with it) were issued at start and
/// are loaded once: two thirds into their validity, it stops the way it stops on a lost
/// lease (lease released, a clean exit). Kubernetes restarts it, and the new process
/// issues itself and its GFD new ones (`install_operator_identity`); the GFD, seeing its
/// files change, restarts too.
async fn stop_to_renew_certificates(validity: Duration, shutdown: CancellationToken) {
    let renew_in = rotation::renew_at(0, validity.as_secs() as i64) as u64;
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(renew_in)) => {}
        () = shutdown.cancelled() => return,
    }
    info!(
        validity_s = validity.as_secs(),
        "this operator's certificates are two thirds into their validity: exiting, so that its restart issues it and its GFD new ones"
    );
    shutdown.cancel();
}
