//! The local RM's API (`tandem.v1.Manager`): `tandem set` changes the spec through it,
//! `tandem status` reads what the RM knows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_replica::pb::{self, Mode};
use tandem_replica::tls::{self, Identity};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::Shared;
use crate::rm::{Instance, Liveness, Spec, Trouble};
use crate::switchover::{Ask, Outcome, Target};

/// How long `Switchover` waits for the RM to decide (it waits while the RM changes the
/// group for its own reasons).
const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(10);

/// The switchover asked through the API and not decided yet: the RM's loop takes it
/// into its record for one round (`Local::reconcile`).
pub(super) fn pending_switchover(shared: &Mutex<Shared>) -> Option<Ask> {
    shared.lock().unwrap_or_else(|p| p.into_inner()).switchover.clone().filter(|a| a.outcome.is_none())
}

/// What the RM's round decided of it, for the API call that waits.
pub(super) fn answer_switchover(shared: &Mutex<Shared>, decided: Option<Ask>) {
    let Some(decided) = decided.filter(|a| a.outcome.is_some()) else { return };
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(asked) =
        shared.switchover.as_mut().filter(|a| a.outcome.is_none() && a.target == decided.target)
    {
        asked.outcome = decided.outcome;
    }
}

pub struct ManagerService {
    shared: Arc<Mutex<Shared>>,
    spec: watch::Sender<Spec>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Mutex<Shared>>,
    spec: watch::Sender<Spec>,
    shutdown: CancellationToken,
) {
    let service = pb::manager_server::ManagerServer::new(ManagerService { shared, spec });
    let result = match tandem_replica::wire::server(tandem_replica::wire::Plane::Internal) {
        Ok(mut server) => {
            tandem_replica::wire::serve_until_shutdown(server.add_service(service), listener, shutdown).await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = result {
        tracing::error!(%error, "the RM's API stopped");
    }
}

/// Whether an RM answers at `address` (another `tandem up` using the same state).
pub async fn answers(address: &str) -> bool {
    let Ok(channel) = tandem_replica::wire::dial_internal(address, None) else { return false };
    let mut client = pb::manager_client::ManagerClient::new(channel);
    tandem_replica::wire::within(Duration::from_millis(500), client.describe(pb::DescribeRequest {}))
        .await
        .is_ok()
}

pub fn spec_to_wire(spec: &Spec) -> pb::ServiceSpec {
    pb::ServiceSpec {
        replicas: spec.replicas,
        mode: spec.mode.into(),
        heartbeat_interval_ms: spec.heartbeat_interval_ms,
        failure_threshold: spec.failure_threshold,
        checkpoint_interval_ms: spec.checkpoint_interval_ms,
    }
}

#[tonic::async_trait]
impl pb::manager_server::Manager for ManagerService {
    async fn update_spec(
        &self,
        request: Request<pb::SpecUpdate>,
    ) -> Result<Response<pb::ServiceSpec>, Status> {
        tls::authorize(&request, "change the group's spec", |caller| *caller == Identity::Manager)?;
        let update = request.into_inner();
        let mut spec = self.spec.borrow().clone();
        if let Some(replicas) = update.replicas {
            spec.replicas = replicas;
        }
        if let Some(mode) = update.mode {
            spec.mode =
                Mode::try_from(mode).map_err(|_| Status::invalid_argument(format!("unknown mode {mode}")))?;
        }
        if let Some(ms) = update.heartbeat_interval_ms {
            spec.heartbeat_interval_ms = ms;
        }
        if let Some(threshold) = update.failure_threshold {
            spec.failure_threshold = threshold;
        }
        if let Some(ms) = update.checkpoint_interval_ms {
            spec.checkpoint_interval_ms = ms;
        }
        if let Some(epoch) = update.recreate_lost_epoch {
            let lost = self.shared.lock().unwrap_or_else(|p| p.into_inner()).record.trouble.clone();
            match lost {
                Some(Trouble::GroupLost { epoch: lost, .. }) if lost == epoch => {
                    spec.recreate_lost_epoch = Some(epoch)
                }
                Some(Trouble::GroupLost { epoch: lost, .. }) => {
                    return Err(Status::failed_precondition(format!(
                        "the group lost is epoch {lost}, not {epoch}: nothing recreated"
                    )));
                }
                _ => {
                    return Err(Status::failed_precondition(
                        "the group is not lost (some member may still hold its data): nothing recreated",
                    ));
                }
            }
        }
        let problems = spec.problems();
        if !problems.is_empty() {
            return Err(Status::invalid_argument(format!("spec refused: {}", problems.join("; "))));
        }
        self.spec.send_replace(spec.clone());
        Ok(Response::new(spec_to_wire(&spec)))
    }

    async fn switchover(
        &self,
        request: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverReply>, Status> {
        tls::authorize(&request, "switch the primary over", |caller| *caller == Identity::Manager)?;
        let target = Target::parse(&request.into_inner().to).map_err(Status::invalid_argument)?;
        {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if shared.switchover.is_some() {
                return Err(Status::aborted("another switchover is under way; try again when it is done"));
            }
            shared.switchover = Some(Ask::new(target.clone(), tandem_replica::wire::unix_ms()));
        }
        let deadline = tokio::time::Instant::now() + SWITCHOVER_PATIENCE;
        let outcome = loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(outcome) = shared.switchover.as_ref().and_then(|a| a.outcome.clone()) {
                shared.switchover = None;
                break outcome;
            }
            if tokio::time::Instant::now() >= deadline {
                shared.switchover = None;
                return Err(Status::deadline_exceeded(format!(
                    "the RM did not get to the switchover to {target} within {} s (it was changing the group); nothing switched over",
                    SWITCHOVER_PATIENCE.as_secs()
                )));
            }
        };
        match outcome {
            Outcome::Done { from, to, epoch } => {
                Ok(Response::new(pb::SwitchoverReply { from, to, epoch, already_primary: false }))
            }
            Outcome::AlreadyPrimary { id, epoch } => Ok(Response::new(pb::SwitchoverReply {
                from: id.clone(),
                to: id,
                epoch,
                already_primary: true,
            })),
            Outcome::Refused(refusal) => {
                Err(Status::failed_precondition(format!("switchover to {target} refused: {refusal}")))
            }
        }
    }

    async fn describe(
        &self,
        request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::ServiceDescription>, Status> {
        tls::authorize(&request, "describe the group", |caller| *caller == Identity::Manager)?;
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let config = shared.record.config.clone();
        let replicas = shared
            .observed
            .iter()
            .map(|o| pb::ReplicaDescription {
                replica_id: o.id.clone(),
                address: o.address.clone(),
                process: match o.instance {
                    Instance::Running => "running",
                    Instance::Terminating => "stopping",
                    Instance::Gone => "gone",
                }
                .into(),
                alive: matches!(o.liveness, Liveness::Alive { .. }),
                ready: matches!(o.liveness, Liveness::Alive { ready: true }),
                member: config.as_ref().is_some_and(|c| c.has_member(&o.id)),
                last_heartbeat_unix_ms: shared.heartbeats.get(&o.id).copied().unwrap_or_default(),
                last_seq: o.facts.as_ref().map_or(0, |f| f.last_seq),
                checkpoint_seq: shared.checkpoint_seqs.get(&o.id).copied().unwrap_or_default(),
                synced_epoch: o.facts.as_ref().map_or(0, |f| f.synced_epoch),
                restarts: shared.restarts.get(&o.id).copied().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ServiceDescription {
            spec: Some(spec_to_wire(&shared.spec)),
            configuration: config,
            replicas,
            failovers: shared.record.failovers,
            gfd_address: shared.gfd_address.clone(),
            membership_known: shared.membership_known,
            trouble: shared.record.trouble.as_ref().map(ToString::to_string).unwrap_or_default(),
            trouble_reason: shared.record.trouble.as_ref().map(|t| t.reason().to_owned()).unwrap_or_default(),
        }))
    }
}
