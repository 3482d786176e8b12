//! `meshserve log-sink`: a CloudEvents receiver that appends every event it gets (binary mode,
//! as KServe's logger and meshserve's sidecars send them) to a file as one JSON line, like
//! KServe's message-dumper. For trying payload logging locally and for the tests; a production
//! sink is whatever takes CloudEvents (Knative Eventing, a Kafka bridge, a log pipeline).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::cloudevents::{event_from_headers, json_line};

/// `meshserve log-sink`'s flags.
#[derive(Debug, Args)]
pub struct LogSinkArgs {
    /// Address to listen on. Only loopback unless you say otherwise.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port (0: let the OS pick; the bound address is logged as `listening on http=ADDR`).
    #[arg(long, default_value_t = 8090)]
    pub port: u16,
    /// The JSON-lines file the events are appended to (`-`: stdout).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
}

/// Runs `meshserve log-sink` until SIGTERM or Ctrl-C.
pub async fn run(args: LogSinkArgs) -> Result<(), String> {
    serve(SocketAddr::new(args.host, args.port), args.out).await
}

/// Serves until Ctrl-C or SIGTERM; each event becomes a line of `out` (`-`: stdout), flushed
/// before the event is acknowledged.
pub async fn serve(addr: SocketAddr, out: PathBuf) -> Result<(), String> {
    let writer: Box<dyn Write + Send> = if out.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&out)
                .map_err(|e| format!("{}: {e}", out.display()))?,
        )
    };
    let writer = Arc::new(Mutex::new(writer));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(out = %out.display(), "listening on http={bound}");
    let stop = crate::signal::stop_signal();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut stop => return Ok(()),
        };
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            let service = service_fn(move |request| receive(Arc::clone(&writer), request));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection closed");
            }
        });
    }
}

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

async fn receive(
    writer: Writer,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let answer = |status: StatusCode, text: &str| {
        let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
        *response.status_mut() = status;
        Ok(response)
    };
    let body = match body.collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let event = event_from_headers(&parts.headers, body);
    if event.header("ce-id").is_none() {
        return answer(
            StatusCode::BAD_REQUEST,
            "not a CloudEvent in binary mode (no ce-id header)",
        );
    }
    let mut line = json_line(&event);
    line.push(b'\n');
    let written = writer
        .lock()
        .map_err(|_| std::io::Error::other("the writer panicked"))
        .and_then(|mut w| {
            w.write_all(&line)?;
            w.flush()
        });
    match written {
        Ok(()) => answer(StatusCode::ACCEPTED, ""),
        Err(e) => answer(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
