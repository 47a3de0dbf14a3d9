//! Where the client and admin commands find the group: `--endpoints`, else
//! TANDEM_ENDPOINTS, else the endpoints a running `tandem up` wrote into its directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tandem_operator::local::{self, StateFile};
use tandem_replica::tls::{self, Identity, Material};
use tandem_replica::wire::ClientCredentials;

#[derive(Debug, Clone, Args)]
pub struct EndpointArgs {
    /// Replica addresses (host:port, comma-separated); the configuration names the rest.
    #[arg(long, short = 'e', env = "TANDEM_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// The directory of a running `tandem up`, used when no endpoints are given.
    #[arg(long, env = "TANDEM_DIR", default_value = ".tandem", global = true)]
    pub dir: PathBuf,
    /// The group's CA (PEM), for a group whose client ports serve TLS (default: DIR/tls/ca.crt
    /// when the `tandem up` in DIR runs with --client-tls).
    #[arg(long, env = "TANDEM_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// A file holding the group's client token (default: DIR/client-token when the
    /// `tandem up` in DIR runs with --client-token).
    #[arg(long, env = "TANDEM_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

impl EndpointArgs {
    pub fn resolve(&self) -> anyhow::Result<Vec<String>> {
        if !self.endpoints.is_empty() {
            return Ok(self.endpoints.clone());
        }
        // The group of the `tandem up` in DIR: speak to it as its manager.
        self.use_local_identity()?;
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

    /// The running local system's state file; this process then speaks on the
    /// group's internal plane as its manager (see `use_local_identity`).
    pub fn local_state(&self) -> anyhow::Result<StateFile> {
        let state = StateFile::read(&self.dir).with_context(|| {
            format!("no running `tandem up` found in {} (start one, or pass --dir)", self.dir.display())
        })?;
        self.use_local_identity()?;
        Ok(state)
    }

    /// What a client needs for this group's client ports: `--ca-file` and
    /// `--token-file`, else what the `tandem up` in DIR made, if it asks for them.
    pub fn credentials(&self) -> anyhow::Result<ClientCredentials> {
        let security = StateFile::read(&self.dir).map(|s| s.security).unwrap_or_default();
        let ca = match (&self.ca_file, security.client_tls) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(self.dir.join("tls").join(tls::CA_FILE)),
            (None, false) => None,
        };
        let ca = ca
            .map(|path| {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the CA {}", path.display()))
            })
            .transpose()?;
        let token = match (&self.token_file, security.client_token) {
            (Some(path), _) => Some(crate::replica::read_token(path)?),
            (None, true) => Some(crate::replica::read_token(&self.dir.join(local::CLIENT_TOKEN_FILE))?),
            (None, false) => None,
        };
        Ok(ClientCredentials { ca, token })
    }

    /// Takes the manager's certificate that `tandem up` keeps in DIR/tls/manager, when
    /// there is one and no --tls-dir was given: the administrator of a local group is
    /// whoever can read its directory.
    pub fn use_local_identity(&self) -> anyhow::Result<()> {
        use_identity(&manager_tls(&self.dir), false)
    }
}

/// Installs the certificate in `dir`, waiting up to `limit` for its files to appear.
pub async fn wait_for_identity(dir: &Path, limit: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let key = dir.join(tls::KEY_FILE);
    if !key.exists() && !limit.is_zero() {
        tracing::info!(dir = %dir.display(), "waiting for this process's certificate");
    }
    while !key.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    use_identity(dir, true)
}

/// Where `tandem up` keeps the manager's certificate of the group in `dir`.
pub fn manager_tls(dir: &Path) -> PathBuf {
    dir.join("tls").join(Identity::Manager.file_name())
}

/// Installs the certificate in `dir` as this process's internal-plane identity, unless
/// one is installed already; `required`: a missing directory is an error.
pub fn use_identity(dir: &Path, required: bool) -> anyhow::Result<()> {
    if tls::installed().is_some() || (!required && !dir.exists()) {
        return Ok(());
    }
    let material =
        Material::load(dir).with_context(|| format!("cannot use the certificate in {}", dir.display()))?;
    tls::install(material)?;
    Ok(())
}
