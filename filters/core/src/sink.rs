//! Where payload events finally go: the sink a predictor's `logger.url` names. The control
//! plane checks the URL when it reads an InferenceService; the sidecar's delivery sends to it.

use std::path::PathBuf;

/// Old files a rotated file sink keeps.
pub const FILE_SINK_KEEP: usize = 5;

/// A payload-log sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// CloudEvents in binary mode, `POST`ed to this URL.
    Http(http::Uri),
    /// A JSON-lines file, rotated past `max_bytes` (`keep` old files).
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: usize,
    },
}

impl SinkSpec {
    /// `http://host:port/path` or `file:///absolute/path.jsonl`; a file sink rotates past
    /// `file_max_bytes`.
    pub fn parse(url: &str, file_max_bytes: u64) -> Result<SinkSpec, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{url}: a file sink needs an absolute path (file:///...)"
                ));
            }
            return Ok(SinkSpec::File {
                path: PathBuf::from(path),
                max_bytes: file_max_bytes,
                keep: FILE_SINK_KEEP,
            });
        }
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!(
                "{url}: the sink must be http://host[:port][/path] or file:///path"
            ));
        }
        Ok(SinkSpec::Http(uri))
    }

    /// The sink as a URL again, for logs.
    pub fn describe(&self) -> String {
        match self {
            SinkSpec::Http(uri) => uri.to_string(),
            SinkSpec::File { path, .. } => format!("file://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_urls_are_checked() {
        assert!(matches!(
            SinkSpec::parse("http://127.0.0.1:8090/x", 1),
            Ok(SinkSpec::Http(_))
        ));
        assert_eq!(
            SinkSpec::parse("file:///tmp/e.jsonl", 7),
            Ok(SinkSpec::File {
                path: PathBuf::from("/tmp/e.jsonl"),
                max_bytes: 7,
                keep: FILE_SINK_KEEP
            })
        );
        for bad in ["file://relative.jsonl", "https://x", "ftp://x", "nonsense"] {
            assert!(SinkSpec::parse(bad, 1).is_err(), "{bad}");
        }
        assert_eq!(
            SinkSpec::parse("http://sink:9/p", 1).unwrap().describe(),
            "http://sink:9/p"
        );
    }
}
