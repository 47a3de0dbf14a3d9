//! Where the client commands find the group: `--endpoints`, else TANDEM_ENDPOINTS.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct EndpointArgs {
    /// Replica addresses (host:port, comma-separated); the configuration names the rest.
    #[arg(long, short = 'e', env = "TANDEM_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
}

impl EndpointArgs {
    pub fn resolve(&self) -> anyhow::Result<Vec<String>> {
        if self.endpoints.is_empty() {
            anyhow::bail!("no endpoints: pass --endpoints host:port,... or set TANDEM_ENDPOINTS");
        }
        Ok(self.endpoints.clone())
    }
}
