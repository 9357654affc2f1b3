//! The gRPC protocol at the broker's edge, as a client that does not go
//! through generated code meets it: bytes that are not the method's message,
//! a message over the limit, none at all, requests that are not gRPC. Each is
//! answered with the code the gRPC spec gives it, and a refused call is
//! audited like any other refusal.

use crate::harness::*;
use bytes::{Buf, BufMut};
use lienthong::v1 as pb;
use lienthong_cli::federation::JUDICIAL_OFFICE;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends and receives message bytes as they are: a client that can send
/// anything.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

const LOOKUP: &str = "/lienthong.v1.Exchange/Lookup";

async fn raw_unary(channel: &tonic::transport::Channel, path: &'static str, message: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone()).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(message),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .expect_err("refused")
}

/// The office's refused Exchange calls in the log, oldest first.
async fn refused_lookups(fed: &lienthong_cli::federation::Federation) -> Vec<pb::AuditEntry> {
    logged(
        fed,
        pb::EntryFilter {
            actor: JUDICIAL_OFFICE.into(),
            outcome: pb::Outcome::Invalid as i32,
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn calls_tonic_refuses_get_the_specs_codes_and_are_audited() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;

    // Not a LookupRequest: a field number 0 is never valid protobuf.
    let garbage = raw_unary(&office.channel, LOOKUP, vec![0x00, 0xff, 0xff]).await;
    assert_eq!(garbage.code(), Code::Internal, "{garbage:?}");
    assert!(
        garbage.message().contains("not this method's protobuf message"),
        "{}",
        garbage.message()
    );

    // Over the broker's message limit (4 MiB by default).
    let huge = raw_unary(&office.channel, LOOKUP, vec![b'a'; 5 * 1024 * 1024]).await;
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert!(
        huge.message().contains("larger than this broker accepts"),
        "{}",
        huge.message()
    );

    // No message at all on a unary call: the spec's cardinality violation.
    let mut grpc = tonic::client::Grpc::new(office.channel.clone());
    grpc.ready().await.unwrap();
    let none = grpc
        .client_streaming::<_, Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(tokio_stream::iter(Vec::<Vec<u8>>::new())),
            http::uri::PathAndQuery::from_static(LOOKUP),
            Raw,
        )
        .await
        .expect_err("refused");
    assert_eq!(none.code(), Code::Unimplemented, "{none:?}");

    // Two lookups' messages on one unary call: the spec's cardinality
    // violation, not the first lookup served and the second dropped.
    use prost::Message;
    let subject = citizen_id(&fed, 2);
    let lookup = birth_lookup(&subject, lienthong_cli::federation::PURPOSE_CERTIFICATE).encode_to_vec();
    grpc.ready().await.unwrap();
    let two = grpc
        .client_streaming::<_, Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(tokio_stream::iter(vec![lookup.clone(), lookup])),
            http::uri::PathAndQuery::from_static(LOOKUP),
            Raw,
        )
        .await
        .expect_err("refused");
    assert_eq!(two.code(), Code::Unimplemented, "{two:?}");
    assert!(two.message().contains("exactly one request message"), "{two:?}");

    let entries = refused_lookups(&fed).await;
    let reasons: Vec<&str> = entries.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(entries.len(), 4, "each refused call is audited: {reasons:?}");
    for e in &entries {
        assert_eq!(e.kind, pb::EntryKind::Access as i32);
        assert_eq!(e.action, "Exchange.Lookup");
        assert!(e.reason.starts_with("malformed_request: "), "{}", e.reason);
    }
    assert!(
        reasons.iter().any(|r| r.contains("could not be decoded")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("size limit")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no request message")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("more than one request message")),
        "{reasons:?}"
    );
    // Nothing was released for the two lookups.
    let released = logged(
        &fed,
        pb::EntryFilter {
            actor: JUDICIAL_OFFICE.into(),
            outcome: pb::Outcome::Allowed as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(released.is_empty(), "{released:?}");

    // The Audit service's OUT_OF_RANGE means "ask again later"; a message
    // over the limit there must not say that.
    let huge_audit = raw_unary(
        &office.channel,
        "/lienthong.v1.Audit/GetSignedTreeHead",
        vec![b'a'; 5 * 1024 * 1024],
    )
    .await;
    assert_eq!(huge_audit.code(), Code::ResourceExhausted, "{huge_audit:?}");
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn requests_that_are_not_grpc_get_the_http_status_the_spec_names() {
    use tower::ServiceExt;
    let (_dir, fed) = bare_federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let send = |method: http::Method, content_type: &'static str| {
        let channel = office.channel.clone();
        let uri = format!("{}/grpc.health.v1.Health/Check", fed.broker_url);
        async move {
            let request = http::Request::builder()
                .method(method)
                .uri(uri)
                .header(http::header::CONTENT_TYPE, content_type)
                .header("te", "trailers")
                .body(tonic::body::Body::empty())
                .unwrap();
            channel.oneshot(request).await.unwrap().status()
        }
    };
    assert_eq!(
        send(http::Method::POST, "text/plain").await,
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        send(http::Method::POST, "application/json").await,
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        send(http::Method::GET, "application/grpc").await,
        http::StatusCode::METHOD_NOT_ALLOWED
    );
    // A gRPC client is answered as before.
    let mut health = tonic_health::pb::health_client::HealthClient::new(office.channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn gzip_requests_are_served_and_other_encodings_and_broken_frames_are_refused_and_audited() {
    use tonic::codec::CompressionEncoding;
    use tower::ServiceExt;
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 1);

    // A stock client set to gzip is served, and its lookup audited as any.
    let mut gzip =
        pb::exchange_client::ExchangeClient::new(office.channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let answer = gzip
        .lookup(birth_lookup(&subject, lienthong_cli::federation::PURPOSE_CERTIFICATE))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.receipt.is_some(), "{answer:?}");

    // A message that decompresses past the limit, however small on the wire.
    let mut grpc = tonic::client::Grpc::new(office.channel.clone())
        .max_encoding_message_size(usize::MAX)
        .send_compressed(CompressionEncoding::Gzip);
    grpc.ready().await.unwrap();
    let bomb = grpc
        .unary(
            tonic::Request::new(vec![0x0a; 5 * 1024 * 1024]),
            http::uri::PathAndQuery::from_static(LOOKUP),
            Raw,
        )
        .await
        .expect_err("refused");
    assert_eq!(bomb.code(), Code::ResourceExhausted, "{bomb:?}");
    assert!(
        bomb.message().contains("larger than this broker accepts"),
        "{}",
        bomb.message()
    );

    // Bytes that are not gzip although the frame says compressed, and an
    // encoding the broker does not accept.
    let send = |encoding: &'static str, frame: Vec<u8>| {
        let channel = office.channel.clone();
        let uri = format!("{}{LOOKUP}", fed.broker_url);
        async move {
            let request = http::Request::builder()
                .method(http::Method::POST)
                .uri(uri)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("te", "trailers")
                .header("grpc-encoding", encoding)
                // ASCII frames, so that a String (an HTTP body as it is) carries them.
                .body(tonic::body::Body::new(String::from_utf8(frame).unwrap()))
                .unwrap();
            channel.oneshot(request).await.unwrap()
        }
    };
    let framed = |payload: &[u8]| {
        let mut frame = vec![1u8];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    };
    let corrupt = send("gzip", framed(b"not gzip at all")).await;
    let corrupt = tonic::Status::from_header_map(corrupt.headers()).unwrap();
    assert_eq!(corrupt.code(), Code::Internal, "{corrupt:?}");
    let zstd = send("zstd", framed(b"whatever")).await;
    assert!(
        zstd.headers()["grpc-accept-encoding"]
            .to_str()
            .unwrap()
            .contains("gzip"),
        "{:?}",
        zstd.headers()
    );
    let zstd = tonic::Status::from_header_map(zstd.headers()).unwrap();
    assert_eq!(zstd.code(), Code::Unimplemented, "{zstd:?}");
    assert!(zstd.message().contains("send it uncompressed or with gzip"), "{zstd:?}");

    // An uncompressed frame that says 100 bytes and brings 8: broken, not
    // a second message.
    let mut truncated = framed(b"whatever");
    truncated[0] = 0;
    truncated[1..5].copy_from_slice(&100u32.to_be_bytes());
    let truncated = send("identity", truncated).await;
    let truncated = tonic::Status::from_header_map(truncated.headers()).unwrap();
    assert_eq!(truncated.code(), Code::Internal, "{truncated:?}");
    assert!(
        truncated.message().contains("not this method's protobuf message"),
        "{truncated:?}"
    );

    let entries = refused_lookups(&fed).await;
    let reasons: Vec<&str> = entries.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(entries.len(), 4, "each refused call is audited: {reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("size limit")), "{reasons:?}");
    assert_eq!(
        reasons.iter().filter(|r| r.contains("could not be decoded")).count(),
        2,
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("encoding")), "{reasons:?}");
    fed.shutdown().await.unwrap();
}

/// A call whose `grpc-timeout` is spent (or nearly) is answered
/// `DEADLINE_EXCEEDED`, as the spec says, not tonic's `CANCELLED`
/// ("Timeout expired"). Sent over plain HTTP/2: tonic's client would time
/// the call out itself.
#[tokio::test]
async fn a_spent_grpc_timeout_is_deadline_exceeded() {
    use prost::Message;
    let (_dir, fed) = federation().await;
    let subject = citizen_id(&fed, 6);
    let material =
        lienthong_tls::TlsMaterial::load(&lienthong_cli::client::member_files(&fed.certs, JUDICIAL_OFFICE)).unwrap();
    let config = lienthong_tls::client_config(
        &material,
        Some((&fed.options.trust_domain, lienthong_tls::Identity::Broker)),
    )
    .unwrap();
    let tls = lienthong_tls::Dialer::new(&fed.broker_url, config, std::time::Duration::from_secs(5))
        .unwrap()
        .dial()
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let message = birth_lookup(&subject, lienthong_cli::federation::PURPOSE_CERTIFICATE).encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    for timeout in ["0m", "1u", "0n", "1m"] {
        for _ in 0..3 {
            let request = http::Request::post(format!("{}{LOOKUP}", fed.broker_url))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("grpc-timeout", timeout)
                .body(())
                .unwrap();
            let mut ready = send.clone().ready().await.unwrap();
            let (answer, mut body) = ready.send_request(request, false).unwrap();
            body.send_data(bytes::Bytes::from(framed.clone()), true).unwrap();
            let mut answer = answer.await.unwrap();
            // Trailers-only, or headers then a message and trailers.
            let status = match answer.headers().get("grpc-status") {
                Some(status) => status.clone(),
                None => {
                    let body = answer.body_mut();
                    while body.data().await.is_some() {}
                    body.trailers().await.unwrap().unwrap()["grpc-status"].clone()
                }
            };
            let ok = status == "0";
            assert!(
                status == "4" || (ok && timeout == "1m"),
                "grpc-timeout {timeout}: grpc-status {status:?} (4 is DEADLINE_EXCEEDED)"
            );
        }
    }
    fed.shutdown().await.unwrap();
}
