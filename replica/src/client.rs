//! The client library, used by the `tandem` command, the benchmarks and the tests.
//!
//! A client is one session: a client id and a growing request id, one request at a time.
//! It learns the configuration from the replicas it is given, sends passive-mode
//! requests to the primary (following redirects) and active-mode requests to every
//! member (keeping the first reply, discarding the duplicates), and retries a request
//! with the same id across failovers until its deadline, so that a request is executed
//! at most once and answered exactly once. When an answer is slow, it asks the other
//! replicas whether the group moved on (a newer configuration) instead of waiting out
//! its timeout on a primary that may hang.
//!
//! Sessions across processes: a session is a client id. A random id (128 bits) is
//! never shared. A chosen id (`client_id`) may be used by one process after another.
//! Request ids start from the wall clock in microseconds: a later process continues
//! above an earlier one's ids, and the group can tell a new session from a late retry
//! of one it forgot (idle sessions expire; see `state::opens_session`). A session that
//! expired while this client idled is renewed on its next request: that request was
//! refused without executing, so it is resent under a fresh id from the clock. Two processes must not use one client id at
//! the same time (their requests would be refused as stale); a replica refuses a
//! request id reused for another operation rather than answer it with the other's
//! reply.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::debug;

use crate::error::error_detail;
use crate::pb::{self, Mode, error_detail::Kind as Detail, op_result, operation};
use crate::stream::Streams;
use crate::wire::{Channels, ClientCredentials, unix_micros, within};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Replicas to start from (`host:port`); the configuration names the rest.
    pub endpoints: Vec<String>,
    /// Session id; a random one when `None`.
    pub client_id: Option<String>,
    /// How long one request may take, retries included.
    pub deadline: Duration,
    /// Timeout of one attempt against one replica.
    pub attempt_timeout: Duration,
    /// An answer slower than this makes the client ask the other replicas, every
    /// `hedge_after / 2`, whether a newer configuration names another primary (a
    /// failover under way); it then goes there instead of waiting for the slow one.
    pub hedge_after: Duration,
    /// For a group whose client port requires TLS or a token.
    pub credentials: ClientCredentials,
}

impl ClientSettings {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            client_id: None,
            deadline: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(6),
            hedge_after: Duration::from_millis(50),
            credentials: ClientCredentials::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given (use --endpoints or TANDEM_ENDPOINTS)")]
    NoEndpoints,
    #[error("invalid request: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("request {request_id} is stale: the session already executed request {last_request_id}")]
    Stale { request_id: u64, last_request_id: u64 },
    #[error(
        "request {request_id} reuses the id of the session's last request for another operation; it was not executed (is another process using client id {client_id}?)"
    )]
    RequestIdReused { client_id: String, request_id: u64 },
    #[error(
        "request {request_id}: the group forgot session {client_id} (idle longer than {session_expiry_ms} ms); an earlier attempt of this request may have executed: check before repeating it"
    )]
    SessionExpired { client_id: String, request_id: u64, session_expiry_ms: u64 },
    #[error("wrong epoch: asked for epoch {got}, the group is at epoch {current}")]
    WrongEpoch { got: u64, current: u64 },
    #[error("the operation failed: {0}")]
    OpFailed(String),
    #[error("request {request_id} got no answer within {waited_ms} ms; last error: {last_error}")]
    Timeout { request_id: u64, waited_ms: u64, last_error: String },
    #[error("bad endpoint {0:?}")]
    BadEndpoint(String),
    #[error("refused: {0}")]
    Refused(String),
}

impl ClientError {
    /// Whether the request may have executed: a timeout, or an expired session found
    /// by a retry, leaves that open.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::SessionExpired { .. })
    }
}

/// What the client believes about the group.
#[derive(Debug, Clone, Default)]
struct View {
    epoch: u64,
    mode: Mode,
    primary: Option<String>,
    /// Shared: every attempt and hedge reads them, none changes them.
    members: Arc<[String]>,
}

impl View {
    fn of(config: &pb::Configuration) -> Self {
        Self {
            epoch: config.epoch,
            mode: config.mode(),
            primary: config.leader().map(|m| m.address.clone()),
            members: config.members.iter().map(|m| m.address.clone()).collect(),
        }
    }
}

/// A client process's connections to a group: one HTTP/2 connection and one request
/// stream per replica. Sessions (`Client`s) made with the same `Connections` share them,
/// and their concurrent requests to a replica travel together in batches; a program
/// that runs many sessions at once should give them one `Connections`.
#[derive(Clone)]
pub struct Connections {
    channels: Arc<Channels>,
    streams: Streams,
}

impl Connections {
    pub fn new(credentials: ClientCredentials) -> Self {
        Self { channels: Arc::new(Channels::client(credentials)), streams: Streams::default() }
    }
}

pub struct Client {
    settings: ClientSettings,
    /// `settings.endpoints`, shared with the hedges of slow attempts.
    endpoints: Arc<[String]>,
    client_id: String,
    last_request_id: u64,
    channels: Arc<Channels>,
    streams: Streams,
    view: View,
    /// Which endpoint to try while the primary is unknown; moves on after a failure.
    rotation: usize,
}

/// A fresh session id: 128 random bits, so two clients never share one by chance.
pub fn random_client_id() -> String {
    format!("c{:032x}", rand::random::<u128>())
}

impl Client {
    /// A session with connections of its own.
    pub fn new(settings: ClientSettings) -> Result<Self, ClientError> {
        let connections = Connections::new(settings.credentials.clone());
        Self::with_connections(settings, connections)
    }

    /// A session over `connections` (shared with other sessions; their credentials are
    /// used, not `settings.credentials`).
    pub fn with_connections(settings: ClientSettings, connections: Connections) -> Result<Self, ClientError> {
        if settings.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for endpoint in &settings.endpoints {
            crate::wire::dial(endpoint, None).map_err(|_| ClientError::BadEndpoint(endpoint.clone()))?;
        }
        // Ids from the clock: a chosen id may have been used by an earlier process
        // (continue above it), and the group tells a new session by its clock-based id.
        let client_id = settings.client_id.clone().unwrap_or_else(random_client_id);
        let last_request_id = unix_micros();
        let Connections { channels, streams } = connections;
        Ok(Self {
            endpoints: settings.endpoints.clone().into(),
            settings,
            client_id,
            last_request_id,
            channels,
            streams,
            view: View::default(),
            rotation: 0,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The id the next request will carry.
    pub fn next_request_id(&self) -> u64 {
        self.last_request_id + 1
    }

    fn channel(&self, address: &str) -> Result<Channel, ClientError> {
        self.channels.get(address).map_err(|_| ClientError::BadEndpoint(address.to_owned()))
    }

    /// Every replica the client knows of: its endpoints and the members of its view.
    fn known_replicas(&self) -> Vec<String> {
        known_replicas(&self.settings.endpoints, &self.view.members)
    }

    /// Asks every known replica for its configuration and keeps the newest.
    async fn refresh_view(&mut self) {
        let timeout = self.settings.attempt_timeout.min(Duration::from_secs(1));
        if let Some(config) = newest_configuration(&self.channels, &self.known_replicas(), timeout).await
            && config.epoch > self.view.epoch
        {
            self.view = View::of(&config);
        }
    }

    /// Waits while an attempt is under way; past `hedge_after`, keeps asking the known
    /// replicas (but `slow`) for a configuration newer than the view. Completes once
    /// one exists: the group moved on, the attempt is not worth waiting for.
    fn newer_configuration(&self, slow: Option<&str>) -> impl Future<Output = View> + 'static {
        // Built only once the attempt is slow: most attempts are not.
        let (endpoints, members) = (Arc::clone(&self.endpoints), Arc::clone(&self.view.members));
        let slow = slow.map(str::to_owned);
        let (channels, epoch, hedge_after) =
            (Arc::clone(&self.channels), self.view.epoch, self.settings.hedge_after);
        async move {
            tokio::time::sleep(hedge_after).await;
            let mut others = known_replicas(&endpoints, &members);
            others.retain(|address| Some(address) != slow.as_ref());
            let period = (hedge_after / 2).max(Duration::from_millis(5));
            loop {
                if let Some(config) =
                    newest_configuration(&channels, &others, Duration::from_millis(200)).await
                    && config.epoch > epoch
                {
                    return View::of(&config);
                }
                tokio::time::sleep(period).await;
            }
        }
    }

    /// Sends `op` as a new request and waits for its one answer. If the group forgot
    /// this session (it idled past the expiry window) and no attempt can have executed
    /// (the refusal answered the first attempt), the request is resent once under a new
    /// id from the clock, which opens a new session.
    pub async fn execute(&mut self, op: operation::Kind) -> Result<pb::ExecuteReply, ClientError> {
        self.last_request_id += 1;
        match self.execute_once(self.last_request_id, op.clone(), 0).await {
            Err(Attempted { error: ClientError::SessionExpired { .. }, uncertain: false }) => {
                self.last_request_id = unix_micros().max(self.last_request_id + 1);
                debug!(client = %self.client_id, request = self.last_request_id, "session expired; renewed");
                self.execute_as(self.last_request_id, op, 0).await
            }
            outcome => outcome.map_err(|attempted| attempted.error),
        }
    }

    /// Sends `op` with an explicit request id (and, when non-zero, a required epoch).
    /// Retries with the same id until the deadline.
    pub async fn execute_as(
        &mut self,
        request_id: u64,
        op: operation::Kind,
        epoch: u64,
    ) -> Result<pb::ExecuteReply, ClientError> {
        self.execute_once(request_id, op, epoch).await.map_err(|attempted| attempted.error)
    }

    /// `execute_as`, also telling whether an attempt may have executed before it failed.
    async fn execute_once(
        &mut self,
        request_id: u64,
        op: operation::Kind,
        epoch: u64,
    ) -> Result<pb::ExecuteReply, Attempted> {
        self.last_request_id = self.last_request_id.max(request_id);
        let request = pb::ExecuteRequest {
            client_id: self.client_id.clone(),
            request_id,
            op: Some(pb::Operation { kind: Some(op) }),
            epoch,
        };
        let deadline = Instant::now() + self.settings.deadline;
        let mut last_error = String::from("no attempt made");
        let mut pause = Duration::from_millis(10);
        // Whether an attempt ended without a clear refusal (it may have executed).
        let mut uncertain = false;
        loop {
            if Instant::now() >= deadline {
                return Err(Attempted::uncertain(ClientError::Timeout {
                    request_id,
                    waited_ms: self.settings.deadline.as_millis() as u64,
                    last_error,
                }));
            }
            if self.view.epoch == 0 {
                self.refresh_view().await;
            }
            let attempt = match self.view.mode {
                Mode::Active => self.attempt_all(&request).await,
                _ => self.attempt_primary(&request).await,
            };
            match attempt {
                Ok(reply) => return Ok(reply),
                Err(Attempt::Fatal(error)) => return Err(Attempted { error, uncertain }),
                Err(Attempt::Redirected) => continue,
                Err(Attempt::Retry(error)) => {
                    uncertain = true;
                    last_error = error;
                }
            }
            // Where did the group go? If somewhere new, go now; else pause first.
            let failed = self.view.clone();
            self.view = View::default();
            self.rotation += 1;
            self.refresh_view().await;
            if self.view.epoch > failed.epoch {
                continue;
            }
            if Instant::now() + pause >= deadline {
                return Err(Attempted::uncertain(ClientError::Timeout {
                    request_id,
                    waited_ms: self.settings.deadline.as_millis() as u64,
                    last_error,
                }));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Passive mode: the primary, or any endpoint when the primary is unknown.
    async fn attempt_primary(&mut self, request: &pb::ExecuteRequest) -> Result<pb::ExecuteReply, Attempt> {
        let endpoints = &self.settings.endpoints;
        let target =
            self.view.primary.clone().unwrap_or_else(|| endpoints[self.rotation % endpoints.len()].clone());
        let channel = self.channel(&target).map_err(Attempt::Fatal)?;
        let call = self.streams.execute(
            &target,
            channel,
            self.channels.credentials(),
            request.clone(),
            self.settings.attempt_timeout,
        );
        let answer = tokio::select! {
            answer = call => answer,
            newer = self.newer_configuration(Some(&target)) => {
                debug!(request = request.request_id, slow = %target, epoch = newer.epoch, "a newer configuration exists; leaving the slow primary");
                self.view = newer;
                return Err(Attempt::Redirected);
            }
        };
        match answer {
            Ok(reply) => Ok(reply),
            Err(status) => match classify(&status) {
                Attempt::Redirected => {
                    if let Some(Detail::NotPrimary(hint)) = error_detail(&status)
                        && !hint.primary_address.is_empty()
                        && Some(&hint.primary_address) != self.view.primary.as_ref()
                    {
                        debug!(request = request.request_id, from = %target, to = %hint.primary_address, "redirected to the primary");
                        self.view.primary = Some(hint.primary_address);
                        return Err(Attempt::Redirected);
                    }
                    Err(Attempt::Retry(format!("{target}: {}", status.message())))
                }
                other => Err(other.with_context(&target)),
            },
        }
    }

    /// Active mode: every member; the first reply wins, the others are discarded.
    async fn attempt_all(&mut self, request: &pb::ExecuteRequest) -> Result<pb::ExecuteReply, Attempt> {
        let mut calls = FuturesUnordered::new();
        for address in self.view.members.iter().cloned() {
            let channel = self.channel(&address).map_err(Attempt::Fatal)?;
            let (streams, channels) = (self.streams.clone(), Arc::clone(&self.channels));
            let (timeout, request) = (self.settings.attempt_timeout, request.clone());
            calls.push(async move {
                let answer =
                    streams.execute(&address, channel, channels.credentials(), request, timeout).await;
                (address, answer)
            });
        }
        let mut last = Attempt::Retry("no member answered".into());
        let newer = self.newer_configuration(None);
        tokio::pin!(newer);
        loop {
            let (address, answer) = tokio::select! {
                next = calls.next() => match next {
                    Some(next) => next,
                    None => break,
                },
                newer = &mut newer => {
                    debug!(request = request.request_id, epoch = newer.epoch, "a newer configuration exists; asking its members");
                    self.view = newer;
                    return Err(Attempt::Redirected);
                }
            };
            match answer {
                Ok(reply) => {
                    // The other members' replies are duplicates: dropping their calls
                    // discards them as they arrive.
                    return Ok(reply);
                }
                Err(status) => {
                    let attempt = classify(&status).with_context(&address);
                    if matches!(attempt, Attempt::Fatal(_)) {
                        return Err(attempt);
                    }
                    last = attempt;
                }
            }
        }
        Err(match last {
            Attempt::Redirected => Attempt::Retry("no member could execute the request".into()),
            other => other,
        })
    }

    pub async fn get(&mut self, key: &str) -> Result<Option<Bytes>, ClientError> {
        match result(self.execute(operation::Kind::Get(pb::Get { key: key.into() })).await?)? {
            op_result::Kind::Get(get) => Ok(get.value),
            other => Err(unexpected(other)),
        }
    }

    pub async fn put(&mut self, key: &str, value: impl Into<Bytes>) -> Result<(), ClientError> {
        match result(
            self.execute(operation::Kind::Put(pb::Put { key: key.into(), value: value.into() })).await?,
        )? {
            op_result::Kind::Put(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes `key`; true when it existed.
    pub async fn delete(&mut self, key: &str) -> Result<bool, ClientError> {
        match result(self.execute(operation::Kind::Delete(pb::Delete { key: key.into() })).await?)? {
            op_result::Kind::Delete(delete) => Ok(delete.existed),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `new_value` if the value is `expected` (`None`: if the key is absent).
    /// Returns whether it swapped, and the value before.
    pub async fn compare_and_swap(
        &mut self,
        key: &str,
        expected: Option<Bytes>,
        new_value: impl Into<Bytes>,
    ) -> Result<(bool, Option<Bytes>), ClientError> {
        let op = pb::CompareAndSwap { key: key.into(), expected, new_value: new_value.into() };
        match result(self.execute(operation::Kind::CompareAndSwap(op)).await?)? {
            op_result::Kind::CompareAndSwap(cas) => Ok((cas.swapped, cas.current)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn increment(&mut self, key: &str, delta: i64) -> Result<i64, ClientError> {
        match result(
            self.execute(operation::Kind::Increment(pb::Increment { key: key.into(), delta })).await?,
        )? {
            op_result::Kind::Increment(incr) => Ok(incr.value),
            other => Err(unexpected(other)),
        }
    }
}

/// `endpoints` and `members`, each address once.
fn known_replicas(endpoints: &[String], members: &[String]) -> Vec<String> {
    let mut addresses: Vec<String> = endpoints.iter().chain(members).cloned().collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// After the first configuration arrives, how long the other replicas get to report a
/// newer one: a hung replica must not hold the answer up for the whole timeout.
const STRAGGLER_GRACE: Duration = Duration::from_millis(50);

/// The highest-epoch configuration that any of `replicas` reports, asking them all at
/// once (each for at most `timeout`; once one answered, the rest for `STRAGGLER_GRACE`
/// more). `None` when none answers with one.
pub async fn newest_configuration(
    channels: &Channels,
    replicas: &[String],
    timeout: Duration,
) -> Option<pb::Configuration> {
    let mut calls: FuturesUnordered<_> = replicas
        .iter()
        .filter_map(|address| channels.get(address).ok())
        .map(|channel| async move {
            let mut client = pb::replica_client::ReplicaClient::new(channel);
            within(timeout, client.status(channels.credentials().request(pb::StatusRequest {}))).await
        })
        .collect();
    let mut newest: Option<pb::Configuration> = None;
    let mut grace = std::pin::pin!(tokio::time::sleep(timeout));
    loop {
        let answer = tokio::select! {
            answer = calls.next() => match answer {
                Some(answer) => answer,
                None => return newest,
            },
            () = &mut grace => return newest,
        };
        if let Ok(status) = answer
            && let Some(config) = status.into_inner().configuration
        {
            if newest.is_none() {
                grace.as_mut().reset(tokio::time::Instant::now() + STRAGGLER_GRACE);
            }
            if newest.as_ref().is_none_or(|n| config.epoch > n.epoch) {
                newest = Some(config);
            }
        }
    }
}

/// A request that failed, and whether one of its attempts may have executed.
struct Attempted {
    error: ClientError,
    uncertain: bool,
}

impl Attempted {
    fn uncertain(error: ClientError) -> Self {
        Self { error, uncertain: true }
    }
}

/// What one failed attempt means for the request.
#[derive(Debug)]
enum Attempt {
    /// Not retryable: the request itself is wrong.
    Fatal(ClientError),
    /// The replica named where to go instead.
    Redirected,
    /// Try again (after a pause, with a fresh view of the group).
    Retry(String),
}

impl Attempt {
    fn with_context(self, address: &str) -> Self {
        match self {
            Self::Retry(message) => Self::Retry(format!("{address}: {message}")),
            other => other,
        }
    }
}

fn classify(status: &Status) -> Attempt {
    match error_detail(status) {
        Some(Detail::InvalidRequest(invalid)) => {
            Attempt::Fatal(ClientError::Invalid { field: invalid.field, reason: invalid.reason })
        }
        Some(Detail::StaleRequest(stale)) => Attempt::Fatal(ClientError::Stale {
            request_id: stale.request_id,
            last_request_id: stale.last_request_id,
        }),
        Some(Detail::RequestIdReused(reused)) => Attempt::Fatal(ClientError::RequestIdReused {
            client_id: reused.client_id,
            request_id: reused.request_id,
        }),
        Some(Detail::SessionExpired(expired)) => Attempt::Fatal(ClientError::SessionExpired {
            client_id: expired.client_id,
            request_id: expired.request_id,
            session_expiry_ms: expired.session_expiry_ms,
        }),
        Some(Detail::WrongEpoch(wrong)) => {
            Attempt::Fatal(ClientError::WrongEpoch { got: wrong.got, current: wrong.current })
        }
        Some(Detail::NotPrimary(_)) => Attempt::Redirected,
        _ if status.code() == Code::InvalidArgument => {
            Attempt::Fatal(ClientError::Invalid { field: String::new(), reason: status.message().to_owned() })
        }
        // Every replica of a group asks for the same token: retrying cannot help.
        _ if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            Attempt::Fatal(ClientError::Refused(status.message().to_owned()))
        }
        _ => Attempt::Retry(status.message().to_owned()),
    }
}

/// The operation's result, with a deterministic operation failure as an error.
pub fn result(reply: pb::ExecuteReply) -> Result<op_result::Kind, ClientError> {
    match reply.result.and_then(|r| r.kind) {
        Some(op_result::Kind::Failed(failed)) => Err(ClientError::OpFailed(failed.reason)),
        Some(kind) => Ok(kind),
        None => Err(ClientError::OpFailed("the replica sent an empty result".into())),
    }
}

fn unexpected(kind: op_result::Kind) -> ClientError {
    ClientError::OpFailed(format!("result of the wrong kind: {kind:?}"))
}
