//! The gRPC protocol's own rules at the edge, for the answers tonic makes
//! itself rather than the broker's handlers: what is not a gRPC call is
//! refused with the HTTP status the gRPC spec names, the codes tonic gives
//! a few of its own failures are replaced by the ones the gRPC status-code
//! spec gives, and a call refused before its handler ran (a message that
//! cannot be decoded, too large, missing, one too many) is audited like any
//! refusal. The rules themselves live in [`lienthong::protocol`], which the
//! provider kit applies too; the broker's words, its one-message check and
//! its audit are here.

use crate::server::{Arrived, HttpRequest, HttpResponse};
use crate::state::Broker;
use lienthong::protocol::TonicFailure;
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome};
use lienthong_tls::PeerInfo;
use std::sync::Arc;
use std::time::Instant;
use time::OffsetDateTime;
use tonic::Code;

/// A failure tonic answers by itself, before or around a handler, or one
/// the broker's [`OneMessage`] makes it answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LibraryFailure {
    /// One of tonic's own (see [`TonicFailure`]); the broker's words for a
    /// message over the limit avoid `OUT_OF_RANGE` above all, since the audit
    /// service's `OUT_OF_RANGE` means "ask again later", which this is not.
    Tonic(TonicFailure),
    /// A call that takes one request message sent a second one: the spec's
    /// request cardinality violation, `UNIMPLEMENTED`; tonic would read and
    /// drop it, and run the call on the first.
    ManyMessages,
}

/// The client's `grpc-timeout` passed before any answer (a call that waited
/// for an exchange turn, or a deadline shorter than the broker's margin).
pub(crate) const TIMED_OUT: LibraryFailure = LibraryFailure::Tonic(TonicFailure::TimedOut);

impl LibraryFailure {
    /// Which of tonic's own failures `status` is (see [`TonicFailure::of`]),
    /// or the broker's answer to a second request message.
    pub(crate) fn of(status: &tonic::Status) -> Option<LibraryFailure> {
        if status.code() == Code::Unimplemented && status.message() == MANY_MESSAGES {
            return Some(LibraryFailure::ManyMessages);
        }
        TonicFailure::of(status).map(LibraryFailure::Tonic)
    }

    /// The status a client gets instead: the spec's code and words a person
    /// can act on.
    fn status(self, original: &tonic::Status) -> tonic::Status {
        let failure = match self {
            LibraryFailure::ManyMessages => return tonic::Status::unimplemented(MANY_MESSAGES),
            LibraryFailure::Tonic(failure) => failure,
        };
        let words = match failure {
            TonicFailure::TooLarge => format!(
                "the request message is larger than this broker accepts ({}); send less in one call",
                original.message().trim_start_matches("Error, ")
            ),
            // tonic's `grpc-accept-encoding` header stays in the answer.
            TonicFailure::UnknownEncoding => "the request is compressed with an encoding this broker does not \
                                              accept; send it uncompressed or with gzip (grpc-accept-encoding)"
                .to_owned(),
            TonicFailure::Undecodable => format!(
                "the request is not this method's protobuf message ({}); check that the client was \
                 built from the broker's .proto files (reflection serves them)",
                original.message()
            ),
            TonicFailure::NoMessage => {
                "a unary call takes exactly one request message and this one sent none".to_owned()
            }
            TonicFailure::TimedOut => "the call's deadline (grpc-timeout) passed before the broker could answer it; \
                                       nothing was released; retry with a longer deadline"
                .to_owned(),
        };
        tonic::Status::new(failure.code(), words)
    }

    /// The reason in the audit entry of a call refused this way.
    fn reason(self) -> &'static str {
        let LibraryFailure::Tonic(failure) = self else {
            return "malformed_request: the call sent more than one request message";
        };
        match failure {
            TonicFailure::TooLarge => "malformed_request: the request message is over the size limit",
            TonicFailure::Undecodable => "malformed_request: the request message could not be decoded",
            TonicFailure::NoMessage => "malformed_request: the unary call sent no request message",
            TonicFailure::TimedOut => "deadline_exceeded: the client's deadline passed before the call started",
            TonicFailure::UnknownEncoding => {
                "malformed_request: compressed with an encoding the broker does not accept"
            }
        }
    }
}

/// The answer to a call whose deadline passed while it waited for a turn.
pub(crate) fn waited_past_deadline() -> HttpResponse {
    tonic::Status::deadline_exceeded(
        "the call's deadline (grpc-timeout) passed while it waited for one of the broker's exchange turns \
         (limits.max_concurrent_exchanges, all busy); nothing was released; retry later or with a longer deadline",
    )
    .into_http()
}

/// When the client's `grpc-timeout` runs out, counted from the call's
/// arrival (time waited for a turn included); `None` without one, or for a
/// deadline past what `Instant` holds.
pub(crate) fn deadline_of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let timeout = crate::exchange::grpc_timeout(request.metadata())?;
    let arrived = request.extensions().get::<Arrived>().map_or_else(Instant::now, |a| a.0);
    arrived.checked_add(timeout)
}

/// How tonic refused a call before its handler ran, if it did.
pub(crate) fn refused_unseen(response: &HttpResponse) -> Option<LibraryFailure> {
    lienthong::protocol::trailers_only_status(response).and_then(|s| LibraryFailure::of(&s))
}

/// Replaces the status of an answer tonic made for one of its own failures
/// with the spec's; any other answer is returned as it is.
pub(crate) fn conform(response: HttpResponse) -> HttpResponse {
    lienthong::protocol::conform(response, |status| {
        LibraryFailure::of(status).map(|failure| failure.status(status))
    })
}

/// The outer layer of every call: stamps its arrival, refuses what is not
/// gRPC, and gives tonic's own failures the spec's codes.
#[derive(Clone)]
pub(crate) struct Protocol<S> {
    inner: S,
}

/// Wraps services in [`Protocol`].
#[derive(Clone, Copy, Default)]
pub(crate) struct ProtocolLayer;

impl<S> tower::Layer<S> for ProtocolLayer {
    type Service = Protocol<S>;

    fn layer(&self, inner: S) -> Protocol<S> {
        Protocol { inner }
    }
}

/// A call's answer with its request path beside it, for [`answered`].
type Answer<F, E> = futures::future::Map<
    futures::future::Join<F, std::future::Ready<Option<http::uri::PathAndQuery>>>,
    fn((Result<HttpResponse, E>, Option<http::uri::PathAndQuery>)) -> Result<HttpResponse, E>,
>;

type Conformed<F, E> = futures::future::Either<
    std::future::Ready<Result<HttpResponse, E>>,
    futures::future::Either<Answer<F, E>, futures::future::BoxFuture<'static, Result<HttpResponse, E>>>,
>;

/// The answer to a call to `path` as it goes out: tonic's own failures with
/// the spec's codes, and a method no service here has named (tonic answers
/// `UNIMPLEMENTED` without a word, for an unknown service as for an unknown
/// method of a known one).
fn answered<E>((answer, path): (Result<HttpResponse, E>, Option<http::uri::PathAndQuery>)) -> Result<HttpResponse, E> {
    answer.map(|response| {
        let response = lienthong::protocol::conform(response, |status| {
            (status.code() == Code::Unimplemented && status.message().is_empty())
                .then(|| tonic::Status::unimplemented(unknown_method(path.as_ref().map_or("", |p| p.path()))))
        });
        conform(response)
    })
}

/// Why a call to `path` found no method.
fn unknown_method(path: &str) -> String {
    format!(
        "this broker serves no method {:?}: check the service and method names (full service name with its \
         package, e.g. /lienthong.v1.Exchange/Lookup); server reflection (grpc.reflection.v1) lists the services \
         and methods it serves",
        crate::exchange::clip(path, 128)
    )
}

/// The answer to a call whose `grpc-timeout` passed before its answer began.
const DEADLINE_PASSED: &str = "the call's deadline (grpc-timeout) passed before the broker answered it; a lookup \
                               still ends and is audited, so ask the audit log before repeating it";

impl<S> tower::Service<HttpRequest> for Protocol<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Conformed<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: HttpRequest) -> Self::Future {
        use futures::FutureExt;
        if let Some(refused) = lienthong::protocol::refuse_non_grpc(&request) {
            return futures::future::Either::Left(std::future::ready(Ok(refused)));
        }
        // Stamped before any wait for an exchange slot, as tonic starts the
        // client's `grpc-timeout` then: a lookup's deadline counts from here.
        request.extensions_mut().insert(Arrived(Instant::now()));
        // Every method but reflection's takes exactly one request message.
        if !request.uri().path().starts_with("/grpc.reflection.") {
            request = request.map(|body| tonic::body::Body::new(OneMessage::new(body)));
        }
        // tonic's own timer, outside this layer, would answer `CANCELLED`
        // ("Timeout expired") where the spec says `DEADLINE_EXCEEDED`. It
        // starts just after this call returns (tonic 0.14's `GrpcTimeout`),
        // so this one, its instant taken here (a sleep made inside the async
        // block would start at its first poll, after tonic's, and could be
        // due a tick later), is due first or in the same timer tick, and is
        // seen first since tonic polls the call before its timer. Dropping
        // the call does not stop a lookup: it runs to its end and its audit
        // entry.
        let deadline = lienthong::protocol::grpc_timeout(request.headers()).map(|t| tokio::time::Instant::now() + t);
        let path = request.uri().path_and_query().cloned();
        let answer = futures::future::join(self.inner.call(request), std::future::ready(path)).map(
            answered::<S::Error>
                as fn(
                    (Result<HttpResponse, S::Error>, Option<http::uri::PathAndQuery>),
                ) -> Result<HttpResponse, S::Error>,
        );
        futures::future::Either::Right(match deadline {
            None => futures::future::Either::Left(answer),
            Some(deadline) => futures::future::Either::Right(Box::pin(async move {
                tokio::select! {
                    biased;
                    answer = answer => answer,
                    () = tokio::time::sleep_until(deadline) => {
                        Ok(tonic::Status::deadline_exceeded(DEADLINE_PASSED).into_http())
                    }
                }
            })),
        })
    }
}

/// The answer to a call that sent a second request message where the
/// method takes one.
const MANY_MESSAGES: &str = "this method takes exactly one request message and the call sent more; \
                             send one call per request";

/// A request body that fails when a second gRPC message begins in it.
/// tonic reads a unary (or server-streaming) call's body to its end before
/// the handler runs, so the failure answers the call instead of the
/// handler, and the call is audited as malformed.
struct OneMessage {
    inner: tonic::body::Body,
    messages: MessageCount,
}

impl OneMessage {
    fn new(inner: tonic::body::Body) -> OneMessage {
        OneMessage {
            inner,
            messages: MessageCount::default(),
        }
    }
}

impl http_body::Body for OneMessage {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && self.messages.feed(data) > 1
        {
            return std::task::Poll::Ready(Some(Err(tonic::Status::unimplemented(MANY_MESSAGES))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the gRPC messages begun in a body from its bytes, however the
/// DATA frames cut them: each is a 5-byte header (flag, big-endian length)
/// and that many bytes.
#[derive(Debug, Default)]
struct MessageCount {
    /// Header bytes of the next message read so far (0 to 4).
    header_read: usize,
    length: [u8; 4],
    /// Bytes of the current message still to come.
    remaining: u64,
    begun: u32,
}

impl MessageCount {
    /// Reads `data`; the number of messages whose header has come whole.
    fn feed(&mut self, mut data: &[u8]) -> u32 {
        while let Some((&first, rest)) = data.split_first() {
            if self.remaining > 0 {
                let skip = data.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            if let Some(slot) = self.header_read.checked_sub(1).and_then(|i| self.length.get_mut(i)) {
                *slot = first;
            }
            self.header_read += 1;
            data = rest;
            // Counted once its header is whole: stray bytes after a message
            // are a broken frame (tonic's "Unexpected EOF"), not a second one.
            if self.header_read == 5 {
                self.begun = self.begun.saturating_add(1);
                self.remaining = u64::from(u32::from_be_bytes(self.length));
                self.header_read = 0;
            }
        }
        self.begun
    }
}

/// Who made a call and to which method, kept (cheaply: reference counts)
/// while it runs, for the audit entry of a call tonic refuses before its
/// handler sees it.
pub(crate) struct CallOrigin {
    broker: Arc<Broker>,
    peer: Option<Arc<PeerInfo>>,
    request_id: Option<http::HeaderValue>,
    path: Option<http::uri::PathAndQuery>,
}

impl CallOrigin {
    /// The origin of `request`, a call to one of the broker's services.
    pub(crate) fn of(broker: &Arc<Broker>, request: &HttpRequest) -> CallOrigin {
        CallOrigin {
            broker: broker.clone(),
            peer: request.extensions().get::<Arc<PeerInfo>>().cloned(),
            request_id: request.headers().get("x-request-id").cloned(),
            path: request.uri().path_and_query().cloned(),
        }
    }

    /// Audits a call tonic refused before its handler ran: its caller
    /// authenticated as any call's is (an unauthenticated one is audited as
    /// such, within the refusal budget), then an entry naming the method
    /// and why.
    pub(crate) async fn audit(self, failure: LibraryFailure) {
        let path = self.path.as_ref().map_or("", |p| p.path());
        // `/lienthong.v1.Exchange/Lookup` is audited as `Exchange.Lookup`.
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let service = service.rsplit('.').next().unwrap_or(service);
        let rpc = crate::exchange::clip(&format!("{service}.{method}"), 128).to_owned();
        let mut request = tonic::Request::new(());
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(peer);
        }
        if let Some(id) = self
            .request_id
            .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok())
        {
            request.metadata_mut().insert("x-request-id", id);
        }
        let Ok(caller) = self.broker.authenticate(&request, &rpc).await else {
            return;
        };
        let kind = match service {
            "Exchange" => EntryKind::Access,
            "Audit" => EntryKind::AuditRead,
            _ => EntryKind::Admin,
        };
        let mut event = AuditEvent::new(kind, OffsetDateTime::now_utc());
        event.actor = caller.id().to_string();
        event.request_id = crate::state::request_id_of(&request);
        event.action = rpc;
        event.outcome = if failure == TIMED_OUT {
            Outcome::Failed
        } else {
            Outcome::Invalid
        };
        event.reason = failure.reason().to_owned();
        if let Err(e) = self.broker.audit.append(event).await {
            tracing::error!(error = %e, ?failure, "could not audit a call refused before its handler");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_are_counted_however_the_frames_cut_them() {
        let frame = |payload: &[u8]| {
            let mut f = vec![0u8];
            f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let one = frame(&[7; 300]);
        for cut in [1, 3, 5, 6, 299, 304] {
            let mut count = MessageCount::default();
            assert_eq!(count.feed(&one[..cut]), u32::from(cut >= 5), "cut at {cut}");
            assert_eq!(count.feed(&one[cut..]), 1, "cut at {cut}");
        }
        // Stray bytes after a message are not a second one.
        let mut count = MessageCount::default();
        count.feed(&one);
        assert_eq!(count.feed(&[0, 0, 0]), 1);
        let mut two = frame(&[]);
        two.extend(frame(b"second"));
        for cut in 0..two.len() {
            let mut count = MessageCount::default();
            count.feed(&two[..cut]);
            assert_eq!(count.feed(&two[cut..]), 2, "cut at {cut}");
        }
        // A length prefix is read whole: 0x100 bytes, not 0 or 1.
        let mut count = MessageCount::default();
        count.feed(&[0, 0, 0, 1, 0]);
        assert_eq!(count.feed(&[1; 256]), 1);
        assert_eq!(count.feed(&[0, 0, 0, 0]), 1);
        assert_eq!(count.feed(&[0]), 2);
    }

    #[test]
    fn tonics_own_failures_get_the_specs_codes_and_others_are_left_alone() {
        let cases = [
            (
                tonic::Status::out_of_range(
                    "Error, decoded message length too large: found 4194314 bytes, the limit is: 4194304 bytes",
                ),
                Code::ResourceExhausted,
            ),
            (tonic::Status::internal("Missing request message."), Code::Unimplemented),
            (tonic::Status::cancelled("Timeout expired"), Code::DeadlineExceeded),
            (
                tonic::Status::resource_exhausted(
                    "Error decompressing: size limit, of 4194304 bytes, exceeded while decompressing message",
                ),
                Code::ResourceExhausted,
            ),
            (
                tonic::Status::internal("Error decompressing: invalid gzip header, while sending request"),
                Code::Internal,
            ),
            (
                tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported"),
                Code::Unimplemented,
            ),
            (tonic::Status::unimplemented(MANY_MESSAGES), Code::Unimplemented),
            (
                tonic::Status::internal("Unexpected EOF decoding stream."),
                Code::Internal,
            ),
            (
                tonic::Status::internal("failed to decode Protobuf message: invalid wire type value: 7"),
                Code::Internal,
            ),
            // The broker's own answers pass as they are.
            (
                tonic::Status::out_of_range("entry 12 is past the signed tree head"),
                Code::OutOfRange,
            ),
            (tonic::Status::internal("the broker failed"), Code::Internal),
            (tonic::Status::cancelled("the client cancelled"), Code::Cancelled),
        ];
        for (status, want) in cases {
            let fixed = conform(status.clone().into_http());
            let got = tonic::Status::from_header_map(fixed.headers()).unwrap();
            assert_eq!(got.code(), want, "{status:?} became {got:?}");
            match LibraryFailure::of(&status) {
                None | Some(LibraryFailure::ManyMessages) => assert_eq!(got.message(), status.message()),
                Some(_) => assert_ne!(got.message(), status.message()),
            }
        }
        // The encodings a client may use instead are still named.
        let mut unknown = tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported");
        unknown
            .metadata_mut()
            .insert("grpc-accept-encoding", "gzip".parse().unwrap());
        let fixed = conform(unknown.into_http());
        assert_eq!(fixed.headers()["grpc-accept-encoding"], "gzip");
        // A method no service has: named, with where to find those there are.
        let unknown = answered::<()>((
            Ok(tonic::Status::unimplemented("").into_http()),
            Some(http::uri::PathAndQuery::from_static("/foo.Bar/Baz")),
        ))
        .unwrap();
        let got = tonic::Status::from_header_map(unknown.headers()).unwrap();
        assert_eq!(got.code(), Code::Unimplemented);
        assert!(
            got.message().contains("\"/foo.Bar/Baz\"") && got.message().contains("reflection"),
            "{got:?}"
        );
        // An answer with a message is not looked into.
        let ok = conform(http::Response::new(tonic::body::Body::empty()));
        assert!(ok.headers().get("grpc-status").is_none());
    }
}
