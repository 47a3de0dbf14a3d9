//! Untrusted input, in CI: every decoder of bytes that come from the network (client
//! requests, a leader's appends and checkpoints, forwarded requests, configurations,
//! LFD messages, peer certificates) driven through the real core calls of its handler
//! (`untrusted/mod.rs`, shared with the cargo-fuzz targets in `fuzz/`), over
//!
//! - arbitrary bytes, raw and in well-formed frames;
//! - the seed corpus (`fuzz/corpus/`), flipped, truncated, extended and spliced;
//! - well-formed messages with absurd contents: epochs and sequence numbers near 2^64,
//!   out-of-range enums, empty or oversized ids, counts a stream does not carry.
//!
//! The drivers assert that nothing panics, that a refused message changes nothing, and
//! that what is accepted only moves a replica forward (see each driver's comment).

mod untrusted;

use std::path::PathBuf;
use std::sync::LazyLock;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use tandem_replica::checkpoint::Checkpoint;
use tandem_replica::pb::{self, Mode, checkpoint_chunk::Part, lfd_message, operation};
use tandem_replica::state::{DEFAULT_SESSION_EXPIRY_MS, MAX_KEY_BYTES, StateMachine};
use tandem_replica::tls::{Authority, Identity};
use untrusted::{NOW_MS, Outcome, TARGETS, configuration, encode_frames, leader_entries};

// ------------------------------------------------------------------ seed corpus

fn put(key: &str, value: &str) -> pb::Operation {
    kind(operation::Kind::Put(pb::Put { key: key.into(), value: Bytes::from(value.to_owned()) }))
}

fn kind(kind: operation::Kind) -> pb::Operation {
    pb::Operation { kind: Some(kind) }
}

/// One operation of each kind on key `k`.
fn every_operation() -> Vec<pb::Operation> {
    vec![
        put("k", "1"),
        kind(operation::Kind::Get(pb::Get { key: "k".into() })),
        kind(operation::Kind::CompareAndSwap(pb::CompareAndSwap {
            key: "k".into(),
            expected: Some(Bytes::from_static(b"1")),
            new_value: Bytes::from_static(b"2"),
        })),
        kind(operation::Kind::Increment(pb::Increment { key: "k".into(), delta: 40 })),
        kind(operation::Kind::Delete(pb::Delete { key: "k".into() })),
    ]
}

/// A checkpoint of a state with `keys` keys and a session per client, as r1 sends it.
fn checkpoint_stream(seq: u64, keys: usize) -> Vec<pb::CheckpointChunk> {
    let mut state = StateMachine::default();
    for i in 0..keys {
        state.apply(i as u64 + 1, &format!("c{}", i % 2), i as u64 + 1, &put(&format!("k{i}"), "v"));
    }
    Checkpoint { seq, seq_epoch: u64::from(seq > 0), state }.into_chunks(1, "r1".into()).collect()
}

/// The DER certificate of `identity`, issued by a new group CA.
fn certificate_of(authority: &Authority, identity: &Identity) -> Vec<u8> {
    let material = authority.issue(identity).expect("issue a certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(material.cert.as_bytes()).expect("PEM");
    pem.contents
}

/// Small valid inputs of each target, by file name: what the fuzzers start from, and
/// what the mutation tests mutate.
fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    let execute = |client: &str, id: u64, op: pb::Operation| pb::ExecuteRequest {
        client_id: client.into(),
        request_id: id,
        op: Some(op),
        epoch: 0,
    };
    let order = |id: u64, op: pb::Operation| pb::OrderRequest {
        epoch: 1,
        from_replica: "r2".into(),
        client_id: "c1".into(),
        request_id: id,
        op: Some(op),
    };
    let append = |prev_seq: u64, entries: Vec<pb::Entry>, commit_seq: u64| pb::AppendRequest {
        epoch: 1,
        leader_id: "r1".into(),
        prev_seq,
        prev_epoch: u64::from(prev_seq > 0),
        entries,
        commit_seq,
        epoch_start_seq: 0,
    };
    let lfd = |kind: lfd_message::Kind| pb::LfdMessage { kind: Some(kind) };
    let report = |alive: bool, ready: bool| {
        lfd(lfd_message::Kind::Report(pb::ReplicaReport {
            alive,
            ready,
            reason: "health check".into(),
            at_unix_ms: NOW_MS,
        }))
    };
    match target {
        "checkpoint" => vec![
            ("seed-empty", encode_frames(&checkpoint_stream(0, 0))),
            ("seed-three-keys", encode_frames(&checkpoint_stream(3, 3))),
            ("seed-ahead-of-log", encode_frames(&checkpoint_stream(40, 5))),
        ],
        "execute_request" => vec![
            (
                "seed-every-operation",
                encode_frames(
                    &every_operation()
                        .into_iter()
                        .zip(1..)
                        .map(|(op, id)| execute("c1", id, op))
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "seed-retry-stale-reused",
                encode_frames(&[
                    execute("c1", 1, put("a", "1")),
                    execute("c1", 1, put("a", "1")),
                    execute("c1", 2, put("a", "2")),
                    execute("c1", 1, put("a", "1")),
                    execute("c1", 2, put("a", "other")),
                    execute("c2", 1, put("a", "3")),
                ]),
            ),
        ],
        "order" => vec![(
            "seed-every-operation",
            encode_frames(
                &every_operation().into_iter().zip(1..).map(|(op, id)| order(id, op)).collect::<Vec<_>>(),
            ),
        )],
        "append" => vec![
            ("seed-next-entries", encode_frames(&[append(3, leader_entries(1, 4, 3), 5)])),
            (
                "seed-keepalive-then-entries",
                encode_frames(&[append(3, vec![], 3), append(3, leader_entries(1, 4, 1), 4)]),
            ),
            ("seed-overlapping", encode_frames(&[append(1, leader_entries(1, 2, 4), 5)])),
        ],
        "configuration" => vec![
            ("seed-next-epoch", encode_frames(&[configuration(2, Mode::Passive, "r1", &["r1", "r2"])])),
            (
                "seed-failover-and-mode-change",
                encode_frames(&[
                    configuration(2, Mode::Active, "r2", &["r1", "r2", "r3"]),
                    configuration(3, Mode::Passive, "r3", &["r2", "r3"]),
                ]),
            ),
        ],
        "lfd_message" => vec![
            (
                "seed-hello-ready-fail",
                encode_frames(&[
                    lfd(lfd_message::Kind::Hello(pb::LfdHello {
                        replica_id: "r1".into(),
                        replica_address: "127.0.0.1:7101".into(),
                    })),
                    lfd(lfd_message::Kind::Hello(pb::LfdHello {
                        replica_id: "r2".into(),
                        replica_address: "127.0.0.1:7102".into(),
                    })),
                    report(true, false),
                    report(true, true),
                    lfd(lfd_message::Kind::Ack(pb::HeartbeatAck { n: 1 })),
                    report(false, false),
                ]),
            ),
            ("seed-report-before-hello", encode_frames(&[report(true, true)])),
        ],
        "certificate" => {
            let authority = Authority::generate("seed corpus").expect("CA");
            vec![
                ("seed-replica", certificate_of(&authority, &Identity::Replica("r1".into()))),
                (
                    "seed-kubernetes-replica",
                    certificate_of(&authority, &Identity::Replica("ns/kv/r2".into())),
                ),
                ("seed-lfd", certificate_of(&authority, &Identity::Lfd("r3".into()))),
                ("seed-manager", certificate_of(&authority, &Identity::Manager)),
            ]
        }
        other => panic!("no seeds for {other}"),
    }
}

/// The seeds of every target, made once (issuing certificates takes a moment).
static SEEDS: LazyLock<Vec<Vec<Vec<u8>>>> = LazyLock::new(|| {
    TARGETS.iter().map(|(name, _)| seeds(name).into_iter().map(|(_, b)| b).collect()).collect()
});

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

/// Writes the seed corpus: `cargo test -p tandem-replica --test untrusted_input --
/// --ignored write_seed_corpus` (after a change of the wire format).
#[test]
#[ignore = "writes fuzz/corpus; run by hand after a change of the wire format"]
fn write_seed_corpus() {
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (name, bytes) in seeds(target) {
            std::fs::write(dir.join(name), bytes).expect("write a seed");
        }
    }
}

#[test]
fn every_seed_is_accepted_whole() {
    for (target, drive) in TARGETS {
        for (name, bytes) in seeds(target) {
            let outcome = drive(&bytes);
            assert!(outcome.accepted > 0, "{target}/{name}: {outcome:?}");
        }
    }
}

/// The committed corpus decodes and reaches past the decoder: a seed that went stale
/// (the wire format changed under it) would only teach the fuzzer garbage.
#[test]
fn the_committed_seed_corpus_is_accepted() {
    let mut total = 0;
    for (target, drive) in TARGETS {
        let files: Vec<_> = std::fs::read_dir(corpus_dir(target))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e} (see write_seed_corpus)"))
            .map(|entry| entry.expect("corpus entry").path())
            .filter(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-")))
            .collect();
        assert!(!files.is_empty(), "fuzz/corpus/{target} has no seed");
        for path in files {
            let bytes = std::fs::read(&path).expect("read a seed");
            total += bytes.len();
            let outcome = drive(&bytes);
            assert!(outcome.accepted > 0, "{}: {outcome:?}", path.display());
        }
    }
    assert!(total < 100 * 1024, "the seed corpus should stay small: {total} bytes");
}

// ------------------------------------------------------------------ arbitrary and mutated bytes

/// One edit of an input, as a fuzzer's mutators make them.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    /// Copies a slice of the input to another place (a repeated field, a second frame).
    Splice {
        from: Index,
        len: usize,
        to: Index,
    },
    Remove(Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![Just(0u8), Just(0x7f), Just(0x80), Just(0xff), any::<u8>()];
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<Index>(), interesting).prop_map(|(at, byte)| Mutation::SetByte(at, byte)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        (any::<Index>(), 1usize..64, any::<Index>()).prop_map(|(from, len, to)| Mutation::Splice {
            from,
            len,
            to
        }),
        (any::<Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove(at, len)),
    ]
}

fn mutate(data: &mut Vec<u8>, mutation: &Mutation) {
    let len = data.len();
    let at = |index: &Index| if len == 0 { 0 } else { index.index(len) };
    match mutation {
        Mutation::FlipBit(i, bit) if len > 0 => data[at(i)] ^= 1 << bit,
        Mutation::SetByte(i, byte) if len > 0 => data[at(i)] = *byte,
        Mutation::Truncate(i) => data.truncate(at(i)),
        Mutation::Insert(i, bytes) => {
            let i = at(i);
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Splice { from, len: n, to } if len > 0 => {
            let from = at(from);
            let slice = data[from..(from + n).min(len)].to_vec();
            let to = at(to);
            data.splice(to..to, slice);
        }
        Mutation::Remove(i, n) if len > 0 => {
            let i = at(i);
            data.drain(i..(i + n).min(len));
        }
        _ => {}
    }
}

fn target() -> impl Strategy<Value = usize> {
    0..TARGETS.len()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// Random bytes, as a whole: mostly refused by the framing or the decoder.
    #[test]
    fn arbitrary_bytes_are_refused_without_harm(target in target(), data in prop::collection::vec(any::<u8>(), 0..512)) {
        (TARGETS[target].1)(&data);
    }

    /// Random bytes in well-formed frames: each reaches the message decoder.
    #[test]
    fn arbitrary_frames_are_refused_without_harm(
        target in target(),
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..96), 0..8),
    ) {
        let mut data = Vec::new();
        for frame in &frames {
            prost::encoding::encode_varint(frame.len() as u64, &mut data);
            data.extend_from_slice(frame);
        }
        (TARGETS[target].1)(&data);
    }

    /// The seeds, edited a few times: close to valid, so they reach deep into the cores.
    #[test]
    fn mutated_seeds_break_nothing(
        target in target(),
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = &SEEDS[target];
        let mut data = seeds[seed.index(seeds.len())].clone();
        for mutation in &mutations {
            mutate(&mut data, mutation);
        }
        (TARGETS[target].1)(&data);
    }
}

// ------------------------------------------------------------------ absurd messages

/// Numbers a sane peer sends (small) and the ones a broken or hostile one might.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..6,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(1 << 63),
        1 => Just(u64::from(u32::MAX) + 1),
        1 => any::<u64>(),
    ]
}

/// Usually `usual` (so a message passes the first checks), sometimes absurd.
fn mostly(usual: u64) -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(usual), 1 => number()]
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["r1", "r2", "r3", "c1", "c2"]).prop_map(String::from),
        1 => Just(String::new()),
        1 => Just("r1\0".to_owned()),
        1 => Just("x".repeat(MAX_KEY_BYTES + 1)),
        1 => "\\PC{0,8}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-c]{1,2}", 1 => Just(String::new()), 1 => Just("k".repeat(MAX_KEY_BYTES + 1))]
}

fn value() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..8).prop_map(Bytes::from),
        1 => Just(Bytes::from_static(b"9223372036854775807")),
        1 => Just(Bytes::from(vec![0u8; tandem_replica::state::MAX_VALUE_BYTES + 1])),
    ]
}

fn operation() -> impl Strategy<Value = Option<pb::Operation>> {
    let delta = prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(-1i64), Just(1), any::<i64>()];
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(pb::Operation { kind: None })),
        2 => key().prop_map(|key| Some(kind(operation::Kind::Get(pb::Get { key })))),
        2 => (key(), value()).prop_map(|(key, value)| Some(kind(operation::Kind::Put(pb::Put { key, value })))),
        1 => key().prop_map(|key| Some(kind(operation::Kind::Delete(pb::Delete { key })))),
        1 => (key(), prop::option::of(value()), value()).prop_map(|(key, expected, new_value)| {
            Some(kind(operation::Kind::CompareAndSwap(pb::CompareAndSwap { key, expected, new_value })))
        }),
        2 => (key(), delta).prop_map(|(key, delta)| Some(kind(operation::Kind::Increment(pb::Increment { key, delta })))),
    ]
}

fn execute_request() -> impl Strategy<Value = pb::ExecuteRequest> {
    (id(), mostly(1), operation(), prop_oneof![Just(0u64), number()]).prop_map(
        |(client_id, request_id, op, epoch)| pb::ExecuteRequest { client_id, request_id, op, epoch },
    )
}

fn order_request() -> impl Strategy<Value = pb::OrderRequest> {
    (mostly(1), id(), id(), mostly(1), operation()).prop_map(
        |(epoch, from_replica, client_id, request_id, op)| pb::OrderRequest {
            epoch,
            from_replica,
            client_id,
            request_id,
            op,
        },
    )
}

/// Entries small enough to execute cheaply (values are never checked on this path: the
/// leader validated them). `seq: None` numbers the entry in sequence after the
/// append's `prev_seq`, as a leader does.
fn entry() -> impl Strategy<Value = (Option<u64>, pb::Entry)> {
    let small_op = (key(), prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(key, value)| {
        Some(kind(operation::Kind::Put(pb::Put { key, value: Bytes::from(value) })))
    });
    let op = prop_oneof![3 => small_op, 1 => Just(None)];
    (
        prop::option::weighted(0.2, number()),
        mostly(1),
        id(),
        number(),
        op,
        mostly(NOW_MS),
        mostly(DEFAULT_SESSION_EXPIRY_MS),
    )
        .prop_map(|(seq, epoch, client_id, request_id, op, stamp_ms, session_expiry_ms)| {
            let entry = pb::Entry { seq: 0, epoch, client_id, request_id, op, stamp_ms, session_expiry_ms };
            (seq, entry)
        })
}

fn append_request() -> impl Strategy<Value = pb::AppendRequest> {
    (
        mostly(1),
        prop_oneof![3 => Just("r1".to_owned()), 1 => id()],
        prop_oneof![3 => 0u64..6, 1 => number()],
        mostly(1),
        prop::collection::vec(entry(), 0..5),
        number(),
        number(),
    )
        .prop_map(|(epoch, leader_id, prev_seq, prev_epoch, entries, commit_seq, epoch_start_seq)| {
            let entries = (1..)
                .zip(entries)
                .map(|(i, (seq, entry))| pb::Entry { seq: seq.unwrap_or(prev_seq.wrapping_add(i)), ..entry })
                .collect();
            pb::AppendRequest { epoch, leader_id, prev_seq, prev_epoch, entries, commit_seq, epoch_start_seq }
        })
}

/// Half of them what an RM sends (a subset of the group, its primary a member) with an
/// absurd epoch or mode at times; half anything at all.
fn configuration_message() -> impl Strategy<Value = pb::Configuration> {
    let mode = || prop_oneof![6 => 1i32..=2, 1 => Just(0), 1 => Just(3), 1 => any::<i32>()];
    let sane =
        (number(), mode(), prop::sample::subsequence(untrusted::MEMBERS.to_vec(), 1..=3), any::<Index>())
            .prop_map(|(epoch, mode, members, primary)| pb::Configuration {
                mode,
                ..configuration(epoch, Mode::Passive, members[primary.index(members.len())], &members)
            });
    let member = (id(), prop_oneof![3 => Just("127.0.0.1:7100".to_owned()), 1 => id()])
        .prop_map(|(id, address)| pb::Member { id, address });
    let anything = (number(), mode(), id(), prop::collection::vec(member, 0..5))
        .prop_map(|(epoch, mode, primary, members)| pb::Configuration { epoch, mode, primary, members });
    prop_oneof![sane, anything]
}

/// How a checkpoint stream is damaged on top of its absurd header.
#[derive(Debug, Clone)]
enum StreamEdit {
    None,
    Drop(Index),
    Duplicate(Index),
    Swap(Index, Index),
    EmptyChunk(Index),
    /// A body chunk no header announced.
    Extra(Index, Vec<(String, u8)>),
    WrongDigest,
    /// A claim to be a checkpoint of changes since this seq, with removals.
    Changes(u64, Index, Vec<String>),
}

fn stream_edit() -> impl Strategy<Value = StreamEdit> {
    prop_oneof![
        4 => Just(StreamEdit::None),
        1 => any::<Index>().prop_map(StreamEdit::Drop),
        1 => any::<Index>().prop_map(StreamEdit::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| StreamEdit::Swap(a, b)),
        1 => any::<Index>().prop_map(StreamEdit::EmptyChunk),
        1 => (any::<Index>(), prop::collection::vec((key(), any::<u8>()), 1..4)).prop_map(|(at, kvs)| StreamEdit::Extra(at, kvs)),
        1 => Just(StreamEdit::WrongDigest),
        1 => (number(), any::<Index>(), prop::collection::vec(key(), 0..3))
            .prop_map(|(base_seq, at, keys)| StreamEdit::Changes(base_seq, at, keys)),
    ]
}

/// The header fields a checkpoint may lie about (each `None`: the true value).
type HeaderLies = (Option<u64>, Option<u64>, Option<u64>, Option<u64>, Option<u64>, Option<String>);

fn header_lies() -> impl Strategy<Value = HeaderLies> {
    let lie = || prop::option::weighted(0.2, number());
    (lie(), lie(), lie(), lie(), lie(), prop::option::weighted(0.2, id()))
}

fn checkpoint_chunks(
    keys: Vec<(String, u8)>,
    sessions: usize,
    seq: u64,
    lies: HeaderLies,
    edit: StreamEdit,
) -> Vec<pb::CheckpointChunk> {
    let mut state = StateMachine::default();
    for (i, (key, value)) in keys.iter().enumerate() {
        let client = format!("c{}", i % sessions.max(1));
        state.apply(i as u64 + 1, &client, i as u64 + 1, &put(key, &value.to_string()));
    }
    let mut chunks: Vec<_> = Checkpoint { seq, seq_epoch: 1, state }.into_chunks(1, "r1".into()).collect();
    let (epoch, lied_seq, seq_epoch, keys, sessions, leader) = lies;
    if let Some(Part::Header(header)) = chunks[0].part.as_mut() {
        header.epoch = epoch.unwrap_or(header.epoch);
        header.seq = lied_seq.unwrap_or(header.seq);
        header.seq_epoch = seq_epoch.unwrap_or(header.seq_epoch);
        header.keys = keys.unwrap_or(header.keys);
        header.sessions = sessions.unwrap_or(header.sessions);
        header.leader_id = leader.unwrap_or_else(|| header.leader_id.clone());
    }
    let len = chunks.len();
    match edit {
        StreamEdit::None => {}
        StreamEdit::Drop(at) => {
            chunks.remove(at.index(len));
        }
        StreamEdit::Duplicate(at) => chunks.insert(at.index(len), chunks[at.index(len)].clone()),
        StreamEdit::Swap(a, b) => chunks.swap(a.index(len), b.index(len)),
        StreamEdit::EmptyChunk(at) => chunks.insert(at.index(len), pb::CheckpointChunk { part: None }),
        StreamEdit::Extra(at, kvs) => {
            let entries =
                kvs.into_iter().map(|(key, v)| pb::KeyValue { key, value: Bytes::from(vec![v]) }).collect();
            let extra = pb::CheckpointChunk { part: Some(Part::KeyValues(pb::KeyValueBatch { entries })) };
            chunks.insert(at.index(len + 1), extra);
        }
        StreamEdit::Changes(base_seq, at, keys) => {
            if let Some(Part::Header(header)) = chunks[0].part.as_mut() {
                header.base_seq = base_seq;
            }
            let removals = pb::Removals { keys, client_ids: Vec::new() };
            chunks.insert(at.index(len + 1), pb::CheckpointChunk { part: Some(Part::Removals(removals)) });
        }
        StreamEdit::WrongDigest => {
            if let Some(Part::Trailer(trailer)) = chunks.last_mut().and_then(|c| c.part.as_mut()) {
                trailer.digest = "0".repeat(64);
            }
        }
    }
    chunks
}

fn lfd_message() -> impl Strategy<Value = pb::LfdMessage> {
    let kind = prop_oneof![
        1 => Just(None),
        2 => (id(), id()).prop_map(|(replica_id, replica_address)| {
            Some(lfd_message::Kind::Hello(pb::LfdHello { replica_id, replica_address }))
        }),
        4 => (any::<bool>(), any::<bool>(), id(), number()).prop_map(|(alive, ready, reason, at_unix_ms)| {
            Some(lfd_message::Kind::Report(pb::ReplicaReport { alive, ready, reason, at_unix_ms }))
        }),
        2 => number().prop_map(|n| Some(lfd_message::Kind::Ack(pb::HeartbeatAck { n }))),
    ];
    kind.prop_map(|kind| pb::LfdMessage { kind })
}

/// URIs a certificate might carry: ours, near misses, and junk.
fn uri() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => (prop::sample::select(vec!["replica", "lfd"]), "[a-z0-9/-]{0,10}")
            .prop_map(|(kind, id)| format!("tandem://{kind}/{id}")),
        1 => prop::sample::select(vec![
            "tandem://gfd", "tandem://manager", "tandem://manager/", "tandem://gfd/x", "TANDEM://gfd",
            "tandem:/replica/r1", "tandem://replica", "https://replica/r1", "tandem://",
        ]).prop_map(String::from),
        1 => "[ -~]{0,24}",
    ]
}

/// One key for every certificate these tests sign: generating keys is the slow part.
static KEY: LazyLock<rcgen::KeyPair> = LazyLock::new(|| rcgen::KeyPair::generate().expect("a key"));

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, ..ProptestConfig::default() })]

    #[test]
    fn absurd_client_requests_are_refused_or_run_once(requests in prop::collection::vec(execute_request(), 1..8)) {
        untrusted::execute_requests(&encode_frames(&requests));
    }

    #[test]
    fn absurd_forwarded_requests_are_refused_or_ordered_once(requests in prop::collection::vec(order_request(), 1..8)) {
        untrusted::order_requests(&encode_frames(&requests));
    }

    #[test]
    fn absurd_appends_never_move_a_follower_back(requests in prop::collection::vec(append_request(), 1..5)) {
        untrusted::appends(&encode_frames(&requests));
    }

    #[test]
    fn absurd_configurations_are_refused_and_change_nothing(configs in prop::collection::vec(configuration_message(), 1..5)) {
        untrusted::configurations(&encode_frames(&configs));
    }

    #[test]
    fn absurd_checkpoints_install_only_what_they_announced(
        keys in prop::collection::vec((key(), any::<u8>()), 0..6),
        sessions in 0usize..3,
        seq in prop_oneof![3 => 0u64..50, 1 => number()],
        lies in header_lies(),
        edit in stream_edit(),
    ) {
        untrusted::checkpoint(&encode_frames(&checkpoint_chunks(keys, sessions, seq, lies, edit)));
    }

    #[test]
    fn absurd_lfd_messages_admit_only_introduced_replicas(messages in prop::collection::vec(lfd_message(), 1..80)) {
        untrusted::lfd_messages(&encode_frames(&messages));
    }

    #[test]
    fn certificates_name_exactly_the_identity_they_carry(uris in prop::collection::vec(uri(), 0..4)) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        for uri in &uris {
            params.subject_alt_names.push(rcgen::SanType::URI(uri.clone().try_into().expect("ASCII")));
        }
        let der = params.self_signed(&*KEY).expect("sign").der().to_vec();
        let expected = uris.iter().find_map(|uri| Identity::from_uri(uri));
        let outcome = untrusted::certificate(&der);
        prop_assert_eq!(outcome == Outcome { accepted: 1, refused: 0 }, expected.is_some());
        prop_assert_eq!(tandem_replica::tls::identity_of(&der), expected);
    }
}

// ------------------------------------------------------------------ what these tests found

/// Found by `absurd_appends_never_move_a_follower_back`: the leader's append could
/// replace an entry a passive backup held as committed (here seq 1 of epoch 1 by one of
/// epoch 0), so the backup, once promoted, would replay another history.
#[test]
fn an_append_cannot_rewrite_a_committed_entry() {
    let mut backup = untrusted::core("r2", true, configuration(1, Mode::Passive, "r1", &untrusted::MEMBERS));
    let append = |prev_seq, entries, commit_seq| pb::AppendRequest {
        epoch: 1,
        leader_id: "r1".into(),
        prev_seq,
        prev_epoch: u64::from(prev_seq > 0),
        entries,
        commit_seq,
        epoch_start_seq: 0,
    };
    backup.on_append(&append(0, leader_entries(1, 1, 2), 2)).expect("the leader's entries");
    let before = untrusted::Seen::of(&backup);
    let mut rewritten = leader_entries(1, 1, 1);
    rewritten[0].epoch = 0;
    rewritten[0].op = Some(put("a", "forged"));
    let mut later_epoch = leader_entries(1, 3, 1);
    later_epoch[0].epoch = 2;
    for (prev_seq, entries) in [(0, rewritten), (2, later_epoch), (2, leader_entries(1, 5, 1))] {
        let refused = backup.on_append(&append(prev_seq, entries, 2));
        assert!(
            matches!(refused, Err(tandem_replica::error::ReplicaError::InvalidRequest { .. })),
            "{refused:?}"
        );
        assert_eq!(untrusted::Seen::of(&backup), before);
    }
}

/// Found by `absurd_lfd_messages_admit_only_introduced_replicas`: a second hello on a
/// stream renamed it, and the replica of the first hello stayed alive for good, since
/// no stream left could report it gone.
#[test]
fn a_second_hello_cannot_orphan_a_live_replica() {
    use tandem_replica::detector::gfd::{GfdCore, GfdSettings};
    let mut gfd = GfdCore::new(GfdSettings::default(), 0);
    gfd.link_opened(1, 0).expect("a stream");
    gfd.hello(1, "r1", "a", 0).expect("a hello");
    gfd.report(1, &pb::ReplicaReport { alive: true, ready: true, ..Default::default() }, 1);
    gfd.hello(1, "r2", "b", 2).expect("ignored, not refused");
    assert_eq!(gfd.replica_of(1), Some("r1"));
    gfd.link_closed(1, 3);
    assert!(gfd.alive().is_empty(), "{:?}", gfd.alive());
}
