//! Tests of the linearizability checker: hand-written histories for each rule, and
//! generated histories that are linearizable by construction (which must pass) or
//! corrupted (which must fail).

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_check::linearizability::{
    Event, Op, Outcome, Violation, check, check_depth_first_only, check_in_rounds_only,
};

// ---- building histories by hand ----

fn get(key: &str) -> Op {
    Op::Get { key: key.into() }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put { key: key.into(), value: value.into() }
}

fn delete(key: &str) -> Op {
    Op::Delete { key: key.into() }
}

fn cas(key: &str, expected: Option<&str>, new: &str) -> Op {
    Op::Cas { key: key.into(), expected: expected.map(Into::into), new: new.into() }
}

fn incr(key: &str, delta: i64) -> Op {
    Op::Incr { key: key.into(), delta }
}

fn read(value: Option<&str>) -> Outcome {
    Outcome::Get(value.map(Into::into))
}

fn swapped(swapped: bool, current: Option<&str>) -> Outcome {
    Outcome::Cas { swapped, current: current.map(Into::into) }
}

/// An event with a known outcome, over [invoked, completed].
fn ev(client: &str, op: Op, invoked: u64, completed: u64, outcome: Outcome) -> Event {
    Event { client: client.into(), op, invoked, completed: Some(completed), outcome }
}

/// An event whose client timed out without learning the outcome.
fn timed_out(client: &str, op: Op, invoked: u64) -> Event {
    Event { client: client.into(), op, invoked, completed: None, outcome: Outcome::Unknown }
}

fn assert_passes(history: &[Event]) {
    if let Err(violation) = check(history) {
        panic!("expected a linearizable history, got {violation}");
    }
}

fn assert_fails_on(history: &[Event], key: &str) -> Violation {
    match check(history) {
        Ok(stats) => panic!("expected a violation on {key:?}, but the history passed: {stats:?}"),
        Err(violation) => {
            assert_eq!(violation.key, key, "violation on the wrong key: {violation}");
            violation
        }
    }
}

// ---- sequential histories ----

#[test]
fn sequential_history_following_the_model_passes() {
    let history = [
        ev("c1", get("k"), 0, 10, read(None)),
        ev("c1", put("k", "a"), 20, 30, Outcome::Put),
        ev("c2", get("k"), 40, 50, read(Some("a"))),
        ev("c2", put("other", "z"), 55, 58, Outcome::Put),
        ev("c1", delete("k"), 60, 70, Outcome::Delete { existed: true }),
        ev("c1", delete("k"), 80, 90, Outcome::Delete { existed: false }),
        ev("c2", get("k"), 100, 110, read(None)),
        ev("c3", get("other"), 120, 130, read(Some("z"))),
    ];
    let stats = check(&history).expect("sequential history follows the model");
    assert_eq!(stats.keys, 2);
    assert_eq!(stats.events, history.len());
    assert!(stats.states_explored >= 6, "{stats:?}");
}

#[test]
fn empty_history_passes() {
    let stats = check(&[]).expect("nothing happened, nothing to contradict");
    assert_eq!((stats.keys, stats.events), (0, 0));
}

#[test]
fn sequential_stale_read_fails_and_names_the_key() {
    let history = [
        ev("c1", put("fine", "1"), 0, 10, Outcome::Put),
        ev("c1", put("k", "old"), 0, 10, Outcome::Put),
        ev("c1", put("k", "new"), 20, 30, Outcome::Put),
        ev("c2", get("fine"), 35, 38, read(Some("1"))),
        ev("c2", get("k"), 40, 50, read(Some("old"))),
    ];
    let violation = assert_fails_on(&history, "k");
    let message = violation.to_string();
    assert!(message.contains("\"k\""), "{message}");
    // The explanation lists the stuck read with its client, times and outcome.
    assert!(
        violation.explanation.contains("[40ns .. 50ns] client \"c2\": get \"k\" -> \"old\""),
        "{message}"
    );
}

#[test]
fn sequential_read_of_a_deleted_key_fails() {
    let history = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        ev("c1", delete("k"), 20, 30, Outcome::Delete { existed: true }),
        ev("c2", get("k"), 40, 50, read(Some("a"))),
    ];
    assert_fails_on(&history, "k");
}

#[test]
fn delete_claiming_the_wrong_existence_fails() {
    let history = [ev("c1", delete("k"), 0, 10, Outcome::Delete { existed: true })];
    assert_fails_on(&history, "k");
}

// ---- concurrency ----

#[test]
fn concurrent_get_may_see_the_value_before_or_after_an_overlapping_put() {
    for seen in ["old", "new"] {
        let history = [
            ev("c1", put("k", "old"), 0, 10, Outcome::Put),
            ev("c1", put("k", "new"), 20, 60, Outcome::Put),
            ev("c2", get("k"), 30, 40, read(Some(seen))),
        ];
        assert_passes(&history);
    }
}

#[test]
fn read_of_a_value_never_written_fails() {
    let history = [ev("c1", put("k", "a"), 0, 50, Outcome::Put), ev("c2", get("k"), 10, 40, read(Some("b")))];
    assert_fails_on(&history, "k");
}

#[test]
fn read_after_a_completed_write_cannot_see_the_older_value() {
    let history = [
        ev("c1", put("k", "old"), 0, 10, Outcome::Put),
        ev("c1", put("k", "new"), 20, 30, Outcome::Put),
        ev("c2", get("k"), 25, 40, read(Some("old"))),
        ev("c3", get("k"), 31, 40, read(Some("old"))),
    ];
    assert_fails_on(&history, "k");
}

#[test]
fn later_read_seeing_an_older_value_than_an_earlier_read_fails() {
    // The write overlaps both reads, so each read alone is fine; but the second read
    // started after the first one returned the new value, so it cannot see the old one.
    let history = [
        ev("w", put("k", "1"), 0, 5, Outcome::Put),
        ev("w", put("k", "2"), 10, 100, Outcome::Put),
        ev("r1", get("k"), 20, 30, read(Some("2"))),
        ev("r2", get("k"), 40, 50, read(Some("1"))),
    ];
    let violation = assert_fails_on(&history, "k");
    assert!(violation.explanation.contains("r2"), "{violation}");
}

#[test]
fn overlapping_reads_may_see_a_concurrent_write_in_either_order() {
    // Same as above but the reads overlap each other, so "1" then "2" is a valid order.
    let history = [
        ev("w", put("k", "1"), 0, 5, Outcome::Put),
        ev("w", put("k", "2"), 10, 100, Outcome::Put),
        ev("r1", get("k"), 20, 45, read(Some("2"))),
        ev("r2", get("k"), 40, 50, read(Some("1"))),
    ];
    assert_passes(&history);
}

#[test]
fn operations_touching_at_the_same_instant_count_as_concurrent() {
    let history = [ev("c1", put("k", "a"), 0, 10, Outcome::Put), ev("c2", get("k"), 10, 20, read(None))];
    assert_passes(&history);
}

#[test]
fn concurrent_writes_must_agree_with_all_reads_in_one_order() {
    // Two concurrent puts; one reader sees a then b, the other sees b then a.
    let history = [
        ev("w1", put("k", "a"), 0, 100, Outcome::Put),
        ev("w2", put("k", "b"), 0, 100, Outcome::Put),
        ev("r1", get("k"), 110, 120, read(Some("a"))),
        ev("r2", get("k"), 130, 140, read(Some("b"))),
    ];
    assert_fails_on(&history, "k");
}

#[test]
fn violation_is_reported_on_the_broken_key_only() {
    // Keys are checked separately; "x" comes first and is fine, "y" has the stale read.
    let history = [
        ev("c1", put("x", "1"), 0, 100, Outcome::Put),
        ev("c2", put("y", "1"), 0, 10, Outcome::Put),
        ev("c3", get("x"), 10, 20, read(None)),
        ev("c3", get("y"), 30, 40, read(None)),
        ev("c4", get("x"), 30, 40, read(Some("1"))),
        ev("c4", put("z", "1"), 50, 60, Outcome::Put),
    ];
    let violation = assert_fails_on(&history, "y");
    assert!(violation.explanation.contains("c3"), "{violation}");
}

// ---- compare-and-swap and increment ----

#[test]
fn cas_with_absent_expected_swaps_only_when_the_key_is_absent() {
    let history = [
        ev("c1", cas("k", None, "a"), 0, 10, swapped(true, None)),
        ev("c2", cas("k", None, "b"), 20, 30, swapped(false, Some("a"))),
        ev("c1", cas("k", Some("a"), "c"), 40, 50, swapped(true, Some("a"))),
        ev("c2", get("k"), 60, 70, read(Some("c"))),
    ];
    assert_passes(&history);
}

#[test]
fn cas_claiming_a_swap_that_the_value_did_not_allow_fails() {
    let history = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        ev("c1", cas("k", None, "b"), 20, 30, swapped(true, Some("a"))),
    ];
    assert_fails_on(&history, "k");
}

#[test]
fn failed_cas_must_report_the_current_value_and_leave_it_alone() {
    let wrong_current = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        ev("c1", cas("k", Some("x"), "b"), 20, 30, swapped(false, Some("x"))),
    ];
    assert_fails_on(&wrong_current, "k");
    let changed_anyway = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        ev("c1", cas("k", Some("x"), "b"), 20, 30, swapped(false, Some("a"))),
        ev("c1", get("k"), 40, 50, read(Some("b"))),
    ];
    assert_fails_on(&changed_anyway, "k");
}

#[test]
fn concurrent_cas_from_the_same_value_only_one_can_win() {
    let both_win = [
        ev("c1", put("k", "0"), 0, 10, Outcome::Put),
        ev("c1", cas("k", Some("0"), "1"), 20, 50, swapped(true, Some("0"))),
        ev("c2", cas("k", Some("0"), "2"), 20, 50, swapped(true, Some("0"))),
    ];
    assert_fails_on(&both_win, "k");
    let one_wins = [
        ev("c1", put("k", "0"), 0, 10, Outcome::Put),
        ev("c1", cas("k", Some("0"), "1"), 20, 50, swapped(false, Some("2"))),
        ev("c2", cas("k", Some("0"), "2"), 20, 50, swapped(true, Some("0"))),
    ];
    assert_passes(&one_wins);
}

#[test]
fn incr_counts_from_absent_and_stores_decimal_text() {
    let history = [
        ev("c1", incr("n", -5), 0, 10, Outcome::Incr(Ok(-5))),
        ev("c2", incr("n", 2), 20, 30, Outcome::Incr(Ok(-3))),
        ev("c1", get("n"), 40, 50, read(Some("-3"))),
        ev("c2", put("n", "+7"), 60, 70, Outcome::Put),
        ev("c1", incr("n", 1), 80, 90, Outcome::Incr(Ok(8))),
        ev("c1", get("n"), 100, 110, read(Some("8"))),
    ];
    assert_passes(&history);
}

#[test]
fn incr_on_a_non_number_fails_with_err_and_leaves_the_value() {
    let history = [
        ev("c1", put("n", "abc"), 0, 10, Outcome::Put),
        ev("c1", incr("n", 1), 20, 30, Outcome::Incr(Err(()))),
        ev("c2", get("n"), 40, 50, read(Some("abc"))),
    ];
    assert_passes(&history);
    let claims_success = [
        ev("c1", put("n", "abc"), 0, 10, Outcome::Put),
        ev("c1", incr("n", 1), 20, 30, Outcome::Incr(Ok(1))),
    ];
    assert_fails_on(&claims_success, "n");
    let claims_failure_on_a_number = [
        ev("c1", put("n", "41"), 0, 10, Outcome::Put),
        ev("c1", incr("n", 1), 20, 30, Outcome::Incr(Err(()))),
    ];
    assert_fails_on(&claims_failure_on_a_number, "n");
}

#[test]
fn incr_that_overflows_fails_with_err_and_leaves_the_value() {
    let history = [
        ev("c1", incr("n", i64::MAX), 0, 10, Outcome::Incr(Ok(i64::MAX))),
        ev("c1", incr("n", 1), 20, 30, Outcome::Incr(Err(()))),
        ev("c1", get("n"), 40, 50, read(Some(&i64::MAX.to_string()))),
        ev("c1", incr("n", -1), 60, 70, Outcome::Incr(Ok(i64::MAX - 1))),
    ];
    assert_passes(&history);
}

#[test]
fn concurrent_increments_must_return_distinct_running_totals() {
    let ok = [
        ev("c1", incr("n", 1), 0, 50, Outcome::Incr(Ok(2))),
        ev("c2", incr("n", 1), 0, 50, Outcome::Incr(Ok(1))),
    ];
    assert_passes(&ok);
    let lost_update = [
        ev("c1", incr("n", 1), 0, 50, Outcome::Incr(Ok(1))),
        ev("c2", incr("n", 1), 0, 50, Outcome::Incr(Ok(1))),
    ];
    assert_fails_on(&lost_update, "n");
}

// ---- unknown outcomes ----

#[test]
fn unknown_put_observed_by_a_later_get_passes() {
    let history = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        timed_out("c2", put("k", "b"), 20),
        ev("c3", get("k"), 1_000, 1_010, read(Some("b"))),
        ev("c3", get("k"), 1_020, 1_030, read(Some("b"))),
    ];
    assert_passes(&history);
}

#[test]
fn unknown_put_never_observed_passes() {
    let history = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        timed_out("c2", put("k", "b"), 20),
        ev("c3", get("k"), 1_000, 1_010, read(Some("a"))),
        ev("c3", get("k"), 1_020, 1_030, read(Some("a"))),
    ];
    assert_passes(&history);
}

#[test]
fn unknown_put_may_take_effect_long_after_its_client_gave_up() {
    let history = [
        timed_out("c1", put("k", "b"), 0),
        ev("c2", get("k"), 1_000, 1_010, read(None)),
        ev("c2", get("k"), 2_000, 2_010, read(Some("b"))),
    ];
    assert_passes(&history);
}

#[test]
fn unknown_put_takes_effect_at_most_once() {
    let history = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        timed_out("c2", put("k", "b"), 20),
        ev("c3", get("k"), 100, 110, read(Some("b"))),
        ev("c1", put("k", "a"), 120, 130, Outcome::Put),
        ev("c3", get("k"), 140, 150, read(Some("b"))),
    ];
    assert_fails_on(&history, "k");
}

#[test]
fn unknown_put_cannot_explain_a_read_before_it_was_invoked() {
    let history = [
        ev("c1", put("k", "a"), 0, 10, Outcome::Put),
        ev("c3", get("k"), 20, 30, read(Some("b"))),
        timed_out("c2", put("k", "b"), 40),
    ];
    let violation = assert_fails_on(&history, "k");
    assert!(violation.explanation.contains("unknown"), "{violation}");
}

#[test]
fn unknown_increments_explain_gaps_in_a_counter() {
    let history = [
        ev("c1", incr("n", 1), 0, 10, Outcome::Incr(Ok(1))),
        timed_out("c2", incr("n", 1), 20),
        timed_out("c2", incr("n", 1), 30),
        timed_out("c2", incr("n", 1), 40),
        ev("c1", incr("n", 1), 100, 110, Outcome::Incr(Ok(3))),
        ev("c1", incr("n", 10), 120, 130, Outcome::Incr(Ok(14))),
    ];
    assert_passes(&history);
    let too_many = [
        ev("c1", incr("n", 1), 0, 10, Outcome::Incr(Ok(1))),
        timed_out("c2", incr("n", 1), 20),
        ev("c1", incr("n", 1), 100, 110, Outcome::Incr(Ok(4))),
    ];
    assert_fails_on(&too_many, "n");
}

#[test]
fn unknown_get_is_ignored() {
    let history = [timed_out("c1", get("k"), 0), ev("c2", get("k"), 10, 20, read(None))];
    assert_passes(&history);
}

#[test]
fn unknown_outcome_with_a_completion_time_still_counts_as_pending_forever() {
    // The time a client gave up does not bound when the request takes effect.
    let history = [
        Event {
            client: "c1".into(),
            op: put("k", "late"),
            invoked: 0,
            completed: Some(10),
            outcome: Outcome::Unknown,
        },
        ev("c2", get("k"), 20, 30, read(None)),
        ev("c2", get("k"), 40, 50, read(Some("late"))),
    ];
    assert_passes(&history);
}

// ---- malformed histories ----

#[test]
fn completion_before_invocation_is_reported_as_a_recorder_bug() {
    let history = [ev("c1", put("k", "a"), 10, 5, Outcome::Put)];
    let violation = assert_fails_on(&history, "k");
    assert!(violation.explanation.contains("malformed"), "{violation}");
}

#[test]
fn known_outcome_without_completion_is_reported_as_a_recorder_bug() {
    let history = [Event {
        client: "c1".into(),
        op: put("k", "a"),
        invoked: 0,
        completed: None,
        outcome: Outcome::Put,
    }];
    let violation = assert_fails_on(&history, "k");
    assert!(violation.explanation.contains("malformed"), "{violation}");
}

#[test]
fn outcome_of_another_kind_is_reported_as_a_recorder_bug() {
    let history = [ev("c1", get("k"), 0, 10, Outcome::Put)];
    let violation = assert_fails_on(&history, "k");
    assert!(violation.explanation.contains("malformed"), "{violation}");
}

#[test]
fn op_key_names_the_key_of_every_kind() {
    let ops = [get("a"), put("a", "v"), delete("a"), cas("a", None, "v"), incr("a", 1)];
    for op in ops {
        assert_eq!(op.key(), "a");
    }
}

// ---- generated histories ----

/// Reference model, written independently of the checker's: applies `op` to `map`.
fn apply(map: &mut BTreeMap<String, Vec<u8>>, op: &Op) -> Outcome {
    match op {
        Op::Get { key } => Outcome::Get(map.get(key).cloned()),
        Op::Put { key, value } => {
            map.insert(key.clone(), value.clone());
            Outcome::Put
        }
        Op::Delete { key } => Outcome::Delete { existed: map.remove(key).is_some() },
        Op::Cas { key, expected, new } => {
            let current = map.get(key).cloned();
            let swapped = current == *expected;
            if swapped {
                map.insert(key.clone(), new.clone());
            }
            Outcome::Cas { swapped, current }
        }
        Op::Incr { key, delta } => {
            let current = match map.get(key) {
                None => Some(0),
                Some(bytes) => std::str::from_utf8(bytes).ok().and_then(|text| text.parse::<i64>().ok()),
            };
            match current.and_then(|n| n.checked_add(*delta)) {
                Some(n) => {
                    map.insert(key.clone(), n.to_string().into_bytes());
                    Outcome::Incr(Ok(n))
                }
                None => Outcome::Incr(Err(())),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    clients: usize,
    keys: usize,
    ops: usize,
    /// Chance that a client times out and never learns the outcome.
    unknown: f64,
    /// Chance that such a timed-out request is lost and never takes effect.
    lost: f64,
    /// Upper bound of the random time between invocation and linearization point, and
    /// between linearization point and completion.
    latency: u64,
    /// Whether written values are unique (else drawn from `VALUES`).
    unique_values: bool,
}

/// Values that ops write from a small pool, so that values repeat and collide, which makes
/// histories ambiguous and the checker work: numbers (so increments succeed) and words (so
/// they fail).
const VALUES: [&str; 6] = ["a", "b", "0", "1", "-7", "+2"];

fn random_op(
    rng: &mut StdRng,
    key: String,
    map: &BTreeMap<String, Vec<u8>>,
    written: &mut u64,
    unique: bool,
) -> Op {
    // Unique values are what real tests write (each write identifiable by its value).
    let mut value = |rng: &mut StdRng| {
        *written += 1;
        match unique {
            true => format!("v{written}").into_bytes(),
            false => VALUES[rng.random_range(0..VALUES.len())].as_bytes().to_vec(),
        }
    };
    match rng.random_range(0..10) {
        0..=2 => Op::Get { key },
        3 | 4 => Op::Put { value: value(rng), key },
        5 => Op::Delete { key },
        6 | 7 => {
            // Half the time expect the current value, so swaps actually happen.
            let expected = match rng.random_range(0..4) {
                0 | 1 => map.get(&key).cloned(),
                2 => None,
                _ => Some(value(rng)),
            };
            Op::Cas { expected, new: value(rng), key }
        }
        _ if unique => Op::Incr { delta: 1, key },
        _ => Op::Incr { delta: if rng.random_bool(0.02) { i64::MAX } else { rng.random_range(-3..=3) }, key },
    }
}

/// Runs random ops against the reference model one at a time (that order is the
/// linearization), giving each an interval around its linearization point that overlaps
/// other clients' ops at random; no client has two requests in flight.
fn generate(seed: u64, workload: Workload) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut map = BTreeMap::new();
    let mut free_at = vec![0u64; workload.clients];
    let mut now = 0u64;
    let mut written = 0;
    let mut history = Vec::with_capacity(workload.ops);
    for _ in 0..workload.ops {
        now += 1 + rng.random_range(0..workload.latency / 2 + 1);
        let earliest_free = free_at.iter().copied().min().unwrap_or_default();
        now = now.max(earliest_free);
        let free: Vec<usize> = (0..workload.clients).filter(|&c| free_at[c] <= now).collect();
        let client = free[rng.random_range(0..free.len())];
        let key = format!("key{}", rng.random_range(0..workload.keys));
        let op = random_op(&mut rng, key, &map, &mut written, workload.unique_values);
        let invoked = now - rng.random_range(0..=workload.latency.min(now - free_at[client]));
        let completed = now + rng.random_range(0..=workload.latency);
        free_at[client] = completed + 1;
        let event = if rng.random_bool(workload.unknown) {
            if !rng.random_bool(workload.lost) {
                apply(&mut map, &op);
            }
            Event { client: format!("c{client}"), op, invoked, completed: None, outcome: Outcome::Unknown }
        } else {
            let outcome = apply(&mut map, &op);
            Event { client: format!("c{client}"), op, invoked, completed: Some(completed), outcome }
        };
        history.push(event);
    }
    history
}

/// The history with one completed get answering a value never written on its key.
fn corrupt_one_read(mut history: Vec<Event>, pick: usize) -> Option<(Vec<Event>, String)> {
    let reads: Vec<usize> =
        (0..history.len()).filter(|&i| matches!(history[i].outcome, Outcome::Get(_))).collect();
    if reads.is_empty() {
        return None;
    }
    let event = &mut history[reads[pick % reads.len()]];
    event.outcome = Outcome::Get(Some(b"never-written".to_vec()));
    let key = event.op.key().to_owned();
    Some((history, key))
}

/// The definition, by exhaustive search over every order of every subset of the unknown
/// ops (small histories only): some order respects real time and explains every outcome.
/// Remembers the (done, map) states that failed, so it can take a few more ops.
fn linearizable_by_brute_force(history: &[Event]) -> bool {
    type Map = BTreeMap<String, Vec<u8>>;
    fn search(history: &[Event], done: u64, map: &Map, failed: &mut HashSet<(u64, Map)>) -> bool {
        let pending = |i: usize| done & (1 << i) == 0 && history[i].outcome != Outcome::Unknown;
        if !(0..history.len()).any(pending) {
            return true;
        }
        if failed.contains(&(done, map.clone())) {
            return false;
        }
        for (i, event) in history.iter().enumerate() {
            // Nothing still pending may have completed before this one was invoked.
            let blocked = (0..history.len())
                .any(|j| pending(j) && history[j].completed.is_some_and(|c| c < event.invoked));
            if done & (1 << i) != 0 || blocked {
                continue;
            }
            let mut after = map.clone();
            let outcome = apply(&mut after, &event.op);
            if event.outcome != Outcome::Unknown && event.outcome != outcome {
                continue;
            }
            if search(history, done | (1 << i), &after, failed) {
                return true;
            }
        }
        failed.insert((done, map.clone()));
        false
    }
    assert!(history.len() <= 64, "brute force takes at most 64 events");
    search(history, 0, &Map::new(), &mut HashSet::new())
}

/// Damages a generated history so that it is often, but not always, non-linearizable:
/// changes a few outcomes and moves a few intervals.
fn mutate(history: &mut [Event], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    if history.is_empty() {
        return;
    }
    // Mostly values written somewhere in the history, to make stale or early reads.
    let mut written: Vec<Option<Vec<u8>>> = vec![None, Some(b"1".to_vec()), Some(b"-7".to_vec())];
    for event in history.iter() {
        if let Op::Put { value: v, .. } | Op::Cas { new: v, .. } = &event.op {
            written.push(Some(v.clone()));
        }
    }
    for _ in 0..rng.random_range(1..=2) {
        let i = rng.random_range(0..history.len());
        let value = |rng: &mut StdRng| written[rng.random_range(0..written.len())].clone();
        let event = &mut history[i];
        match &mut event.outcome {
            Outcome::Get(seen) => *seen = value(&mut rng),
            Outcome::Delete { existed } => *existed = !*existed,
            Outcome::Cas { swapped, current } => {
                if rng.random_bool(0.5) {
                    *swapped = !*swapped;
                } else {
                    *current = value(&mut rng);
                }
            }
            Outcome::Incr(result) => {
                *result = match *result {
                    Ok(n) if rng.random_bool(0.7) => Ok(n.wrapping_add(rng.random_range(-2..=2))),
                    Ok(_) => Err(()),
                    Err(()) => Ok(rng.random_range(-3..=3)),
                }
            }
            Outcome::Put | Outcome::Unknown => {
                let shift = rng.random_range(0..=30);
                event.invoked += shift;
                event.completed = event.completed.map(|c| c + shift + rng.random_range(0..=5));
            }
        }
    }
}

fn workload_strategy() -> impl Strategy<Value = (u64, Workload)> {
    (
        any::<u64>(),
        1usize..=5,
        1usize..=3,
        0usize..=60,
        0.0f64..0.3,
        prop_oneof![Just(0u64), 1u64..=4, 5u64..=60],
    )
        .prop_map(|(seed, clients, keys, ops, unknown, latency)| {
            let workload = Workload { clients, keys, ops, unknown, lost: 0.5, latency, unique_values: false };
            (seed, workload)
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Integration tests have no lib.rs or main.rs to store regressions next to.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_linearizable_histories_pass((seed, workload) in workload_strategy()) {
        let history = generate(seed, workload);
        let result = check(&history);
        prop_assert!(result.is_ok(), "{}\nhistory: {:#?}", result.err().map(|v| v.to_string()).unwrap_or_default(), history);
    }

    #[test]
    fn generated_history_with_a_read_of_a_never_written_value_fails(
        (seed, workload) in workload_strategy(),
        pick in any::<usize>(),
    ) {
        let Some((history, key)) = corrupt_one_read(generate(seed, workload), pick) else {
            return Ok(());
        };
        let result = check(&history);
        prop_assert!(result.is_err(), "corrupted history passed: {:?}\n{:#?}", result, history);
        prop_assert_eq!(result.err().map(|violation| violation.key), Some(key));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        // Integration tests have no lib.rs or main.rs to store regressions next to.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn checker_agrees_with_brute_force_on_small_damaged_histories(
        seed in any::<u64>(),
        damage in any::<u64>(),
        clients in 1usize..=4,
        keys in 1usize..=2,
        ops in 0usize..=12,
        unknown in 0.0f64..0.5,
        latency in 0u64..=20,
        unique_values in any::<bool>(),
    ) {
        let workload = Workload { clients, keys, ops, unknown, lost: 0.5, latency, unique_values };
        let mut history = generate(seed, workload);
        mutate(&mut history, damage);
        let expected = linearizable_by_brute_force(&history);
        let result = check(&history);
        prop_assert_eq!(result.is_ok(), expected, "{:?}\n{:#?}", result, history);
        // Each search strategy alone must be exact too (`check` mostly needs only the first).
        let depth_first = check_depth_first_only(&history);
        prop_assert_eq!(depth_first.is_ok(), expected, "depth first: {:?}", depth_first);
        let in_rounds = check_in_rounds_only(&history);
        prop_assert_eq!(in_rounds.is_ok(), expected, "in rounds: {:?}", in_rounds);
    }
}

fn hot_key(unknown: f64, unique_values: bool) -> Workload {
    Workload { clients: 4, keys: 1, ops: 2000, unknown, lost: 0.5, latency: 40, unique_values }
}

#[test]
fn two_thousand_events_on_one_hot_key_with_four_clients_pass() {
    for seed in 0..3 {
        let history = generate(seed, hot_key(0.05, false));
        let started = Instant::now();
        let stats = check(&history).unwrap_or_else(|violation| panic!("seed {seed}: {violation}"));
        println!("seed {seed}: {stats:?} in {:?}", started.elapsed());
        assert_eq!((stats.keys, stats.events), (1, 2000));
    }
}

#[test]
fn two_thousand_events_on_one_hot_key_with_unique_values_and_many_timeouts_pass() {
    // The shape of real test workloads: every write distinct, counters incremented by one,
    // and here one request in five timing out.
    for seed in 0..2 {
        let history = generate(seed, hot_key(0.2, true));
        let started = Instant::now();
        let stats = check(&history).unwrap_or_else(|violation| panic!("seed {seed}: {violation}"));
        println!("seed {seed}: {stats:?} in {:?}", started.elapsed());
    }
}

#[test]
fn stale_read_deep_in_a_hot_key_history_with_timeouts_fails() {
    let mut history = generate(3, hot_key(0.05, true));
    // A read near the middle returns the value of a put some fifty operations earlier,
    // overwritten since: the classic bug of a lagging replica answering reads.
    let read = (1000..history.len())
        .find(|&i| matches!(history[i].outcome, Outcome::Get(Some(_))))
        .expect("the history has reads");
    let stale = (0..read - 50)
        .rev()
        .find_map(|i| match (&history[i].op, &history[i].outcome) {
            (Op::Put { value, .. }, Outcome::Put) => Some(value.clone()),
            _ => None,
        })
        .expect("the history has puts");
    history[read].outcome = Outcome::Get(Some(stale.clone()));
    let started = Instant::now();
    let violation = assert_fails_on(&history, "key0");
    println!("{} in {:?}", violation.explanation.lines().next().unwrap_or_default(), started.elapsed());
    let stale = String::from_utf8(stale).expect("generated values are text");
    assert!(violation.explanation.contains(&format!("get \"key0\" -> \"{stale}\"")), "{violation}");
}

#[test]
fn eight_clients_with_three_hundred_ops_each_over_fifty_keys_pass() {
    let workload = Workload {
        clients: 8,
        keys: 50,
        ops: 8 * 300,
        unknown: 0.05,
        lost: 0.5,
        latency: 40,
        unique_values: false,
    };
    let history = generate(7, workload);
    let started = Instant::now();
    let stats = check(&history).unwrap_or_else(|violation| panic!("{violation}"));
    println!("{stats:?} in {:?}", started.elapsed());
    assert_eq!((stats.keys, stats.events), (50, 2400));
}

#[test]
fn corrupted_read_in_a_large_history_fails_on_its_key() {
    let workload = Workload {
        clients: 8,
        keys: 50,
        ops: 8 * 300,
        unknown: 0.05,
        lost: 0.5,
        latency: 40,
        unique_values: false,
    };
    let (history, key) = corrupt_one_read(generate(11, workload), 1234).expect("a large history has reads");
    let violation = assert_fails_on(&history, &key);
    assert!(violation.explanation.contains("never-written"), "{violation}");
}
