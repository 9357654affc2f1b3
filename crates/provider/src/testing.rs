//! Misbehaving providers for the broker's end-to-end tests.
//!
//! Every server here is real: it listens on `127.0.0.1:0`, speaks mutual TLS with
//! the material it is given, and misbehaves on the wire, so the broker's deadline,
//! retry, circuit-breaker and record-validation paths are exercised for real.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lienthong::provider::v1::FetchRequest;
use lienthong_tls::{AcceptOptions, MtlsStream, ServerTls, incoming};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::kit::{FetchContext, FetchError, ProviderConfig, RecordSource, serve};

/// How a [`Faulty`] source behaves; switchable while its server runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Answers like the wrapped source.
    Healthy,
    /// Waits this long, then answers like the wrapped source (after the broker's deadline).
    Sleep(Duration),
    /// Answers a record violating any schema that requires the record's first
    /// field: that field is removed and the next one gets the wrong type.
    InvalidRecord,
    /// Answers `UNAVAILABLE`.
    Unavailable,
}

/// A [`RecordSource`] wrapper that misbehaves on demand.
///
/// Cloning shares the mode and the call counter, so a test keeps a clone to flip
/// the mode of a running server.
#[derive(Clone)]
pub struct Faulty {
    /// The source answering in `Healthy` and `Sleep` modes.
    pub inner: Arc<dyn RecordSource>,
    /// The current mode.
    pub mode: Arc<Mutex<FaultMode>>,
    /// Fetches received (after the kit's checks), for asserting retries.
    pub calls: Arc<AtomicU64>,
}

impl Faulty {
    /// Wraps `inner`, starting healthy.
    pub fn new(inner: Arc<dyn RecordSource>) -> Self {
        Faulty {
            inner,
            mode: Arc::new(Mutex::new(FaultMode::Healthy)),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Switches the mode; takes effect for the next fetch.
    pub fn set_mode(&self, mode: FaultMode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        self.mode.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Fetches received so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Breaks a record: drops its first field and gives the next one the wrong type.
fn corrupt(record: Value) -> Value {
    match record {
        Value::Object(map) => {
            let mut broken: serde_json::Map<String, Value> = map.into_iter().skip(1).collect();
            if let Some((_, value)) = broken.iter_mut().next() {
                *value = match value {
                    Value::Number(_) => json!("not a number"),
                    _ => json!(12345),
                };
            }
            Value::Object(broken)
        }
        // Whatever the schema says about fields, a record must be an object.
        _ => json!([]),
    }
}

#[async_trait::async_trait]
impl RecordSource for Faulty {
    fn record_types(&self) -> Vec<String> {
        self.inner.record_types()
    }

    async fn fetch(&self, ctx: FetchContext) -> Result<Value, FetchError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.mode() {
            FaultMode::Healthy => self.inner.fetch(ctx).await,
            FaultMode::Sleep(delay) => {
                tokio::time::sleep(delay).await;
                self.inner.fetch(ctx).await
            }
            FaultMode::InvalidRecord => self.inner.fetch(ctx).await.map(corrupt),
            FaultMode::Unavailable => Err(FetchError::Unavailable(
                "register is down for maintenance (injected fault)".to_owned(),
            )),
        }
    }
}

/// A `RecordProvider` answering every fetch with fixed bytes: JSON or not,
/// UTF-8 or not.
///
/// It bypasses the kit (which only answers serialised JSON values) and checks
/// no identity, to let tests feed the broker malformed answers.
#[derive(Clone)]
pub struct RawProvider {
    answer: Arc<Mutex<Vec<u8>>>,
    calls: Arc<AtomicU64>,
}

impl RawProvider {
    /// Answers `record_json` to every fetch.
    pub fn new(record_json: impl Into<Vec<u8>>) -> Self {
        RawProvider {
            answer: Arc::new(Mutex::new(record_json.into())),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Changes the answer for the next fetches.
    pub fn set_answer(&self, record_json: impl Into<Vec<u8>>) {
        *self.answer.lock().unwrap_or_else(PoisonError::into_inner) = record_json.into();
    }

    /// Fetches received so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// `FetchResponse` with its record as bytes: the same wire format (proto3
/// `string` and `bytes` are both length-delimited), but free to carry text
/// that is not UTF-8, as a register written in another language might send.
#[derive(Clone, PartialEq, prost::Message)]
struct RawAnswer {
    #[prost(bytes = "vec", tag = "1")]
    record_json: Vec<u8>,
}

/// A [`RawProvider`]'s `Fetch`.
struct RawFetch(RawProvider);

impl tonic::server::UnaryService<FetchRequest> for RawFetch {
    type Response = RawAnswer;
    type Future = std::future::Ready<Result<Response<RawAnswer>, Status>>;

    fn call(&mut self, _request: Request<FetchRequest>) -> Self::Future {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let record_json = self.0.answer.lock().unwrap_or_else(PoisonError::into_inner).clone();
        std::future::ready(Ok(Response::new(RawAnswer { record_json })))
    }
}

/// The `RecordProvider` service of a [`RawProvider`], written out as
/// tonic's generated server is, for its bytes answer.
#[derive(Clone)]
struct RawServer(RawProvider);

impl tonic::server::NamedService for RawServer {
    const NAME: &'static str = "lienthong.provider.v1.RecordProvider";
}

impl<B> tower_service::Service<http::Request<B>> for RawServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let raw = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != "/lienthong.provider.v1.RecordProvider/Fetch" {
                return Ok(Status::unimplemented("the raw test provider only answers Fetch").into_http());
            }
            let codec = tonic_prost::ProstCodec::<RawAnswer, FetchRequest>::default();
            Ok(tonic::server::Grpc::new(codec).unary(RawFetch(raw), request).await)
        })
    }
}

/// A test server running in the background; dropping it shuts it down.
pub struct ServerHandle {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`, for `lienthong_tls::connect_channel`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Requests the server received: fetches for the kit and raw servers,
    /// requests read then dropped for the dropping server.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until it has stopped.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Binds `127.0.0.1:0`, runs `run(listener, shutdown)` in the background.
async fn spawn_server<R, Fut>(requests: Arc<AtomicU64>, run: R) -> io::Result<ServerHandle>
where
    R: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(run(listener, rx));
    Ok(ServerHandle {
        addr,
        requests,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// Serves `faulty` through the kit (broker-only, mTLS) on an ephemeral port.
pub async fn start_faulty_server(faulty: Faulty, tls: Arc<ServerTls>) -> io::Result<ServerHandle> {
    let calls = faulty.calls.clone();
    let config = ProviderConfig::new(tls.trust_domain());
    spawn_server(calls, move |listener, rx| async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        if let Err(e) = serve(Arc::new(faulty), tls, config, listener, shutdown).await {
            tracing::error!(error = %e, "faulty test provider stopped");
        }
    })
    .await
}

/// Serves `source` through the kit on an ephemeral port, healthy.
pub async fn start_server(source: Arc<dyn RecordSource>, tls: Arc<ServerTls>) -> io::Result<ServerHandle> {
    start_faulty_server(Faulty::new(source), tls).await
}

/// Serves `raw` (no kit, no identity check) over TLS on an ephemeral port.
pub async fn start_raw_server(raw: RawProvider, tls: Arc<ServerTls>) -> io::Result<ServerHandle> {
    let calls = raw.calls.clone();
    spawn_server(calls, move |listener, rx| async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        let served = tonic::transport::Server::builder()
            .add_service(RawServer(raw))
            .serve_with_incoming_shutdown(incoming(listener, tls, AcceptOptions::default()), shutdown)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "raw test provider stopped");
        }
    })
    .await
}

/// A server that completes the TLS handshake, reads one whole HTTP/2 request,
/// then closes the TCP connection without answering.
pub async fn start_dropping_server(tls: Arc<ServerTls>) -> io::Result<ServerHandle> {
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    spawn_server(requests, move |listener, mut rx| async move {
        let mut connections = Box::pin(incoming(listener, tls, AcceptOptions::default()));
        loop {
            tokio::select! {
                _ = &mut rx => return,
                next = connections.next() => match next {
                    Some(Ok(stream)) => {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            match read_one_request(stream).await {
                                Ok(true) => { counter.fetch_add(1, Ordering::SeqCst); }
                                Ok(false) => {}
                                Err(e) => tracing::debug!(error = %e, "dropping server: client went away"),
                            }
                            // The stream is dropped here: TCP closed, no close_notify, no answer.
                        });
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "dropping server cannot accept"),
                    None => return,
                },
            }
        }
    })
    .await
}

/// A register that says GOAWAY on a connection while a call on it is still
/// under way, as a gRPC server past its maximum connection age, or draining
/// for a restart, does: the first connection's first call is held, never
/// answered, and that connection stays up for it (its pings answered); every
/// call on a later connection is answered as `raw` answers.
///
/// [`ServerHandle::requests`] turns 1 once the broker has acknowledged a ping
/// sent after the GOAWAY, and so has read the GOAWAY itself.
pub async fn start_going_away_server(raw: RawProvider, tls: Arc<ServerTls>) -> io::Result<ServerHandle> {
    let gone_away = Arc::new(AtomicU64::new(0));
    let signal = gone_away.clone();
    spawn_server(gone_away, move |listener, rx| async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        let first = std::sync::atomic::AtomicBool::new(true);
        let later = incoming(listener, tls, AcceptOptions::default()).filter_map(move |stream| {
            if stream.is_ok() && first.swap(false, Ordering::SeqCst) {
                let signal = signal.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = stream
                        && let Err(e) = hold_one_call_and_go_away(stream, &signal).await
                    {
                        tracing::debug!(error = %e, "going-away server: the broker closed the held connection");
                    }
                });
                return None;
            }
            Some(stream)
        });
        let served = tonic::transport::Server::builder()
            .add_service(RawServer(raw))
            .serve_with_incoming_shutdown(later, shutdown)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "going-away test provider stopped");
        }
    })
    .await
}

/// Reads one request, answers GOAWAY naming it as the last stream served and
/// a ping, counts the ping's acknowledgement in `gone_away`, then holds the
/// connection (answering pings and settings) until the broker closes it.
async fn hold_one_call_and_go_away(mut stream: MtlsStream, gone_away: &AtomicU64) -> io::Result<()> {
    let Some(last_stream) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let mut go_away = vec![0, 0, 8, FRAME_GOAWAY, 0, 0, 0, 0, 0];
    go_away.extend_from_slice(&last_stream.to_be_bytes());
    go_away.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
    stream.write_all(&go_away).await?;
    stream
        .write_all(&[0, 0, 8, FRAME_PING, 0, 0, 0, 0, 0, 7, 7, 7, 7, 7, 7, 7, 7])
        .await?;
    stream.flush().await?;
    loop {
        let (kind, flags, _, payload) = read_frame(&mut stream).await?;
        match kind {
            FRAME_PING if flags & FLAG_ACK != 0 => {
                gone_away.fetch_add(1, Ordering::SeqCst);
            }
            FRAME_PING => {
                let mut pong = vec![0, 0, 8, FRAME_PING, FLAG_ACK, 0, 0, 0, 0];
                pong.extend_from_slice(&payload);
                stream.write_all(&pong).await?;
                stream.flush().await?;
            }
            FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                stream
                    .write_all(&[0, 0, 0, FRAME_SETTINGS, FLAG_ACK, 0, 0, 0, 0])
                    .await?;
                stream.flush().await?;
            }
            _ => {}
        }
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;

/// Speaks just enough HTTP/2 to read a request to its end; true if one was read.
async fn read_one_request(mut stream: MtlsStream) -> io::Result<bool> {
    Ok(read_request(&mut stream).await?.is_some())
}

/// Reads the client's preface and frames up to the end of a request, acking
/// its settings; the request's stream id, or `None` when the client does not
/// speak HTTP/2.
async fn read_request(stream: &mut MtlsStream) -> io::Result<Option<u32>> {
    let mut preface = [0u8; 24];
    stream.read_exact(&mut preface).await?;
    if &preface != H2_PREFACE {
        return Ok(None);
    }
    // Our (empty) SETTINGS: every default applies.
    stream.write_all(&[0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0]).await?;
    stream.flush().await?;
    loop {
        let (kind, flags, stream_id, _) = read_frame(stream).await?;
        match kind {
            FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                stream
                    .write_all(&[0, 0, 0, FRAME_SETTINGS, FLAG_ACK, 0, 0, 0, 0])
                    .await?;
                stream.flush().await?;
            }
            FRAME_DATA | FRAME_HEADERS if stream_id != 0 && flags & FLAG_END_STREAM != 0 => {
                return Ok(Some(stream_id));
            }
            _ => {}
        }
    }
}

/// One HTTP/2 frame: its type, flags, stream id and payload.
async fn read_frame(stream: &mut MtlsStream) -> io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let (kind, flags) = (header[3], header[4]);
    let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok((kind, flags, stream_id, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_drops_the_first_field_and_retypes_the_next() {
        let record = json!({ "national_id": "001090000001", "full_name": "Lê Văn An", "age": 3 });
        assert_eq!(corrupt(record), json!({ "full_name": 12345, "age": 3 }));
        let numeric = json!({ "id": "x", "count": 2 });
        assert_eq!(corrupt(numeric), json!({ "count": "not a number" }));
        assert_eq!(corrupt(json!("text")), json!([]));
    }
}
