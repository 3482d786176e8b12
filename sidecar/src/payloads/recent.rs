//! The last few payload events a sidecar took, kept in memory for `meshserve up`'s console
//! (`GET /meshserve/events/recent` on the sidecar's own port, only with `--log-recent N`):
//! each event's CloudEvent attributes and the start of its payload.

use std::collections::VecDeque;
use std::sync::Mutex;

use meshserve_filter_core::logger::Event;
use serde_json::{Map, Value, json};

/// Where the console reads them.
pub const RECENT_PATH: &str = "/meshserve/events/recent";

/// The most payload bytes kept of one event.
pub const PREVIEW_BYTES: usize = 2048;

/// The largest `--log-recent`.
pub const MAX_RECENT: usize = 1000;

/// A bounded list of event summaries, oldest first.
#[derive(Debug)]
pub struct Recent {
    capacity: usize,
    events: Mutex<VecDeque<Value>>,
}

impl Recent {
    pub fn new(capacity: usize) -> Recent {
        let capacity = capacity.min(MAX_RECENT);
        Recent {
            capacity,
            events: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    /// Keeps these summaries ([`summaries`], of events now durable), dropping the oldest
    /// beyond the capacity.
    pub fn keep(&self, summaries: Vec<Value>) {
        let Ok(mut kept) = self.events.lock() else {
            return;
        };
        for summary in summaries {
            if kept.len() == self.capacity {
                kept.pop_front();
            }
            kept.push_back(summary);
        }
    }

    /// `{"events": [...]}`, oldest first.
    pub fn to_json(&self) -> Value {
        let events: Vec<Value> = match self.events.lock() {
            Ok(kept) => kept.iter().cloned().collect(),
            Err(_) => Vec::new(),
        };
        json!({ "events": events })
    }
}

/// What [`Recent`] keeps of each event.
pub fn summaries(events: &[Event]) -> Vec<Value> {
    events.iter().map(summary).collect()
}

/// An event's attributes (`ce-` taken off their names), content type, size and the start of
/// its payload as text.
fn summary(event: &Event) -> Value {
    let mut attributes = Map::new();
    for (name, value) in &event.headers {
        let key = name.strip_prefix("ce-").unwrap_or(name);
        attributes.insert(key.to_owned(), Value::from(value.as_str()));
    }
    let end = event.body.len().min(PREVIEW_BYTES);
    let preview = event.body.get(..end).unwrap_or_default();
    json!({
        "attributes": attributes,
        "bytes": event.body.len(),
        "payload": String::from_utf8_lossy(preview),
        "payload_cut": end < event.body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: usize, body: Vec<u8>) -> Event {
        Event {
            headers: vec![
                ("ce-id".into(), id.to_string()),
                (
                    "ce-type".into(),
                    "org.kubeflow.serving.inference.request".into(),
                ),
                ("content-type".into(), "application/json".into()),
            ],
            body,
        }
    }

    #[test]
    fn keeps_the_last_events_and_the_start_of_each_payload() {
        let recent = Recent::new(2);
        recent.keep(summaries(&[
            event(1, b"{}".to_vec()),
            event(2, b"{\"a\": 1}".to_vec()),
        ]));
        recent.keep(summaries(&[event(3, vec![b'x'; PREVIEW_BYTES + 10])]));
        let json = recent.to_json();
        let events = json["events"].as_array().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["attributes"]["id"], "2");
        assert_eq!(events[0]["attributes"]["content-type"], "application/json");
        assert_eq!(events[0]["payload"], "{\"a\": 1}");
        assert_eq!(events[1]["bytes"], PREVIEW_BYTES + 10);
        assert_eq!(events[1]["payload"].as_str().unwrap().len(), PREVIEW_BYTES);
        assert_eq!(events[1]["payload_cut"], true);
        assert_eq!(Recent::new(usize::MAX).capacity, MAX_RECENT);
    }
}
