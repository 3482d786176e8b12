//! Delivery from the spool to the sink, in order, at least once: a batch of events is sent
//! (concurrently, to an HTTP sink), each retried with backoff until the sink takes it, and only
//! then does the cursor move past the batch.
//!
//! Sinks: `http://...` gets each event as a CloudEvent in binary mode (its `ce-*` headers and
//! payload, as KServe's logger sends them); `file:///path` gets JSON lines (CloudEvents' JSON
//! format), synced before the cursor moves, rotated by size.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshserve_filter_core::logger::Event;
use meshserve_filter_core::sink::SinkSpec;

use super::cloudevents::json_line;
use super::metrics::PayloadMetrics;
use super::spool::Reader;

/// Events read from the spool at once: an HTTP sink gets them concurrently, a file sink in one
/// write and one sync.
const BATCH_HTTP: usize = 64;
const BATCH_FILE: usize = 1024;
/// Backoff between attempts: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After a batch smaller than the most, delivery waits this long for more before reading again:
/// fewer, larger writes and syncs under load, for a little delay.
const LINGER: Duration = Duration::from_millis(20);
/// A sink that refuses an event outright (a 4xx other than 408 and 429) gets this many attempts
/// before the event is dropped (counted, logged): one bad event must not stall every later one.
const REFUSALS: u32 = 10;
/// A sink's answer is awaited this long.
const SINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs delivery until the spool closes.
pub async fn run(mut reader: Reader, sink: SinkSpec, metrics: PayloadMetrics) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut file = match &sink {
        SinkSpec::File {
            path,
            max_bytes,
            keep,
        } => Some(FileSink {
            path: path.clone(),
            max_bytes: *max_bytes,
            keep: *keep,
        }),
        SinkSpec::Http(_) => None,
    };
    loop {
        let size = if file.is_some() {
            BATCH_FILE
        } else {
            BATCH_HTTP
        };
        let batch = match reader.next_batch(size).await {
            Ok(batch) if batch.is_empty() => return,
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the payload spool; retrying");
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
        };
        let last = batch.last().map(|(p, _)| *p);
        let events: Vec<Event> = batch.into_iter().map(|(_, e)| e).collect();
        let count = events.len() as u64;
        match (&sink, file.as_mut()) {
            (SinkSpec::Http(uri), _) => {
                let sends = events
                    .into_iter()
                    .map(|event| send_until_taken(&client, uri, event, &metrics));
                futures_join_all(sends).await;
            }
            (SinkSpec::File { .. }, Some(file)) => {
                let mut delay = BACKOFF_FIRST;
                while let Err(e) = file.append(&events) {
                    metrics.retried.inc_by(count);
                    tracing::warn!(error = %e, "cannot write to the payload file sink; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
            (SinkSpec::File { .. }, None) => return,
        }
        metrics.delivered.inc_by(count);
        if let Some(position) = last
            && let Err(e) = reader.commit(position)
        {
            tracing::warn!(error = %e, "cannot record the payload delivery cursor");
        }
        metrics.spool_bytes.set(reader_bytes(&reader));
        if count < size as u64 {
            tokio::time::sleep(LINGER).await;
        }
    }
}

fn reader_bytes(reader: &Reader) -> i64 {
    i64::try_from(reader.spooled_bytes()).unwrap_or(i64::MAX)
}

/// Waits for every future (they run concurrently on this task).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

async fn send_until_taken(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    event: Event,
    metrics: &PayloadMetrics,
) {
    let body = Bytes::from(event.body);
    let mut delay = BACKOFF_FIRST;
    let (mut attempt, mut refusals) = (0u32, 0u32);
    loop {
        let mut request = http::Request::post(uri.clone());
        for (name, value) in &event.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let outcome = match request.body(Full::new(body.clone())) {
            Ok(request) => {
                match tokio::time::timeout(SINK_TIMEOUT, client.request(request)).await {
                    Ok(Ok(response)) if response.status().is_success() => return,
                    Ok(Ok(response)) => {
                        let status = response.status();
                        let refused = status.is_client_error()
                            && status != http::StatusCode::REQUEST_TIMEOUT
                            && status != http::StatusCode::TOO_MANY_REQUESTS;
                        refusals += u32::from(refused);
                        if refusals >= REFUSALS {
                            tracing::error!(sink = %uri, %status, "the sink refuses an event; dropped after {REFUSALS} attempts");
                            metrics
                                .dropped
                                .with_label_values(&["refused_by_sink"])
                                .inc();
                            return;
                        }
                        format!("the sink answered {status}")
                    }
                    Ok(Err(e)) => format!("cannot reach the sink: {e}"),
                    Err(_) => "the sink did not answer in time".to_owned(),
                }
            }
            // A header the intake took but HTTP cannot carry: it can never be delivered.
            Err(e) => {
                tracing::error!(error = %e, "an event cannot be sent over HTTP; dropped");
                metrics.dropped.with_label_values(&["unsendable"]).inc();
                return;
            }
        };
        attempt += 1;
        metrics.retried.inc();
        if attempt == 1 || attempt.is_power_of_two() {
            tracing::warn!(sink = %uri, attempt, "{outcome}; retrying");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// The JSON-lines file sink.
#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
}

impl FileSink {
    fn append(&mut self, events: &[Event]) -> std::io::Result<()> {
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size >= self.max_bytes {
            self.rotate()?;
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = Vec::new();
        for event in events {
            out.extend_from_slice(&json_line(event));
            out.push(b'\n');
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let before = file.metadata()?.len();
        let written = file.write_all(&out).and_then(|()| file.sync_data());
        if written.is_err() {
            // No torn line for the retry to append after.
            let _ = file.set_len(before);
        }
        written
    }

    /// events.jsonl -> events.jsonl.1 -> ... -> events.jsonl.<keep> (the oldest goes).
    fn rotate(&self) -> std::io::Result<()> {
        let numbered = |n: usize| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_sink_rotates_and_keeps_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut sink = FileSink {
            path: path.clone(),
            max_bytes: 100,
            keep: 2,
        };
        let event = Event {
            headers: vec![
                ("ce-id".into(), "1".into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: br#"{"a": 1}"#.to_vec(),
        };
        for _ in 0..10 {
            sink.append(&[event.clone(), event.clone()]).unwrap();
        }
        let numbered = |n: u32| dir.path().join(format!("events.jsonl.{n}"));
        assert!(path.exists() && numbered(1).exists() && numbered(2).exists());
        assert!(!numbered(3).exists(), "only `keep` old files stay");
        for file in [path, numbered(1), numbered(2)] {
            let text = std::fs::read_to_string(&file).unwrap();
            assert_eq!(text.lines().count(), 2, "{}", file.display());
            for line in text.lines() {
                let event: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(event["data"]["a"], 1);
            }
        }
    }
}
