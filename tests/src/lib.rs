//! Test harness: runs the real `meshserve` binary on 127.0.0.1 with OS-chosen ports, reads the
//! bound addresses from its log, keeps its log to print when a test fails, and kills it on drop.

pub mod istio;
pub mod otlp;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A command for a process the test owns: besides the kill on drop, the kernel sends it
/// SIGTERM when the thread that started it ends (`setpriv --pdeathsig`, util-linux), so it
/// cannot outlive its test even when the test binary itself is killed or aborts. SIGTERM, not
/// SIGKILL, so that `meshserve up` stops its own sidecars and Envoy on the way out.
pub fn owned_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    static SETPRIV: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let setpriv = SETPRIV.get_or_init(|| {
        ["/usr/bin/setpriv", "/bin/setpriv"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    });
    match setpriv {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "TERM", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The `meshserve` binary: `$MESHSERVE_BIN`, else the workspace's release or debug build.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHSERVE_BIN") {
        return PathBuf::from(path);
    }
    let release = root().join("target/release/meshserve");
    if release.exists() {
        release
    } else {
        root().join("target/debug/meshserve")
    }
}

pub fn model_repository() -> PathBuf {
    root().join("models/repository")
}

/// A running `meshserve serve`.
#[derive(Debug)]
pub struct Sidecar {
    child: Child,
    log: Arc<Mutex<String>>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl Sidecar {
    /// Starts `meshserve serve` on the demo repository with these extra flags, and waits
    /// until it is ready.
    pub fn start(extra: &[&str]) -> Sidecar {
        Sidecar::start_on(&model_repository(), extra, true)
    }

    /// Starts `meshserve serve` on `repository`; waits for readiness if `wait_ready`.
    pub fn start_on(repository: &Path, extra: &[&str], wait_ready: bool) -> Sidecar {
        Sidecar::start_at(repository, (0, 0), extra, wait_ready)
    }

    /// As [`Sidecar::start_on`], on the given (REST, gRPC) ports (0: the OS picks): a restart
    /// on the ports an Envoy already points at.
    pub fn start_at(
        repository: &Path,
        (http, grpc): (u16, u16),
        extra: &[&str],
        wait_ready: bool,
    ) -> Sidecar {
        let mut args: Vec<String> = vec![
            "--model-repository".into(),
            repository.display().to_string(),
            "--http-port".into(),
            http.to_string(),
            "--grpc-port".into(),
            grpc.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Sidecar::serve(&args, wait_ready)
    }

    /// `meshserve serve ARGS` (they name the model and the ports, 0 for the OS to pick);
    /// waits for readiness if `wait_ready`.
    pub fn serve(args: &[String], wait_ready: bool) -> Sidecar {
        let args: Vec<String> = std::iter::once("serve".to_owned())
            .chain(args.iter().cloned())
            .collect();
        let sidecar = Sidecar::command(&args);
        if wait_ready {
            sidecar.wait_ready();
        }
        sidecar
    }

    /// Runs `meshserve ARGS` (a subcommand that logs `listening on http=` and `grpc=`) and
    /// reads the addresses it bound.
    pub fn command(args: &[String]) -> Sidecar {
        let (mut child, log) = spawn(args);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = log.lock().map(|l| l.clone()).unwrap_or_default();
            if let (Some(http), Some(grpc)) = (address(&text, "http"), address(&text, "grpc")) {
                return Sidecar {
                    child,
                    log,
                    http,
                    grpc,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("meshserve exited ({status}) before listening:\n{text}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("meshserve did not report its addresses within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Polls `/v2/health/ready` with plain HTTP until 200 (30 s deadline).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_status(self.http, "GET /v2/health/ready") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("meshserve never became ready:\n{}", self.log());
    }

    /// Kills the process (SIGKILL: no draining, no clean-up) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit (deadline), returning its status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- meshserve log ----\n{}", self.log());
        }
    }
}

/// `meshserve log-sink`: a CloudEvents receiver writing JSON lines to a file.
#[derive(Debug)]
pub struct LogSink {
    child: Child,
    log: Arc<Mutex<String>>,
    pub addr: SocketAddr,
    pub out: PathBuf,
}

impl LogSink {
    /// Starts a receiver on `port` (0: the OS picks) appending to `out`.
    pub fn start(port: u16, out: &Path) -> LogSink {
        let args: Vec<String> = vec![
            "log-sink".into(),
            "--port".into(),
            port.to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        let (mut child, log) = spawn(&args);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = log.lock().map(|l| l.clone()).unwrap_or_default();
            if let Some(addr) = address(&text, "http") {
                return LogSink {
                    child,
                    log,
                    addr,
                    out: out.to_owned(),
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("meshserve log-sink exited ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "meshserve log-sink did not listen within 30 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The events received so far, one JSON value each.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the receiver (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `meshserve ARGS` to completion (with a deadline) and returns its exit status and log.
pub fn run_to_exit(args: &[&str], within: Duration) -> (Option<ExitStatus>, String) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let (mut child, log) = spawn(&args);
    let deadline = Instant::now() + within;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(50));
    let text = log.lock().map(|l| l.clone()).unwrap_or_default();
    (status, text)
}

fn spawn(args: &[String]) -> (Child, Arc<Mutex<String>>) {
    let mut child = owned_command(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (run scripts/setup.sh)",
                binary().display()
            )
        });
    let log = capture_stderr(&mut child);
    (child, log)
}

/// Collects a child's stderr, line by line, into a shared buffer.
fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
    }
    log
}

/// The address in a `listening on <kind>=ADDR` log line.
fn address(log: &str, kind: &str) -> Option<SocketAddr> {
    let marker = format!("listening on {kind}=");
    let start = log.find(&marker)? + marker.len();
    log[start..].split_whitespace().next()?.parse().ok()
}

/// The status code of a bodiless request line such as `GET /x`, over a fresh connection.
pub fn http_status(addr: SocketAddr, request_line: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// A reference fixture from `models/reference`.
pub fn fixtures() -> Vec<serde_json::Value> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("models/reference"))
        .expect("models/reference")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).expect("fixture")).expect("fixture JSON"))
        .collect()
}

/// Compares flat JSON data of a datatype: numbers within `tolerance`, FP16 and FP32 compared
/// as the f32 they mean (JSON carries their shortest decimal form), the rest exactly.
pub fn assert_data_close(
    datatype: &str,
    actual: &serde_json::Value,
    expected: &serde_json::Value,
    tolerance: f64,
    what: &str,
) {
    let (Some(a), Some(e)) = (actual.as_array(), expected.as_array()) else {
        panic!("{what}: not arrays: {actual} vs {expected}");
    };
    assert_eq!(a.len(), e.len(), "{what}: lengths differ");
    let single = matches!(datatype, "FP16" | "FP32");
    for (i, (x, y)) in a.iter().zip(e).enumerate() {
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) if single && (x as f32) == (y as f32) => {}
            (Some(x), Some(y)) if x.fract() != 0.0 || y.fract() != 0.0 || tolerance > 0.0 => {
                assert!(
                    (x - y).abs() <= tolerance || x == y,
                    "{what}[{i}]: {x} vs {y} (tolerance {tolerance})"
                )
            }
            _ => assert_eq!(x, y, "{what}[{i}]"),
        }
    }
}

/// A model repository in a temporary directory, made of the demo models with other configs;
/// removed on drop.
#[derive(Debug)]
pub struct TempRepository {
    pub path: PathBuf,
}

impl TempRepository {
    /// `models`: (name, demo model to copy as version 1, config.yaml text or "" for none).
    pub fn new(tag: &str, models: &[(&str, &str, &str)]) -> TempRepository {
        let path = std::env::temp_dir().join(format!("meshserve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        for (name, source, config) in models {
            let version = path.join(name).join("1");
            std::fs::create_dir_all(&version).expect("temp repository");
            std::fs::copy(
                model_repository().join(source).join("1/model.onnx"),
                version.join("model.onnx"),
            )
            .expect("copy model");
            if !config.is_empty() {
                std::fs::write(path.join(name).join("config.yaml"), config).expect("config");
            }
        }
        TempRepository { path }
    }
}

impl Drop for TempRepository {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The Envoy binary: `$MESHSERVE_ENVOY`, else the set-up script's `.venv`.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHSERVE_ENVOY") {
        return PathBuf::from(path);
    }
    let lib = root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("no Envoy under {} (run scripts/setup.sh)", lib.display()))
}

/// `meshserve_filters.wasm`, as `scripts/setup.sh` builds it.
pub fn wasm_module() -> PathBuf {
    let path = root().join("target/wasm32-wasip1/release/meshserve_filters.wasm");
    assert!(
        path.is_file(),
        "{} is missing (run scripts/setup.sh)",
        path.display()
    );
    path
}

/// A ModelInfer request for the digits models (one row of 64 features, all 2.0), with `id`.
pub fn digits_grpc_request(id: &str) -> meshserve_proto::inference::ModelInferRequest {
    use meshserve_proto::inference::model_infer_request::InferInputTensor;
    meshserve_proto::inference::ModelInferRequest {
        model_name: "digits".into(),
        id: id.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 64],
            parameters: Default::default(),
            contents: None,
        }],
        raw_input_contents: vec![meshserve_proto::TensorData::Fp32(vec![2.0; 64]).to_raw()],
        ..Default::default()
    }
}

/// A running Envoy on a bootstrap file; its listener's real port read from the admin API.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    log: Arc<Mutex<String>>,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (whose admin and listener ports may be 0) and waits until
    /// the listener is up.
    pub fn start(bootstrap: &Path, workdir: &Path) -> Envoy {
        let admin_file = workdir.join("admin-address");
        let _ = std::fs::remove_file(&admin_file);
        let mut child = owned_command(envoy_binary())
            .args([
                "-c",
                &bootstrap.display().to_string(),
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "-l",
                "info",
            ])
            .args(["--admin-address-path", &admin_file.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start Envoy");
        let log = capture_stderr(&mut child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Some(addr) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|a| a.trim().parse().ok())
            {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "Envoy exited ({status}):\n{}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "Envoy wrote no admin address in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut envoy = Envoy {
            child,
            log,
            admin,
            listener: admin,
        };
        let listener = loop {
            let text = envoy.admin_get("/listeners?format=json");
            let port = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()
                });
            if let Some(port) = port.filter(|&p| p > 0) {
                break SocketAddr::from(([127, 0, 0, 1], port as u16));
            }
            assert!(
                Instant::now() < deadline,
                "Envoy's listener did not come up:\n{}",
                envoy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        envoy.listener = listener;
        while envoy.admin_get("/ready").trim() != "LIVE" {
            assert!(
                Instant::now() < deadline,
                "Envoy never became ready:\n{}",
                envoy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        envoy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listener)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// A GET on the admin API; the body ("" on failure).
    pub fn admin_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(self.admin) else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        );
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            return String::new();
        };
        if !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return body.to_owned();
        }
        // Undo chunked encoding: size line, data, repeat until a zero size.
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            out.push_str(&after[..size]);
            rest = after[size..].trim_start_matches("\r\n");
        }
        out
    }

    /// The value of one stat (`/stats?filter=` exact name), 0 if absent.
    pub fn stat(&self, name: &str) -> u64 {
        self.admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))
            .lines()
            .find_map(|l| {
                l.split_once(": ")
                    .and_then(|(k, v)| (k == name).then(|| v.trim().parse().ok()).flatten())
            })
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- Envoy log ----\n{}", self.log());
        }
    }
}

/// Writes a local mesh for `config` into `dir` (Envoy on OS-picked loopback ports, the
/// workspace's wasm module) and returns the bootstrap's path. `upstreams`: (cluster, REST
/// address, gRPC address). `otlp`: a collector for Envoy's traces.
pub fn write_local_mesh(
    dir: &Path,
    config: &serde_json::Value,
    upstreams: &[(&str, SocketAddr, SocketAddr)],
    otlp: Option<SocketAddr>,
) -> PathBuf {
    use meshserve_mesh::render::{self, EnvoySpec, Upstream};
    let upstreams: Vec<(String, Upstream)> = upstreams
        .iter()
        .map(|(name, http, grpc)| ((*name).to_owned(), Upstream::local(*http, *grpc)))
        .collect();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let spec = EnvoySpec {
        listener: loopback,
        admin: loopback,
        config_dir: dir,
        upstreams: &upstreams,
        otlp: otlp.map(Into::into),
        trace_sampling: 1.0,
        jwt: Vec::new(),
        wake: None,
    };
    render::write_mesh(dir, config, &wasm_module(), &spec).expect("the mesh's files");
    dir.join(render::BOOTSTRAP_FILE)
}

/// A running `meshserve up` on an InferenceService file, on an OS-picked Envoy port; stopped
/// (SIGTERM, then a kill) on drop.
#[derive(Debug)]
pub struct Up {
    child: Child,
    /// Envoy's listener, `http://127.0.0.1:PORT`.
    pub url: String,
    pub state: PathBuf,
}

impl Up {
    pub fn start(file: &Path, extra: &[&str]) -> Up {
        let state = std::env::temp_dir().join(format!(
            "meshserve-up-{}-{}",
            std::process::id(),
            file.file_stem().and_then(|s| s.to_str()).unwrap_or("isvc")
        ));
        let mut child = owned_command(binary())
            .arg("up")
            .arg(file)
            .args(["--port", "0", "--state-dir"])
            .arg(&state)
            .arg("--envoy")
            .arg(envoy_binary())
            .arg("--wasm")
            .arg(wasm_module())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start meshserve up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let url = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(90))
                .expect("meshserve up did not come up within 90 s");
            if let Some(rest) = line.strip_prefix("meshserve is up: Envoy on ") {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        Up { child, url, state }
    }

    /// The process id of `meshserve up`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The processes whose parent is `parent` and whose command line holds `needle`.
pub fn children_with(parent: u32, needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
