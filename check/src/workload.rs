//! Concurrent clients that write and read while a test injects faults, recording every
//! operation (invocation, completion, outcome) for the linearizability checker, and every
//! acknowledged write to a unique key, to read back at the end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tandem_replica::client::{Client, ClientError, ClientSettings, Connections};
use tandem_replica::pb::{self, op_result, operation};
use tandem_replica::wire::ClientCredentials;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::linearizability::{Event, Op, Outcome};

/// The shared record of a test run.
pub struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
    acked: Mutex<Vec<(String, String)>>,
    failures: Mutex<Vec<String>>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
        })
    }

    /// Nanoseconds since the recorder started: the clock of every recorded event.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// How long after `since` (a `now()`) the first write sent after it was
    /// acknowledged: what clients saw of a fault that began at `since`.
    pub fn first_write_acknowledged_after(&self, since: u64) -> Option<Duration> {
        self.events()
            .iter()
            .filter(|e| e.invoked >= since && !matches!(e.op, Op::Get { .. }))
            .filter(|e| !matches!(e.outcome, Outcome::Unknown))
            .filter_map(|e| e.completed)
            .min()
            .map(|completed| Duration::from_nanos(completed - since))
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("recorder lock").clone()
    }

    /// Acknowledged writes to unique keys: (key, value).
    pub fn acked(&self) -> Vec<(String, String)> {
        self.acked.lock().expect("recorder lock").clone()
    }

    /// Requests that failed (timed out or refused) instead of being answered.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().expect("recorder lock").clone()
    }

    /// Operations recorded so far.
    pub fn operations(&self) -> usize {
        self.events.lock().expect("recorder lock").len()
    }
}

/// A client whose every operation lands in the recorder.
pub struct RecordingClient {
    pub client: Client,
    recorder: Arc<Recorder>,
}

fn to_kind(op: &Op) -> operation::Kind {
    match op.clone() {
        Op::Get { key } => operation::Kind::Get(pb::Get { key }),
        Op::Put { key, value } => operation::Kind::Put(pb::Put { key, value: value.into() }),
        Op::Delete { key } => operation::Kind::Delete(pb::Delete { key }),
        Op::Cas { key, expected, new } => operation::Kind::CompareAndSwap(pb::CompareAndSwap {
            key,
            expected: expected.map(Bytes::from),
            new_value: new.into(),
        }),
        Op::Incr { key, delta } => operation::Kind::Increment(pb::Increment { key, delta }),
    }
}

fn to_outcome(result: Option<op_result::Kind>) -> Outcome {
    let bytes = |b: Option<Bytes>| b.map(|b| b.to_vec());
    match result {
        Some(op_result::Kind::Get(get)) => Outcome::Get(bytes(get.value)),
        Some(op_result::Kind::Put(_)) => Outcome::Put,
        Some(op_result::Kind::Delete(delete)) => Outcome::Delete { existed: delete.existed },
        Some(op_result::Kind::CompareAndSwap(cas)) => {
            Outcome::Cas { swapped: cas.swapped, current: bytes(cas.current) }
        }
        Some(op_result::Kind::Increment(incr)) => Outcome::Incr(Ok(incr.value)),
        Some(op_result::Kind::Failed(_)) => Outcome::Incr(Err(())),
        None => Outcome::Unknown,
    }
}

/// The replicas a run talks to, and how: their client addresses, and the CA and token
/// their client ports ask for (none locally, by default).
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub credentials: ClientCredentials,
}

impl From<Vec<String>> for Target {
    fn from(endpoints: Vec<String>) -> Self {
        Self { endpoints, credentials: ClientCredentials::default() }
    }
}

impl From<&Vec<String>> for Target {
    fn from(endpoints: &Vec<String>) -> Self {
        endpoints.clone().into()
    }
}

impl From<&[String]> for Target {
    fn from(endpoints: &[String]) -> Self {
        endpoints.to_vec().into()
    }
}

impl Target {
    pub fn client_settings(&self) -> ClientSettings {
        let mut settings = ClientSettings::new(self.endpoints.clone());
        settings.credentials = self.credentials.clone();
        settings
    }
}

impl RecordingClient {
    pub fn new(target: &Target, client_id: String, recorder: Arc<Recorder>) -> Self {
        Self::sharing(target, client_id, recorder, Connections::new(target.credentials.clone()))
    }

    /// A session over `connections`, shared with other sessions (as a real client
    /// program's sessions share them): its requests travel in batches with theirs.
    pub fn sharing(
        target: &Target,
        client_id: String,
        recorder: Arc<Recorder>,
        connections: Connections,
    ) -> Self {
        let mut settings = target.client_settings();
        settings.client_id = Some(client_id);
        settings.deadline = Duration::from_secs(20);
        settings.attempt_timeout = Duration::from_secs(3);
        Self { client: Client::with_connections(settings, connections).expect("client"), recorder }
    }

    /// Runs one operation and records it. A timeout is recorded as an unknown outcome
    /// (it may have executed); a refusal that guarantees nothing executed is not.
    pub async fn run(&mut self, op: Op) -> Result<Outcome, ClientError> {
        let invoked = self.recorder.now();
        let answer = self.client.execute(to_kind(&op)).await;
        let completed = self.recorder.now();
        let (outcome, completed) = match &answer {
            Ok(reply) => (to_outcome(reply.result.clone().and_then(|r| r.kind)), Some(completed)),
            Err(error) if error.outcome_unknown() => (Outcome::Unknown, None),
            Err(_) => return answer.map(|_| Outcome::Unknown),
        };
        if let Err(error) = &answer {
            self.recorder
                .failures
                .lock()
                .expect("recorder lock")
                .push(format!("{}: {error}", self.client.client_id()));
        }
        self.recorder.events.lock().expect("recorder lock").push(Event {
            client: self.client.client_id().to_owned(),
            op,
            invoked,
            completed,
            outcome: outcome.clone(),
        });
        answer.map(|_| outcome)
    }
}

/// What the writers do.
#[derive(Debug, Clone)]
pub struct Workload {
    pub clients: usize,
    /// Shared keys the clients contend on (reads, writes, cas, incr).
    pub shared_keys: usize,
    /// Most operations per client (the run also stops when cancelled).
    pub max_ops: usize,
    /// Pause between a client's operations.
    pub think: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Self { clients: 4, shared_keys: 6, max_ops: 2_000, think: Duration::from_millis(2) }
    }
}

/// The counters the workload increments (by 1 each time), checked for increments
/// applied twice or lost.
pub const COUNTERS: [&str; 3] = ["n0", "n1", "n2"];

impl Workload {
    /// Every key whose final value the checks read: the shared keys and the counters.
    pub fn final_keys(&self) -> Vec<String> {
        (0..self.shared_keys)
            .map(|k| format!("k{k}"))
            .chain(COUNTERS.iter().map(|c| (*c).to_owned()))
            .collect()
    }
}

/// Starts the writers; they stop at `max_ops` or when `stop` is cancelled.
pub fn start(
    workload: Workload,
    target: impl Into<Target>,
    recorder: Arc<Recorder>,
    stop: CancellationToken,
) -> tokio::task::JoinSet<()> {
    let target = target.into();
    let mut tasks = tokio::task::JoinSet::new();
    let connections = Connections::new(target.credentials.clone());
    for c in 0..workload.clients {
        let mut client =
            RecordingClient::sharing(&target, format!("w{c}"), Arc::clone(&recorder), connections.clone());
        let (stop, workload, recorder) = (stop.clone(), workload.clone(), Arc::clone(&recorder));
        tasks.spawn(async move {
            let mut last_seen: Option<Vec<u8>> = None;
            for i in 0..workload.max_ops {
                if stop.is_cancelled() {
                    return;
                }
                let shared = format!("k{}", rand::rng().random_range(0..workload.shared_keys));
                let value = format!("w{c}-{i}").into_bytes();
                let op = match rand::rng().random_range(0..100) {
                    0..30 => Op::Put { key: format!("unique/w{c}/{i}"), value: value.clone() },
                    30..55 => Op::Put { key: shared, value: value.clone() },
                    55..75 => Op::Get { key: shared },
                    75..90 => Op::Incr { key: COUNTERS[i % COUNTERS.len()].into(), delta: 1 },
                    _ => Op::Cas { key: shared, expected: last_seen.clone(), new: value.clone() },
                };
                let unique_key = matches!(&op, Op::Put { key, .. } if key.starts_with("unique/"))
                    .then(|| op.key().to_owned());
                match client.run(op).await {
                    Ok(Outcome::Get(seen)) => last_seen = seen,
                    Ok(Outcome::Put) => {
                        if let Some(key) = unique_key {
                            let value = String::from_utf8(value).expect("ascii");
                            recorder.acked.lock().expect("recorder lock").push((key, value));
                        }
                    }
                    _ => {}
                }
                tokio::time::sleep(workload.think).await;
            }
        });
    }
    tasks
}

/// Reads every acknowledged unique key back (eight readers at once); returns those
/// missing or wrong.
pub async fn lost_acknowledged_writes(target: &Target, recorder: &Arc<Recorder>) -> Vec<String> {
    const READERS: usize = 8;
    let acked = recorder.acked();
    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..READERS {
        let mine: Vec<(String, String)> = acked.iter().skip(reader).step_by(READERS).cloned().collect();
        let mut client = RecordingClient::new(target, format!("verifier{reader}"), Arc::clone(recorder));
        readers.spawn(async move {
            let mut lost = Vec::new();
            for (key, value) in mine {
                match client.run(Op::Get { key: key.clone() }).await {
                    Ok(Outcome::Get(Some(found))) if found == value.as_bytes() => {}
                    other => lost.push(format!("{key}: wrote {value}, read {other:?}")),
                }
            }
            lost
        });
    }
    let mut lost = Vec::new();
    while let Some(found) = readers.join_next().await {
        lost.extend(found.unwrap_or_else(|e| vec![format!("a reader failed: {e}")]));
    }
    lost
}
