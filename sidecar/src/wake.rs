//! `meshserve wake-scaler`: a KEDA external-push scaler that wakes a revision at zero at once.
//!
//! On Kubernetes the router's activator runs in the gateway's Envoy: it holds a request for a
//! revision at zero and POSTs `/wake/<namespace>/<name>` (the revision's ScaledObject) on this
//! scaler's HTTP port. KEDA keeps `StreamIsActive` open on the gRPC port for every
//! ScaledObject whose `external-push` trigger names this scaler, and a `true` pushed there
//! makes it scale the revision from zero at once, not at its next polling interval. A woken
//! revision stays active for `--active-secs` after its last wake; the ScaledObject's other
//! triggers (requests in flight, the held-requests gauge) keep it up after that.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use meshserve_proto::externalscaler::external_scaler_server::{
    ExternalScaler, ExternalScalerServer,
};
use meshserve_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

/// `meshserve wake-scaler`'s flags.
#[derive(Debug, Args)]
pub struct WakeScalerArgs {
    /// Address to listen on. Only loopback unless you say otherwise (in a pod: 0.0.0.0).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST), env = "MESHSERVE_HOST")]
    pub host: IpAddr,
    /// KEDA's gRPC port (the trigger's `scalerAddress`; 0: the OS picks, logged as
    /// `listening on grpc=ADDR`).
    #[arg(long, default_value_t = WAKE_GRPC_PORT)]
    pub grpc_port: u16,
    /// The activator's HTTP port (`POST /wake/<namespace>/<name>`; 0: the OS picks).
    #[arg(long, default_value_t = WAKE_HTTP_PORT)]
    pub http_port: u16,
    /// Seconds a woken revision stays active after its last wake.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub active_secs: u64,
}

/// The scaler's ports, as rendered for Kubernetes.
pub const WAKE_GRPC_PORT: u16 = 9090;
pub const WAKE_HTTP_PORT: u16 = 9091;
/// ScaledObjects remembered at once; past it, the oldest wakes are forgotten.
const MAX_REMEMBERED: usize = 10_000;
/// The metric this scaler reports to KEDA's HPA: 1 while woken, so at least one replica.
const METRIC: &str = "meshserve-wake";

type Key = (String, String);

/// The wakes seen, and who listens for them.
struct Wakes {
    last: Mutex<HashMap<Key, Instant>>,
    pushed: broadcast::Sender<Key>,
    active: Duration,
}

impl Wakes {
    fn wake(&self, key: Key) {
        if let Ok(mut last) = self.last.lock() {
            if last.len() >= MAX_REMEMBERED {
                let active = self.active;
                last.retain(|_, at| at.elapsed() < active);
            }
            if last.len() < MAX_REMEMBERED || last.contains_key(&key) {
                last.insert(key.clone(), Instant::now());
            }
        }
        let _ = self.pushed.send(key);
    }

    /// How long `key` stays active from now (zero: inactive).
    fn active_for(&self, key: &Key) -> Duration {
        self.last
            .lock()
            .ok()
            .and_then(|last| last.get(key).copied())
            .map_or(Duration::ZERO, |at| {
                self.active.saturating_sub(at.elapsed())
            })
    }
}

fn key(reference: &ScaledObjectRef) -> Key {
    (reference.namespace.clone(), reference.name.clone())
}

struct Scaler(Arc<Wakes>);

type ActiveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: GrpcRequest<ScaledObjectRef>,
    ) -> Result<GrpcResponse<IsActiveResponse>, Status> {
        let result = !self.0.active_for(&key(request.get_ref())).is_zero();
        Ok(GrpcResponse::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: GrpcRequest<ScaledObjectRef>,
    ) -> Result<GrpcResponse<ActiveStream>, Status> {
        let wanted = key(request.get_ref());
        let wakes = Arc::clone(&self.0);
        let mut pushed = wakes.pushed.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut active = !wakes.active_for(&wanted).is_zero();
            if tx
                .send(Ok(IsActiveResponse { result: active }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let left = wakes.active_for(&wanted);
                let expiry = async {
                    if active {
                        tokio::time::sleep(left).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                let now = tokio::select! {
                    woken = pushed.recv() => match woken {
                        Ok(key) if key == wanted => true,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => !wakes.active_for(&wanted).is_zero(),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = expiry => !wakes.active_for(&wanted).is_zero(),
                    () = tx.closed() => return,
                };
                // Every wake is pushed (KEDA acts on each); the end of activity once.
                if now || active {
                    active = now;
                    if tx.send(Ok(IsActiveResponse { result: now })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        _request: GrpcRequest<ScaledObjectRef>,
    ) -> Result<GrpcResponse<GetMetricSpecResponse>, Status> {
        Ok(GrpcResponse::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: METRIC.into(),
                target_size: 1,
                target_size_float: 1.0,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: GrpcRequest<GetMetricsRequest>,
    ) -> Result<GrpcResponse<GetMetricsResponse>, Status> {
        let reference = request
            .get_ref()
            .scaled_object_ref
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is missing"))?;
        let value = i64::from(!self.0.active_for(&key(reference)).is_zero());
        Ok(GrpcResponse::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: METRIC.into(),
                metric_value: value,
                metric_value_float: value as f64,
            }],
        }))
    }
}

/// A Kubernetes name: a DNS-1123 label (ScaledObjects' names are subdomains; meshserve's are
/// labels).
fn is_name(text: &str) -> bool {
    (1..=253).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !text.starts_with(['-', '.'])
        && !text.ends_with(['-', '.'])
}

/// `POST /wake/<namespace>/<name>`: 202, and the ScaledObject is active; 404 or 405 else.
async fn answer(
    wakes: Arc<Wakes>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, text: &str| {
        let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
        *response.status_mut() = status;
        if let Ok(json) = hyper::header::HeaderValue::from_str("application/json") {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, json);
        }
        Ok(response)
    };
    let parts: Vec<&str> = request.uri().path().split('/').collect();
    let (namespace, name) = match parts.as_slice() {
        ["", "wake", namespace, name] if is_name(namespace) && is_name(name) => (*namespace, *name),
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                r#"{"error": "POST /wake/<namespace>/<scaledobject>"}"#,
            );
        }
    };
    if request.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error": "a wake is a POST"}"#,
        );
    }
    tracing::info!(namespace, name, "woken");
    wakes.wake((namespace.to_owned(), name.to_owned()));
    reply(StatusCode::ACCEPTED, r#"{"waking": true}"#)
}

/// Runs the scaler until SIGTERM or Ctrl-C.
pub async fn run(args: WakeScalerArgs) -> Result<(), String> {
    let (pushed, _) = broadcast::channel(1024);
    let wakes = Arc::new(Wakes {
        last: Mutex::new(HashMap::new()),
        pushed,
        active: Duration::from_secs(args.active_secs),
    });
    let bind = |port| async move {
        let addr = SocketAddr::new(args.host, port);
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let grpc = bind(args.grpc_port).await?;
    let http = bind(args.http_port).await?;
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    tracing::info!("listening on grpc={grpc_addr}");
    tracing::info!("listening on http={http_addr}");
    let grpc_server = tonic::transport::Server::builder()
        .add_service(ExternalScalerServer::new(Scaler(Arc::clone(&wakes))))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            crate::signal::stop_signal(),
        );
    let http_server = async {
        loop {
            let Ok((stream, _)) = http.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let wakes = Arc::clone(&wakes);
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(Arc::clone(&wakes), request));
                // The sidecar's header deadline: an idle or slow client cannot keep a task.
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(crate::server::HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        served = grpc_server => served.map_err(|e| e.to_string()),
        () = http_server => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kubernetes_names() {
        for good in ["default", "digits-predictor", "a.b", "x1"] {
            assert!(is_name(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", &"a".repeat(254)] {
            assert!(!is_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_wake_is_active_for_its_window_and_memory_is_bounded() {
        let (pushed, _) = broadcast::channel(4);
        let wakes = Wakes {
            last: Mutex::new(HashMap::new()),
            pushed,
            active: Duration::from_secs(60),
        };
        let k = ("ns".to_owned(), "r".to_owned());
        assert!(wakes.active_for(&k).is_zero());
        wakes.wake(k.clone());
        assert!(wakes.active_for(&k) > Duration::from_secs(59));
        for i in 0..MAX_REMEMBERED + 10 {
            wakes.wake(("ns".to_owned(), format!("r{i}")));
        }
        assert!(wakes.last.lock().unwrap().len() <= MAX_REMEMBERED);
        assert!(!wakes.active_for(&k).is_zero(), "a known one is kept");
    }
}
