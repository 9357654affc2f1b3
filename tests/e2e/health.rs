//! The broker's `grpc.health.v1.Health` as the standard
//! (grpc/grpc doc/health-checking.md) describes it to a load balancer that
//! watches: an unknown service is `SERVICE_UNKNOWN` on a stream that stays
//! open, and a shutdown tells every watcher `NOT_SERVING` and then ends its
//! stream, so that watchers do not hold the drain for the grace period.

use crate::harness::*;
use lienthong_cli::federation::{Federation, FederationOptions, JUDICIAL_OFFICE};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::codec::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Far longer than a drain without watchers takes, so a watcher holding the
/// drain to its end cannot pass for a prompt shutdown.
const GRACE: Duration = Duration::from_secs(30);

async fn federation_with_long_grace() -> (tempfile::TempDir, Federation) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = FederationOptions::new(dir.path());
    options.extra_config = format!("\n[limits]\nshutdown_grace_ms = {}\n", GRACE.as_millis());
    let fed = Federation::start_bare(options).await.expect("federation starts");
    (dir, fed)
}

async fn watch(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> Streaming<HealthCheckResponse> {
    health
        .watch(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("watch {service:?} refused: {s:?}"))
        .into_inner()
}

async fn next_status(stream: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a status within 10 s")
        .unwrap()
        .expect("a message, not the end of the stream");
    message.status()
}

/// The stream has nothing more to say for a while: it is neither ended nor failed.
async fn stays_open(stream: &mut Streaming<HealthCheckResponse>) {
    if let Ok(next) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        panic!("the watch should stay open and quiet, got {next:?}");
    }
}

#[tokio::test]
async fn watching_an_unknown_service_says_service_unknown_and_keeps_the_stream_open() {
    let (_dir, fed) = bare_federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let mut health = HealthClient::new(office.channel.clone());

    let mut unknown = watch(&mut health, "lienthong.v1.NoSuchService").await;
    assert_eq!(next_status(&mut unknown).await, ServingStatus::ServiceUnknown);
    stays_open(&mut unknown).await;

    // `Check` of the same name stays NOT_FOUND, as the standard says.
    let checked = health
        .check(HealthCheckRequest {
            service: "lienthong.v1.NoSuchService".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(checked.code(), Code::NotFound, "{checked:?}");

    // Every service the broker serves, and the server as a whole, is SERVING.
    for service in lienthong::SERVICE_NAMES.iter().copied().chain([""]) {
        let mut stream = watch(&mut health, service).await;
        assert_eq!(next_status(&mut stream).await, ServingStatus::Serving, "{service:?}");
        stays_open(&mut stream).await;
        let checked = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checked.status(), ServingStatus::Serving, "{service:?}");
    }
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn on_shutdown_watchers_hear_not_serving_and_their_streams_end_without_holding_the_drain() {
    let (_dir, fed) = federation_with_long_grace().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let mut health = HealthClient::new(office.channel.clone());

    let mut exchange = watch(&mut health, "lienthong.v1.Exchange").await;
    assert_eq!(next_status(&mut exchange).await, ServingStatus::Serving);
    let mut server = watch(&mut health, "").await;
    assert_eq!(next_status(&mut server).await, ServingStatus::Serving);
    let mut unknown = watch(&mut health, "lienthong.v1.NoSuchService").await;
    assert_eq!(next_status(&mut unknown).await, ServingStatus::ServiceUnknown);

    let started = Instant::now();
    let shutdown = tokio::spawn(fed.shutdown());

    for (name, stream) in [("exchange", &mut exchange), ("server", &mut server)] {
        assert_eq!(next_status(stream).await, ServingStatus::NotServing, "{name}");
    }
    // Each watch then ends with a status a client retries on, sent by the
    // health service itself rather than a connection torn down under it.
    for (name, stream) in [
        ("exchange", &mut exchange),
        ("server", &mut server),
        ("unknown", &mut unknown),
    ] {
        let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("the {name} watch ends within 10 s"))
            .expect_err("the watch ends with a status");
        assert_eq!(ended.code(), Code::Unavailable, "{name}: {ended:?}");
        assert_eq!(ended.message(), "server is shutting down", "{name}: {ended:?}");
    }

    shutdown.await.unwrap().unwrap();
    let took = started.elapsed();
    eprintln!("shutdown with three open watches took {took:?} (grace {GRACE:?})");
    assert!(
        took < GRACE,
        "the watchers held the drain to the end of the grace period: {took:?}"
    );
}

/// Reflection answers clients without a certificate too: an idle stream of
/// it must not hold the drain either.
#[tokio::test]
async fn an_open_reflection_stream_ends_at_shutdown_without_holding_the_drain() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let (_dir, fed) = federation_with_long_grace().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let (ask, questions) = tokio::sync::mpsc::channel(1);
    let mut reflection = ServerReflectionClient::new(office.channel.clone())
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(questions))
        .await
        .unwrap()
        .into_inner();
    ask.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .unwrap();
    assert!(
        reflection.message().await.unwrap().is_some(),
        "the question is answered"
    );

    // The client keeps its side open and asks nothing more.
    let started = Instant::now();
    let shutdown = tokio::spawn(fed.shutdown());
    let ended = tokio::time::timeout(Duration::from_secs(10), reflection.message())
        .await
        .expect("the reflection stream ends within 10 s")
        .expect_err("it ends with a status");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    shutdown.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took < GRACE, "the reflection stream held the drain: {took:?}");
    drop(ask);
}
