//! Remote model storage, as KServe's storage initializer reads it, downloaded into a local
//! cache so that the rest of the predictor sees a local storage location ([`crate::storage`]).
//!
//! | `storageUri` | from | credentials and settings (environment) |
//! |---|---|---|
//! | `s3://BUCKET/PREFIX` | S3 or an S3-compatible server | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`/`AWS_REGION`, `AWS_ENDPOINT_URL`; KServe's `S3_ENDPOINT` (host:port), `S3_USE_HTTPS` (`0`: http), `S3_VERIFY_SSL` (`0`: do not check the certificate); none of the keys: anonymous |
//! | `gs://BUCKET/PREFIX` | Google Cloud Storage | `GOOGLE_APPLICATION_CREDENTIALS` (a service-account key file) or `GOOGLE_SERVICE_ACCOUNT_KEY`; `STORAGE_EMULATOR_HOST` (an emulator, no credentials); none: anonymous (public buckets) |
//! | `https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX` | Azure Blob Storage | `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, or a client secret (`AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`, `AZURE_TENANT_ID`); none: anonymous |
//! | `http(s)://HOST/PATH` | one file; `.tar.gz`, `.tgz` and `.zip` are unpacked | none |
//!
//! Every object under the prefix (or the one object the URI names) is streamed to disk, never
//! held whole in memory, into a directory that is renamed into place only when complete: a
//! half-downloaded model is never served. The cache key is the URI and what the listing says
//! of each object (its path, size and ETag), so a restart over unchanged objects downloads
//! nothing, and a changed object is downloaded again. Requests are retried with exponential
//! backoff (object_store's defaults: 10 tries within 3 minutes); the whole download is bounded
//! by [`MAX_DOWNLOAD_BYTES`]. Errors name the URI, never a credential.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

/// The most bytes one storage location may download, by default (64 GiB; `meshserve serve
/// --max-download-bytes`).
pub const MAX_DOWNLOAD_BYTES: u64 = 64 << 30;
/// How long one object's download may take.
const OBJECT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Whether a storage location is remote (downloaded by [`fetch`]).
pub fn is_remote(uri: &str) -> bool {
    ["s3://", "gs://", "http://", "https://"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

/// What a URI names: a store and the prefix (or object) in it, or one file over HTTP.
struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// Whether the store can list a prefix (not plain HTTP: there the URI is one file).
    listable: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn options() -> ClientOptions {
    ClientOptions::new().with_timeout(OBJECT_TIMEOUT)
}

/// `BUCKET/PREFIX` of `s3://`, `gs://`.
fn bucket_and_prefix<'a>(uri: &str, rest: &'a str) -> Result<(&'a str, &'a str), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("{uri}: no bucket"));
    }
    Ok((bucket, prefix.trim_matches('/')))
}

/// S3 settings that KServe's storage spec gives (the storage-config secret's entry), read
/// before the environment's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint_url: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub region: Option<String>,
    /// `verify_ssl: "0"` or `"false"`: do not check the certificate.
    pub verify_ssl: Option<bool>,
    /// `anonymous: "true"`: unsigned requests.
    pub anonymous: bool,
}

/// The environment variable KServe's webhook gives the storage initializer: the JSON entry of
/// the storage-config secret that `storage.key` names.
pub const STORAGE_CONFIG: &str = "STORAGE_CONFIG";
/// `storage.parameters` as JSON, overlaid on [`STORAGE_CONFIG`].
pub const STORAGE_OVERRIDE_CONFIG: &str = "STORAGE_OVERRIDE_CONFIG";

/// KServe's storage spec (`storage: {key, path, parameters}`) resolved: the storage-config
/// entry (`config`, JSON of strings: `type`, `bucket`, `endpoint_url`, `access_key_id`,
/// `secret_access_key`, `region`, `verify_ssl`, `anonymous`) with `overrides` (the
/// `parameters`) laid over it, and `path` inside the bucket. Returns the `s3://` URI and its
/// settings. Only `type: s3` is read (KServe's other types are HDFS).
pub fn storage_spec(
    path: &str,
    config: &str,
    overrides: Option<&str>,
) -> Result<(String, S3Settings), String> {
    let parse =
        |what: &str, text: &str| -> Result<serde_json::Map<String, serde_json::Value>, String> {
            match serde_json::from_str(text) {
                Ok(serde_json::Value::Object(map)) => Ok(map),
                _ => Err(format!("{what} is not a JSON object of strings")),
            }
        };
    let mut entry = parse(STORAGE_CONFIG, config)?;
    if let Some(overrides) = overrides.filter(|o| !o.trim().is_empty()) {
        entry.extend(parse("storage.parameters", overrides)?);
    }
    let get = |key: &str| {
        entry
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    match get("type").as_deref() {
        Some("s3") => {}
        Some(other) => {
            return Err(format!(
                "storage type '{other}' is not read (meshserve reads s3 storage specs; give other stores as storageUri)"
            ));
        }
        None => return Err("the storage spec names no type (KServe: \"type\": \"s3\")".into()),
    }
    let bucket = get("bucket").ok_or(
        "the storage spec names no bucket (in storage.parameters or the storage-config entry)",
    )?;
    let flag =
        |key: &str| get(key).map(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false"));
    let uri = format!("s3://{bucket}/{}", path.trim_matches('/'));
    Ok((
        uri.trim_end_matches('/').to_owned(),
        S3Settings {
            endpoint_url: get("endpoint_url"),
            access_key_id: get("access_key_id"),
            secret_access_key: get("secret_access_key"),
            region: get("region"),
            verify_ssl: flag("verify_ssl"),
            anonymous: flag("anonymous").unwrap_or(false),
        },
    ))
}

/// Downloads what a storage spec names ([`storage_spec`]); returns what [`fetch`] returns.
pub async fn fetch_storage_spec(
    path: &str,
    config: &str,
    overrides: Option<&str>,
    cache: &Path,
    max_bytes: u64,
) -> Result<PathBuf, String> {
    let (uri, s3) = storage_spec(path, config, overrides)?;
    tracing::info!(%uri, "storage spec");
    fetch_with(&uri, &s3, cache, max_bytes).await
}

fn locate(uri: &str, s3: &S3Settings) -> Result<Location, String> {
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, prefix) = bucket_and_prefix(uri, rest)?;
        let mut options = options();
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(region) = &s3.region {
            builder = builder.with_region(region);
        }
        if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let endpoint = s3
            .endpoint_url
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| {
                env("S3_ENDPOINT").map(|host| {
                    let scheme = if env("S3_USE_HTTPS").as_deref() == Some("0") {
                        "http"
                    } else {
                        "https"
                    };
                    format!("{scheme}://{host}")
                })
            });
        if let Some(endpoint) = endpoint {
            options = options.with_allow_http(endpoint.starts_with("http://"));
            builder = builder.with_endpoint(endpoint);
        }
        if s3.verify_ssl == Some(false)
            || (s3.verify_ssl.is_none() && env("S3_VERIFY_SSL").as_deref() == Some("0"))
        {
            options = options.with_allow_invalid_certificates(true);
        }
        if s3.region.is_none() && env("AWS_DEFAULT_REGION").is_none() && env("AWS_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        let signed = !s3.anonymous
            && (s3.access_key_id.is_some()
                || ["AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE"]
                    .iter()
                    .any(|v| env(v).is_some()));
        let store = built(
            uri,
            builder
                .with_skip_signature(!signed)
                .with_client_options(options)
                .build(),
        )?;
        return Ok(Location {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix),
            listable: true,
        });
    }
    if let Some(rest) = uri.strip_prefix("gs://") {
        let (bucket, prefix) = bucket_and_prefix(uri, rest)?;
        let mut builder =
            object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
        let mut options = options();
        if let Some(host) = env("STORAGE_EMULATOR_HOST") {
            let base = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            options = options.with_allow_http(base.starts_with("http://"));
            builder = builder
                .with_base_url(base.trim_end_matches('/'))
                .with_skip_signature(true);
        } else if env("GOOGLE_APPLICATION_CREDENTIALS").is_none()
            && env("GOOGLE_SERVICE_ACCOUNT_KEY").is_none()
            && env("GOOGLE_SERVICE_ACCOUNT").is_none()
        {
            builder = builder.with_skip_signature(true);
        }
        let store = built(uri, builder.with_client_options(options).build())?;
        return Ok(Location {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix),
            listable: true,
        });
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(format!("{uri}: not a remote storage location"));
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(account) = host.strip_suffix(".blob.core.windows.net") {
        let (container, prefix) = path.split_once('/').unwrap_or((path, ""));
        if container.is_empty() {
            return Err(format!("{uri}: no container"));
        }
        let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_account(account)
            .with_container_name(container);
        let signed = [
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_SAS_KEY",
            "AZURE_CLIENT_SECRET",
            "AZURE_STORAGE_USE_EMULATOR",
        ]
        .iter()
        .any(|v| env(v).is_some());
        builder = builder.with_skip_signature(!signed);
        let store = built(uri, builder.with_client_options(options()).build())?;
        return Ok(Location {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            listable: true,
        });
    }
    // One file over HTTP: the store is its directory.
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    if file.is_empty() || file.contains(['?', '#']) {
        return Err(format!(
            "{uri}: an http(s) location names one file (a model, or a .tar.gz/.tgz/.zip archive)"
        ));
    }
    let store = built(
        uri,
        object_store::http::HttpBuilder::new()
            .with_url(format!("{scheme}://{host}/{dir}"))
            .with_client_options(options().with_allow_http(scheme == "http"))
            .build(),
    )?;
    Ok(Location {
        store: Arc::new(store),
        prefix: ObjectPath::from(file),
        listable: false,
    })
}

fn built<T>(uri: &str, result: object_store::Result<T>) -> Result<T, String> {
    result.map_err(|e| store_error(uri, &e))
}

/// A storage client's error, for the user: the URI, and what went wrong without credentials.
fn store_error(uri: &str, e: &object_store::Error) -> String {
    format!("{uri}: {}", redact(&e.to_string()))
}

/// Drops what could be a credential from an error text (a query string with a signature).
fn redact(text: &str) -> String {
    text.split_whitespace()
        .map(|word| match word.split_once('?') {
            Some((before, _)) if before.contains("://") => format!("{before}?..."),
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The objects the location holds: everything under the prefix, or the one object it names.
/// The boolean says which (true: one object).
async fn objects(uri: &str, location: &Location) -> Result<(Vec<ObjectMeta>, bool), String> {
    let failed = |e: object_store::Error| store_error(uri, &e);
    let mut listed = Vec::new();
    if location.listable {
        let mut list = location.store.list(Some(&location.prefix));
        while let Some(item) = list.next().await {
            listed.push(item.map_err(failed)?);
        }
    }
    if !listed.is_empty() {
        listed.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        return Ok((listed, false));
    }
    match location.store.head(&location.prefix).await {
        Ok(meta) => Ok((vec![meta], true)),
        Err(object_store::Error::NotFound { .. }) => {
            Err(format!("{uri}: no object there, nor under it"))
        }
        Err(e) => Err(failed(e)),
    }
}

/// Downloads the storage at `uri` into `cache` (once per content) and returns the local
/// location: a directory, or the one model file the URI names.
pub async fn fetch(uri: &str, cache: &Path, max_bytes: u64) -> Result<PathBuf, String> {
    fetch_with(uri, &S3Settings::default(), cache, max_bytes).await
}

/// [`fetch`], with S3 settings from a storage spec ([`storage_spec`]) read first.
pub async fn fetch_with(
    uri: &str,
    s3: &S3Settings,
    cache: &Path,
    max_bytes: u64,
) -> Result<PathBuf, String> {
    let location = locate(uri, s3)?;
    let (objects, single) = objects(uri, &location).await?;
    let total: u64 = objects.iter().map(|o| o.size).sum();
    if total > max_bytes {
        return Err(format!(
            "{uri}: {total} bytes, over the download limit of {max_bytes} (--max-download-bytes)"
        ));
    }
    let mut key = Sha256::new();
    key.update(uri.as_bytes());
    for object in &objects {
        key.update(object.location.as_ref().as_bytes());
        key.update(object.size.to_le_bytes());
        key.update(object.e_tag.as_deref().unwrap_or_default().as_bytes());
    }
    let key: String = key.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let done = cache.join(&key);
    let result = |dir: &Path| -> Result<PathBuf, String> {
        if !single {
            return Ok(dir.to_owned());
        }
        // One object: the file itself, unless it was an archive (then its contents).
        let name = object_name(&objects[0].location);
        let file = dir.join(&name);
        Ok(if file.is_file() { file } else { dir.to_owned() })
    };
    if done.is_dir() {
        tracing::info!(%uri, dir = %done.display(), "storage: already downloaded");
        return result(&done);
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let partial = cache.join(format!("{key}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let outcome = download(uri, &location, &objects, single, &partial, max_bytes).await;
    if let Err(e) = outcome {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    match std::fs::rename(&partial, &done) {
        Ok(()) => {}
        // Another process finished the same download first: use its copy.
        Err(_) if done.is_dir() => {
            let _ = std::fs::remove_dir_all(&partial);
        }
        Err(e) => return Err(format!("{}: {e}", done.display())),
    }
    tracing::info!(%uri, bytes = total, objects = objects.len(), dir = %done.display(), "storage: downloaded");
    result(&done)
}

fn object_name(location: &ObjectPath) -> String {
    location
        .filename()
        .map_or_else(|| "model".to_owned(), str::to_owned)
}

async fn download(
    uri: &str,
    location: &Location,
    objects: &[ObjectMeta],
    single: bool,
    into: &Path,
    max_bytes: u64,
) -> Result<(), String> {
    let failed = |e: object_store::Error| store_error(uri, &e);
    let mut received = 0u64;
    for object in objects {
        let relative = if single {
            object_name(&object.location)
        } else {
            let full = object.location.as_ref();
            full.strip_prefix(location.prefix.as_ref())
                .unwrap_or(full)
                .trim_start_matches('/')
                .to_owned()
        };
        if relative.is_empty() || relative.split('/').any(|part| part == "..") {
            continue;
        }
        let target = into.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let mut file =
            std::fs::File::create(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let mut stream = location
            .store
            .get(&object.location)
            .await
            .map_err(failed)?
            .into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(failed)?;
            written += chunk.len() as u64;
            received += chunk.len() as u64;
            if received > max_bytes {
                return Err(format!(
                    "{uri}: over the download limit of {max_bytes} bytes (--max-download-bytes)"
                ));
            }
            file.write_all(&chunk)
                .map_err(|e| format!("{}: {e}", target.display()))?;
        }
        if written != object.size {
            return Err(format!(
                "{uri}: {} ended after {written} of {} bytes",
                object.location, object.size
            ));
        }
        file.sync_all()
            .map_err(|e| format!("{}: {e}", target.display()))?;
        if single {
            unpack(uri, &target, into)?;
        }
    }
    Ok(())
}

/// Unpacks a `.tar.gz`/`.tgz`/`.zip` archive in place (the archive itself removed).
fn unpack(uri: &str, archive: &Path, into: &Path) -> Result<(), String> {
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bad = |e: &dyn std::fmt::Display| format!("{uri}: not a readable archive: {e}");
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        let file = std::fs::File::open(archive).map_err(|e| bad(&e))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        // `unpack` refuses entries that would land outside `into`.
        for entry in tar.entries().map_err(|e| bad(&e))? {
            let mut entry = entry.map_err(|e| bad(&e))?;
            entry.unpack_in(into).map_err(|e| bad(&e))?;
        }
    } else if name.ends_with(".zip") {
        let file = std::fs::File::open(archive).map_err(|e| bad(&e))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
        // `extract` refuses paths outside `into`.
        zip.extract(into).map_err(|e| bad(&e))?;
    } else {
        return Ok(());
    }
    std::fs::remove_file(archive).map_err(|e| format!("{}: {e}", archive.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_schemes_and_redaction() {
        assert!(is_remote("s3://b/m") && is_remote("gs://b") && is_remote("https://h/m.onnx"));
        assert!(!is_remote("file:///m") && !is_remote("pvc://c/m") && !is_remote("/m"));
        assert_eq!(
            redact("GET https://h/m.onnx?X-Amz-Signature=abc failed"),
            "GET https://h/m.onnx?... failed"
        );
        assert!(locate("s3:///m", &S3Settings::default()).is_err());
        assert!(locate("https://h/", &S3Settings::default()).is_err());
    }

    #[test]
    fn a_kserve_storage_spec_becomes_an_s3_uri_and_its_settings() {
        let config = r#"{"type": "s3", "access_key_id": "minio", "secret_access_key": "minio123",
            "endpoint_url": "http://minio-service.kubeflow:9000", "bucket": "mlpipeline", "region": "us-south"}"#;
        let (uri, s3) =
            storage_spec("/sklearn/", config, Some(r#"{"bucket": "example-models"}"#)).unwrap();
        assert_eq!(uri, "s3://example-models/sklearn");
        assert_eq!(
            s3.endpoint_url.as_deref(),
            Some("http://minio-service.kubeflow:9000")
        );
        assert_eq!(
            (s3.region.as_deref(), s3.anonymous, s3.verify_ssl),
            (Some("us-south"), false, None)
        );
        let (uri, _) = storage_spec("m", config, None).unwrap();
        assert_eq!(uri, "s3://mlpipeline/m");
        for (config, says) in [
            (r#"{"type": "hdfs", "bucket": "b"}"#, "hdfs"),
            (r#"{"bucket": "b"}"#, "no type"),
            (r#"{"type": "s3"}"#, "no bucket"),
            ("[1]", "not a JSON object"),
        ] {
            let why = storage_spec("m", config, None).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
    }
}
