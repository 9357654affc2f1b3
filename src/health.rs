//! `grpc.health.v1.Health` as the standard (grpc/grpc doc/health-checking.md)
//! describes it, for the broker and the registers alike.
//!
//! tonic-health's own service parts from the standard where a load balancer
//! notices: it fails a `Watch` of a service it does not know with `NOT_FOUND`
//! instead of answering `SERVICE_UNKNOWN` and staying open, and its watches
//! never end, so that every watcher holds a graceful shutdown until the grace
//! period runs out. Here a watch hears `SERVICE_UNKNOWN` and then the status
//! once the service is known, and [`HealthReporter::shut_down`] tells every
//! watcher `NOT_SERVING` and then ends its stream with `UNAVAILABLE`, which
//! clients retry (on another replica, or here after the restart).
//!
//! The generated types stay tonic-health's, so clients need nothing new.

use futures::StreamExt;
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

pub use tonic_health::pb::health_check_response::ServingStatus;

/// Largest health request accepted. A request is only a service name, and a
/// watcher of an unknown one keeps it for the life of its stream: without a
/// bound a client without a certificate could park megabytes per stream.
pub const MAX_REQUEST_BYTES: usize = 1024;

/// What a watch ends with once the server shuts down.
const SHUTTING_DOWN: &str = "server is shutting down";

/// Sets the serving status of services; the [`HealthService`] made by
/// [`HealthReporter::service`] answers with it. Clones share the statuses.
#[derive(Clone, Debug)]
pub struct HealthReporter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    statuses: Mutex<HashMap<String, watch::Sender<ServingStatus>>>,
    /// Bumped whenever a service becomes known, which wakes the watchers of
    /// services that were not.
    registered: watch::Sender<()>,
    shutting_down: watch::Sender<bool>,
}

// === impl HealthReporter ===

impl HealthReporter {
    /// A reporter knowing only the server as a whole (`""`), serving.
    pub fn new() -> Self {
        let statuses = HashMap::from([(String::new(), watch::Sender::new(ServingStatus::Serving))]);
        HealthReporter {
            shared: Arc::new(Shared {
                statuses: Mutex::new(statuses),
                registered: watch::Sender::new(()),
                shutting_down: watch::Sender::new(false),
            }),
        }
    }

    /// The `grpc.health.v1.Health` service answering with this reporter's statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService {
            shared: self.shared.clone(),
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Reports `service` (a fully qualified name, or `""` for the server as
    /// a whole) as `status`, making it known if it was not. Once shut down,
    /// every status is `NOT_SERVING`, whatever is asked: a late report must
    /// not call traffic back to a server that is draining.
    pub fn set_status(&self, service: &str, status: ServingStatus) {
        let mut statuses = self.shared.statuses();
        // Read under the lock `shut_down` flips it under, so that a report
        // racing the shutdown cannot land after it.
        let status = if *self.shared.shutting_down.borrow() {
            ServingStatus::NotServing
        } else {
            status
        };
        match statuses.get(service) {
            Some(tx) => update(tx, status),
            None => {
                statuses.insert(service.to_owned(), watch::Sender::new(status));
                // Under the lock, so that a watcher that did not find the
                // service has subscribed before this and so wakes.
                self.shared.registered.send_replace(());
            }
        }
    }

    /// Reports the service `S` serving.
    pub fn set_serving<S: NamedService>(&self) {
        self.set_status(S::NAME, ServingStatus::Serving);
    }

    /// Reports the service `S` not serving.
    pub fn set_not_serving<S: NamedService>(&self) {
        self.set_status(S::NAME, ServingStatus::NotServing);
    }

    /// The status of `service`, `None` while it is not known.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        self.shared.statuses().get(service).map(|tx| *tx.borrow())
    }

    /// Starts the shutdown: every known service and the server as a whole
    /// become `NOT_SERVING`, and every watch, open or still to come, ends
    /// with `UNAVAILABLE` once it has told its client so. Call it when the
    /// server stops taking calls, so that the drain does not wait for
    /// watchers, whose calls never end by themselves.
    pub fn shut_down(&self) {
        let statuses = self.shared.statuses();
        for tx in statuses.values() {
            update(tx, ServingStatus::NotServing);
        }
        // After the statuses, so that a watcher that sees the switch sees
        // NOT_SERVING as well and says so before it ends.
        self.shared.shutting_down.send_replace(true);
    }

    /// Whether [`HealthReporter::shut_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        *self.shared.shutting_down.borrow()
    }
}

impl Default for HealthReporter {
    fn default() -> Self {
        Self::new()
    }
}

/// Sets `status`, waking the watchers only if it changed: the standard
/// sends one message per change.
fn update(tx: &watch::Sender<ServingStatus>, status: ServingStatus) {
    tx.send_if_modified(|current| std::mem::replace(current, status) != status);
}

impl Shared {
    fn statuses(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<ServingStatus>>> {
        // Nothing panics while holding it, and the map is whole at every step anyway.
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl HealthService ===

/// The `grpc.health.v1.Health` service of a [`HealthReporter`].
#[derive(Debug)]
pub struct HealthService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        match self.shared.statuses().get(service) {
            Some(tx) => Ok(Response::new(HealthCheckResponse {
                status: *tx.borrow() as i32,
            })),
            // Not echoed: the name is the caller's, of any content.
            None => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream = BoxStream<'static, Result<HealthCheckResponse, Status>>;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let watcher = Watcher::new(self.shared.clone(), request.into_inner().service);
        // No task of its own: the stream is polled by the call, and dropped
        // with its receivers when the client goes.
        Ok(Response::new(futures::stream::unfold(watcher, Watcher::next).boxed()))
    }
}

// === impl Watcher ===

/// One `Watch` call's state.
struct Watcher {
    shared: Arc<Shared>,
    /// The service's name while it is not known, empty after.
    service: String,
    /// `None` while the service is not known.
    status: Option<watch::Receiver<ServingStatus>>,
    registered: watch::Receiver<()>,
    shutting_down: watch::Receiver<bool>,
    sent: Option<ServingStatus>,
    ended: bool,
}

impl Watcher {
    fn new(shared: Arc<Shared>, service: String) -> Self {
        let (status, registered) = {
            let statuses = shared.statuses();
            // Subscribed under the lock that registering takes: a service
            // registered after this lookup wakes this watcher.
            (
                statuses.get(&service).map(watch::Sender::subscribe),
                shared.registered.subscribe(),
            )
        };
        let shutting_down = shared.shutting_down.subscribe();
        // Kept only to look the service up once it becomes known.
        let service = if status.is_some() { String::new() } else { service };
        Watcher {
            shared,
            service,
            status,
            registered,
            shutting_down,
            sent: None,
            ended: false,
        }
    }

    /// The next message: the status whenever it differs from the last one
    /// sent, and once shut down, after the status, the end of the call.
    async fn next(mut self) -> Option<(Result<HealthCheckResponse, Status>, Self)> {
        if self.ended {
            return None;
        }
        loop {
            if self.status.is_none() {
                self.status = self.shared.statuses().get(&self.service).map(watch::Sender::subscribe);
                if self.status.is_some() {
                    // Known from now on: the name is no longer needed.
                    self.service = String::new();
                }
            }
            let current = match &mut self.status {
                Some(rx) => *rx.borrow_and_update(),
                None => ServingStatus::ServiceUnknown,
            };
            if self.sent != Some(current) {
                self.sent = Some(current);
                let message = HealthCheckResponse { status: current as i32 };
                return Some((Ok(message), self));
            }
            if *self.shutting_down.borrow_and_update() {
                return Some((Err(self.end()), self));
            }
            let Watcher {
                status,
                registered,
                shutting_down,
                ..
            } = &mut self;
            let woken = tokio::select! {
                r = shutting_down.changed() => r,
                r = async {
                    match status {
                        Some(rx) => rx.changed().await,
                        None => registered.changed().await,
                    }
                } => r,
            };
            // The senders live in `shared`, which this holds, so this does
            // not happen; ended rather than spinning if it ever did.
            if woken.is_err() {
                return Some((Err(self.end()), self));
            }
        }
    }

    fn end(&mut self) -> Status {
        self.ended = true;
        Status::unavailable(SHUTTING_DOWN)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    const EXCHANGE: &str = "lienthong.v1.Exchange";

    type Stream = BoxStream<'static, Result<HealthCheckResponse, Status>>;

    fn service(reporter: &HealthReporter) -> HealthService {
        HealthService {
            shared: reporter.shared.clone(),
        }
    }

    fn request(name: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: name.to_owned(),
        })
    }

    async fn watch(reporter: &HealthReporter, name: &str) -> Stream {
        service(reporter).watch(request(name)).await.unwrap().into_inner()
    }

    async fn check(reporter: &HealthReporter, name: &str) -> Result<ServingStatus, Status> {
        service(reporter)
            .check(request(name))
            .await
            .map(|r| r.into_inner().status())
    }

    /// The next message's status; `None` at the end of the stream.
    async fn next(stream: &mut Stream) -> Option<Result<ServingStatus, Status>> {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the watch says something within 5 s")
            .map(|r| r.map(|m| m.status()))
    }

    async fn says(stream: &mut Stream, status: ServingStatus) {
        assert_eq!(next(stream).await.unwrap().unwrap(), status);
    }

    async fn ends_shutting_down(stream: &mut Stream) {
        let ended = next(stream).await.unwrap().unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
        assert_eq!(ended.message(), SHUTTING_DOWN);
        assert!(next(stream).await.is_none(), "nothing after the end");
    }

    async fn quiet(stream: &mut Stream) {
        if let Ok(next) = tokio::time::timeout(Duration::from_millis(50), stream.next()).await {
            panic!("the watch should stay open and quiet, got {next:?}");
        }
    }

    #[tokio::test]
    async fn check_answers_known_services_and_not_found_for_others() {
        let reporter = HealthReporter::new();
        // The server as a whole is known from the start.
        assert_eq!(check(&reporter, "").await.unwrap(), ServingStatus::Serving);
        let unknown = check(&reporter, EXCHANGE).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
        reporter.set_status(EXCHANGE, ServingStatus::NotServing);
        assert_eq!(check(&reporter, EXCHANGE).await.unwrap(), ServingStatus::NotServing);
        assert_eq!(reporter.status(EXCHANGE), Some(ServingStatus::NotServing));
        assert_eq!(reporter.status("lienthong.v1.Nothing"), None);
    }

    #[tokio::test]
    async fn an_unknown_service_is_service_unknown_on_an_open_stream_until_it_becomes_known() {
        let reporter = HealthReporter::new();
        let mut stream = watch(&reporter, EXCHANGE).await;
        says(&mut stream, ServingStatus::ServiceUnknown).await;
        quiet(&mut stream).await;
        // Another service becoming known wakes the watcher, which stays quiet.
        reporter.set_status("lienthong.v1.Audit", ServingStatus::Serving);
        quiet(&mut stream).await;
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        says(&mut stream, ServingStatus::Serving).await;
        quiet(&mut stream).await;
    }

    #[tokio::test]
    async fn every_change_is_delivered_and_a_repeated_status_is_not() {
        let reporter = HealthReporter::new();
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        let mut stream = watch(&reporter, EXCHANGE).await;
        says(&mut stream, ServingStatus::Serving).await;
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        quiet(&mut stream).await;
        reporter.set_status(EXCHANGE, ServingStatus::NotServing);
        says(&mut stream, ServingStatus::NotServing).await;
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        says(&mut stream, ServingStatus::Serving).await;
        quiet(&mut stream).await;
    }

    #[tokio::test]
    async fn shutting_down_says_not_serving_and_then_ends_every_watch() {
        let reporter = HealthReporter::new();
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        let mut exchange = watch(&reporter, EXCHANGE).await;
        says(&mut exchange, ServingStatus::Serving).await;
        let mut server = watch(&reporter, "").await;
        says(&mut server, ServingStatus::Serving).await;
        let mut unknown = watch(&reporter, "lienthong.v1.Nothing").await;
        says(&mut unknown, ServingStatus::ServiceUnknown).await;

        reporter.shut_down();
        assert!(reporter.is_shutting_down());
        says(&mut exchange, ServingStatus::NotServing).await;
        ends_shutting_down(&mut exchange).await;
        says(&mut server, ServingStatus::NotServing).await;
        ends_shutting_down(&mut server).await;
        ends_shutting_down(&mut unknown).await;

        // A late report cannot call traffic back.
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        assert_eq!(check(&reporter, EXCHANGE).await.unwrap(), ServingStatus::NotServing);
        assert_eq!(check(&reporter, "").await.unwrap(), ServingStatus::NotServing);
        // A watch that comes during the drain hears the status and ends too.
        let mut late = watch(&reporter, EXCHANGE).await;
        says(&mut late, ServingStatus::NotServing).await;
        ends_shutting_down(&mut late).await;
    }

    #[tokio::test]
    async fn a_watch_already_told_not_serving_just_ends_at_shutdown() {
        let reporter = HealthReporter::new();
        reporter.set_status(EXCHANGE, ServingStatus::NotServing);
        let mut stream = watch(&reporter, EXCHANGE).await;
        says(&mut stream, ServingStatus::NotServing).await;
        reporter.shut_down();
        ends_shutting_down(&mut stream).await;
    }

    #[tokio::test]
    async fn a_watch_the_client_left_holds_nothing() {
        let reporter = HealthReporter::new();
        reporter.set_status(EXCHANGE, ServingStatus::Serving);
        let receivers = |name: &str| reporter.shared.statuses()[name].receiver_count();
        let mut known = watch(&reporter, EXCHANGE).await;
        says(&mut known, ServingStatus::Serving).await;
        let mut unknown = watch(&reporter, "lienthong.v1.Nothing").await;
        says(&mut unknown, ServingStatus::ServiceUnknown).await;
        assert_eq!(receivers(EXCHANGE), 1);
        assert_eq!(reporter.shared.registered.receiver_count(), 2);
        assert_eq!(reporter.shared.shutting_down.receiver_count(), 2);

        drop(known);
        drop(unknown);
        assert_eq!(receivers(EXCHANGE), 0);
        assert_eq!(reporter.shared.registered.receiver_count(), 0);
        assert_eq!(reporter.shared.shutting_down.receiver_count(), 0);
        // Watching an unknown name did not make it known.
        assert_eq!(reporter.status("lienthong.v1.Nothing"), None);
    }
}
