//! The mesh's one HTTP client: a request over a fresh loopback connection to Envoy's admin
//! API, its listener or a sidecar, within a deadline. `up` polls readiness and stats with it;
//! the console reads metrics and events and sends "try it" on with it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// The largest answer read (a sidecar's metrics, Envoy's stats, a model's answer).
pub const MAX_ANSWER: usize = 16 << 20;

/// An answer from Envoy or a sidecar.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One HTTP/1.1 request to `addr` over a fresh connection, within `timeout`. `Host` is the
/// address unless `headers` names one.
pub async fn fetch(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Fetched, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        request.headers_mut().extend(headers);
        if !request.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
            request.headers_mut().insert(header::HOST, host);
        }
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, incoming) = response.into_parts();
        let body = Limited::new(incoming, MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
}

/// A GET naming `host`: its status and body (as text), or `None` if nothing answered in time.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    host: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_str(host).ok()?);
    let answer = fetch(addr, Method::GET, path, headers, Bytes::new(), timeout)
        .await
        .ok()?;
    Some((
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}
