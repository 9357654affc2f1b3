//! What the kit puts around the `RecordProvider` service: the life of each
//! connection, and what every call meets before a service sees it.
//!
//! The TLS handshake lets any peer in (the certificate is judged afterwards,
//! so that a refusal can say why), so everything here assumes the peer may be
//! anyone: a peer that is not the broker gets a few connections for a short
//! time, and its calls other than health are refused before their message is
//! read.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use lienthong::protocol::{HttpResponse, TonicFailure, conform, grpc_timeout, refuse_non_grpc};
use lienthong_tls::{Identity, MtlsStream, PeerInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::kit::{Refusals, RefusedCertificates, authorize};

/// Calls any peer may make: a load balancer probes without the broker's certificate.
const HEALTH: &str = "/grpc.health.v1.Health/";

/// A request as tonic's server hands it on.
type HttpRequest = http::Request<tonic::body::Body>;

/// Whether `peer` is the broker with a certificate this register accepts
/// now: not refused and not expired (a connection outlives the certificate
/// it was made with).
fn is_broker(peer: &PeerInfo, refused: &RefusedCertificates) -> bool {
    matches!(peer.identity, Ok(Identity::Broker))
        && peer.not_after.is_none_or(|t| t > time::OffsetDateTime::now_utc())
        && !peer
            .fingerprints
            .as_ref()
            .is_some_and(|c| c.iter().any(|f| refused.contains(f)))
}

// === impl Connections ===

/// The connections open on one register, so that a shutdown can close those
/// no call is on.
#[derive(Default)]
pub(crate) struct Connections {
    open: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    non_broker: AtomicUsize,
}

/// What a connection's stream and its calls share.
#[derive(Default)]
pub(crate) struct Connection {
    /// Calls on it whose answer has not been handed over whole.
    calls: AtomicUsize,
    /// Ends the connection: its reads end and its writes fail.
    close: CancellationToken,
}

/// How long, and how many, connections of peers that are not the broker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NonBrokerLimits {
    pub(crate) lifetime: Duration,
    pub(crate) max_connections: usize,
}

impl Connections {
    /// `stream` as the register serves it, or `None` (closing it) when its
    /// peer is not the broker and `limits.max_connections` such are open.
    pub(crate) fn admit(
        self: &Arc<Self>,
        stream: MtlsStream,
        limits: NonBrokerLimits,
        refused: &RefusedCertificates,
    ) -> Option<KitStream> {
        let broker = is_broker(stream.peer(), refused);
        if !broker {
            let open = self.non_broker.fetch_add(1, Ordering::SeqCst);
            if open >= limits.max_connections {
                self.non_broker.fetch_sub(1, Ordering::SeqCst);
                tracing::info!(
                    remote = ?stream.peer().remote_addr,
                    max = limits.max_connections,
                    "connection closed: as many connections of peers that are not the broker are open as allowed"
                );
                return None;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection::default());
        self.lock().insert(id, connection.clone());
        Some(KitStream {
            inner: stream,
            closed: Box::pin(connection.close.clone().cancelled_owned()),
            lifetime: (!broker).then(|| Box::pin(tokio::time::sleep(limits.lifetime))),
            refused: broker.then(|| refused.clone()),
            stranger_lifetime: limits.lifetime,
            ended: false,
            caller: connection,
            _entry: Entry {
                connections: self.clone(),
                id,
                non_broker: !broker,
            },
        })
    }

    /// Closes every connection no call is on (at shutdown: a silent
    /// connection would otherwise hold the drain, since HTTP/2's goodbye
    /// needs the peer to speak); the number closed.
    pub(crate) fn close_idle(&self) -> usize {
        let mut closed = 0;
        for idle in self.lock().values().filter(|c| c.calls.load(Ordering::SeqCst) == 0) {
            idle.close.cancel();
            closed += 1;
        }
        closed
    }

    /// Connections open now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place in [`Connections`], given back when it closes.
struct Entry {
    connections: Arc<Connections>,
    id: u64,
    non_broker: bool,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
        if self.non_broker {
            self.connections.non_broker.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

// === impl KitStream ===

/// A connection as the kit serves it: an [`MtlsStream`] that ends when
/// [`Connections`] closes it or, for a peer that is not the broker, when its
/// lifetime is over.
pub(crate) struct KitStream {
    inner: MtlsStream,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    lifetime: Option<Pin<Box<tokio::time::Sleep>>>,
    /// For the broker's connection, the list that may come to refuse its
    /// certificate: once refused or expired, the connection gets a stranger's
    /// lifetime, so that a leaked key refused after connecting (or a
    /// certificate past its end) keeps no connection exempt from the limits
    /// strangers meet (its calls meanwhile are refused, saying why).
    refused: Option<RefusedCertificates>,
    stranger_lifetime: Duration,
    ended: bool,
    caller: Arc<Connection>,
    _entry: Entry,
}

impl KitStream {
    /// Whether the connection is to end; registers `cx` to hear when it is.
    fn ended(&mut self, cx: &mut Context<'_>) -> bool {
        if self.ended {
            return true;
        }
        // Checked whenever the connection reads or writes; an idle one does
        // at the latest with its next keepalive ping.
        if self.refused.as_ref().is_some_and(|r| !is_broker(self.inner.peer(), r)) {
            tracing::info!(
                remote = ?self.inner.peer().remote_addr,
                lifetime_ms = self.stranger_lifetime.as_millis() as u64,
                "the broker's certificate on this connection is refused or expired now: it is closed as a stranger's would be"
            );
            self.refused = None;
            self.lifetime = Some(Box::pin(tokio::time::sleep(self.stranger_lifetime)));
        }
        if self.lifetime.as_mut().is_some_and(|l| l.as_mut().poll(cx).is_ready()) {
            tracing::debug!(
                remote = ?self.inner.peer().remote_addr,
                "connection of a peer that is not the broker closed: its time is over"
            );
            self.ended = true;
        } else {
            self.ended = self.closed.as_mut().poll(cx).is_ready();
        }
        self.ended
    }
}

fn ended_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed by the register")
}

impl AsyncRead for KitStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.ended(cx) {
            // End of stream: HTTP/2 then ends the connection, in or after its handshake.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KitStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.ended(cx) {
            return Poll::Ready(Err(ended_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.ended(cx) {
            return Poll::Ready(Err(ended_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended(cx) {
            return Poll::Ready(Err(ended_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What every call learns of its connection (tonic puts it in the request's
/// extensions): the peer, and where to count the call.
#[derive(Clone)]
pub(crate) struct Caller {
    peer: Arc<PeerInfo>,
    connection: Arc<Connection>,
}

impl tonic::transport::server::Connected for KitStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        Caller {
            peer: self.inner.peer().clone(),
            connection: self.caller.clone(),
        }
    }
}

/// One call counted on its connection until its answer is handed over whole.
struct Call(Arc<Connection>);

impl Call {
    fn on(connection: Arc<Connection>) -> Call {
        connection.calls.fetch_add(1, Ordering::SeqCst);
        Call(connection)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body, counting its call until it is sent (or dropped).
struct Answer {
    body: tonic::body::Body,
    _call: Option<Call>,
}

impl http_body::Body for Answer {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

// === impl Edge ===

/// Wraps the kit's services in [`Edge`].
#[derive(Clone)]
pub(crate) struct EdgeLayer {
    refused: RefusedCertificates,
    trust_domain: Arc<str>,
    refusals: Arc<Refusals>,
}

impl EdgeLayer {
    /// Lets through the broker of `trust_domain` unless its certificate is
    /// in `refused`, noting each refusal in `refusals`.
    pub(crate) fn new(refused: RefusedCertificates, trust_domain: String, refusals: Arc<Refusals>) -> EdgeLayer {
        EdgeLayer {
            refused,
            trust_domain: trust_domain.into(),
            refusals,
        }
    }
}

impl<S> tower_layer::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            refused: self.refused.clone(),
            trust_domain: self.trust_domain.clone(),
            refusals: self.refusals.clone(),
        }
    }
}

/// The outer layer of every call: refuses what is not gRPC with the HTTP
/// status the spec names, refuses a peer that is not the broker before its
/// message is read (health aside), answers `DEADLINE_EXCEEDED` when the
/// client's deadline passes, and gives tonic's own failures the spec's codes.
#[derive(Clone)]
pub(crate) struct Edge<S> {
    inner: S,
    refused: RefusedCertificates,
    trust_domain: Arc<str>,
    refusals: Arc<Refusals>,
}

impl<S> tower_service::Service<HttpRequest> for Edge<S>
where
    S: tower_service::Service<HttpRequest, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: HttpRequest) -> Self::Future {
        if let Some(refused) = refuse_non_grpc(&request) {
            return Box::pin(std::future::ready(Ok(refused)));
        }
        let caller = request.extensions_mut().remove::<Caller>();
        let peer = caller.as_ref().map(|c| c.peer.clone());
        let call = caller.map(|c| Call::on(c.connection));
        if !request.uri().path().starts_with(HEALTH) {
            // Refused before tonic reads the message: a peer without the
            // broker's certificate costs the register the headers only.
            let mut check = tonic::Request::new(());
            if let Some(peer) = &peer {
                check.extensions_mut().insert(peer.clone());
            }
            if let Err(status) = authorize(&check, &self.refused, &self.trust_domain, &self.refusals) {
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        if let Some(peer) = peer {
            // Where `lienthong_tls::peer_info` looks for it.
            request.extensions_mut().insert(peer);
        }
        // tonic's own timer, outside this layer, would answer `CANCELLED`
        // where the spec says `DEADLINE_EXCEEDED`. It starts just after this
        // call returns (tonic 0.14's `GrpcTimeout`), so this one, started
        // here for as long, is due first or in the same timer tick, and is
        // seen first since tonic polls the call before its timer.
        let deadline = grpc_timeout(request.headers()).map(tokio::time::sleep);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = match deadline {
                None => answer.await,
                Some(deadline) => tokio::select! {
                    biased;
                    answer = answer => answer,
                    () = deadline => Ok(tonic::Status::deadline_exceeded(
                        "the call's deadline (grpc-timeout) passed before the register answered it",
                    )
                    .into_http()),
                },
            };
            answer.map(|response| {
                conform(response, kit_status).map(|body| tonic::body::Body::new(Answer { body, _call: call }))
            })
        })
    }
}

/// The status the kit answers instead of one of tonic's own failures.
fn kit_status(status: &tonic::Status) -> Option<tonic::Status> {
    let failure = TonicFailure::of(status)?;
    let words = match failure {
        TonicFailure::TooLarge => format!(
            "the request message is larger than this register accepts ({}); a FetchRequest takes a few KB",
            status.message().trim_start_matches("Error, ")
        ),
        TonicFailure::Undecodable => format!(
            "the request is not this method's protobuf message ({}); check that the client was built from \
             lienthong's .proto files",
            status.message()
        ),
        TonicFailure::NoMessage => "a unary call takes exactly one request message and this one sent none".to_owned(),
        TonicFailure::TimedOut => {
            "the call's deadline (grpc-timeout) passed before the register answered it".to_owned()
        }
        TonicFailure::UnknownEncoding => {
            "the request is compressed with an encoding this register does not accept; send it uncompressed".to_owned()
        }
    };
    Some(tonic::Status::new(failure.code(), words))
}
