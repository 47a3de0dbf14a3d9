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

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
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

/// A channel for heartbeating the replica whose client address is `address` (the LFD,
/// the readiness probe): its internal port over mutual TLS when this process has an
/// identity (so it works whether or not the client port wants TLS or a token), else
/// its client port.
pub fn dial_replica_health(address: &str, local: Option<IpAddr>) -> Result<Channel, BadAddress> {
    match crate::tls::installed() {
        Some(_) => dial_internal(&internal_address(address)?, local),
        None => dial(address, local),
    }
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

/// Dials a client port that serves TLS with a certificate of the CA `ca` (PEM); no
/// client certificate.
pub fn dial_client_tls(ca: &str, address: &str, local: Option<IpAddr>) -> Result<Channel, BadAddress> {
    let bad = |reason: String| BadAddress { address: address.to_owned(), reason };
    let tls = tonic::transport::ClientTlsConfig::new()
        .domain_name(crate::tls::SERVER_NAME)
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    let endpoint = endpoint("https", address)?.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    Ok(tune(endpoint, local))
}

/// Dials `address` over mutual TLS with `tls` (a certificate other than this process's
/// own: a test speaking as a group's manager), or in plaintext without.
pub fn dial_with(
    tls: Option<&crate::tls::Material>,
    address: &str,
    local: Option<IpAddr>,
) -> Result<Channel, BadAddress> {
    let bad = |reason: String| BadAddress { address: address.to_owned(), reason };
    let mut endpoint = endpoint(if tls.is_some() { "https" } else { "http" }, address)?;
    if let Some(material) = tls {
        endpoint = endpoint.tls_config(material.client_config()).map_err(|e| bad(e.to_string()))?;
    }
    Ok(tune(endpoint, local))
}

/// `scheme://address`, refused unless it names a port.
fn endpoint(scheme: &str, address: &str) -> Result<Endpoint, BadAddress> {
    let bad = |reason: String| BadAddress { address: address.to_owned(), reason };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|e| bad(e.to_string()))?;
    if endpoint.uri().port_u16().is_none() {
        return Err(bad("no port".into()));
    }
    Ok(endpoint)
}

/// Every channel's timeouts and keepalives, lazily connected from `local`.
fn tune(endpoint: Endpoint, local: Option<IpAddr>) -> Channel {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .local_address(local)
        .connect_lazy()
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
    /// On the client plane: how to reach a group that requires TLS or a token.
    credentials: ClientCredentials,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// What a client needs for a group whose client port requires it: the CA that signed
/// the replicas' certificates (TLS to the client port), and the group's token.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// PEM of the group's CA; TLS to the client port when set.
    pub ca: Option<String>,
    pub token: Option<String>,
}

/// The metadata key of the client token (`authorization: Bearer <token>`).
pub const TOKEN_HEADER: &str = "authorization";

impl ClientCredentials {
    /// `message` as a request carrying the token, when there is one.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = self
            .token
            .as_ref()
            .and_then(|t| format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<_>>().ok())
        {
            request.metadata_mut().insert(TOKEN_HEADER, value);
        }
        request
    }
}

/// Whether `request` carries `token` (compared in constant time: a wrong guess tells
/// nothing of how close it was).
pub fn carries_token<T>(request: &tonic::Request<T>, token: &str) -> bool {
    let presented = request
        .metadata()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

impl Channels {
    /// Client-plane channels with `credentials` (TLS to the client port with their CA,
    /// their token on every call made through `credentials().request`).
    pub fn client(credentials: ClientCredentials) -> Self {
        Self { credentials, ..Self::default() }
    }

    pub fn credentials(&self) -> &ClientCredentials {
        &self.credentials
    }

    /// Internal-plane channels to replicas, named by their client addresses (what
    /// configurations hold); connections start from `local` (see `dial`).
    pub fn replicas_internal(local: Option<IpAddr>) -> Self {
        Self { plane: Plane::Internal, to_replicas: true, local, ..Self::default() }
    }

    pub fn get(&self, address: &str) -> Result<Channel, BadAddress> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = match (&self.credentials.ca, self.to_replicas) {
            (Some(ca), _) => dial_client_tls(ca, address, self.local)?,
            (None, true) => dial_on(self.plane, &internal_address(address)?, self.local)?,
            (None, false) => dial_on(self.plane, address, self.local)?,
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

/// Most connections one server (replica, GFD, RM API) keeps open at once. Real use is
/// far below: a client keeps one connection per replica, a replica one per peer, an LFD
/// one to its GFD, so thousands of clients still fit; each connection costs a socket and
/// some tens of KiB of HTTP/2 buffers, and a flood of them must not exhaust the process's
/// memory or file descriptors. Connections beyond it are closed as they come.
pub const MAX_CONNECTIONS: usize = 8192;
/// Calls (HTTP/2 streams) open at once on one connection: a client multiplexes all its
/// calls on one connection (a benchmark's hundreds of writers included); a peer that
/// opens streams and leaves them idle gets no further than this.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// A connection that sends nothing for this long is closed. Every server pings its
/// clients every `KEEPALIVE_INTERVAL` and a live HTTP/2 client answers each ping, so only
/// a dead peer, or one that connected and never spoke HTTP/2, stays this silent.
pub const SILENT_CONNECTION_LIMIT: Duration = Duration::from_secs(20);

/// The one server configuration of every Tandem service: keepalive pings (a client that
/// stopped answering, paused or cut off, loses its connection and the calls it left
/// waiting), and the per-connection stream limits. No overall call timeout: a checkpoint
/// stream takes minutes, and every handler bounds its own waits. On the internal plane,
/// mutual TLS with this process's identity when it has one (a client without a
/// certificate of the group cannot finish the handshake).
pub fn server(plane: Plane) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize);
    match plane.tls() {
        Some(material) => builder.tls_config(material.server_config()),
        None => Ok(builder),
    }
}

/// How many connections a server admits, and how long one may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub silent_limit: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self { max_connections: MAX_CONNECTIONS, silent_limit: SILENT_CONNECTION_LIMIT }
    }
}

/// Serves `incoming` with `router` until `shutdown`, then at most `SHUTDOWN_GRACE` more,
/// within the default `ConnectionLimits`.
pub async fn serve_until_shutdown(
    router: tonic::transport::server::Router,
    incoming: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    serve_limited(router, incoming, shutdown, ConnectionLimits::default()).await
}

/// `serve_until_shutdown` with explicit limits.
pub async fn serve_limited(
    router: tonic::transport::server::Router,
    incoming: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    limits: ConnectionLimits,
) -> Result<(), tonic::transport::Error> {
    let stopping = shutdown.clone();
    let server = router.serve_with_incoming_shutdown(admit(incoming, limits), shutdown.cancelled_owned());
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served,
        () = async {
            stopping.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// The connections `listener` accepts, each holding one of `limits.max_connections`
/// places until it closes; beyond that, a new connection is closed at once. An accept
/// error (out of file descriptors) pauses accepting briefly rather than spinning.
fn admit(
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
) -> impl futures::Stream<Item = Result<Admitted, std::io::Error>> {
    let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refused_since_warning = 0u64;
    let state = (listener, places, None::<tokio::time::Instant>, refused_since_warning);
    futures::stream::unfold(state, move |(listener, places, mut warned, mut refused)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match Arc::clone(&places).try_acquire_owned() {
                    Ok(place) => {
                        // tonic's own nodelay setting applies only to listeners it binds.
                        let _ = stream.set_nodelay(true);
                        let connection = Admitted::new(stream, place, limits.silent_limit);
                        return Some((Ok(connection), (listener, places, warned, refused)));
                    }
                    Err(_) => {
                        drop(stream);
                        refused += 1;
                        // One warning a second at most: a flood must not flood the log too.
                        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(%peer, refused, limit = limits.max_connections, "too many connections; closing new ones");
                            warned = Some(tokio::time::Instant::now());
                            refused = 0;
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot accept connections; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// An admitted connection: holds its place among `MAX_CONNECTIONS` until dropped, and
/// fails its reads once the peer has been silent for the limit (hyper then closes it).
pub struct Admitted {
    stream: tokio::net::TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
    silent_limit: Duration,
    silence: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Admitted {
    fn new(
        stream: tokio::net::TcpStream,
        place: tokio::sync::OwnedSemaphorePermit,
        silent_limit: Duration,
    ) -> Self {
        Self { stream, _place: place, silent_limit, silence: Box::pin(tokio::time::sleep(silent_limit)) }
    }
}

impl tokio::io::AsyncRead for Admitted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let until = tokio::time::Instant::now() + self.silent_limit;
                self.silence.as_mut().reset(until);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.silence.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer sent nothing for {} s", self.silent_limit.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Admitted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Admitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The protobuf codec of every Tandem service (build.rs names it for the generated code):
/// prost's, except that a message that does not decode is the sender's fault, answered
/// INVALID_ARGUMENT (prost's codec says INTERNAL, which reads as a bug of the receiver).
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(self.0.decoder())
    }
}

/// prost's decoder, with a malformed message reported as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, tonic::Status> {
        self.0.decode(buf).map_err(|status| {
            tonic::Status::invalid_argument(format!(
                "malformed protobuf: {} (the message does not decode as {}); nothing was done",
                status.message(),
                std::any::type_name::<U>().rsplit("::").next().unwrap_or("this call's message"),
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
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
    use bytes::{Buf, BufMut, Bytes};
    use tonic::codec::{EncodeBuf, Encoder};

    /// Sends its bytes as they are, as one gRPC message; takes any answer.
    #[derive(Debug, Clone, Default)]
    struct RawCodec;

    impl Encoder for RawCodec {
        type Item = Bytes;
        type Error = tonic::Status;

        fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            buf.put(item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = ();
        type Error = tonic::Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
            buf.advance(buf.remaining());
            Ok(Some(()))
        }
    }

    impl Codec for RawCodec {
        type Encode = Bytes;
        type Decode = ();
        type Encoder = Self;
        type Decoder = Self;

        fn encoder(&mut self) -> Self {
            Self
        }

        fn decoder(&mut self) -> Self {
            Self
        }
    }

    /// Calls `method` (`/package.Service/Method`) at `address` with `bytes` as the message.
    async fn call_raw(address: &str, method: &'static str, bytes: &'static [u8]) -> tonic::Status {
        let mut grpc = tonic::client::Grpc::new(dial(address, None).expect("address"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            // The server may still be starting.
            if grpc.ready().await.is_ok() {
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
                let answer = grpc.unary(tonic::Request::new(Bytes::from_static(bytes)), path, RawCodec).await;
                match answer {
                    Err(status) if status.code() == tonic::Code::Unavailable => {}
                    Err(status) => return status,
                    Ok(_) => panic!("{method} took garbage"),
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "{method}: no server at {address}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Issue 9: a message that does not decode was answered INTERNAL (prost's codec), as if
    /// the receiver had a bug. It is the sender's: INVALID_ARGUMENT, on every service.
    #[tokio::test]
    async fn malformed_protobuf_on_any_service_is_invalid_argument() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let replica = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let replica_address = replica.local_addr().expect("address");
        let mut settings = crate::node::ReplicaSettings::new("r1", replica_address);
        settings.bootstrap = true;
        let node = crate::node::Node::new(settings, shutdown.clone());
        let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let internal_address = internal.local_addr().expect("address").to_string();
        tokio::spawn(crate::server::serve(node, replica, internal));
        let gfd = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let gfd_address = gfd.local_addr().expect("address").to_string();
        let detector = crate::detector::service::Gfd::new(Default::default(), Default::default());
        tokio::spawn(crate::detector::service::serve_gfd(detector, gfd, shutdown.clone()));

        // Field 1 with wire type 7, which does not exist; then a varint that never ends.
        let garbage: &'static [u8] = b"\x0f\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff";
        let replica_address = replica_address.to_string();
        let calls = [
            (&replica_address, "/tandem.v1.Replica/Execute"),
            (&internal_address, "/tandem.v1.Replica/Execute"),
            (&internal_address, "/tandem.v1.Peer/Append"),
            (&internal_address, "/tandem.v1.Peer/InstallCheckpoint"),
            (&internal_address, "/tandem.v1.Control/InstallConfiguration"),
            (&gfd_address, "/tandem.v1.FaultDetector/UpdateDetectorSettings"),
            (&gfd_address, "/tandem.v1.FaultDetector/Members"),
        ];
        for (address, method) in calls {
            let status = call_raw(address, method, garbage).await;
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{method}: {status:?}");
            assert!(status.message().contains("malformed protobuf"), "{method}: {}", status.message());
        }
        shutdown.cancel();
    }

    /// Reads from a raw connection until the server closes it; false if it stays open
    /// past `limit`.
    async fn closed_within(socket: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                // The server's HTTP/2 preface and pings: it is still open.
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    /// Issue 9: limits on connections. Beyond the cap a new connection is closed at once;
    /// a connection that never speaks is closed after the silence limit, which frees its
    /// place; a real client is served throughout once there is room.
    #[tokio::test]
    async fn connections_beyond_the_cap_and_silent_ones_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
        let address = listener.local_addr().expect("address").to_string();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (_, health) = tonic_health::server::health_reporter();
        let limits = ConnectionLimits { max_connections: 2, silent_limit: Duration::from_millis(500) };
        let mut server = server(Plane::Client).expect("a plaintext server");
        tokio::spawn(serve_limited(server.add_service(health), listener, shutdown.clone(), limits));

        let connect = || tokio::net::TcpStream::connect(address.clone());
        let (mut first, mut second) = (connect().await.expect("first"), connect().await.expect("second"));
        let mut third = connect().await.expect("the kernel accepts; the server closes");
        assert!(closed_within(&mut third, Duration::from_secs(5)).await, "a third connection was kept");
        assert!(closed_within(&mut first, Duration::from_secs(10)).await, "a silent connection was kept");
        assert!(closed_within(&mut second, Duration::from_secs(10)).await, "a silent connection was kept");

        let mut client =
            tonic_health::pb::health_client::HealthClient::new(dial(&address, None).expect("address"));
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let answer = within(Duration::from_secs(10), client.check(request)).await;
        assert!(answer.is_ok(), "a real client once there is room: {answer:?}");
        shutdown.cancel();
    }

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
