//! Binds the REST and gRPC listeners, serves until told to stop, then drains: the server
//! reports not ready, stops accepting, lets in-flight requests finish (up to a deadline), exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use meshserve_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::grpc::GrpcService;
use crate::rest;
use crate::service::Service;

/// A client gets this long to send a request's headers (HTTP/1.1); then the connection is
/// closed: a client sending them a byte at a time (slow-loris) holds nothing for long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenConfig {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// How long in-flight requests get to finish after a stop signal.
    pub drain_timeout: Duration,
    /// How long the server goes on accepting requests after a stop signal, reporting not
    /// ready, before it closes its listeners: the time the proxies in front need to see it
    /// is going (Kubernetes' preStop sleep; meshserve's activator probes every 500 ms).
    pub drain_grace: Duration,
}

/// A running server: its bound addresses, and a handle to stop it.
#[derive(Debug)]
pub struct Server {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds both listeners (port 0 picks a free port) and starts serving.
    pub async fn start(service: Arc<Service>, config: ListenConfig) -> std::io::Result<Server> {
        let http = TcpListener::bind(config.http).await?;
        let grpc = TcpListener::bind(config.grpc).await?;
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        // The listeners close after the grace, not at the stop signal.
        let (close, closed) = watch::channel(false);

        let http_task = tokio::spawn(serve_http(
            http,
            Arc::clone(&service),
            closed.clone(),
            config.drain_timeout,
        ));
        let grpc_task = tokio::spawn(serve_grpc(grpc, Arc::clone(&service), closed));
        let done = tokio::spawn(async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
            service.start_draining();
            if !config.drain_grace.is_zero() {
                tokio::time::sleep(config.drain_grace).await;
            }
            let _ = close.send(true);
            if tokio::time::timeout(config.drain_timeout, service.drained())
                .await
                .is_err()
            {
                tracing::warn!(timeout = ?config.drain_timeout, "drain deadline passed with requests still in flight");
            }
            let _ = tokio::join!(http_task, grpc_task);
        });
        Ok(Server {
            http_addr,
            grpc_addr,
            stop,
            done,
        })
    }

    /// Stops accepting, drains, and returns when both servers are down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }

    /// Serves until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        tracing::info!("stop requested: draining in-flight requests");
        self.shutdown().await;
        tracing::info!("stopped");
    }
}

async fn serve_http(
    listener: TcpListener,
    service: Arc<Service>,
    mut stopped: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = Arc::clone(&service);
                let connection = builder.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request| rest::handle(Arc::clone(&service), request)),
                );
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                });
            }
            _ = stopped.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open at the drain deadline; closing them");
    }
}

async fn serve_grpc(
    listener: TcpListener,
    service: Arc<Service>,
    mut stopped: watch::Receiver<bool>,
) {
    let limit = service.limits().max_request_bytes;
    let grpc = GrpcInferenceServiceServer::new(GrpcService::new(service))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    // `Server::tcp_nodelay` does not apply to incoming streams we bind ourselves; without
    // TCP_NODELAY, Nagle's algorithm and delayed ACKs stall responses by 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_resource_exhausted,
        ))
        .add_service(grpc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// tonic refuses a message over `max_decoding_message_size` with OUT_OF_RANGE; the gRPC status
/// code for "larger than the limit" is RESOURCE_EXHAUSTED (what grpc-go and grpc-core send,
/// and what the REST side's 413 maps to), so clients see one code for one condition.
fn too_large_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}
