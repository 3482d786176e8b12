//! Delivery from the spool to the sink, in order, at least once: a batch of events is sent
//! (to an HTTP sink within its adaptive window, [`super::http_sink`]), each retried with
//! backoff until the sink takes it, and only then does the cursor move past the batch.
//!
//! Sinks: `http://...` gets each event as a CloudEvent in binary mode (its `ce-*` headers and
//! payload, as KServe's logger sends them), or in CloudEvents' batched mode when asked;
//! `file:///path` gets JSON lines (CloudEvents' JSON format), synced before the cursor moves,
//! rotated by size.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use meshserve_filter_core::logger::Event;
use meshserve_filter_core::sink::SinkSpec;

use super::cloudevents::json_line;
use super::http_sink::{BACKOFF_FIRST, BACKOFF_MAX, HttpSink};
use super::metrics::PayloadMetrics;
use super::spool::Reader;

/// Events read from the spool at once: an HTTP sink gets them within its window (or as one
/// batch), a file sink in one write and one sync.
const BATCH_HTTP: usize = 64;
const BATCH_FILE: usize = 1024;
/// After a batch smaller than the most, delivery waits this long for more before reading again:
/// fewer, larger writes and syncs under load, for a little delay.
const LINGER: Duration = Duration::from_millis(20);
/// Runs delivery until the spool closes; an HTTP sink in CloudEvents' batched mode if
/// `batched`.
pub async fn run(mut reader: Reader, sink: SinkSpec, batched: bool, metrics: PayloadMetrics) {
    let mut http = match &sink {
        SinkSpec::Http(uri) => Some(HttpSink::new(uri.clone(), batched)),
        SinkSpec::File { .. } => None,
    };
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
        match (http.as_mut(), file.as_mut()) {
            (Some(http), _) => http.deliver(events, &metrics).await,
            (None, Some(file)) => {
                let mut delay = BACKOFF_FIRST;
                while let Err(e) = file.append(&events) {
                    metrics.retried.inc_by(count);
                    tracing::warn!(error = %e, "cannot write to the payload file sink; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
            (None, None) => return,
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
