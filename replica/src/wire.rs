//! The plumbing every layer shares: how to dial another process (one `dial`, with its
//! timeouts set on the Endpoint, and one cache of channels), the size limit of a gRPC
//! message, one way to bound a call in time, and the wall clock in unix milliseconds.
//! Two planes: clients dial a replica's client port in plaintext (`dial`); everything
//! else is internal and goes over mutual TLS when this process has an identity
//! (`dial_internal`, `Plane::Internal`; see `tls`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message a replica accepts: a maximal value plus its envelope, or one
/// batch of log entries.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// How long a connection attempt may take before the call fails (a refused connection
/// fails at once; a dropped SYN, e.g. a partition, waits this long).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// HTTP/2 pings on idle connections: a peer that stopped answering (paused, cut off)
/// has its connection closed after `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT`, so the next
/// call dials afresh instead of queueing on a dead connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad address {address:?}: {reason} (expected host:port)")]
pub struct BadAddress {
    pub address: String,
    pub reason: String,
}

/// A lazily connected channel to `address` (`host:port`). `local`: the source address
/// of the connections (a replica on its own loopback address dials from it, so a test
/// can cut the link between two replicas with a firewall rule).
pub fn dial(address: &str, local: Option<IpAddr>) -> Result<Channel, BadAddress> {
    dial_on(Plane::Client, address, local)
}

/// Like `dial`, on the internal plane: mutual TLS with this process's identity when it
/// has one (`tls::install`).
pub fn dial_internal(address: &str, local: Option<IpAddr>) -> Result<Channel, BadAddress> {
    dial_on(Plane::Internal, address, local)
}

/// Which of a replica's two ports a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Plane {
    /// Client requests (Execute, Status, Digest, health): open to any client.
    #[default]
    Client,
    /// Peers, the RM, the detectors: only holders of a certificate of the group.
    Internal,
}

impl Plane {
    fn tls(self) -> Option<&'static crate::tls::Material> {
        match self {
            Self::Client => None,
            Self::Internal => crate::tls::installed(),
        }
    }
}

pub fn dial_on(plane: Plane, address: &str, local: Option<IpAddr>) -> Result<Channel, BadAddress> {
    dial_with(plane.tls(), address, local)
}

/// Dials `address` over mutual TLS with `tls` (a certificate other than this process's
/// own: a test speaking as a group's manager), or in plaintext without.
pub fn dial_with(
    tls: Option<&crate::tls::Material>,
    address: &str,
    local: Option<IpAddr>,
) -> Result<Channel, BadAddress> {
    let bad = |reason: String| BadAddress { address: address.to_owned(), reason };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|e| bad(e.to_string()))?;
    if endpoint.uri().port_u16().is_none() {
        return Err(bad("no port".into()));
    }
    if let Some(material) = tls {
        endpoint = endpoint.tls_config(material.client_config()).map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .local_address(local)
        .connect_lazy())
}

/// A replica's internal port is its client port plus this, as Redis Cluster's bus port
/// is: every member address in a configuration stays the one clients use, and peers,
/// the RM and the detectors derive the internal one from it.
pub const INTERNAL_PORT_OFFSET: u16 = 10_000;

/// The internal address of the replica whose client address is `address`.
pub fn internal_address(address: &str) -> Result<String, BadAddress> {
    let bad = |reason: &str| BadAddress { address: address.to_owned(), reason: reason.to_owned() };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    let internal = port.checked_add(INTERNAL_PORT_OFFSET).ok_or_else(|| {
        bad("the internal port (client port + 10000) would be above 65535: choose a client port below 55536")
    })?;
    Ok(format!("{host}:{internal}"))
}

/// The internal socket address of a replica listening for clients on `listen`.
pub fn internal_listen(listen: std::net::SocketAddr) -> Result<std::net::SocketAddr, BadAddress> {
    let internal = internal_address(&listen.to_string())?;
    internal.parse().map_err(|_| BadAddress { address: internal, reason: "not a socket address".into() })
}

/// Channels by address, dialled once and shared (a channel multiplexes every call).
/// Clones share the cache.
#[derive(Debug, Default, Clone)]
pub struct Channels {
    plane: Plane,
    /// Addresses given are replicas' client addresses: dial their internal port.
    to_replicas: bool,
    local: Option<IpAddr>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    /// Internal-plane channels to replicas, named by their client addresses (what
    /// configurations hold); connections start from `local` (see `dial`).
    pub fn replicas_internal(local: Option<IpAddr>) -> Self {
        Self { plane: Plane::Internal, to_replicas: true, local, channels: Arc::default() }
    }

    pub fn get(&self, address: &str) -> Result<Channel, BadAddress> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = if self.to_replicas {
            dial_on(self.plane, &internal_address(address)?, self.local)?
        } else {
            dial_on(self.plane, address, self.local)?
        };
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Forgets channels to addresses not in `keep` (replicas that went away).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).retain(|address, _| keep(address));
    }
}

/// Runs `call` for at most `limit`; a timeout becomes DEADLINE_EXCEEDED.
pub async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!("no answer within {} ms", limit.as_millis())))
    })
}

/// How long a stopping server waits for open calls and connections before it closes
/// them: clients keep HTTP/2 connections open for good, so waiting for them would hold
/// a stopping process (a pod being deleted) until it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// A gRPC server's common settings; on the internal plane, mutual TLS with this
/// process's identity when it has one (a client without a certificate of the group
/// cannot finish the handshake).
pub fn server(plane: Plane) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // A client that stopped answering (paused, cut off) loses its connection, and
        // with it the calls it left waiting here.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    match plane.tls() {
        Some(material) => builder.tls_config(material.server_config()),
        None => Ok(builder),
    }
}

/// Serves `incoming` with `router` until `shutdown`, then at most `SHUTDOWN_GRACE` more.
pub async fn serve_until_shutdown(
    router: tonic::transport::server::Router,
    incoming: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let stopping = shutdown.clone();
    let server = router.serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(incoming),
        shutdown.cancelled_owned(),
    );
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served,
        () = async {
            stopping.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// Wall-clock time in unix milliseconds (what detectors and the RM put in messages and
/// status; timers use tokio's clock).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock time in unix microseconds.
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_without_a_port_is_refused_with_what_to_write() {
        let error = dial("localhost", None).expect_err("no port");
        assert!(error.to_string().contains("host:port"), "{error}");
        assert!(dial("127.0.0.1:7000", None).is_ok());
        assert!(dial("not a uri:1", None).is_err());
    }

    #[test]
    fn the_internal_port_is_the_client_port_plus_the_offset() {
        assert_eq!(internal_address("127.0.0.1:7011").as_deref(), Ok("127.0.0.1:17011"));
        assert_eq!(internal_address("kv-1.kv.default.svc:7101").as_deref(), Ok("kv-1.kv.default.svc:17101"));
        let error = internal_address("127.0.0.1:60000").expect_err("above 65535");
        assert!(error.to_string().contains("below 55536"), "{error}");
        assert!(internal_address("127.0.0.1").is_err());
    }
}
