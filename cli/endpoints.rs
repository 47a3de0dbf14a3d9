//! Where the client and admin commands find the group: `--endpoints`, else
//! TANDEM_ENDPOINTS, else the endpoints a running `tandem up` wrote into its directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tandem_operator::local::StateFile;

#[derive(Debug, Clone, Args)]
pub struct EndpointArgs {
    /// Replica addresses (host:port, comma-separated); the configuration names the rest.
    #[arg(long, short = 'e', env = "TANDEM_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// The directory of a running `tandem up`, used when no endpoints are given.
    #[arg(long, env = "TANDEM_DIR", default_value = ".tandem", global = true)]
    pub dir: PathBuf,
}

impl EndpointArgs {
    pub fn resolve(&self) -> anyhow::Result<Vec<String>> {
        if !self.endpoints.is_empty() {
            return Ok(self.endpoints.clone());
        }
        let written = std::fs::read_to_string(self.dir.join("endpoints")).unwrap_or_default();
        let endpoints: Vec<String> =
            written.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect();
        anyhow::ensure!(
            !endpoints.is_empty(),
            "no endpoints: pass --endpoints host:port,..., set TANDEM_ENDPOINTS, or start `tandem up` (which writes {})",
            self.dir.join("endpoints").display()
        );
        Ok(endpoints)
    }

    /// The running local system's state file.
    pub fn local_state(&self) -> anyhow::Result<StateFile> {
        StateFile::read(&self.dir).with_context(|| {
            format!("no running `tandem up` found in {} (start one, or pass --dir)", self.dir.display())
        })
    }
}
