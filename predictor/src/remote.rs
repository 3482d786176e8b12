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

fn locate(uri: &str) -> Result<Location, String> {
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, prefix) = bucket_and_prefix(uri, rest)?;
        let mut options = options();
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = env("AWS_ENDPOINT_URL").or_else(|| {
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
        if env("S3_VERIFY_SSL").as_deref() == Some("0") {
            options = options.with_allow_invalid_certificates(true);
        }
        if env("AWS_DEFAULT_REGION").is_none() && env("AWS_REGION").is_none() {
            builder = builder.with_region("us-east-1");
        }
        let signed = ["AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE"]
            .iter()
            .any(|v| env(v).is_some());
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
    let location = locate(uri)?;
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
        assert!(locate("s3:///m").is_err());
        assert!(locate("https://h/").is_err());
    }
}
