//! `meshserve render` on the bundled InferenceServices: the committed demo rendering is
//! current, every Envoy configuration it writes passes `envoy --mode validate` (local,
//! compose, and the EnvoyFilter's extension config), docker-compose accepts the compose file,
//! and bad InferenceServices are answered with the field's path. The Istio and Kubernetes
//! YAML is checked against the published schemas by tests/python/test_render.py.

use std::path::{Path, PathBuf};
use std::process::Command;

use meshserve_e2e::{Envoy, binary, envoy_binary, root, wasm_module};
use serde_json::{Value, json};

/// A directory beside `envoy-config/demo/rendered` (so relative paths come out the same),
/// removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn beside_demo(tag: &str) -> Scratch {
        let dir = root().join(format!(
            "envoy-config/demo/.render-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn render(file: &str, out: &Path, extra: &[&str]) -> String {
    render_in(&root(), file, out, extra)
}

/// `meshserve render` run from `dir` (relative paths are relative to it).
fn render_in(dir: &Path, file: &str, out: &Path, extra: &[&str]) -> String {
    let output = Command::new(binary())
        .current_dir(dir)
        .args(["render", file, "--out", &out.display().to_string()])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "render {file} failed:\n{text}");
    text
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn validate(bootstrap: &Path) {
    let output = Command::new(envoy_binary())
        .args([
            "--mode",
            "validate",
            "-c",
            &bootstrap.display().to_string(),
            "--disable-hot-restart",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} is not a valid Envoy config:\n{}",
        bootstrap.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Puts the filters' extension configs inline (the real module as code) into a bootstrap's
/// HTTP filters, so Envoy validates the filter configuration itself too.
fn inline_filters(bootstrap: &mut Value, configs: &[(String, Value)]) {
    let filters = bootstrap
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters",
        )
        .unwrap();
    for (i, (name, typed)) in configs.iter().enumerate() {
        let mut typed = typed.clone();
        typed["config"]["vm_config"]["code"] =
            json!({"local": {"filename": wasm_module().display().to_string()}});
        assert_eq!(&filters[i]["name"], name);
        filters[i] = json!({"name": name, "typed_config": typed});
    }
}

fn ecds_configs(dir: &Path) -> Vec<(String, Value)> {
    ["router", "transformer", "logger"]
        .iter()
        .filter_map(|f| {
            let path = dir.join(format!("{f}.ecds.json"));
            path.is_file().then(|| {
                let ecds = read_json(&path);
                (
                    ecds["resources"][0]["name"].as_str().unwrap().to_owned(),
                    ecds["resources"][0]["typed_config"].clone(),
                )
            })
        })
        .collect()
}

#[test]
fn the_demo_rendering_is_current() {
    let committed = root().join("envoy-config/demo/rendered");
    let fresh = Scratch::beside_demo("current");
    let output = Command::new("bash")
        .current_dir(root())
        .args(["scripts/render-demo.sh", &fresh.0.display().to_string()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let now = files(&fresh.0);
    let then = files(&committed);
    let relative = |files: &[PathBuf], base: &Path| -> Vec<PathBuf> {
        files
            .iter()
            .map(|f| f.strip_prefix(base).unwrap().to_path_buf())
            .collect()
    };
    assert_eq!(
        relative(&then, &committed),
        relative(&now, &fresh.0),
        "envoy-config/demo/rendered has other files than a fresh rendering: run scripts/render-demo.sh"
    );
    for file in &now {
        let name = file.strip_prefix(&fresh.0).unwrap();
        // The local bootstrap names the ECDS files by the --out path.
        let text = std::fs::read_to_string(file).unwrap().replace(
            &fresh.0.display().to_string(),
            &committed.display().to_string(),
        );
        let text = text.replace(
            &committed.display().to_string(),
            "envoy-config/demo/rendered",
        );
        let old = std::fs::read_to_string(committed.join(name))
            .unwrap()
            .replace(
                &committed.display().to_string(),
                "envoy-config/demo/rendered",
            );
        assert_eq!(
            old,
            text,
            "envoy-config/demo/rendered/{} is stale: run scripts/render-demo.sh",
            name.display()
        );
    }
}

#[test]
fn every_rendered_envoy_configuration_is_valid() {
    let out = Scratch::beside_demo("valid");
    render(
        "envoy-config/demo/inferenceservice.yaml",
        &out.0,
        &["--otlp-endpoint", "http://otel-collector:4317"],
    );
    // The local bootstrap as written, then with the filters' configurations inline.
    validate(&out.0.join("envoy.json"));
    let mut bootstrap = read_json(&out.0.join("envoy.json"));
    inline_filters(&mut bootstrap, &ecds_configs(&out.0));
    let inline = out.0.join("envoy-inline.json");
    std::fs::write(&inline, bootstrap.to_string()).unwrap();
    validate(&inline);

    // The compose bootstrap, with its container paths where the files are here.
    let compose = out.0.join("compose");
    let text = std::fs::read_to_string(compose.join("envoy.json"))
        .unwrap()
        .replace("/etc/meshserve/config", &compose.display().to_string());
    let mut bootstrap: Value = serde_json::from_str(&text).unwrap();
    assert!(
        text.contains("\"STRICT_DNS\""),
        "compose reaches sidecars by name"
    );
    assert!(
        text.contains("envoy.tracers.opentelemetry"),
        "Envoy traces to the collector"
    );
    let here = compose.join("envoy-here.json");
    std::fs::write(&here, &text).unwrap();
    validate(&here);
    inline_filters(&mut bootstrap, &ecds_configs(&compose));
    std::fs::write(&here, bootstrap.to_string()).unwrap();
    validate(&here);

    // The EnvoyFilter's extension configs, inline in the local bootstrap.
    let envoy_filter: Value = serde_yaml::from_str(
        &std::fs::read_to_string(out.0.join("istio/envoyfilter.yaml")).unwrap(),
    )
    .unwrap();
    let configs: Vec<(String, Value)> = envoy_filter["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["applyTo"] == "EXTENSION_CONFIG")
        .map(|p| {
            (
                p["patch"]["value"]["name"].as_str().unwrap().to_owned(),
                p["patch"]["value"]["typed_config"].clone(),
            )
        })
        .collect();
    assert_eq!(configs.len(), 3, "router, transformer and logger");
    let mut bootstrap = read_json(&out.0.join("envoy.json"));
    inline_filters(&mut bootstrap, &configs);
    std::fs::write(&inline, bootstrap.to_string()).unwrap();
    validate(&inline);
}

/// A rendering made with a relative --out runs from any directory: the bootstrap names the
/// extension-config files and the module by absolute paths (Envoy resolves relative ones
/// against its own working directory).
#[test]
fn the_local_files_work_from_any_directory() {
    let scratch = Scratch::beside_demo("anywhere");
    let cwd = scratch.0.join("made-here");
    std::fs::create_dir_all(&cwd).unwrap();
    let isvc = root().join("envoy-config/demo/inferenceservice.yaml");
    render_in(
        &cwd,
        &isvc.display().to_string(),
        Path::new("out"),
        &["--port", "0", "--admin-port", "0"],
    );
    let bootstrap = cwd.join("out/envoy.json");
    let text = std::fs::read_to_string(&bootstrap).unwrap();
    for path in ["\"out/", "\"meshserve_filters.wasm\""] {
        assert!(!text.contains(path), "a relative path {path} in {text}");
    }
    // Envoy runs elsewhere (the harness's directory), reads every filter's configuration,
    // and the router answers an unknown model itself.
    let elsewhere = scratch.0.join("run-here");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let envoy = Envoy::start(&bootstrap, &elsewhere);
    let (status, body) = post_json(envoy.listener, "/v2/models/nope/infer");
    assert_eq!(status, 404, "{body}\n{}", envoy.log());
    assert!(body.contains("unknown model 'nope'"), "{body}");
}

/// POSTs `{}` and returns the status and body (plain HTTP/1.1, one connection).
fn post_json(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

/// `docker-compose` (Debian's package; scripts/test.sh installs it) reads the compose file.
#[test]
fn docker_compose_accepts_the_compose_file() {
    let out = Scratch::beside_demo("compose");
    render("envoy-config/demo/inferenceservice.yaml", &out.0, &[]);
    let compose = out.0.join("compose/docker-compose.yaml");
    let output = Command::new("docker-compose")
        .args(["-f", &compose.display().to_string(), "config"])
        .output()
        .unwrap_or_else(|e| {
            panic!("docker-compose: {e}: install Debian's docker-compose package (scripts/test.sh does, as root)")
        });
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "docker-compose rejects {}:\n{}",
        compose.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let resolved: Value = serde_yaml::from_str(&text).unwrap();
    let services = resolved["services"].as_object().unwrap();
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        vec![
            "digits-predictor-v1",
            "digits-predictor-v2",
            "digits-xgboost-predictor",
            "envoy",
            "mnist-predictor-v1"
        ]
    );
    // Every bind mount names a file that exists here (models, the module, the transformer).
    for service in services.values() {
        for volume in service["volumes"].as_array().unwrap() {
            if volume["type"] == "bind" {
                let source = volume["source"].as_str().unwrap();
                assert!(
                    Path::new(source).exists() || source.ends_with("meshserve_filters.wasm"),
                    "{source} is missing"
                );
            }
        }
    }
}

#[test]
fn bad_inferenceservices_are_answered_with_the_field_path() {
    let dir = Scratch::beside_demo("bad");
    std::fs::create_dir_all(&dir.0).unwrap();
    let good = std::fs::read_to_string(root().join("envoy-config/examples/kserve-production.yaml"))
        .unwrap();
    for (from, to, path) in [
        ("maxReplicas: 8", "maxReplica: 8", "spec.predictor"),
        (
            "scaleMetric: concurrency",
            "scaleMetric: gpu",
            "spec.predictor.scaleMetric",
        ),
        (
            "storageUri: pvc://model-store/fraud/v7/model.onnx",
            "storageUri: ftp://bucket/fraud",
            "spec.predictor.model.storageUri",
        ),
        (
            "autoscalerClass: keda",
            "autoscalerClass: kpa",
            "metadata.annotations.serving.kserve.io/autoscalerClass",
        ),
        ("- top_k: {k: 3}", "- top_k: {k: 0}", "spec.transformer"),
    ] {
        assert!(good.contains(from), "{from}");
        let file = dir.0.join("isvc.yaml");
        std::fs::write(&file, good.replacen(from, to, 1)).unwrap();
        let output = Command::new(binary())
            .args(["render", &file.display().to_string(), "--out"])
            .arg(dir.0.join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{to} was accepted");
        assert!(stderr.contains(&format!("{path}:")), "{to}: {stderr}");
    }
}

/// A service with `serving.meshserve.io/jwt-*` annotations gets Envoy's own jwt_authn (and
/// rbac, for its subjects) right after the router filter, its JWKS fetched over TLS through a
/// cluster of its own, and client copies of its claim headers dropped: all as Envoy accepts.
#[test]
fn tokens_are_checked_by_envoys_own_filters() {
    let out = Scratch::beside_demo("jwt");
    render("envoy-config/examples/kserve-production.yaml", &out.0, &[]);
    let bootstrap = read_json(&out.0.join("envoy.json"));
    let manager = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    let names: Vec<&str> = manager["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "meshserve.router",
            "envoy.filters.http.jwt_authn",
            "envoy.filters.http.rbac",
            "meshserve.transformer",
            "meshserve.logger",
            "envoy.filters.http.router"
        ]
    );
    let jwt = &manager["http_filters"][1]["typed_config"];
    let provider = &jwt["providers"]["payments.fraud"];
    assert_eq!(provider["issuer"], "https://login.payments.example.com");
    assert_eq!(
        provider["remote_jwks"]["http_uri"]["cluster"],
        "meshserve.jwks.payments.fraud"
    );
    assert_eq!(
        jwt["rules"][0]["match"]["headers"][0]["string_match"]["exact"],
        "fraud"
    );
    let clusters = bootstrap["static_resources"]["clusters"]
        .as_array()
        .unwrap();
    let jwks = clusters
        .iter()
        .find(|c| c["name"] == "meshserve.jwks.payments.fraud")
        .unwrap();
    assert_eq!(
        jwks["transport_socket"]["typed_config"]["sni"],
        "login.payments.example.com"
    );
    let early = manager["early_header_mutation_extensions"].to_string();
    assert!(early.contains("x-caller"), "{early}");
    validate(&out.0.join("envoy.json"));
}
