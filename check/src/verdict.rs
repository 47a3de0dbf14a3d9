//! The checks every run ends with, once the writers stop: every acknowledged write is
//! read back; the final values join the history, which must be linearizable; no
//! increment was applied more often than it was sent; every live replica reaches the
//! same digest at the same sequence number.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_replica::pb;
use tandem_replica::wire::{Channels, within};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::linearizability::{self, Event, Op, Outcome};
use crate::workload::{COUNTERS, Recorder, RecordingClient, Target, Workload, lost_acknowledged_writes};

/// What the checks found.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Operations in the history (final reads included).
    pub operations: usize,
    /// Why the history is not linearizable, if it is not.
    pub violation: Option<String>,
    /// Acknowledged writes that could not be read back.
    pub lost_acked: Vec<String>,
    /// Counters incremented more often than increments were sent.
    pub duplicates: Vec<String>,
    /// The digest every live replica agreed on, or why they did not.
    pub converged: Result<pb::DigestReply, String>,
    /// Requests that got no answer (timed out or were refused).
    pub unanswered: usize,
    pub acknowledged_writes: usize,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violation.is_none()
            && self.lost_acked.is_empty()
            && self.duplicates.is_empty()
            && self.converged.is_ok()
    }

    /// Ok(the agreed digest), or Err(everything that failed, with the evidence).
    pub fn into_result(self) -> Result<pb::DigestReply, String> {
        let mut failures = Vec::new();
        if !self.lost_acked.is_empty() {
            failures.push(format!("acknowledged writes lost: {:#?}", self.lost_acked));
        }
        if let Some(violation) = &self.violation {
            failures.push(format!("history of {} events is not linearizable: {violation}", self.operations));
        }
        if !self.duplicates.is_empty() {
            failures.push(format!("requests executed twice: {:#?}", self.duplicates));
        }
        if let Err(why) = &self.converged {
            failures.push(why.clone());
        }
        if failures.is_empty() { self.converged } else { Err(failures.join("\n")) }
    }
}

/// Stops the writers, then runs every check against the replicas at `live`.
pub async fn judge(
    live: impl Into<Target>,
    workload: &Workload,
    recorder: &Arc<Recorder>,
    stop: CancellationToken,
    mut writers: tokio::task::JoinSet<()>,
) -> Verdict {
    let live = live.into();
    stop.cancel();
    while writers.join_next().await.is_some() {}
    let mut verdict = Verdict {
        operations: 0,
        violation: None,
        lost_acked: lost_acknowledged_writes(&live, recorder).await,
        duplicates: Vec::new(),
        converged: Err("not checked yet".into()),
        unanswered: recorder.failures().len(),
        acknowledged_writes: recorder.acked().len(),
    };
    // Final reads join the history, so the end state is checked too.
    let mut reader = RecordingClient::new(&live, "final-reader".into(), Arc::clone(recorder));
    let mut finals = BTreeMap::new();
    for key in workload.final_keys() {
        match reader.run(Op::Get { key: key.clone() }).await {
            Ok(Outcome::Get(value)) => {
                finals.insert(key, value);
            }
            other => verdict.lost_acked.push(format!("final read of {key} failed: {other:?}")),
        }
    }
    let history = recorder.events();
    verdict.operations = history.len();
    verdict.violation = linearizability::check(&history).err().map(|v| v.to_string());
    verdict.duplicates = duplicate_increments(&history, &finals);
    verdict.converged = wait_converged(&live, Duration::from_secs(30))
        .await
        .map_err(|digests| format!("replicas {:?} did not converge: {digests:#?}", live.endpoints));
    verdict
}

/// Acknowledged unique writes a run needs before its checks prove anything.
const MIN_PROGRESS: usize = 20;

/// Stops the writers (once they made enough progress to prove something, waiting up to
/// 30 s for it) and checks the run; Err: what failed, with the evidence.
pub async fn stop_and_verify(
    live: impl Into<Target>,
    recorder: &Arc<Recorder>,
    stop: CancellationToken,
    writers: tokio::task::JoinSet<()>,
) -> Result<pb::DigestReply, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorder.acked().len() <= MIN_PROGRESS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verdict = judge(live, &Workload::default(), recorder, stop, writers).await;
    let (acked, unanswered) = (verdict.acknowledged_writes, verdict.unanswered);
    let operations = verdict.operations;
    let digest = verdict.into_result()?;
    eprintln!(
        "linearizable ({operations} operations); converged at seq {} ({} keys); {acked} acknowledged unique writes; {unanswered} unanswered requests",
        digest.seq, digest.keys
    );
    if acked <= MIN_PROGRESS {
        return Err("the workload made too little progress to prove anything".into());
    }
    Ok(digest)
}

/// Each counter must hold between the increments acknowledged and those sent (an
/// unanswered one may or may not have executed); more means some executed twice.
pub fn duplicate_increments(history: &[Event], finals: &BTreeMap<String, Option<Vec<u8>>>) -> Vec<String> {
    let mut duplicates = Vec::new();
    for counter in COUNTERS {
        let increments = history.iter().filter(|e| matches!(&e.op, Op::Incr { key, .. } if key == counter));
        let (mut acknowledged, mut sent) = (0i64, 0i64);
        for event in increments {
            match event.outcome {
                Outcome::Incr(Ok(_)) => {
                    acknowledged += 1;
                    sent += 1;
                }
                Outcome::Unknown => sent += 1,
                _ => {}
            }
        }
        let value = finals
            .get(counter)
            .and_then(|v| v.as_ref())
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            .unwrap_or(0);
        if value > sent {
            duplicates.push(format!(
                "{counter} = {value}, but only {sent} increments were sent ({acknowledged} acknowledged)"
            ));
        }
    }
    duplicates
}

pub async fn digest_of(address: &str, channels: &Channels) -> Option<pb::DigestReply> {
    let mut client = pb::replica_client::ReplicaClient::new(channels.get(address).ok()?);
    within(Duration::from_secs(10), client.digest(channels.credentials().request(pb::DigestRequest {})))
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Waits until every replica at `addresses` reports the same digest at the same sequence
/// number. Err: what each answered at the deadline.
pub async fn wait_converged(
    target: &Target,
    limit: Duration,
) -> Result<pb::DigestReply, Vec<Option<pb::DigestReply>>> {
    let deadline = Instant::now() + limit;
    let channels = Channels::client(target.credentials.clone());
    loop {
        let mut digests = Vec::new();
        for address in &target.endpoints {
            digests.push(digest_of(address, &channels).await);
        }
        let first = digests.first().cloned().flatten();
        let all_equal = first.as_ref().is_some_and(|f| {
            digests.iter().all(|d| d.as_ref().is_some_and(|d| d.digest == f.digest && d.seq == f.seq))
        });
        if let (true, Some(first)) = (all_equal, first) {
            return Ok(first);
        }
        if Instant::now() > deadline {
            return Err(digests);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incr(outcome: Outcome) -> Event {
        Event {
            client: "c".into(),
            op: Op::Incr { key: "n0".into(), delta: 1 },
            invoked: 0,
            completed: Some(1),
            outcome,
        }
    }

    #[test]
    fn a_counter_above_the_increments_sent_is_a_duplicate() {
        let history = vec![incr(Outcome::Incr(Ok(1))), incr(Outcome::Unknown), incr(Outcome::Incr(Ok(3)))];
        let finals = |v: &str| BTreeMap::from([("n0".to_owned(), Some(v.as_bytes().to_vec()))]);
        assert!(duplicate_increments(&history, &finals("3")).is_empty());
        assert!(
            duplicate_increments(&history, &finals("2")).is_empty(),
            "the unanswered one may not have run"
        );
        assert_eq!(duplicate_increments(&history, &finals("4")).len(), 1);
    }
}
