//! Issue 10: a durable group survives the loss of every process at once. A real
//! `tandem up` (fsync durability, the default) under a writing workload; kill -9 of
//! every process (`tandem up`, the GFD, every replica and LFD); `tandem up` again on the
//! same directory. Every acknowledged write must be there, the history across the
//! restart linearizable, no increment applied twice, digests equal, and the group back
//! to full strength within a bound. Then the same with one replica's log tail cut off
//! and another's corrupted: they recover what they can verify and catch up from peers.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::local::LocalSystem;
use support::workload::{self, Recorder, Workload};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

/// From `tandem up`'s restart to a whole group: the RM restarts every replica, each
/// recovers from its disk, and the group resumes in a new epoch.
const BACK_WITHIN: Duration = Duration::from_secs(60);

/// The newest write-ahead log segment of a replica's data directory.
fn newest_segment(data_dir: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(data_dir.join("wal"))
        .expect("the replica has a log")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

/// Where each frame of a log segment starts (a frame: length u32 LE, crc32 u32 LE,
/// payload).
fn frame_starts(bytes: &[u8]) -> Vec<u64> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        starts.push(at as u64);
        at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    }
    starts
}

/// What is killed.
enum Outage {
    /// Every process, `tandem up` included (a power cut).
    Everything,
    /// Every replica, while the RM runs on and sees them go one by one.
    Replicas,
    /// `tandem up` stopped with Ctrl-C (SIGTERM): it stops everything it started.
    Stopped,
}

enum Damage {
    None,
    /// One replica's log loses its last bytes; another's gets a flipped byte near its end.
    CutAndCorrupt,
}

async fn everything_killed_and_restarted(mode: &str, damage: Damage) {
    killed_and_restarted(mode, Outage::Everything, damage).await;
}

async fn killed_and_restarted(mode: &str, outage: Outage, damage: Damage) {
    let mut system = LocalSystem::start(3, &["--mode", mode]).await;
    let recorder = Recorder::new();
    let stop = CancellationToken::new();
    let writers =
        workload::start(Workload::default(), system.endpoints(), Arc::clone(&recorder), stop.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while recorder.acked().len() < 60 {
        assert!(tokio::time::Instant::now() < deadline, "the workload made no progress");
        sleep(Duration::from_millis(20)).await;
    }
    let epoch = system.configuration().await.epoch;
    let acked_before = recorder.acked().len();

    match outage {
        Outage::Everything => system.kill_everything().await,
        Outage::Replicas => {
            for id in ["r1", "r2", "r3"] {
                system.signal_replica(id, nix::sys::signal::Signal::SIGKILL);
            }
        }
        Outage::Stopped => system.stop_up().await,
    }
    if let Damage::CutAndCorrupt = damage {
        // r1 loses its last two records (cut inside the one before last); r2's last
        // record gets a flipped byte.
        let cut = newest_segment(&system.data_dir("r1"));
        let starts = frame_starts(&std::fs::read(&cut).expect("segment"));
        assert!(starts.len() >= 2, "r1 wrote too little to cut: {starts:?}");
        let file = std::fs::OpenOptions::new().write(true).open(&cut).expect("open");
        file.set_len(starts[starts.len() - 2] + 5).expect("cut the tail");
        let corrupt = newest_segment(&system.data_dir("r2"));
        let mut bytes = std::fs::read(&corrupt).expect("segment");
        let last = *frame_starts(&bytes).last().expect("a record") as usize;
        bytes[last + 9] ^= 0xff;
        std::fs::write(&corrupt, &bytes).expect("corrupt the tail");
    }
    if matches!(outage, Outage::Everything | Outage::Stopped) {
        system.start_up();
    }
    // Back: the RM resumed the group in a new epoch, and it is whole.
    system
        .wait_for(BACK_WITHIN, "resumed", |d| d.configuration.as_ref().is_some_and(|c| c.epoch > epoch))
        .await;
    system.wait_healthy(3, BACK_WITHIN).await;
    let output = system.output();
    assert!(output.contains("recovered from disk"), "tandem up never said it recovered:\n{output}");
    if let Damage::CutAndCorrupt = damage {
        let logs = std::fs::read_to_string(system.dir().join("logs").join("r1.log")).unwrap_or_default()
            + &std::fs::read_to_string(system.dir().join("logs").join("r2.log")).unwrap_or_default();
        let cuts = logs.lines().filter(|l| l.contains("recovered with damage")).count();
        assert_eq!(cuts, 2, "both damaged replicas report what they cut:\n{logs}");
    }
    // The group takes writes again, then everything is checked across the restart.
    let resumed = recorder.acked().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while recorder.acked().len() < resumed + 30 {
        assert!(tokio::time::Instant::now() < deadline, "no writes acknowledged after the restart");
        sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{acked_before} writes acknowledged before the outage, {} in all", recorder.acked().len());
    system.verify(&recorder, stop, writers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passive_every_process_killed_at_once_loses_nothing() {
    everything_killed_and_restarted("passive", Damage::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_every_process_killed_at_once_loses_nothing() {
    everything_killed_and_restarted("active", Damage::None).await;
}

/// The README's promise: Ctrl-C, then `tandem up` again on the same directory, and the
/// group resumes with every acknowledged write (a stop once deleted the RM's record, and
/// the next `tandem up` started a new group that could not serve the data on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_with_ctrl_c_and_started_again_loses_nothing() {
    killed_and_restarted("passive", Outage::Stopped, Damage::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_killed_while_the_rm_runs_loses_nothing() {
    killed_and_restarted("active", Outage::Replicas, Damage::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_and_a_corrupted_log_tail_recover_from_peers() {
    everything_killed_and_restarted("passive", Damage::CutAndCorrupt).await;
}
