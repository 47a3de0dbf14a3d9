//! The load driver every throughput bench shares: C clients of one system (a `Target`
//! each: Tandem's client library, an etcd client, a client of the no-op service), each
//! with one request in flight, putting a fixed value under unique keys and, with a
//! read share, reading keys it wrote. It runs for a fixed time, up to a number of
//! writes, or until stopped; latency goes into an HDR histogram, and optionally every
//! request's (completion, latency) into a bounded timeline for a plot. A progress line
//! goes to stderr each second. The same driver, at the same concurrency, for every
//! system compared.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use tandem_replica::client::{Client, ClientSettings, Connections};
use tandem_replica::wire::ClientCredentials;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One client of a system: a session of its own, one request at a time.
pub trait Target: Send + 'static {
    /// Writes `value` under `key`; returns once the system acknowledged it.
    fn put(&mut self, key: String, value: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Reads `key` (linearizably, where the system offers a choice).
    fn get(&mut self, key: String) -> impl Future<Output = anyhow::Result<Option<Bytes>>> + Send;
}

impl Target for Client {
    async fn put(&mut self, key: String, value: Bytes) -> anyhow::Result<()> {
        Ok(Client::put(self, &key, value).await?)
    }

    async fn get(&mut self, key: String) -> anyhow::Result<Option<Bytes>> {
        Ok(Client::get(self, &key).await?)
    }
}

/// `clients` sessions of Tandem's client library sharing their connections, as the
/// sessions of one program do (their requests to a replica travel in batches).
pub fn tandem_clients(endpoints: &[String], clients: u32) -> anyhow::Result<Vec<Client>> {
    let connections = Connections::new(ClientCredentials::default());
    (0..clients)
        .map(|_| {
            Client::with_connections(ClientSettings::new(endpoints.to_vec()), connections.clone())
                .context("cannot make a Tandem client")
        })
        .collect()
}

/// What the clients send.
#[derive(Debug, Clone)]
pub struct Shape {
    pub value: Bytes,
    /// Share of reads, 0..=100; a read asks for a key the same client wrote.
    pub read_percent: u32,
    /// Keys are `<prefix>/<n>`, n unique across the clients of one load.
    pub prefix: String,
    /// Stop once this many writes were sent (None: run until stopped).
    pub writes: Option<u64>,
    /// Keep every request's (completion, latency) (`Run::timeline`).
    pub timeline: bool,
    /// Print progress on stderr each second, under this label.
    pub progress: Option<String>,
}

impl Shape {
    /// Unique-key writes of `value` until stopped, no timeline, no progress.
    pub fn writes(value: Bytes, prefix: impl Into<String>) -> Self {
        Self { value, read_percent: 0, prefix: prefix.into(), writes: None, timeline: false, progress: None }
    }
}

/// One acknowledged request on a timeline: µs from the load's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub done_us: u64,
    pub latency_us: u64,
}

/// What a load did.
pub struct Run {
    /// Latency of every acknowledged request, µs.
    pub histogram: Histogram<u64>,
    pub errors: u64,
    /// Reads of a key the client had written that found nothing (none should).
    pub read_misses: u64,
    /// The first errors, for a message.
    pub first_errors: Vec<String>,
    /// From the start signal to the last client's stop.
    pub elapsed: Duration,
    /// Acknowledged requests by completion time (when `Shape::timeline`), at most
    /// `TIMELINE_OPS` of them.
    pub timeline: Vec<Op>,
}

/// Latency percentiles, ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// From a histogram of µs; zeros when it is empty.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if histogram.is_empty() {
            return Self { p50_ms: 0.0, p99_ms: 0.0, p999_ms: 0.0, max_ms: 0.0 };
        }
        Self {
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

impl Run {
    pub fn ops(&self) -> u64 {
        self.histogram.len()
    }

    pub fn ops_per_s(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    pub fn latency(&self) -> Latency {
        Latency::of(&self.histogram)
    }

    /// `ops=… ops_per_s=… p50_ms=… p99_ms=… p999_ms=… max_ms=… errors=… read_misses=…
    /// seconds=…`.
    pub fn words(&self) -> String {
        let latency = self.latency();
        format!(
            "ops={} ops_per_s={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} errors={} read_misses={} seconds={:.1}",
            self.ops(),
            self.ops_per_s(),
            latency.p50_ms,
            latency.p99_ms,
            latency.p999_ms,
            latency.max_ms,
            self.errors,
            self.read_misses,
            self.elapsed.as_secs_f64()
        )
    }

    /// The first errors on stderr, if any.
    pub fn print_errors(&self, label: &str) {
        for error in &self.first_errors {
            eprintln!("{label}: failed request: {error}");
        }
    }
}

/// Timeline entries kept across all clients of a load (16 bytes each).
pub const TIMELINE_OPS: usize = 1 << 20;

/// The clients' first requests (connections, finding the leader) may take this long.
const WARMUP_LIMIT: Duration = Duration::from_secs(60);

/// After a failed request a client waits this long, so that a system that refuses at
/// once is not spun on.
const AFTER_ERROR: Duration = Duration::from_millis(10);

/// Keys a client remembers to read back.
const READABLE_KEYS: usize = 1024;

/// How many errors a client keeps the text of.
const KEPT_ERRORS: usize = 3;

/// "None yet" in the atomics holding a time.
const NEVER: u64 = u64::MAX;

/// What the clients and the driver share.
struct Shared {
    origin: Instant,
    next: AtomicU64,
    stopped: AtomicBool,
    acked: AtomicU64,
    errors: AtomicU64,
    /// µs from the origin: requests sent after this count for `resumed` (NEVER: none).
    watch_from_us: AtomicU64,
    /// µs from the origin: the first of those acknowledged.
    resumed_us: AtomicU64,
    warmup_error: Mutex<Option<String>>,
}

impl Shared {
    fn since_origin(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }
}

/// A load under way.
pub struct Load {
    shared: Arc<Shared>,
    clients: JoinSet<Outcome>,
    started: Instant,
    progress: CancellationToken,
}

/// What one client did.
#[derive(Default)]
struct Outcome {
    histogram: Option<Histogram<u64>>,
    errors: u64,
    read_misses: u64,
    first_errors: Vec<String>,
    timeline: Vec<Op>,
}

impl Load {
    /// Starts one client per target. Each first writes once, untimed (connections,
    /// finding the leader); the load starts when all have, and this returns then.
    pub async fn start<T: Target>(targets: Vec<T>, shape: Shape) -> anyhow::Result<Self> {
        anyhow::ensure!(!targets.is_empty(), "a load needs at least one client");
        anyhow::ensure!(shape.read_percent <= 100, "the read share is a percentage (0..=100)");
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            next: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            watch_from_us: AtomicU64::new(NEVER),
            resumed_us: AtomicU64::new(NEVER),
            warmup_error: Mutex::new(None),
        });
        let start = Arc::new(tokio::sync::Barrier::new(targets.len() + 1));
        let timeline_cap = (TIMELINE_OPS / targets.len()).max(2);
        let mut clients = JoinSet::new();
        for (c, target) in targets.into_iter().enumerate() {
            let (shared, start, shape) = (Arc::clone(&shared), Arc::clone(&start), shape.clone());
            clients.spawn(run_client(c, target, shared, start, shape, timeline_cap));
        }
        tokio::time::timeout(WARMUP_LIMIT, start.wait())
            .await
            .with_context(|| format!("the clients' first writes took longer than {WARMUP_LIMIT:?}"))?;
        let started = Instant::now();
        let warmup_error = shared.warmup_error.lock().expect("lock").take();
        let progress = CancellationToken::new();
        let load = Self { shared, clients, started, progress };
        if let Some(error) = warmup_error {
            load.stop().await?;
            anyhow::bail!("a client's first write failed: {error}");
        }
        if let Some(label) = shape.progress {
            tokio::spawn(report_progress(label, Arc::clone(&load.shared), started, load.progress.clone()));
        }
        Ok(load)
    }

    /// The instant the timeline's times count from.
    pub fn origin(&self) -> Instant {
        self.shared.origin
    }

    /// From now on, the first request sent after `after` and acknowledged is what
    /// `resumed` waits for (the system serving again after a fault at `after`).
    pub fn watch_from(&self, after: Instant) {
        self.shared.watch_from_us.store(NEVER, Ordering::SeqCst);
        self.shared.resumed_us.store(NEVER, Ordering::SeqCst);
        self.shared.watch_from_us.store(self.shared.since_origin(after), Ordering::SeqCst);
    }

    /// When the first request sent after `watch_from` was acknowledged; fails after
    /// `limit`.
    pub async fn resumed(&self, limit: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + limit;
        let from = self.shared.watch_from_us.load(Ordering::SeqCst);
        anyhow::ensure!(from != NEVER, "watch_from first");
        loop {
            let resumed = self.shared.resumed_us.load(Ordering::SeqCst);
            if resumed != NEVER && resumed >= from {
                self.shared.watch_from_us.store(NEVER, Ordering::SeqCst);
                return Ok(self.shared.origin + Duration::from_micros(resumed));
            }
            anyhow::ensure!(Instant::now() < deadline, "no request was acknowledged within {limit:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Runs for `duration`, then stops.
    pub async fn run_for(self, duration: Duration) -> anyhow::Result<Run> {
        tokio::time::sleep(duration).await;
        self.stop().await
    }

    /// Waits until the clients sent `Shape::writes` writes.
    pub async fn finish(self) -> anyhow::Result<Run> {
        self.collect().await
    }

    /// Each client stops before its next request.
    pub async fn stop(self) -> anyhow::Result<Run> {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.collect().await
    }

    async fn collect(mut self) -> anyhow::Result<Run> {
        let mut run = Run {
            histogram: new_histogram(),
            errors: 0,
            read_misses: 0,
            first_errors: Vec::new(),
            elapsed: Duration::ZERO,
            timeline: Vec::new(),
        };
        while let Some(client) = self.clients.join_next().await {
            let client = client.context("a client task failed")?;
            if let Some(histogram) = &client.histogram {
                run.histogram.add(histogram).context("merging latency histograms")?;
            }
            run.errors += client.errors;
            run.read_misses += client.read_misses;
            run.first_errors.extend(client.first_errors);
            run.timeline.extend(client.timeline);
        }
        run.elapsed = self.started.elapsed();
        run.first_errors.truncate(KEPT_ERRORS);
        run.timeline.sort_unstable_by_key(|op| op.done_us);
        self.progress.cancel();
        Ok(run)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.progress.cancel();
        self.shared.stopped.store(true, Ordering::Relaxed);
    }
}

/// Latencies of 1 µs to 10 min, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

async fn run_client<T: Target>(
    c: usize,
    mut target: T,
    shared: Arc<Shared>,
    start: Arc<tokio::sync::Barrier>,
    shape: Shape,
    timeline_cap: usize,
) -> Outcome {
    let warm = target.put(format!("{}/warmup/{c}", shape.prefix), shape.value.clone()).await;
    if let Err(error) = warm {
        shared.warmup_error.lock().expect("lock").get_or_insert_with(|| format!("{error:#}"));
    }
    start.wait().await;
    let mut done = Outcome { histogram: Some(new_histogram()), ..Outcome::default() };
    let histogram = done.histogram.as_mut().expect("just set");
    let mut timeline = shape.timeline.then(|| Timeline::new(timeline_cap));
    let mut written = std::collections::VecDeque::with_capacity(READABLE_KEYS);
    let limit = shape.writes.unwrap_or(u64::MAX);
    while !shared.stopped.load(Ordering::Relaxed) {
        let read =
            shape.read_percent > 0 && !written.is_empty() && rand::random_range(0..100) < shape.read_percent;
        let sent = Instant::now();
        let outcome = if read {
            let n = written[rand::random_range(0..written.len())];
            target.get(format!("{}/{n}", shape.prefix)).await.map(|found| {
                if found.is_none() {
                    done.read_misses += 1;
                }
            })
        } else {
            let n = shared.next.fetch_add(1, Ordering::Relaxed);
            if n >= limit {
                break;
            }
            target.put(format!("{}/{n}", shape.prefix), shape.value.clone()).await.map(|()| {
                if written.len() == READABLE_KEYS {
                    written.pop_front();
                }
                written.push_back(n);
            })
        };
        match outcome {
            Ok(()) => {
                let finished = Instant::now();
                let latency_us = finished.duration_since(sent).as_micros() as u64;
                histogram.saturating_record(latency_us.max(1));
                shared.acked.fetch_add(1, Ordering::Relaxed);
                let done_us = shared.since_origin(finished);
                if let Some(timeline) = &mut timeline {
                    timeline.push(Op { done_us, latency_us });
                }
                let watch = shared.watch_from_us.load(Ordering::SeqCst);
                if watch != NEVER && shared.since_origin(sent) > watch {
                    shared.resumed_us.fetch_min(done_us, Ordering::SeqCst);
                }
            }
            Err(error) => {
                done.errors += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if done.first_errors.len() < KEPT_ERRORS {
                    done.first_errors.push(format!("{error:#}"));
                }
                tokio::time::sleep(AFTER_ERROR).await;
            }
        }
    }
    done.timeline = timeline.map(Timeline::into_ops).unwrap_or_default();
    done
}

/// Once a second until `stop`: elapsed time, requests so far, rate over the last second.
async fn report_progress(label: String, shared: Arc<Shared>, started: Instant, stop: CancellationToken) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_acked, mut last_at) = (0, started);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (acked, now) = (shared.acked.load(Ordering::Relaxed), Instant::now());
        let rate = (acked - last_acked) as f64 / now.duration_since(last_at).as_secs_f64().max(1e-3);
        let line = format!(
            "{label}: {:.0} s, {acked} ops, {rate:.0} ops/s, {} errors",
            now.duration_since(started).as_secs_f64(),
            shared.errors.load(Ordering::Relaxed)
        );
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        (last_acked, last_at) = (acked, now);
    }
    if terminal {
        eprint!("\r\x1b[2K");
    }
}

/// Every request's (completion, latency), at most `cap` of them: when full, each two
/// neighbours merge into the slower one and later requests are kept one in 2^k (the
/// slowest of each group), so that a long run keeps its shape and its outliers.
struct Timeline {
    ops: Vec<Op>,
    cap: usize,
    /// Requests per kept entry.
    stride: usize,
    /// The slowest of the group being gathered, and how many it has.
    pending: Option<Op>,
    grouped: usize,
}

impl Timeline {
    fn new(cap: usize) -> Self {
        Self { ops: Vec::new(), cap: cap.max(2), stride: 1, pending: None, grouped: 0 }
    }

    fn push(&mut self, op: Op) {
        let slowest = match self.pending {
            Some(pending) if pending.latency_us >= op.latency_us => pending,
            _ => op,
        };
        self.grouped += 1;
        if self.grouped < self.stride {
            self.pending = Some(slowest);
            return;
        }
        self.ops.push(slowest);
        (self.pending, self.grouped) = (None, 0);
        if self.ops.len() >= self.cap {
            self.ops = self
                .ops
                .chunks(2)
                .map(|pair| *pair.iter().max_by_key(|op| op.latency_us).expect("chunks are not empty"))
                .collect();
            self.stride *= 2;
        }
    }

    fn into_ops(mut self) -> Vec<Op> {
        self.ops.extend(self.pending.take());
        self.ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram_in_ms() {
        let mut histogram = new_histogram();
        for us in 1..=1000 {
            histogram.record(us * 10).expect("in range");
        }
        let latency = Latency::of(&histogram);
        assert!((latency.p50_ms - 5.0).abs() < 0.01, "{latency:?}");
        assert!((latency.p99_ms - 9.9).abs() < 0.01, "{latency:?}");
        assert!((latency.p999_ms - 9.99).abs() < 0.01, "{latency:?}");
        assert!((latency.max_ms - 10.0).abs() < 0.01, "{latency:?}");
        assert_eq!(Latency::of(&new_histogram()).p99_ms, 0.0, "no request: zeros");
    }

    #[test]
    fn a_full_timeline_halves_and_keeps_the_slowest() {
        let mut timeline = Timeline::new(4);
        let slow = Op { done_us: 7, latency_us: 900 };
        for done_us in 0..20 {
            timeline.push(if done_us == 7 { slow } else { Op { done_us, latency_us: 10 } });
        }
        let ops = timeline.into_ops();
        assert!(ops.len() <= 4, "bounded: {ops:?}");
        assert!(ops.contains(&slow), "the outlier survives: {ops:?}");
        assert!(ops.windows(2).all(|w| w[0].done_us < w[1].done_us), "in order: {ops:?}");
        assert!(ops.last().is_some_and(|op| op.done_us >= 16), "covers the end: {ops:?}");
    }

    #[test]
    fn a_timeline_below_its_cap_keeps_everything() {
        let mut timeline = Timeline::new(100);
        for done_us in 0..50 {
            timeline.push(Op { done_us, latency_us: done_us });
        }
        assert_eq!(timeline.into_ops().len(), 50);
    }

    /// A target that acknowledges everything at once and remembers what it holds.
    #[derive(Default)]
    struct Memory(std::collections::HashMap<String, Bytes>);

    impl Target for Memory {
        async fn put(&mut self, key: String, value: Bytes) -> anyhow::Result<()> {
            self.0.insert(key, value);
            Ok(())
        }

        async fn get(&mut self, key: String) -> anyhow::Result<Option<Bytes>> {
            Ok(self.0.get(&key).cloned())
        }
    }

    #[tokio::test]
    async fn a_load_of_n_writes_sends_n_writes_and_reads_back_what_it_wrote() {
        let shape = Shape {
            writes: Some(500),
            read_percent: 50,
            timeline: true,
            ..Shape::writes(Bytes::from_static(b"v"), "k")
        };
        let run = Load::start((0..4).map(|_| Memory::default()).collect(), shape)
            .await
            .expect("start")
            .finish()
            .await
            .expect("finish");
        assert_eq!(run.errors, 0);
        assert_eq!(run.read_misses, 0, "each client reads only keys it wrote");
        assert!(run.ops() >= 500, "500 writes and the reads: {}", run.ops());
        assert_eq!(run.timeline.len() as u64, run.ops());
    }
}
