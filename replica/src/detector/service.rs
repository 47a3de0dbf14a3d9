//! The detectors' I/O: the LFD process (probe its replica with grpc.health.v1, keep a
//! stream to the GFD) and the GFD server (the LFDs' streams, heartbeats, membership
//! subscriptions). Decisions are made by `LfdCore` and `GfdCore`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tracing::{Instrument, debug, info, warn};

use super::gfd::{self, Change, GfdCore, GfdSettings, LinkId, MAX_NAME_BYTES};
use super::lfd::{LfdCore, LfdSettings, Probe, Verdict};
use super::limits;
use crate::pb::{
    self, MembershipChange, fault_detector_client::FaultDetectorClient, gfd_message, lfd_message,
};
use crate::tls::{self, Caller, Identity};
use crate::wire::{BadAddress, dial_internal, unix_ms, within};

/// How long an LFD waits to be attached to the GFD before it tries again.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------ LFD

#[derive(Debug, Clone)]
pub struct LfdConfig {
    pub replica_id: String,
    pub replica_address: String,
    pub gfd_address: String,
    /// Local address to dial from (None: the system's choice).
    pub dial_from: Option<std::net::IpAddr>,
    pub settings: LfdSettings,
}

/// Runs an LFD until shutdown: heartbeats the replica, reports to the GFD.
pub async fn run_lfd(config: LfdConfig, shutdown: CancellationToken) -> Result<(), BadAddress> {
    let replica = crate::wire::dial_replica_health(&config.replica_address, config.dial_from)?;
    dial_internal(&config.gfd_address, config.dial_from)?;
    let settings = watch::Sender::new(config.settings);
    let verdicts = watch::Sender::new(None::<Verdict>);
    info!(replica = %config.replica_id, address = %config.replica_address, gfd = %config.gfd_address,
        interval_ms = config.settings.heartbeat_interval.as_millis() as u64, threshold = config.settings.failure_threshold, "LFD started");
    tokio::join!(
        probe_replica(&config, replica.clone(), settings.subscribe(), &verdicts, &shutdown),
        stay_attached(&config, replica, &settings, verdicts.subscribe(), &shutdown),
    );
    Ok(())
}

/// Heartbeats the replica every interval (a Check each, answered or not: a hung one
/// does not delay the next), lets time decide when silence means death, and also
/// watches the replica's health stream, which breaks the moment the process dies.
async fn probe_replica(
    config: &LfdConfig,
    channel: Channel,
    mut settings: watch::Receiver<LfdSettings>,
    verdicts: &watch::Sender<Option<Verdict>>,
    shutdown: &CancellationToken,
) {
    let health = HealthClient::new(channel);
    let mut core = LfdCore::default();
    let mut watching: Option<Streaming<tonic_health::pb::HealthCheckResponse>> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut current = *settings.borrow_and_update();
    let mut beat = tokio::time::interval(current.heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Silence is weighed four times per interval, so death is declared within a
    // quarter interval of the window's end, not up to a whole one after.
    let mut check = tokio::time::interval(current.heartbeat_interval / 4);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let report = |verdict: Option<Verdict>| {
        if let Some(verdict) = verdict {
            info!("LFD {}: replica is {} ({})", config.replica_id, describe(&verdict), verdict.reason);
            verdicts.send_replace(Some(verdict));
        }
    };
    loop {
        tokio::select! {
            _ = check.tick() => report(core.tick(unix_ms(), &current)),
            _ = beat.tick() => {
                // A probe waits at most the detection window: later, it proves nothing new.
                let (mut health, limit) = (health.clone(), Duration::from_millis(current.detection_window_ms()));
                in_flight.push(async move {
                    within(limit, health.check(HealthCheckRequest { service: String::new() })).await
                });
                continue;
            }
            Some(answer) = in_flight.next() => {
                let probe = match answer {
                    Ok(answer) if answer.get_ref().status() == ServingStatus::Serving => Probe::Serving,
                    Ok(_) => Probe::NotServing,
                    // Timed out: silence, which `tick` weighs.
                    Err(status) if status.code() == tonic::Code::DeadlineExceeded => continue,
                    Err(status) => Probe::Failed(status.message().to_owned()),
                };
                debug!("LFD {}: heartbeat answered: {probe:?}", config.replica_id);
                let answered = matches!(probe, Probe::Serving | Probe::NotServing);
                report(core.observe(probe, unix_ms()));
                if answered && watching.is_none() {
                    let mut health = health.clone();
                    let request = HealthCheckRequest { service: String::new() };
                    if let Ok(stream) = within(current.heartbeat_interval, health.watch(request)).await {
                        watching = Some(stream.into_inner());
                    }
                }
            }
            // The watch stream ended or changed: probe right away.
            _ = next_health_change(&mut watching) => beat.reset_immediately(),
            _ = settings.changed() => {
                current = *settings.borrow_and_update();
                beat = tokio::time::interval(current.heartbeat_interval);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                check = tokio::time::interval(current.heartbeat_interval / 4);
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Waits for the health stream's next message; drops the stream when it ends. Never
/// returns without a stream.
async fn next_health_change(watching: &mut Option<Streaming<tonic_health::pb::HealthCheckResponse>>) {
    let Some(stream) = watching.as_mut() else { return std::future::pending().await };
    match stream.next().await {
        Some(Ok(_)) => {}
        _ => *watching = None,
    }
}

fn describe(verdict: &Verdict) -> &'static str {
    match (verdict.alive, verdict.ready) {
        (true, true) => "alive and ready",
        (true, false) => "alive, not ready",
        _ => "dead",
    }
}

/// Keeps one stream open to the GFD: hello, reports, heartbeat answers, settings.
/// Reconnects (with back-off) whenever it breaks, e.g. when the GFD restarts.
async fn stay_attached(
    config: &LfdConfig,
    replica: Channel,
    settings: &watch::Sender<LfdSettings>,
    mut verdicts: watch::Receiver<Option<Verdict>>,
    shutdown: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut gfd_address = config.gfd_address.clone();
    let mut channel = dial_internal(&gfd_address, config.dial_from).ok();
    loop {
        let (outbound, receiver) = mpsc::channel(16);
        let hello = lfd_message::Kind::Hello(pb::LfdHello {
            replica_id: config.replica_id.clone(),
            replica_address: config.replica_address.clone(),
        });
        let _ = outbound.send(pb::LfdMessage { kind: Some(hello) }).await;
        let attached = match channel.clone() {
            Some(channel) => {
                let mut client = FaultDetectorClient::new(channel);
                tokio::select! {
                    // A paused GFD accepts the connection but never answers: try again.
                    attached = within(ATTACH_TIMEOUT, client.attach(ReceiverStream::new(receiver))) => attached,
                    () = shutdown.cancelled() => return,
                }
            }
            None => Err(Status::unavailable(format!("no usable GFD address ({gfd_address:?})"))),
        };
        match attached {
            Ok(inbound) => {
                info!("LFD {}: attached to the GFD at {gfd_address}", config.replica_id);
                backoff = Duration::from_millis(50);
                // Repeat the current verdict: a restarted GFD knows nothing yet.
                verdicts.mark_changed();
                let ended =
                    relay(config, inbound.into_inner(), &outbound, settings, &mut verdicts, shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                warn!("LFD {}: stream to the GFD ended ({ended}); reconnecting", config.replica_id);
            }
            Err(status) => {
                debug!("LFD {}: GFD {gfd_address} unreachable: {}", config.replica_id, status.message());
                // The operator may have moved: its replica knows the current address.
                if let Some(moved) = current_gfd_address(&replica).await.filter(|a| *a != gfd_address) {
                    info!("LFD {}: the GFD moved to {moved}", config.replica_id);
                    channel = dial_internal(&moved, config.dial_from).ok();
                    gfd_address = moved;
                    backoff = Duration::from_millis(50);
                    continue;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The GFD address the operator last gave the replica, if any.
async fn current_gfd_address(replica: &Channel) -> Option<String> {
    let mut client = pb::replica_client::ReplicaClient::new(replica.clone());
    let status = within(Duration::from_millis(500), client.status(pb::StatusRequest {})).await.ok()?;
    Some(status.into_inner().gfd_address).filter(|a| !a.is_empty())
}

/// Relays between the GFD's stream and this LFD until the stream ends, or the GFD has
/// been silent for long (its heartbeats stopped: it hangs, or dropped this stream), in
/// which case the stream is abandoned and the caller attaches afresh.
async fn relay(
    config: &LfdConfig,
    mut inbound: Streaming<pb::GfdMessage>,
    outbound: &mpsc::Sender<pb::LfdMessage>,
    settings: &watch::Sender<LfdSettings>,
    verdicts: &mut watch::Receiver<Option<Verdict>>,
    shutdown: &CancellationToken,
) -> String {
    let mut gfd_heartbeat = Duration::from_millis(limits::DEFAULT_HEARTBEAT_INTERVAL_MS);
    let mut heard = tokio::time::Instant::now();
    loop {
        let patience = (gfd_heartbeat * 10).max(Duration::from_secs(2));
        tokio::select! {
            () = tokio::time::sleep_until(heard + patience) => {
                return format!("no word from the GFD for {} ms", patience.as_millis());
            }
            message = inbound.next() => match message {
                Some(Ok(pb::GfdMessage { kind: Some(gfd_message::Kind::Heartbeat(beat)) })) => {
                    heard = tokio::time::Instant::now();
                    let ack = lfd_message::Kind::Ack(pb::HeartbeatAck { n: beat.n });
                    if outbound.send(pb::LfdMessage { kind: Some(ack) }).await.is_err() {
                        return "outbound closed".into();
                    }
                }
                Some(Ok(pb::GfdMessage { kind: Some(gfd_message::Kind::Settings(update)) })) => {
                    heard = tokio::time::Instant::now();
                    // A wild interval (u64::MAX overflowed `patience` below) is ignored.
                    match update.gfd_heartbeat_interval_ms.map(|ms| (ms, limits::check_interval(ms))) {
                        Some((ms, Ok(()))) => gfd_heartbeat = Duration::from_millis(ms),
                        Some((_, Err(problem))) => warn!("LFD {}: ignoring the GFD's heartbeat interval: {problem}", config.replica_id),
                        None => {}
                    }
                    let mut next = *settings.borrow();
                    if let Some(ms) = update.heartbeat_interval_ms {
                        next.heartbeat_interval = Duration::from_millis(ms);
                    }
                    if let Some(threshold) = update.failure_threshold {
                        next.failure_threshold = threshold;
                    }
                    if let Err(problem) = limits::check(next.heartbeat_interval.as_millis() as u64, next.failure_threshold) {
                        warn!("LFD {}: ignoring settings from the GFD: {problem}", config.replica_id);
                        continue;
                    }
                    settings.send_replace(next);
                    let now = *settings.borrow();
                    info!("LFD {}: settings now heartbeat_interval={} ms failure_threshold={}",
                        config.replica_id, now.heartbeat_interval.as_millis(), now.failure_threshold);
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => return status.message().to_owned(),
                None => return "closed by the GFD".into(),
            },
            changed = verdicts.changed() => {
                if changed.is_err() {
                    return "detector stopped".into();
                }
                let verdict = verdicts.borrow_and_update().clone();
                if let Some(verdict) = verdict {
                    let report = pb::ReplicaReport { alive: verdict.alive, ready: verdict.ready, reason: verdict.reason, at_unix_ms: unix_ms() };
                    if outbound.send(pb::LfdMessage { kind: Some(lfd_message::Kind::Report(report)) }).await.is_err() {
                        return "outbound closed".into();
                    }
                }
            }
            () = shutdown.cancelled() => return "shutdown".into(),
        }
    }
}

// ------------------------------------------------------------------ GFD

type Outbound = mpsc::Sender<Result<pb::GfdMessage, Status>>;

/// The GFD: one per group, reached by every LFD and by the RM.
pub struct Gfd {
    core: Mutex<GfdCore>,
    lfd_settings: Mutex<pb::DetectorSettings>,
    /// Settings for the LFDs of some replicas only, by replica id prefix.
    scoped_settings: Mutex<std::collections::BTreeMap<String, pb::DetectorSettings>>,
    events: broadcast::Sender<pb::MembershipEvent>,
    /// Each LFD stream: where to send, and a token that ends its reader when the core
    /// gives up on the stream.
    links: Mutex<HashMap<LinkId, (Outbound, CancellationToken)>>,
    next_link: AtomicU64,
}

/// Membership events kept for subscribers that fall behind (each up to a whole
/// membership of `MAX_MEMBERS`, a few hundred KiB).
const MEMBERSHIP_EVENTS_KEPT: usize = 64;

/// A client of the GFD's membership stream (the RM's): it accepts a whole membership of
/// `MAX_MEMBERS`, whatever tonic's default message limit.
pub fn subscriber(channel: Channel) -> FaultDetectorClient<Channel> {
    FaultDetectorClient::new(channel).max_decoding_message_size(crate::wire::MAX_MESSAGE_BYTES)
}

/// Most replica prefixes with settings of their own (one per group, or per replica in a
/// test): the map must not grow with every caller's whim.
const MAX_SCOPED_SETTINGS: usize = 256;

/// How often the whole membership goes out even when nothing changed: a subscriber
/// whose view lost a replica's state (the RM forgets a restarted replica's old verdict;
/// a change may reach it before its subscription) has it back within this long, instead
/// of waiting for that replica's next change (seen: a caught-up replica left out of the
/// group for 10 s, its LFD having reattached during a GFD pause with nothing new to say).
const PERIODIC_SNAPSHOT_MS: u64 = 1_000;
const PERIODIC_SNAPSHOT: &str = "periodic snapshot";

impl Gfd {
    pub fn new(settings: GfdSettings, lfd: LfdSettings) -> Arc<Self> {
        let lfd_settings = pb::DetectorSettings {
            heartbeat_interval_ms: Some(lfd.heartbeat_interval.as_millis() as u64),
            failure_threshold: Some(lfd.failure_threshold),
            gfd_heartbeat_interval_ms: Some(settings.heartbeat_interval_ms),
            replica_prefix: String::new(),
        };
        Arc::new(Self {
            core: Mutex::new(GfdCore::new(settings, unix_ms())),
            lfd_settings: Mutex::new(lfd_settings),
            scoped_settings: Mutex::new(std::collections::BTreeMap::new()),
            // Each event carries the whole membership: keep few (a subscriber that falls
            // further behind gets a fresh snapshot instead).
            events: broadcast::channel(MEMBERSHIP_EVENTS_KEPT).0,
            links: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
        })
    }

    /// The settings in force for `replica_id`'s LFD: the global ones, overridden by the
    /// longest matching prefix.
    fn settings_for(&self, replica_id: &str) -> pb::DetectorSettings {
        let mut settings = self.lfd_settings.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let scoped = self.scoped_settings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, over)) = scoped
            .iter()
            .filter(|(prefix, _)| replica_id.starts_with(prefix.as_str()))
            .max_by_key(|(p, _)| p.len())
        {
            settings.heartbeat_interval_ms = over.heartbeat_interval_ms.or(settings.heartbeat_interval_ms);
            settings.failure_threshold = over.failure_threshold.or(settings.failure_threshold);
        }
        settings.replica_prefix = String::new();
        settings
    }

    fn send_settings(&self, link: LinkId, settings: pb::DetectorSettings) {
        let outbound =
            self.links.lock().unwrap_or_else(|p| p.into_inner()).get(&link).map(|(o, _)| o.clone());
        if let Some(outbound) = outbound {
            let _ =
                outbound.try_send(Ok(pb::GfdMessage { kind: Some(gfd_message::Kind::Settings(settings)) }));
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, GfdCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces membership changes to subscribers and to the log.
    fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        // After a readiness change the member list would only repeat itself.
        let membership_changed =
            changes.iter().any(|c| c.reason != PERIODIC_SNAPSHOT && gfd::changes_members(c.kind));
        let now = unix_ms();
        // Versioned, taken and sent under the core's lock: two publishers racing could
        // otherwise send an older snapshot last, and a subscriber keep a replica's stale
        // state until the next change (seen: a ready replica shown not ready for good).
        let mut core = self.core();
        let alive = core.alive();
        for change in changes {
            // One version per event: a subscriber skips an event whose version it has
            // seen, and each event's own change (a failure) must count.
            core.publish();
            let membership = core.snapshot(now);
            let what = match change.kind {
                MembershipChange::Joined => "joined",
                MembershipChange::Failed => "failed",
                MembershipChange::DetectorLost => "lost (LFD gone)",
                MembershipChange::Ready => "ready",
                MembershipChange::NotReady => "not ready",
                _ => "snapshot",
            };
            if change.reason == PERIODIC_SNAPSHOT {
                debug!("GFD: {}", change.reason);
            } else if change.replica_id.is_empty() {
                info!("GFD: {}", change.reason);
            } else {
                info!("GFD: {} {what} ({})", change.replica_id, change.reason);
            }
            let _ = self.events.send(pb::MembershipEvent {
                at_unix_ms: now,
                change: change.kind.into(),
                replica_id: change.replica_id,
                reason: change.reason,
                membership: Some(membership),
            });
        }
        drop(core);
        if membership_changed {
            info!("GFD: {}", gfd::members_line(&alive));
        }
    }

    /// Ends an LFD's stream with `status` (the LFD logs it, and attaches again later).
    fn refuse(&self, link: LinkId, status: Status) {
        let outbound = self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(&link).map(|(o, _)| o);
        if let Some(outbound) = outbound {
            let _ = outbound.try_send(Err(status));
        }
    }

    /// Heartbeats every LFD and lets the core notice silent ones.
    async fn heartbeat_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut n = 0u64;
        let mut last_snapshot = 0u64;
        loop {
            let interval = Duration::from_millis(self.core().settings().heartbeat_interval_ms);
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            n += 1;
            let now = unix_ms();
            let (tick, settled) = {
                let mut core = self.core();
                (core.tick(now), core.is_settled())
            };
            self.publish(tick.changes);
            if settled && now.saturating_sub(last_snapshot) >= PERIODIC_SNAPSHOT_MS {
                last_snapshot = now;
                self.publish(vec![Change {
                    kind: MembershipChange::Snapshot,
                    replica_id: String::new(),
                    reason: PERIODIC_SNAPSHOT.into(),
                }]);
            }
            let outbounds: Vec<Outbound> = {
                let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
                for link in tick.close {
                    // Ends the stream: an LFD that still runs sees it and attaches afresh.
                    if let Some((_, reader)) = links.remove(&link) {
                        debug!(link, "closing a silent LFD's stream");
                        reader.cancel();
                    }
                }
                links.values().map(|(outbound, _)| outbound.clone()).collect()
            };
            for outbound in outbounds {
                let beat = gfd_message::Kind::Heartbeat(pb::Heartbeat { n });
                let _ = outbound.try_send(Ok(pb::GfdMessage { kind: Some(beat) }));
            }
        }
    }

    async fn read_link(
        self: Arc<Self>,
        link: LinkId,
        caller: Caller,
        mut inbound: Streaming<pb::LfdMessage>,
        closed: CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(message)) => message,
                    _ => break,
                },
                () = closed.cancelled() => break,
            };
            let now = unix_ms();
            match message.kind {
                Some(lfd_message::Kind::Hello(hello)) => {
                    // Only a replica's own LFD speaks for it.
                    let claimed = Identity::Lfd(hello.replica_id.clone());
                    if caller.permit("report for a replica", |lfd| *lfd == claimed).is_err() {
                        break;
                    }
                    debug!(link, replica = %hello.replica_id, "LFD attached");
                    if let Err(refused) =
                        self.core().hello(link, &hello.replica_id, &hello.replica_address, now)
                    {
                        warn!(link, %refused, "GFD: LFD refused");
                        self.refuse(link, tonic::Status::resource_exhausted(refused.to_string()));
                        break;
                    }
                    // A (re)attached LFD adopts the settings in force, changed at run time or not.
                    self.send_settings(link, self.settings_for(&hello.replica_id));
                }
                Some(lfd_message::Kind::Report(report)) => {
                    let changes = self.core().report(link, &report, now);
                    self.publish(changes);
                }
                Some(lfd_message::Kind::Ack(_)) => self.core().answered(link, now),
                None => {}
            }
        }
        self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(&link);
        let changes = self.core().link_closed(link, unix_ms());
        self.publish(changes);
    }
}

/// Serves the GFD on `listener` until shutdown.
pub async fn serve_gfd(
    gfd: Arc<Gfd>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    info!(listen = ?listener.local_addr().ok(), "GFD started");
    tokio::spawn(Arc::clone(&gfd).heartbeat_loop(shutdown.clone()).in_current_span());
    let router = crate::wire::server(crate::wire::Plane::Internal)?
        .add_service(pb::fault_detector_server::FaultDetectorServer::new(GfdService(gfd)));
    crate::wire::serve_until_shutdown(router, listener, shutdown).await
}

struct GfdService(Arc<Gfd>);

type EventStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::fault_detector_server::FaultDetector for GfdService {
    type AttachStream = ReceiverStream<Result<pb::GfdMessage, Status>>;
    type SubscribeStream = EventStream<pb::MembershipEvent>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::LfdMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let gfd = &self.0;
        let caller = tls::caller(&request);
        caller.permit("attach as an LFD", |caller| matches!(caller, Identity::Lfd(_)))?;
        let link = gfd.next_link.fetch_add(1, Ordering::Relaxed);
        let (outbound, receiver) = mpsc::channel(16);
        let closed = CancellationToken::new();
        gfd.core().link_opened(link, unix_ms()).map_err(|refused| {
            warn!(%refused, "GFD: LFD stream refused");
            Status::resource_exhausted(refused.to_string())
        })?;
        gfd.links.lock().unwrap_or_else(|p| p.into_inner()).insert(link, (outbound, closed.clone()));
        tokio::spawn(Arc::clone(gfd).read_link(link, caller, request.into_inner(), closed).in_current_span());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        tls::authorize(&request, "follow the membership", |caller| *caller == Identity::Manager)?;
        let gfd = Arc::clone(&self.0);
        let mut events = gfd.events.subscribe();
        let snapshot = |gfd: &Gfd| pb::MembershipEvent {
            at_unix_ms: unix_ms(),
            change: MembershipChange::Snapshot.into(),
            replica_id: String::new(),
            reason: "current membership".into(),
            membership: Some(gfd.core().snapshot(unix_ms())),
        };
        let first = snapshot(&gfd);
        let stream = async_stream(first, move |sender| async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    // Too slow to follow every change: start over from the whole picture.
                    Err(broadcast::error::RecvError::Lagged(_)) => snapshot(&gfd),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn members(
        &self,
        request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::Membership>, Status> {
        tls::authorize(&request, "read the membership", |caller| *caller == Identity::Manager)?;
        Ok(Response::new(self.0.core().snapshot(unix_ms())))
    }

    async fn update_detector_settings(
        &self,
        request: Request<pb::DetectorSettings>,
    ) -> Result<Response<pb::DetectorSettings>, Status> {
        tls::authorize(&request, "change the detectors' settings", |caller| *caller == Identity::Manager)?;
        let update = request.into_inner();
        let gfd = &self.0;
        let prefix = update.replica_prefix.clone();
        // Checked as they would be in force: the update over the current settings.
        let current = gfd.settings_for(&prefix);
        let threshold = update.failure_threshold.or(current.failure_threshold).unwrap_or_default();
        let lfd_interval = update.heartbeat_interval_ms.or(current.heartbeat_interval_ms).unwrap_or_default();
        let gfd_interval =
            update.gfd_heartbeat_interval_ms.unwrap_or(gfd.core().settings().heartbeat_interval_ms);
        for interval in [lfd_interval, gfd_interval] {
            limits::check(interval, threshold).map_err(|problem| {
                Status::invalid_argument(format!("detector settings refused: {problem}"))
            })?;
        }
        if !prefix.is_empty() {
            let scoped = gfd.scoped_settings.lock().unwrap_or_else(|p| p.into_inner());
            if prefix.len() > MAX_NAME_BYTES {
                return Err(Status::invalid_argument(format!(
                    "replica_prefix is {} bytes, more than {MAX_NAME_BYTES}",
                    prefix.len()
                )));
            }
            if !scoped.contains_key(&prefix) && scoped.len() >= MAX_SCOPED_SETTINGS {
                return Err(Status::resource_exhausted(format!(
                    "the GFD already keeps settings for {MAX_SCOPED_SETTINGS} prefixes; change one of those"
                )));
            }
        }
        if prefix.is_empty() {
            gfd.core().set_heartbeat(update.gfd_heartbeat_interval_ms, update.failure_threshold);
            let mut current = gfd.lfd_settings.lock().unwrap_or_else(|p| p.into_inner());
            current.heartbeat_interval_ms = update.heartbeat_interval_ms.or(current.heartbeat_interval_ms);
            current.failure_threshold = update.failure_threshold.or(current.failure_threshold);
            current.gfd_heartbeat_interval_ms =
                update.gfd_heartbeat_interval_ms.or(current.gfd_heartbeat_interval_ms);
        } else {
            let mut scoped = gfd.scoped_settings.lock().unwrap_or_else(|p| p.into_inner());
            let entry = scoped.entry(prefix.clone()).or_default();
            entry.heartbeat_interval_ms = update.heartbeat_interval_ms.or(entry.heartbeat_interval_ms);
            entry.failure_threshold = update.failure_threshold.or(entry.failure_threshold);
        }
        info!(?update, "GFD: detector settings changed");
        let links: Vec<(LinkId, String)> = {
            let core = gfd.core();
            core.links().filter_map(|link| Some((link, core.replica_of(link)?.to_owned()))).collect()
        };
        for (link, replica) in links.into_iter().filter(|(_, replica)| replica.starts_with(&prefix)) {
            gfd.send_settings(link, gfd.settings_for(&replica));
        }
        let mut settings = gfd.settings_for(&prefix);
        settings.replica_prefix = prefix;
        Ok(Response::new(settings))
    }
}

/// A stream that yields `first`, then whatever `produce` sends.
fn async_stream<T, F, Fut>(first: T, produce: F) -> EventStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(64);
    let _ = sender.try_send(Ok(first));
    tokio::spawn(produce(sender));
    Box::pin(ReceiverStream::new(receiver))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seen on Kubernetes: two LFDs' changes published at once, the older snapshot sent
    /// last, and a ready replica stayed "not ready" in the RM's view for good (no later
    /// change came to correct it). Whatever the interleaving, the last event a
    /// subscriber receives must carry the membership as it is.
    #[test]
    fn the_last_event_published_carries_the_newest_membership() {
        const REPLICAS: u64 = 6;
        const FLIPS: u64 = 80;
        let summary = |m: &pb::Membership| -> Vec<(String, bool, bool)> {
            m.members.iter().map(|s| (s.replica_id.clone(), s.alive, s.ready)).collect()
        };
        for _round in 0..20 {
            let gfd = Gfd::new(GfdSettings::default(), LfdSettings::default());
            let mut events = gfd.events.subscribe();
            for link in 0..REPLICAS {
                let mut core = gfd.core();
                core.link_opened(link, unix_ms()).expect("admitted");
                core.hello(link, &format!("r{link}"), "127.0.0.1:1", unix_ms()).expect("admitted");
            }
            let threads: Vec<_> = (0..REPLICAS)
                .map(|link| {
                    let gfd = Arc::clone(&gfd);
                    std::thread::spawn(move || {
                        for flip in 0..FLIPS {
                            // Ends ready: every flip changes something, so every call publishes.
                            let report =
                                pb::ReplicaReport { alive: true, ready: flip % 2 == 1, ..Default::default() };
                            let changes = gfd.core().report(link, &report, unix_ms());
                            gfd.publish(changes);
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().expect("publisher");
            }
            let mut last: Option<pb::Membership> = None;
            // A subscriber that falls behind skips to the oldest event still kept.
            loop {
                let event = match events.try_recv() {
                    Ok(event) => event,
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                let membership = event.membership.expect("a membership");
                let previous = last.as_ref().map_or(0, |m| m.version);
                assert!(membership.version > previous, "version {} after {previous}", membership.version);
                last = Some(membership);
            }
            let last = last.expect("events were published");
            assert_eq!(summary(&last), summary(&gfd.core().snapshot(unix_ms())));
            assert!(last.members.iter().all(|m| m.ready), "{last:?}");
        }
    }

    /// One call can bring several changes (a replica joins and is ready; a tick loses two
    /// LFDs). Each event carries a version of its own, or a subscriber that skips versions
    /// it has seen would drop the second change.
    #[test]
    fn each_change_of_a_batch_has_its_own_version() {
        let gfd = Gfd::new(GfdSettings::default(), LfdSettings::default());
        let mut events = gfd.events.subscribe();
        let changes = {
            let mut core = gfd.core();
            core.link_opened(1, unix_ms()).expect("admitted");
            core.hello(1, "r1", "127.0.0.1:1", unix_ms()).expect("admitted");
            core.report(1, &pb::ReplicaReport { alive: true, ready: true, ..Default::default() }, unix_ms())
        };
        assert_eq!(changes.len(), 2, "{changes:?}");
        gfd.publish(changes);
        let versions: Vec<u64> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.membership.expect("membership").version)
            .collect();
        assert_eq!(versions, vec![1, 2]);
    }

    /// A view that lost a replica's state gets it back without waiting for that replica
    /// to change: the whole membership goes out every second even when nothing changes.
    #[tokio::test]
    async fn the_whole_membership_goes_out_every_second_while_nothing_changes() {
        let gfd = Gfd::new(GfdSettings { settle_ms: 0, ..GfdSettings::default() }, LfdSettings::default());
        {
            let mut core = gfd.core();
            core.link_opened(1, unix_ms()).expect("admitted");
            core.hello(1, "r1", "127.0.0.1:1", unix_ms()).expect("admitted");
            let changes = core.report(
                1,
                &pb::ReplicaReport { alive: true, ready: true, ..Default::default() },
                unix_ms(),
            );
            assert!(!changes.is_empty());
        }
        let mut events = gfd.events.subscribe();
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&gfd).heartbeat_loop(stop.clone()));
        // The LFD answers every heartbeat: r1 stays alive and ready, nothing changes.
        let lfd = Arc::clone(&gfd);
        let answering = stop.clone();
        tokio::spawn(async move {
            while !answering.is_cancelled() {
                lfd.core().answered(1, unix_ms());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut periodic = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while periodic.len() < 2 {
            let event = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("two periodic snapshots within 30 s")
                .expect("the GFD publishes");
            assert!(event.replica_id.is_empty(), "nothing changed, yet: {event:?}");
            if event.reason == PERIODIC_SNAPSHOT {
                periodic.push(event);
            }
        }
        stop.cancel();
        for event in &periodic {
            assert_eq!(event.change(), MembershipChange::Snapshot);
            let members = &event.membership.as_ref().expect("membership").members;
            assert!(members.iter().any(|m| m.replica_id == "r1" && m.alive && m.ready), "{members:?}");
        }
        let gap = periodic[1].at_unix_ms.saturating_sub(periodic[0].at_unix_ms);
        assert!(gap >= PERIODIC_SNAPSHOT_MS, "{gap} ms apart");
    }

    /// Issue 9: 6,000 fake members made every membership event too large for the RM, and
    /// its subscription broke for good. The GFD keeps at most `MAX_MEMBERS` (refusing
    /// the rest with the reason), and its whole membership, names at their longest,
    /// still reaches a subscriber.
    #[tokio::test]
    async fn a_flood_of_members_is_capped_and_the_membership_still_reaches_subscribers() {
        use super::super::gfd::{MAX_MEMBERS, Refused};
        let gfd = Gfd::new(GfdSettings { settle_ms: 0, ..GfdSettings::default() }, LfdSettings::default());
        let long = |i: u64| format!("{i:0>width$}", width = MAX_NAME_BYTES);
        let mut refused = Vec::new();
        {
            let mut core = gfd.core();
            // Past the cap by a few hundred: each refusal is as good as the next 5,000.
            for link in 0..(MAX_MEMBERS as u64 + 300) {
                let admitted = core
                    .link_opened(link, unix_ms())
                    .and_then(|()| core.hello(link, &long(link), &long(link), unix_ms()));
                if let Err(refusal) = admitted {
                    refused.push(refusal);
                    core.link_closed(link, unix_ms());
                }
            }
            assert_eq!(core.snapshot(unix_ms()).members.len(), MAX_MEMBERS);
        }
        assert_eq!(refused.len(), 300);
        assert!(matches!(&refused[0], Refused::TooManyMembers { .. }), "{:?}", refused[0]);
        assert!(refused[0].to_string().contains("is not admitted"), "{}", refused[0]);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let address = listener.local_addr().expect("address").to_string();
        let stop = CancellationToken::new();
        tokio::spawn(serve_gfd(Arc::clone(&gfd), listener, stop.clone()));
        let mut client = subscriber(crate::wire::dial(&address, None).expect("address"));
        let mut events = within(Duration::from_secs(20), client.subscribe(pb::SubscribeRequest {}))
            .await
            .expect("subscribed")
            .into_inner();
        let first = within(Duration::from_secs(20), async { events.message().await })
            .await
            .expect("an event")
            .expect("the stream is open");
        assert_eq!(first.membership.expect("membership").members.len(), MAX_MEMBERS);
        stop.cancel();
    }
}
