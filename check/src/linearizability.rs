//! Linearizability checker for Tandem key-value histories: could one atomic map, applying each
//! operation at an instant between its invocation and completion, explain every outcome? Keys
//! are checked separately (locality), each by Wing & Gong search with Lowe's memoization (WGL).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get { key: String },
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
    Cas { key: String, expected: Option<Vec<u8>>, new: Vec<u8> },
    Incr { key: String, delta: i64 },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Get { key }
            | Op::Put { key, .. }
            | Op::Delete { key }
            | Op::Cas { key, .. }
            | Op::Incr { key, .. } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Get(Option<Vec<u8>>),
    Put,
    Delete {
        existed: bool,
    },
    Cas {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    Incr(Result<i64, ()>),
    /// The client never learned the result (timeout): the op may or may not have taken
    /// effect, at any time after it was invoked.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub client: String,
    pub op: Op,
    /// Nanoseconds since the start of the test, when the client sent the request.
    pub invoked: u64,
    /// When the client got the answer; None when the outcome is Unknown.
    pub completed: Option<u64>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub key: String,
    /// Human-readable explanation including the (up to ~20) events on that key that could
    /// not be linearized, with their times and outcomes, so a failing test prints something useful.
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "linearizability violation on key {:?}: {}", self.key, self.explanation)
    }
}

impl std::error::Error for Violation {}

#[derive(Debug, Clone, Default)]
pub struct CheckStats {
    pub keys: usize,
    pub events: usize,
    pub states_explored: u64,
}

/// How many pending events a violation lists, so a failure stays readable.
const EXPLAIN_LIMIT: usize = 20;
/// How many of the last linearized events a violation lists as context.
const CONTEXT_LIMIT: usize = 5;
/// States a search strategy may visit per key before the other one gets a turn (plus ten
/// per event); valid histories with few unknown outcomes need far fewer.
const INITIAL_BUDGET: u64 = 20_000;

/// Checks that the history is linearizable with respect to the key-value model above,
/// starting from an empty map. Returns the first violation found.
///
/// An event whose outcome is `Unknown` is treated as pending forever (its `completed`, if
/// any, is ignored): it may take effect at any point after `invoked`, or never. Two events
/// where one completes at the very nanosecond the other is invoked count as concurrent.
pub fn check(history: &[Event]) -> Result<CheckStats, Violation> {
    check_with(history, &[Strategy::DepthFirst, Strategy::Rounds])
}

/// `check` using only plain depth-first search; for testing the checker itself.
pub fn check_depth_first_only(history: &[Event]) -> Result<CheckStats, Violation> {
    check_with(history, &[Strategy::DepthFirst])
}

/// `check` using only the search in rounds; for testing the checker itself.
pub fn check_in_rounds_only(history: &[Event]) -> Result<CheckStats, Violation> {
    check_with(history, &[Strategy::Rounds])
}

fn check_with(history: &[Event], strategies: &[Strategy]) -> Result<CheckStats, Violation> {
    for (index, event) in history.iter().enumerate() {
        validate(index, event)?;
    }
    // Keys in order of first appearance, so "the first violation" is deterministic.
    let mut keys: Vec<&str> = Vec::new();
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, event) in history.iter().enumerate() {
        let key = event.op.key();
        by_key
            .entry(key)
            .or_insert_with(|| {
                keys.push(key);
                Vec::new()
            })
            .push(index);
    }
    let mut stats = CheckStats { keys: keys.len(), events: history.len(), states_explored: 0 };
    for key in keys {
        let indices = by_key.get(key).map(Vec::as_slice).unwrap_or_default();
        stats.states_explored += Problem::new(history, key, indices).solve(strategies)?;
    }
    Ok(stats)
}

/// Rejects histories that no execution could have produced, whatever the order: these are
/// bugs in the code that recorded the history, and reporting them beats a misleading verdict.
fn validate(index: usize, event: &Event) -> Result<(), Violation> {
    let malformed = |why: String| Violation {
        key: event.op.key().to_owned(),
        explanation: format!(
            "malformed history (a bug in the recorder, not in the system under test): \
             event #{index} {why}\n  {}",
            describe(event)
        ),
    };
    if let Some(completed) = event.completed
        && completed < event.invoked
    {
        return Err(malformed(format!(
            "completed at {completed}ns, before it was invoked at {}ns",
            event.invoked
        )));
    }
    let kinds_match = matches!(
        (&event.op, &event.outcome),
        (_, Outcome::Unknown)
            | (Op::Get { .. }, Outcome::Get(_))
            | (Op::Put { .. }, Outcome::Put)
            | (Op::Delete { .. }, Outcome::Delete { .. })
            | (Op::Cas { .. }, Outcome::Cas { .. })
            | (Op::Incr { .. }, Outcome::Incr(_))
    );
    if !kinds_match {
        return Err(malformed("has an outcome of a different kind than its operation".to_owned()));
    }
    if event.outcome != Outcome::Unknown && event.completed.is_none() {
        return Err(malformed("has a known outcome but no completion time".to_owned()));
    }
    Ok(())
}

/// A value in the per-key search, interned so states are cheap to copy, hash and compare.
type Val = u32;
const ABSENT: Val = 0;

/// Interns every value seen on one key; id 0 is "absent", id n is `values[n - 1]`.
///
/// Values that no outcome shows and no compare-and-swap expects can only be told apart by
/// whether `incr` parses them, and as what. So each such group shares one id: that makes,
/// say, two timed-out puts of never-read values interchangeable, and states that differ only
/// in such values one state. Real tests write unique values, and most are never read.
#[derive(Default, Clone)]
struct Values {
    /// Values some outcome or compare-and-swap can tell apart from every other.
    distinguished: HashSet<Vec<u8>>,
    ids: HashMap<Vec<u8>, Val>,
    /// The id of each group of undistinguished values, by what `incr` parses them as.
    groups: HashMap<Option<i64>, Val>,
    /// One value of each id, and how many distinct values share it.
    values: Vec<(Vec<u8>, usize)>,
    /// The value parsed as `incr` parses it, computed once per value.
    ints: Vec<Option<i64>>,
    /// Id of the decimal text of an integer, so `incr` needn't format and hash each time.
    by_int: HashMap<i64, Val>,
}

impl Values {
    fn intern(&mut self, bytes: &[u8]) -> Val {
        if let Some(&id) = self.ids.get(bytes) {
            return id;
        }
        let int = std::str::from_utf8(bytes).ok().and_then(|text| text.parse::<i64>().ok());
        let grouped = !self.distinguished.contains(bytes);
        let id = match self.groups.get(&int) {
            Some(&id) if grouped => {
                self.values[id as usize - 1].1 += 1;
                id
            }
            _ => {
                self.values.push((bytes.to_vec(), 1));
                self.ints.push(int);
                let id = Val::try_from(self.values.len()).expect("fewer than 2^32 distinct values");
                if grouped {
                    self.groups.insert(int, id);
                }
                id
            }
        };
        self.ids.insert(bytes.to_vec(), id);
        id
    }

    fn intern_opt(&mut self, bytes: Option<&[u8]>) -> Val {
        bytes.map_or(ABSENT, |bytes| self.intern(bytes))
    }

    fn intern_int(&mut self, n: i64) -> Val {
        if let Some(&id) = self.by_int.get(&n) {
            return id;
        }
        let id = self.intern(n.to_string().as_bytes());
        self.by_int.insert(n, id);
        id
    }

    /// What `incr` reads from a value: absent counts as 0, non-numbers as None.
    fn as_int(&self, id: Val) -> Option<i64> {
        match id {
            ABSENT => Some(0),
            _ => self.ints[id as usize - 1],
        }
    }

    fn show(&self, id: Val) -> String {
        match id {
            ABSENT => "absent".to_owned(),
            _ => match &self.values[id as usize - 1] {
                (bytes, 1) => show_bytes(bytes),
                (bytes, _) => format!("{} (or another value that nothing read)", show_bytes(bytes)),
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum ModelOp {
    Get,
    Put(Val),
    Delete,
    Cas { expected: Val, new: Val },
    Incr(i64),
}

impl ModelOp {
    /// Whether the op leaves the same value whatever it found (when its outcome is unknown).
    fn is_blind_write(self) -> bool {
        matches!(self, ModelOp::Put(_) | ModelOp::Delete)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ModelOut {
    Get(Val),
    Put,
    Delete(bool),
    Cas { swapped: bool, current: Val },
    Incr(Option<i64>),
}

/// An op whose outcome the client learned. Its bit in the known bitset is its index in
/// `Problem::known`, which is in invocation order.
struct KnownOp {
    event: usize,
    op: ModelOp,
    out: ModelOut,
    invoked: u64,
    completed: u64,
}

/// An op whose client never learned the outcome: it takes effect once, at any time after
/// `invoked`, or never. Its bit in the unknown bitset is its index in `Problem::unknown`.
struct UnknownOp {
    event: usize,
    op: ModelOp,
    invoked: u64,
    /// The previous unknown op (by invocation) with the identical effect.
    twin: Option<usize>,
}

#[derive(Clone, Copy)]
enum Step {
    Known(usize),
    Unknown(usize),
}

/// Visited states. A state is (linearized known ops, value, linearized unknown ops); it is
/// pruned if a visited state has the same known ops and value and a SUBSET of its unknown
/// ops: an unknown op may also never take effect, so having more of them still pending can
/// only help, and whatever this state could reach, that one could too.
#[derive(Default)]
struct Memo {
    /// (hash of the known ops, value) -> the states with those; collisions are compared.
    seen: HashMap<(u64, Val), Vec<MemoEntry>, BuildHasherDefault<MixHasher>>,
}

struct MemoEntry {
    known: Box<[u64]>,
    /// The minimal sets of linearized unknown ops visited with these known ops and value.
    unknown_sets: Vec<Box<[u64]>>,
}

impl Memo {
    /// Records the state; false if it (or a state dominating it) was already visited.
    fn visit(&mut self, known_hash: u64, known: &[u64], value: Val, unknown: &[u64]) -> bool {
        let entries = self.seen.entry((known_hash, value)).or_default();
        let Some(entry) = entries.iter_mut().find(|entry| *entry.known == *known) else {
            entries.push(MemoEntry { known: known.into(), unknown_sets: vec![unknown.into()] });
            return true;
        };
        let sets = &mut entry.unknown_sets;
        if sets.iter().any(|set| is_subset(set, unknown)) {
            return false;
        }
        // Keep only the minimal sets: any superset of this one is now redundant.
        sets.retain(|set| !is_subset(unknown, set));
        sets.push(unknown.into());
        true
    }
}

/// A cheap hasher for memo keys, which are already well mixed (std's SipHash was most of
/// the run time).
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A fixed pseudo-random 64-bit tag per known op; the hash of a set of known ops is the XOR
/// of their tags (Zobrist hashing), kept up to date as ops are linearized and undone.
fn tag(i: usize) -> u64 {
    // SplitMix64 finalizer.
    let mut z = (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether every bit of `a` is set in `b` (same length). A plain loop: this is the hot
/// spot when many ops have unknown outcomes, even in debug builds.
fn is_subset(a: &[u64], b: &[u64]) -> bool {
    let mut i = 0;
    while i < a.len() {
        if a[i] & !b[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

fn has_bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn flip_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] ^= 1 << (i % 64);
}

/// The deepest point the search reached, kept to explain a violation.
#[derive(Default)]
struct Best {
    known_done: usize,
    known: Vec<u64>,
    unknown: Vec<u64>,
    value: Val,
    /// The last few ops linearized, oldest first.
    tail: Vec<Step>,
}

/// A state whose unknown-op successors wait for the next round.
struct Saved {
    /// Known ops below `lo` are all linearized; `extra` lists those linearized above it.
    lo: usize,
    extra: Box<[usize]>,
    known_hash: u64,
    unknown: Box<[u64]>,
    value: Val,
    /// Whether an unknown op led to this state (see `Search::try_unknown`).
    after_unknown: bool,
}

/// A node of the depth-first search.
#[derive(Clone, Copy)]
struct Node {
    /// The op linearized to reach this node, and the value before it.
    via: Option<(Step, Val)>,
    /// Whether the op that led here had an unknown outcome.
    after_unknown: bool,
    /// Known candidates still to try: pending known ops in `next..end` invoked by `bound`.
    bound: u64,
    next: usize,
    end: usize,
    /// Unknown candidates still to try, from this index on (`usize::MAX`: none here).
    next_unknown: usize,
}

/// How to order the search. Both are complete; they differ in what they find fast.
///
/// Unknown ops are what make the search expensive: each may be linearized anywhere after its
/// invocation, or never, and the memo prunes a state only if one with the same known ops and
/// value and FEWER unknown ops was visited. Depth-first search often visits the costlier
/// state first, then explores the same ground again from the cheaper one; with many unknown
/// ops that compounds exponentially when no linearization exists. Searching in rounds by the
/// number of unknown ops used reaches every state only after all cheaper ones, but explores
/// each round completely, which is slow when a linearization exists. So `check` runs both,
/// taking turns under a budget that doubles: it costs at most a few times the better one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    /// Plain depth-first, trying unknown ops only after the known ones at each node, so they
    /// are used only where needed.
    DepthFirst,
    /// Round c explores, depth-first over known ops only, every state that uses exactly c
    /// unknown ops, saving each; round c + 1 starts from those with one more unknown op.
    Rounds,
}

/// How a turn of a search ended.
enum End {
    Linearized,
    Exhausted,
    OverBudget,
}

/// The ops on one key, ready to search.
struct Problem<'a> {
    history: &'a [Event],
    key: &'a str,
    /// Events on this key (for explanations), including unknown gets the search ignores.
    total: usize,
    /// The values of the ops; each search extends its own copy.
    values: Values,
    /// In invocation order.
    known: Vec<KnownOp>,
    unknown: Vec<UnknownOp>,
}

impl<'a> Problem<'a> {
    fn new(history: &'a [Event], key: &'a str, indices: &[usize]) -> Self {
        let mut values = Values::default();
        for &index in indices {
            let event = &history[index];
            if let Op::Cas { expected: Some(value), .. } = &event.op {
                values.distinguished.insert(value.clone());
            }
            if let Outcome::Get(Some(value)) | Outcome::Cas { current: Some(value), .. } = &event.outcome {
                values.distinguished.insert(value.clone());
            }
        }
        let mut known = Vec::new();
        let mut unknown: Vec<UnknownOp> = Vec::new();
        let mut last_unknown_with: HashMap<ModelOp, usize> = HashMap::new();
        let mut by_invocation = indices.to_vec();
        by_invocation.sort_by_key(|&i| (history[i].invoked, i));
        for &index in &by_invocation {
            let event = &history[index];
            let op = match &event.op {
                Op::Get { .. } => ModelOp::Get,
                Op::Put { value, .. } => ModelOp::Put(values.intern(value)),
                Op::Delete { .. } => ModelOp::Delete,
                Op::Cas { expected, new, .. } => {
                    ModelOp::Cas { expected: values.intern_opt(expected.as_deref()), new: values.intern(new) }
                }
                Op::Incr { delta, .. } => ModelOp::Incr(*delta),
            };
            let out = match &event.outcome {
                Outcome::Get(value) => ModelOut::Get(values.intern_opt(value.as_deref())),
                Outcome::Put => ModelOut::Put,
                Outcome::Delete { existed } => ModelOut::Delete(*existed),
                Outcome::Cas { swapped, current } => {
                    ModelOut::Cas { swapped: *swapped, current: values.intern_opt(current.as_deref()) }
                }
                Outcome::Incr(result) => ModelOut::Incr(result.ok()),
                Outcome::Unknown => {
                    // A get that never answered changed nothing and constrains nothing.
                    if op != ModelOp::Get {
                        unknown.push(UnknownOp {
                            event: index,
                            op,
                            invoked: event.invoked,
                            twin: last_unknown_with.insert(op, unknown.len()),
                        });
                    }
                    continue;
                }
            };
            known.push(KnownOp {
                event: index,
                op,
                out,
                invoked: event.invoked,
                completed: event.completed.expect("validated: known outcomes have one"),
            });
        }
        Problem { history, key, total: indices.len(), values, known, unknown }
    }

    /// Runs the strategies in turns; Ok(states explored) if some linearization explains
    /// every op with a known outcome.
    fn solve(&self, strategies: &[Strategy]) -> Result<u64, Violation> {
        let mut searches: Vec<Search> =
            strategies.iter().map(|&strategy| Search::new(self, strategy)).collect();
        let mut limit = match strategies.len() {
            1 => u64::MAX,
            _ => INITIAL_BUDGET + 10 * self.total as u64,
        };
        loop {
            for i in 0..searches.len() {
                match searches[i].advance(self, limit) {
                    End::Linearized => return Ok(searches.iter().map(|s| s.explored).sum()),
                    End::Exhausted => return Err(self.explain(&searches)),
                    End::OverBudget => {}
                }
            }
            limit = limit.saturating_mul(2);
        }
    }

    fn explain(&self, searches: &[Search]) -> Violation {
        use std::fmt::Write as _;
        let explored: u64 = searches.iter().map(|s| s.explored).sum();
        // The search that got furthest (solve runs at least one).
        let search = searches
            .iter()
            .skip(1)
            .fold(&searches[0], |a, b| if b.best.known_done > a.best.known_done { b } else { a });
        let best = &search.best;
        let mut text = format!(
            "no order of the {} operations on this key ({} with a known outcome) is consistent \
             with a single key-value register (explored {explored} states).\n",
            self.total,
            self.known.len(),
        );
        let _ = writeln!(
            text,
            "The longest consistent prefix linearized {} of the {} operations with a known \
             outcome, leaving the value {}, and ended with (in linearization order):",
            best.known_done,
            self.known.len(),
            search.values.show(best.value)
        );
        if best.tail.is_empty() {
            text.push_str("  (nothing: no operation could go first)\n");
        }
        for step in &best.tail {
            let event = match *step {
                Step::Known(i) => self.known[i].event,
                Step::Unknown(j) => self.unknown[j].event,
            };
            let _ = writeln!(text, "  {}", describe(&self.history[event]));
        }
        // Known ops first since they are what got stuck, then the unknown ones that could
        // still have taken effect; each in invocation order.
        let pending: Vec<usize> = (0..self.known.len())
            .filter(|&i| !has_bit(&best.known, i))
            .map(|i| self.known[i].event)
            .chain(
                (0..self.unknown.len())
                    .filter(|&j| !has_bit(&best.unknown, j))
                    .map(|j| self.unknown[j].event),
            )
            .collect();
        let _ = writeln!(
            text,
            "None of the {} remaining operations can come next; the earliest invoked:",
            pending.len()
        );
        for &event in pending.iter().take(EXPLAIN_LIMIT) {
            let _ = writeln!(text, "  {}", describe(&self.history[event]));
        }
        if pending.len() > EXPLAIN_LIMIT {
            let _ = writeln!(text, "  ... and {} more", pending.len() - EXPLAIN_LIMIT);
        }
        Violation { key: self.key.to_owned(), explanation: text }
    }
}

/// One resumable search of a `Problem` (the WGL search, ordered by a `Strategy`).
struct Search {
    strategy: Strategy,
    values: Values,
    /// The current state: the linearized ops and the value they left.
    known_bits: Vec<u64>,
    /// Zobrist hash of `known_bits` (see `tag`).
    known_hash: u64,
    unknown_bits: Vec<u64>,
    value: Val,
    known_done: usize,
    memo: Memo,
    explored: u64,
    best: Best,
    started: bool,
    /// The depth-first search in progress; its top node is the current state.
    stack: Vec<Node>,
    /// Rounds: the saved states of this round still to expand, and those of the next.
    round: VecDeque<Saved>,
    next_round: Vec<Saved>,
}

impl Search {
    fn new(problem: &Problem, strategy: Strategy) -> Self {
        let known_bits = vec![0; problem.known.len().div_ceil(64)];
        let unknown_bits = vec![0; problem.unknown.len().div_ceil(64)];
        Search {
            strategy,
            values: problem.values.clone(),
            best: Best { known: known_bits.clone(), unknown: unknown_bits.clone(), ..Best::default() },
            known_bits,
            known_hash: 0,
            unknown_bits,
            value: ABSENT,
            known_done: 0,
            memo: Memo::default(),
            explored: 0,
            started: false,
            stack: Vec::new(),
            round: VecDeque::new(),
            next_round: Vec::new(),
        }
    }

    /// Continues the search until it ends or has explored more than `limit` states.
    fn advance(&mut self, problem: &Problem, limit: u64) -> End {
        loop {
            if self.explored > limit {
                return End::OverBudget;
            }
            if !self.stack.is_empty() {
                match self.next_child(problem) {
                    Some(via) => {
                        if let Some(end) = self.push_node(problem, Some(via)) {
                            return end;
                        }
                    }
                    None => self.pop_node(),
                }
                continue;
            }
            if !self.started {
                self.started = true;
                self.visit();
                if let Some(end) = self.push_node(problem, None) {
                    return end;
                }
                continue;
            }
            // Depth-first: the one search from the empty map is over. Rounds: expand the
            // next saved state, starting the next round when this one is done.
            if self.round.is_empty() {
                self.round = std::mem::take(&mut self.next_round).into();
            }
            let Some(saved) = self.round.pop_front() else {
                return End::Exhausted;
            };
            self.restore(&saved);
            let (_, bound, _) = self.window(problem);
            self.stack.push(Node {
                via: None,
                after_unknown: saved.after_unknown,
                bound,
                next: 0,
                end: 0,
                next_unknown: 0,
            });
        }
    }

    /// Makes the current state, which was just visited, a node of the search.
    fn push_node(&mut self, problem: &Problem, via: Option<(Step, Val)>) -> Option<End> {
        if self.known_done == problem.known.len() {
            return Some(End::Linearized);
        }
        let (first, bound, end) = self.window(problem);
        let after_unknown = matches!(via, Some((Step::Unknown(_), _)));
        let next_unknown = match self.strategy {
            Strategy::DepthFirst => 0,
            Strategy::Rounds => {
                if problem.unknown.first().is_some_and(|op| op.invoked <= bound) {
                    let saved = self.save(first, end, after_unknown);
                    self.next_round.push(saved);
                }
                usize::MAX
            }
        };
        self.stack.push(Node { via, after_unknown, bound, next: first, end, next_unknown });
        self.note_progress();
        None
    }

    /// Every candidate failed at the top node: undoes the op that led to it.
    fn pop_node(&mut self) {
        if let Some(Node { via: Some((step, before)), .. }) = self.stack.pop() {
            match step {
                Step::Known(i) => {
                    self.toggle_known(i);
                    self.known_done -= 1;
                }
                Step::Unknown(j) => flip_bit(&mut self.unknown_bits, j),
            }
            self.value = before;
        }
    }

    /// Moves to the next new state reachable from the top node by one op: the known
    /// candidates first, then the unknown ones. Returns the op and the value before it.
    fn next_child(&mut self, problem: &Problem) -> Option<(Step, Val)> {
        let mut node = *self.stack.last()?;
        let found = self.next_child_of(problem, &mut node);
        if let Some(top) = self.stack.last_mut() {
            *top = node;
        }
        found
    }

    fn next_child_of(&mut self, problem: &Problem, node: &mut Node) -> Option<(Step, Val)> {
        let before = self.value;
        while node.next < node.end {
            let i = node.next;
            node.next += 1;
            let op = &problem.known[i];
            if has_bit(&self.known_bits, i) || op.invoked > node.bound {
                continue;
            }
            let Some(after) = self.step(before, op.op, Some(op.out)) else {
                continue;
            };
            self.toggle_known(i);
            self.value = after;
            if self.visit() {
                self.known_done += 1;
                return Some((Step::Known(i), before));
            }
            self.toggle_known(i);
            self.value = before;
        }
        while node.next_unknown < problem.unknown.len() {
            let j = node.next_unknown;
            node.next_unknown += 1;
            if problem.unknown[j].invoked > node.bound {
                // In invocation order: the rest were invoked even later.
                node.next_unknown = usize::MAX;
                break;
            }
            let Some(after) = self.try_unknown(problem, j, node.after_unknown) else {
                continue;
            };
            flip_bit(&mut self.unknown_bits, j);
            self.value = after;
            if self.visit() {
                return Some((Step::Unknown(j), before));
            }
            flip_bit(&mut self.unknown_bits, j);
            self.value = before;
        }
        None
    }

    /// The value if unknown op `j` took effect now, or None if that needn't be explored.
    fn try_unknown(&mut self, problem: &Problem, j: usize, after_unknown: bool) -> Option<Val> {
        let op = &problem.unknown[j];
        // Identical unknown ops are interchangeable: take them in invocation order.
        let twin_pending = op.twin.is_some_and(|twin| !has_bit(&self.unknown_bits, twin));
        // Two unknown ops in a row where the second overwrites the value: the first one
        // achieved nothing, and the state without it is reachable directly.
        let overwrites_unknown = after_unknown && op.op.is_blind_write();
        if has_bit(&self.unknown_bits, j) || twin_pending || overwrites_unknown {
            return None;
        }
        self.step(self.value, op.op, None)
    }

    /// Applies `op` to `value` as the model does; None if that contradicts `out`, the
    /// outcome the client saw (None if it saw none).
    fn step(&mut self, value: Val, op: ModelOp, out: Option<ModelOut>) -> Option<Val> {
        let (after, model_out) = match op {
            ModelOp::Get => (value, ModelOut::Get(value)),
            ModelOp::Put(new) => (new, ModelOut::Put),
            ModelOp::Delete => (ABSENT, ModelOut::Delete(value != ABSENT)),
            ModelOp::Cas { expected, new } => {
                let swapped = value == expected;
                let model_out = ModelOut::Cas { swapped, current: value };
                (if swapped { new } else { value }, model_out)
            }
            ModelOp::Incr(delta) => {
                let result = self.values.as_int(value).and_then(|n| n.checked_add(delta));
                // Check the outcome before interning, so wrong guesses create no values.
                if out.is_some_and(|out| out != ModelOut::Incr(result)) {
                    return None;
                }
                return Some(result.map_or(value, |n| self.values.intern_int(n)));
            }
        };
        match out {
            Some(out) if out != model_out => None,
            _ => Some(after),
        }
    }

    /// Where the candidates for the next linearization point are, in the current state:
    /// (first pending known op, bound, end). A known op can go next iff it is pending, in
    /// `first..end`, and invoked by `bound`, the earliest completion of a pending known op;
    /// an unknown op iff it is pending and invoked by `bound`. (Ops that touch at an instant
    /// count as concurrent.)
    fn window(&self, problem: &Problem) -> (usize, u64, usize) {
        let known = &problem.known;
        let first = self
            .known_bits
            .iter()
            .position(|&word| word != u64::MAX)
            .map_or(known.len(), |w| w * 64 + (!self.known_bits[w]).trailing_zeros() as usize)
            .min(known.len());
        let mut bound = u64::MAX;
        let mut end = first;
        // Pending ops invoked after the bound complete after it, so they cannot lower it.
        while end < known.len() && known[end].invoked <= bound {
            if !has_bit(&self.known_bits, end) {
                bound = bound.min(known[end].completed);
            }
            end += 1;
        }
        (first, bound, end)
    }

    /// Records the current state in the memo; false if it needn't be explored.
    fn visit(&mut self) -> bool {
        let new = self.memo.visit(self.known_hash, &self.known_bits, self.value, &self.unknown_bits);
        self.explored += u64::from(new);
        new
    }

    fn toggle_known(&mut self, i: usize) {
        flip_bit(&mut self.known_bits, i);
        self.known_hash ^= tag(i);
    }

    fn note_progress(&mut self) {
        if self.known_done <= self.best.known_done {
            return;
        }
        let mut tail: Vec<Step> =
            self.stack.iter().filter_map(|node| node.via.map(|(step, _)| step)).collect();
        tail.drain(..tail.len().saturating_sub(CONTEXT_LIMIT));
        self.best = Best {
            known_done: self.known_done,
            known: self.known_bits.clone(),
            unknown: self.unknown_bits.clone(),
            value: self.value,
            tail,
        };
    }

    fn save(&self, first: usize, end: usize, after_unknown: bool) -> Saved {
        // Linearized known ops are all before `end`: each was a candidate under a bound no
        // later than the current one.
        Saved {
            lo: first,
            extra: (first..end).filter(|&i| has_bit(&self.known_bits, i)).collect(),
            known_hash: self.known_hash,
            unknown: self.unknown_bits.clone().into_boxed_slice(),
            value: self.value,
            after_unknown,
        }
    }

    fn restore(&mut self, saved: &Saved) {
        self.known_bits.fill(0);
        for i in 0..saved.lo / 64 {
            self.known_bits[i] = u64::MAX;
        }
        for i in (saved.lo / 64 * 64..saved.lo).chain(saved.extra.iter().copied()) {
            flip_bit(&mut self.known_bits, i);
        }
        self.known_hash = saved.known_hash;
        self.unknown_bits.copy_from_slice(&saved.unknown);
        self.value = saved.value;
        self.known_done = saved.lo + saved.extra.len();
    }
}

fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

fn show_opt(bytes: &Option<Vec<u8>>) -> String {
    bytes.as_deref().map_or_else(|| "absent".to_owned(), show_bytes)
}

/// One event on one line: who, what, what it returned, and when.
fn describe(event: &Event) -> String {
    let op = match &event.op {
        Op::Get { key } => format!("get {key:?}"),
        Op::Put { key, value } => format!("put {key:?} = {}", show_bytes(value)),
        Op::Delete { key } => format!("delete {key:?}"),
        Op::Cas { key, expected, new } => {
            format!("cas {key:?} from {} to {}", show_opt(expected), show_bytes(new))
        }
        Op::Incr { key, delta } => format!("incr {key:?} by {delta}"),
    };
    let outcome = match &event.outcome {
        Outcome::Get(value) => show_opt(value),
        Outcome::Put => "ok".to_owned(),
        Outcome::Delete { existed } => format!("existed={existed}"),
        Outcome::Cas { swapped, current } => {
            format!("swapped={swapped} current={}", show_opt(current))
        }
        Outcome::Incr(Ok(n)) => format!("Ok({n})"),
        Outcome::Incr(Err(())) => "Err".to_owned(),
        Outcome::Unknown => "unknown".to_owned(),
    };
    let completed = event.completed.map_or_else(|| "never".to_owned(), |t| format!("{t}ns"));
    format!("[{}ns .. {completed}] client {:?}: {op} -> {outcome}", event.invoked, event.client)
}
