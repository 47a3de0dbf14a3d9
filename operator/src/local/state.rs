//! What `tandem up` keeps in its directory, each file written whole or not at all
//! (written beside, then renamed over):
//! - `up.json`: where the RM's API and the GFD are, and each replica's address and
//!   processes (pid and start time), for `tandem status`, `set`, `chaos` and for the
//!   next `tandem up` to adopt them;
//! - `endpoints`: the replicas' addresses, comma-separated, for the client commands;
//! - `rm.json`: the RM's record (spec, configuration, each member's join epoch and
//!   incarnation), written before any replica hears of a new configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LocalError;
use super::supervisor::ProcessId;
use crate::crd::ConfigurationStatus;
use crate::rm::{Durability, Record, Spec};
use crate::status::{configuration_status, record_from_configuration};

/// Writes `contents` to `path` atomically: a reader sees the old file or the new one,
/// never a part.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

/// What `tandem status`, `set` and `chaos` read to find a running local system.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateFile {
    pub manager: String,
    pub gfd: String,
    pub gfd_pid: Option<u32>,
    #[serde(default)]
    pub gfd_started: Option<u64>,
    pub replicas: BTreeMap<String, ReplicaEntry>,
    /// How the planes are secured: a `tandem up` adopting this group must match it.
    #[serde(default)]
    pub security: Security,
}

/// Mutual TLS on the internal plane; TLS and a token on the client port.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Security {
    pub tls: bool,
    pub client_tls: bool,
    pub client_token: bool,
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flag = |on: bool, name: &str| if on { format!(" {name}") } else { String::new() };
        write!(
            f,
            "{}{}{}",
            if self.tls { "mutual TLS inside" } else { "plaintext inside (--no-tls)" },
            flag(self.client_tls, "--client-tls"),
            flag(self.client_token, "--client-token")
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaEntry {
    pub address: String,
    pub pid: Option<u32>,
    #[serde(default)]
    pub pid_started: Option<u64>,
    pub lfd_pid: Option<u32>,
    #[serde(default)]
    pub lfd_started: Option<u64>,
}

fn process(pid: Option<u32>, started: Option<u64>) -> Option<ProcessId> {
    Some(ProcessId { pid: pid?, started: started? })
}

impl ReplicaEntry {
    /// The replica's process, as recorded (check `alive()` before signalling it).
    pub fn process(&self) -> Option<ProcessId> {
        process(self.pid, self.pid_started)
    }

    pub fn lfd_process(&self) -> Option<ProcessId> {
        process(self.lfd_pid, self.lfd_started)
    }

    pub fn set_process(&mut self, id: Option<ProcessId>) {
        (self.pid, self.pid_started) = (id.map(|p| p.pid), id.map(|p| p.started));
    }

    pub fn set_lfd_process(&mut self, id: Option<ProcessId>) {
        (self.lfd_pid, self.lfd_started) = (id.map(|p| p.pid), id.map(|p| p.started));
    }
}

impl StateFile {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("up.json")
    }

    pub fn read(dir: &Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(Self::path(dir)).ok()?).ok()
    }

    pub fn gfd_process(&self) -> Option<ProcessId> {
        process(self.gfd_pid, self.gfd_started)
    }

    pub fn set_gfd(&mut self, id: Option<ProcessId>) {
        (self.gfd_pid, self.gfd_started) = (id.map(|p| p.pid), id.map(|p| p.started));
    }

    /// Writes `up.json` and `endpoints`, each atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(&Self::path(dir), json.as_bytes())?;
        let endpoints: Vec<&str> = self.replicas.values().map(|r| r.address.as_str()).collect();
        write_atomically(&dir.join("endpoints"), endpoints.join(",").as_bytes())
    }
}

/// The RM's record on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SavedRecord {
    pub replicas: u32,
    pub mode: String,
    pub heartbeat_interval_ms: u64,
    pub failure_threshold: u32,
    pub checkpoint_interval_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<ConfigurationStatus>,
    #[serde(default)]
    pub epoch_floor: u64,
    #[serde(default)]
    pub failovers: u64,
    /// A record from before durability was a group in memory.
    #[serde(default = "memory")]
    pub durability: String,
}

fn memory() -> String {
    Durability::Memory.to_string()
}

impl SavedRecord {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("rm.json")
    }

    /// The saved record, if there is one. An unreadable one is an error: starting a
    /// new group over it could hand out an epoch twice.
    pub fn read(dir: &Path) -> Result<Option<Self>, LocalError> {
        let bad = |source: std::io::Error| LocalError::BadRecord { path: Self::path(dir), source };
        match std::fs::read_to_string(Self::path(dir)) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| bad(e.into())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(bad(error)),
        }
    }

    pub fn of(spec: &Spec, record: &Record) -> Self {
        Self {
            replicas: spec.replicas,
            mode: spec.mode.to_string(),
            heartbeat_interval_ms: spec.heartbeat_interval_ms,
            failure_threshold: spec.failure_threshold,
            checkpoint_interval_ms: spec.checkpoint_interval_ms,
            configuration: configuration_status(record),
            epoch_floor: record.epoch_floor,
            failovers: record.failovers,
            durability: spec.durability.to_string(),
        }
    }

    /// The spec it was running with (what `tandem set` changed survives a restart).
    pub fn spec(&self, given: &Spec) -> Spec {
        Spec {
            replicas: self.replicas,
            mode: self.mode.parse().unwrap_or(given.mode),
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            failure_threshold: self.failure_threshold,
            checkpoint_interval_ms: self.checkpoint_interval_ms,
            recreate_lost_epoch: None,
            durability: self.durability.parse().unwrap_or(given.durability),
        }
    }

    pub fn record(&self) -> Record {
        let mut record = record_from_configuration(self.configuration.as_ref());
        record.epoch_floor = self.epoch_floor;
        record.failovers = self.failovers;
        record
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(&Self::path(dir), json.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_replica::pb::{self, Mode};

    #[test]
    fn the_record_survives_a_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("tandem-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut record = Record {
            config: Some(pb::Configuration {
                epoch: 7,
                mode: Mode::Active.into(),
                primary: "r2".into(),
                members: vec![pb::Member { id: "r2".into(), address: "127.0.0.1:7112".into() }],
            }),
            failovers: 3,
            epoch_floor: 4,
            ..Record::default()
        };
        record.joined_epoch.insert("r2".into(), 6);
        record.incarnations.insert("r2".into(), "abc".into());
        let spec = Spec { replicas: 5, mode: Mode::Active, ..Spec::default() };
        SavedRecord::of(&spec, &record).write(&dir).expect("write");
        let read = SavedRecord::read(&dir).expect("readable").expect("present");
        assert_eq!(read.record(), record);
        assert_eq!(read.spec(&Spec::default()), spec);
        std::fs::write(SavedRecord::path(&dir), "{ torn").expect("write");
        assert!(SavedRecord::read(&dir).is_err(), "a torn record is an error, not a new group");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
