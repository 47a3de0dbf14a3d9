//! Partitions on loopback, for the nemesis and the tests: iptables rules in a chain of
//! this process's own (`TANDEM-NEMESIS-<pid>`, jumped to from OUTPUT), so that healing
//! is flushing the chain and cleaning up is deleting it, whatever happens. Chains that
//! a killed process left behind are removed at start. Needs root and iptables.

use std::process::Command;

pub struct Firewall {
    chain: String,
}

fn iptables(args: &[&str]) -> Result<(), String> {
    let output = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

const PREFIX: &str = "TANDEM-NEMESIS-";

impl Firewall {
    /// A chain of this process's, jumped to from OUTPUT. Err: why partitions cannot be
    /// done here (not root, no iptables).
    pub fn new() -> Result<Self, String> {
        remove_leftovers();
        let chain = format!("{PREFIX}{}", std::process::id());
        iptables(&["-N", &chain])?;
        if let Err(error) = iptables(&["-I", "OUTPUT", "1", "-j", &chain]) {
            let _ = iptables(&["-X", &chain]);
            return Err(error);
        }
        Ok(Self { chain })
    }

    /// No packet between the addresses `a` and `b`, either way.
    pub fn cut(&self, a: &str, b: &str) -> Result<(), String> {
        iptables(&["-A", &self.chain, "-s", a, "-d", b, "-j", "DROP"])?;
        iptables(&["-A", &self.chain, "-s", b, "-d", a, "-j", "DROP"])
    }

    /// No packet to or from `address`.
    pub fn isolate(&self, address: &str) -> Result<(), String> {
        iptables(&["-A", &self.chain, "-s", address, "-j", "DROP"])?;
        iptables(&["-A", &self.chain, "-d", address, "-j", "DROP"])
    }

    /// Every cut healed.
    pub fn heal(&self) -> Result<(), String> {
        iptables(&["-F", &self.chain])
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}

/// Deletes the chains of nemesis runs that are gone.
fn remove_leftovers() {
    let Ok(output) = Command::new("iptables").args(["-w", "-S"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(chain) = line.strip_prefix("-N ").filter(|c| c.starts_with(PREFIX)) else { continue };
        let alive = chain[PREFIX.len()..]
            .parse::<u32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = iptables(&["-D", "OUTPUT", "-j", chain]);
            let _ = iptables(&["-F", chain]);
            let _ = iptables(&["-X", chain]);
        }
    }
}
