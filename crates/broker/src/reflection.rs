//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), as grpcurl,
//! Postman and the stock clients' descriptor databases expect it.
//!
//! tonic-reflection's service departs from the protocol in two ways a client
//! meets: a symbol or file it does not know ends the whole stream with an
//! error, where the protocol answers `error_response` and keeps the stream
//! for the next question; and a file is sent without the files it imports.
//! This one answers every request on the stream, sends each file with the
//! imports not yet sent on that stream (as grpc-go does), and lists only the
//! services the broker serves. The generated types are tonic-reflection's.

use futures::{Stream, StreamExt};
use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto};
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};
use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

/// Why the descriptor sets given at start cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ReflectionError {
    /// A set or a file in it is not a valid protobuf descriptor.
    #[error("descriptor set: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A file without a name, which no client could ask for.
    #[error("descriptor set holds a file without a name")]
    Unnamed,
}

/// The raw bytes of each file of a `FileDescriptorSet` (field 1), served
/// as they were compiled rather than decoded and encoded again.
#[derive(Clone, PartialEq, Message)]
struct RawFileSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

struct File {
    encoded: Arc<[u8]>,
    imports: Vec<String>,
}

/// What reflection answers from: the files, every symbol they define, and
/// the services listed.
pub struct Index {
    files: HashMap<String, File>,
    /// Fully qualified symbol (package, message, nested, field, enum, enum
    /// value, service, method) to the file defining it.
    symbols: HashMap<String, String>,
    messages: HashSet<String>,
    services: Vec<String>,
}

impl Index {
    /// Indexes the encoded descriptor sets; `services` are the names
    /// `list_services` answers (a set may define services not served here).
    pub fn new(sets: &[&[u8]], services: &[&str]) -> Result<Index, ReflectionError> {
        let mut index = Index {
            files: HashMap::new(),
            symbols: HashMap::new(),
            messages: HashSet::new(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
        };
        for set in sets {
            for encoded in RawFileSet::decode(*set)?.file {
                let file = FileDescriptorProto::decode(encoded.as_slice())?;
                let name = file.name.clone().ok_or(ReflectionError::Unnamed)?;
                // The first set naming a file wins, as protoc's import order does.
                if index.files.contains_key(&name) {
                    continue;
                }
                index.add_symbols(&file, &name);
                index.files.insert(
                    name,
                    File {
                        encoded: encoded.into(),
                        imports: file.dependency.clone(),
                    },
                );
            }
        }
        Ok(index)
    }

    fn add_symbols(&mut self, file: &FileDescriptorProto, name: &str) {
        let package = file.package.clone().unwrap_or_default();
        for message in &file.message_type {
            self.add_message(&package, message, name);
        }
        for e in &file.enum_type {
            self.add_enum(&package, e, name);
        }
        for service in &file.service {
            let service_name = qualified(&package, service.name());
            for method in &service.method {
                self.symbols
                    .insert(qualified(&service_name, method.name()), name.to_owned());
            }
            self.symbols.insert(service_name, name.to_owned());
        }
    }

    fn add_message(&mut self, scope: &str, message: &DescriptorProto, name: &str) {
        let full = qualified(scope, message.name());
        for nested in &message.nested_type {
            self.add_message(&full, nested, name);
        }
        for e in &message.enum_type {
            self.add_enum(&full, e, name);
        }
        for field in &message.field {
            self.symbols.insert(qualified(&full, field.name()), name.to_owned());
        }
        for oneof in &message.oneof_decl {
            self.symbols.insert(qualified(&full, oneof.name()), name.to_owned());
        }
        self.messages.insert(full.clone());
        self.symbols.insert(full, name.to_owned());
    }

    fn add_enum(&mut self, scope: &str, e: &EnumDescriptorProto, name: &str) {
        let full = qualified(scope, e.name());
        for value in &e.value {
            // Protobuf scopes enum values beside their enum (C++ rules);
            // tonic-reflection's clients may ask for them inside it.
            self.symbols.insert(qualified(scope, value.name()), name.to_owned());
            self.symbols.insert(qualified(&full, value.name()), name.to_owned());
        }
        self.symbols.insert(full, name.to_owned());
    }

    /// `file` first, then the files it imports, directly or not, that this
    /// stream has not been sent yet.
    fn with_imports(&self, file: &str, sent: &mut HashSet<String>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut queue = VecDeque::from([file.to_owned()]);
        let mut seen = HashSet::new();
        while let Some(name) = queue.pop_front() {
            if !seen.insert(name.clone()) {
                continue;
            }
            // An import outside the index (none in the broker's sets) is left
            // to the client to ask for by name.
            let Some(entry) = self.files.get(&name) else {
                continue;
            };
            if out.is_empty() || !sent.contains(&name) {
                out.push(entry.encoded.to_vec());
                sent.insert(name);
            }
            queue.extend(entry.imports.iter().cloned());
        }
        out
    }

    /// The answer to one request on a stream that has been sent `sent`.
    fn answer(&self, request: &MessageRequest, sent: &mut HashSet<String>) -> MessageResponse {
        match request {
            MessageRequest::FileByFilename(name) => match self.files.contains_key(name) {
                true => files(self.with_imports(name, sent)),
                false => error(Code::NotFound, format!("no file {:?} is served here", clip(name))),
            },
            MessageRequest::FileContainingSymbol(symbol) => match self.symbols.get(symbol.trim_start_matches('.')) {
                Some(file) => files(self.with_imports(file, sent)),
                None => error(Code::NotFound, format!("no symbol {:?} is served here", clip(symbol))),
            },
            // The broker's protos declare no extensions.
            MessageRequest::FileContainingExtension(e) => error(
                Code::NotFound,
                format!(
                    "no extension {} of {:?} is served here",
                    e.extension_number,
                    clip(&e.containing_type)
                ),
            ),
            MessageRequest::AllExtensionNumbersOfType(message) => {
                let message = message.trim_start_matches('.');
                if self.messages.contains(message) {
                    MessageResponse::AllExtensionNumbersResponse(v1::ExtensionNumberResponse {
                        base_type_name: message.to_owned(),
                        extension_number: Vec::new(),
                    })
                } else {
                    error(
                        Code::NotFound,
                        format!("no message type {:?} is served here", clip(message)),
                    )
                }
            }
            MessageRequest::ListServices(_) => MessageResponse::ListServicesResponse(v1::ListServiceResponse {
                service: self
                    .services
                    .iter()
                    .map(|name| v1::ServiceResponse { name: name.clone() })
                    .collect(),
            }),
        }
    }

    /// The response to `request`, which names what it answers.
    fn respond(
        &self,
        request: v1::ServerReflectionRequest,
        sent: &mut HashSet<String>,
    ) -> v1::ServerReflectionResponse {
        let message_response = match &request.message_request {
            Some(asked) => self.answer(asked, sent),
            None => error(
                Code::InvalidArgument,
                "the request names nothing to look up (message_request is empty)".to_owned(),
            ),
        };
        v1::ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(message_response),
        }
    }
}

fn qualified(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

/// A name the client sent, cut short enough for an error message.
fn clip(text: &str) -> &str {
    crate::exchange::clip(text, 256)
}

fn files(file_descriptor_proto: Vec<Vec<u8>>) -> MessageResponse {
    MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse { file_descriptor_proto })
}

fn error(code: Code, error_message: String) -> MessageResponse {
    MessageResponse::ErrorResponse(v1::ErrorResponse {
        error_code: code as i32,
        error_message,
    })
}

type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The answers to a stream of requests, one per request, in order; the
/// stream ends when the client's does, or with `UNAVAILABLE` once `closing`
/// is cancelled: reflection answers clients without a certificate, and an
/// idle stream would otherwise hold the server's drain for its whole grace
/// period. `Req` and `Resp` are either protocol version's types: the two
/// versions are the same messages on the wire.
fn answers<Req, Resp>(index: Arc<Index>, closing: CancellationToken, requests: Streaming<Req>) -> Answers<Resp>
where
    Req: Message + Default + 'static,
    Resp: Message + Default + 'static,
{
    let sent = HashSet::new();
    let stream = futures::stream::unfold(
        (index, requests, sent, false),
        move |(index, mut requests, mut sent, ended)| {
            let closing = closing.clone();
            async move {
                if ended {
                    return None;
                }
                let next = tokio::select! {
                    biased;
                    () = closing.cancelled() => {
                        return Some((Err(Status::unavailable("server is shutting down")), (index, requests, sent, true)));
                    }
                    next = requests.next() => next,
                };
                let answer = match next? {
                    Ok(request) => v1::ServerReflectionRequest::decode(request.encode_to_vec().as_slice())
                        .map_err(|e| Status::internal(format!("reflection request: {e}")))
                        .and_then(|request| {
                            let response = index.respond(request, &mut sent);
                            Resp::decode(response.encode_to_vec().as_slice())
                                .map_err(|e| Status::internal(format!("reflection response: {e}")))
                        }),
                    // The client's stream broke: its status ends ours.
                    Err(status) => Err(status),
                };
                let ended = answer.is_err();
                Some((answer, (index, requests, sent, ended)))
            }
        },
    );
    Box::pin(stream)
}

/// `grpc.reflection.v1.ServerReflection`; its streams end once the token is cancelled.
#[derive(Clone)]
pub struct ReflectionV1(pub Arc<Index>, pub CancellationToken);

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for ReflectionV1 {
    type ServerReflectionInfoStream = Answers<v1::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answers(
            self.0.clone(),
            self.1.clone(),
            request.into_inner(),
        )))
    }
}

/// `grpc.reflection.v1alpha.ServerReflection`, which older clients (grpcurl
/// before 1.8.8, grpcio-reflection before 1.62) still call.
#[derive(Clone)]
pub struct ReflectionV1Alpha(pub Arc<Index>, pub CancellationToken);

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for ReflectionV1Alpha {
    type ServerReflectionInfoStream = Answers<v1alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answers(
            self.0.clone(),
            self.1.clone(),
            request.into_inner(),
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index() -> Index {
        Index::new(
            &[lienthong::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET],
            &["lienthong.v1.Exchange", "grpc.health.v1.Health"],
        )
        .unwrap()
    }

    fn names(response: &MessageResponse) -> Vec<String> {
        match response {
            MessageResponse::FileDescriptorResponse(r) => r
                .file_descriptor_proto
                .iter()
                .map(|f| FileDescriptorProto::decode(f.as_slice()).unwrap().name().to_owned())
                .collect(),
            other => panic!("not files: {other:?}"),
        }
    }

    fn error_code(response: &MessageResponse) -> Code {
        match response {
            MessageResponse::ErrorResponse(e) => Code::from_i32(e.error_code),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn a_file_comes_with_the_imports_this_stream_has_not_had() {
        let index = index();
        let mut sent = HashSet::new();
        let audit = index.answer(
            &MessageRequest::FileContainingSymbol("lienthong.v1.Audit".into()),
            &mut sent,
        );
        let first = names(&audit);
        let own = &first[0];
        assert_eq!(own, "lienthong/v1/audit.proto");
        for import in ["lienthong/v1/exchange.proto", "google/protobuf/timestamp.proto"] {
            assert!(first.iter().any(|f| f == import), "{import} in {first:?}");
        }
        assert_eq!(first.len(), 3, "each file once: {first:?}");
        // Asked again on the same stream: the file, not its imports again.
        let again = names(&index.answer(&MessageRequest::FileByFilename(own.clone()), &mut sent));
        assert_eq!(again, std::slice::from_ref(own));
        // A fresh stream gets everything again.
        assert_eq!(
            names(&index.answer(&MessageRequest::FileByFilename(own.clone()), &mut HashSet::new())),
            first
        );
    }

    #[test]
    fn every_kind_of_symbol_is_found_and_unknown_ones_are_errors_not_the_end() {
        let index = index();
        for symbol in [
            "lienthong.v1.Exchange",
            "lienthong.v1.Exchange.Lookup",
            "lienthong.v1.LookupRequest",
            "lienthong.v1.LookupRequest.record_type",
            ".lienthong.v1.LookupRequest",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
            "grpc.health.v1.HealthCheckResponse.SERVING",
        ] {
            let answer = index.answer(
                &MessageRequest::FileContainingSymbol(symbol.into()),
                &mut HashSet::new(),
            );
            assert!(
                matches!(answer, MessageResponse::FileDescriptorResponse(_)),
                "{symbol}: {answer:?}"
            );
        }
        let mut sent = HashSet::new();
        for unknown in [
            MessageRequest::FileContainingSymbol("no.such.Symbol".into()),
            MessageRequest::FileByFilename("no/such.proto".into()),
            MessageRequest::FileContainingExtension(v1::ExtensionRequest {
                containing_type: "lienthong.v1.LookupRequest".into(),
                extension_number: 100,
            }),
            MessageRequest::AllExtensionNumbersOfType("no.such.Message".into()),
        ] {
            assert_eq!(
                error_code(&index.answer(&unknown, &mut sent)),
                Code::NotFound,
                "{unknown:?}"
            );
        }
        match index.answer(
            &MessageRequest::AllExtensionNumbersOfType("lienthong.v1.LookupRequest".into()),
            &mut sent,
        ) {
            MessageResponse::AllExtensionNumbersResponse(r) => {
                assert_eq!(r.base_type_name, "lienthong.v1.LookupRequest");
                assert!(r.extension_number.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_services_served_are_listed_and_the_request_is_named() {
        let index = index();
        let request = v1::ServerReflectionRequest {
            host: "broker".into(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let response = index.respond(request.clone(), &mut HashSet::new());
        assert_eq!(response.valid_host, "broker");
        assert_eq!(response.original_request, Some(request));
        match response.message_response.unwrap() {
            MessageResponse::ListServicesResponse(r) => {
                let listed: Vec<_> = r.service.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(listed, ["lienthong.v1.Exchange", "grpc.health.v1.Health"]);
            }
            other => panic!("{other:?}"),
        }
        let empty = index.respond(v1::ServerReflectionRequest::default(), &mut HashSet::new());
        assert_eq!(error_code(&empty.message_response.unwrap()), Code::InvalidArgument);
    }

    #[test]
    fn the_alpha_messages_are_the_same_on_the_wire() {
        let alpha = v1alpha::ServerReflectionRequest {
            host: "h".into(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "lienthong.v1.Exchange".into(),
                ),
            ),
        };
        let as_v1 = v1::ServerReflectionRequest::decode(alpha.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            as_v1.message_request,
            Some(MessageRequest::FileContainingSymbol("lienthong.v1.Exchange".into()))
        );
    }
}
