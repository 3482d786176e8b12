//! CloudEvents on the wire, both ways: an event read from HTTP headers in binary mode (the
//! intake and `meshserve log-sink` take them so), and an event written as one line of
//! CloudEvents' JSON format (the file sink and `log-sink` write them so).

use base64::Engine;
use meshserve_filter_core::logger::Event;

/// An event from HTTP headers in CloudEvents binary mode: the `ce-*` ones and `content-type`.
pub fn event_from_headers(headers: &http::HeaderMap, body: Vec<u8>) -> Event {
    let headers = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("ce-") || *name == http::header::CONTENT_TYPE)
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    Event { headers, body }
}

/// The event in CloudEvents' JSON format, one line: its attributes (`ce-` dropped),
/// `datacontenttype`, and `data` (a JSON payload as it came, checked to be JSON) or
/// `data_base64`.
pub fn json_line(event: &Event) -> Vec<u8> {
    use serde_json::value::RawValue;

    let mut line = Vec::with_capacity(event.body.len() + 512);
    line.push(b'{');
    let field = |line: &mut Vec<u8>, name: &str| {
        if line.len() > 1 {
            line.push(b',');
        }
        // Names and string values go through serde_json for their escaping.
        let _ = serde_json::to_writer(&mut *line, name);
        line.push(b':');
    };
    let mut json_payload = false;
    for (name, value) in &event.headers {
        if let Some(attribute) = name.strip_prefix("ce-") {
            field(&mut line, attribute);
            match serde_json::from_str::<&RawValue>(value) {
                Ok(raw) if attribute == "metadata" => line.extend_from_slice(raw.get().as_bytes()),
                _ => {
                    let _ = serde_json::to_writer(&mut line, value);
                }
            }
        } else if name == "content-type" {
            json_payload = value.starts_with("application/json");
            field(&mut line, "datacontenttype");
            let _ = serde_json::to_writer(&mut line, value);
        }
    }
    match json_payload
        .then(|| serde_json::from_slice::<&RawValue>(&event.body).ok())
        .flatten()
    {
        // A JSON payload as it came (checked to be JSON): no parse into values and back.
        Some(raw) => {
            field(&mut line, "data");
            line.extend_from_slice(raw.get().as_bytes());
        }
        None => {
            field(&mut line, "data_base64");
            let _ = serde_json::to_writer(
                &mut line,
                &base64::engine::general_purpose::STANDARD.encode(&event.body),
            );
        }
    }
    line.push(b'}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn json_lines_keep_json_payloads_as_json() {
        let event = Event {
            headers: vec![
                ("ce-id".into(), "1".into()),
                ("ce-metadata".into(), r#"{"x-user":["ada"]}"#.into()),
                ("content-type".into(), "application/json".into()),
            ],
            body: br#"{"instances": [[1, 2]]}"#.to_vec(),
        };
        let line: Value = serde_json::from_slice(&json_line(&event)).unwrap();
        assert_eq!(line["id"], "1");
        assert_eq!(line["metadata"]["x-user"][0], "ada");
        assert_eq!(line["data"]["instances"][0][1], 2);
        let binary = Event {
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            body: vec![0, 255],
        };
        let line: Value = serde_json::from_slice(&json_line(&binary)).unwrap();
        assert_eq!(line["data_base64"], "AP8=");
    }
}
