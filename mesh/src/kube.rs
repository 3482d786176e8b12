//! Kubernetes manifests for InferenceServices: per revision a Deployment running the
//! predictor sidecar (KServe's container name, ports, labels and probes) and a Service, and
//! the autoscaler KServe's fields ask for: a HorizontalPodAutoscaler on cpu or memory, or a
//! KEDA ScaledObject where the revision scales to zero or on requests. A transformer's
//! pipeline travels in a ConfigMap. Envoy is Istio's: see [`crate::istio`].

use meshserve_predictor::remote::{STORAGE_CONFIG, STORAGE_OVERRIDE_CONFIG};
use serde_json::{Map, Value, json};

use crate::isvc::{Autoscaler, InferenceService, RevisionSpec, ScaleMetric, Storage};
use crate::workload::{
    self, GRPC_PORT, HTTP_PORT, SCRATCH_DIR, SPOOL_DIR, Settings, TRANSFORMER_DIR, TRANSFORMER_FILE,
};

/// KServe's name for the model server's container.
pub const CONTAINER: &str = "kserve-container";
/// Seconds a stopping pod gets: the sidecar drains for 30.
const GRACE_SECONDS: u64 = 40;
/// KServe's storage-config secret, and the InferenceService annotation that names another.
const DEFAULT_STORAGE_SECRET: &str = "storage-config";
const STORAGE_SECRET_ANNOTATION: &str = "serving.kserve.io/storageSecretName";
/// KEDA's wait before scaling an idle revision to zero (KEDA's default).
const COOLDOWN_SECONDS: u64 = 300;

/// Every object for one InferenceService, in apply order.
pub fn objects(isvc: &InferenceService, settings: &Settings) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    if let Some(transformer) = &isvc.transformer {
        let text = serde_json::to_string_pretty(transformer).map_err(|e| e.to_string())?;
        out.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(&transformer_map(&isvc.name), isvc, None),
            "data": {TRANSFORMER_FILE: text},
        }));
    }
    for revision in workload::revisions(isvc) {
        let name = workload::name(&isvc.name, &revision.name);
        let scaler = scaler(isvc, revision);
        out.push(deployment(isvc, revision, &name, scaler, settings));
        out.push(service(isvc, revision, &name));
        match scaler {
            Scaler::Fixed(_) => {}
            Scaler::Hpa(scale) => out.push(hpa(isvc, revision, &name, scale)),
            Scaler::Keda(scale) => out.push(keda(isvc, revision, &name, scale, settings)),
        }
    }
    Ok(out)
}

fn transformer_map(isvc: &str) -> String {
    format!("{isvc}-transformer")
}

/// How a revision's replicas are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaler {
    /// A fixed count (`autoscalerClass: none`), or none set (`external`).
    Fixed(Option<u32>),
    Hpa(Scale),
    Keda(Scale),
}

/// The bounds and the signal of an autoscaler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    pub min: u32,
    pub max: u32,
    pub metric: ScaleMetric,
    pub target: u32,
}

/// KServe's rules: `minReplicas` defaults to 1, `maxReplicas` to at least it; cpu at 80% by
/// default. Scaling to zero, or on requests (concurrency, rps), needs KEDA.
pub fn scaler(isvc: &InferenceService, revision: &RevisionSpec) -> Scaler {
    let s = &revision.scaling;
    let min = s.min_replicas.unwrap_or(1);
    let metric = s.metric.unwrap_or(ScaleMetric::Cpu);
    let scale = Scale {
        min,
        max: s.max_replicas.unwrap_or(0).max(min).max(1),
        metric,
        target: s.target.unwrap_or_else(|| metric.default_target()),
    };
    let on_requests = matches!(metric, ScaleMetric::Concurrency | ScaleMetric::Rps);
    match isvc.autoscaler {
        Autoscaler::None => Scaler::Fixed(Some(min)),
        Autoscaler::External => Scaler::Fixed(None),
        Autoscaler::Keda => Scaler::Keda(scale),
        Autoscaler::Hpa if min == 0 || on_requests => Scaler::Keda(scale),
        Autoscaler::Hpa => Scaler::Hpa(scale),
    }
}

/// KServe's labels, meshserve's, and the InferenceService's own.
fn labels(isvc: &InferenceService, revision: Option<&RevisionSpec>) -> Map<String, Value> {
    let mut labels: Map<String, Value> = isvc
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    labels.insert(
        "serving.kserve.io/inferenceservice".into(),
        json!(isvc.name),
    );
    labels.insert("app.kubernetes.io/managed-by".into(), json!("meshserve"));
    if let Some(revision) = revision {
        labels.insert("component".into(), json!("predictor"));
        labels.insert("meshserve.io/revision".into(), json!(revision.name));
        labels.insert(
            "app".into(),
            json!(workload::name(&isvc.name, &revision.name)),
        );
    }
    labels
}

fn metadata(name: &str, isvc: &InferenceService, revision: Option<&RevisionSpec>) -> Value {
    json!({"name": name, "namespace": isvc.namespace, "labels": labels(isvc, revision)})
}

fn deployment(
    isvc: &InferenceService,
    revision: &RevisionSpec,
    name: &str,
    scaler: Scaler,
    settings: &Settings,
) -> Value {
    let mut mounts = vec![json!({"name": "scratch", "mountPath": SCRATCH_DIR})];
    let mut volumes = vec![json!({"name": "scratch", "emptyDir": {}})];
    let claim = match &revision.storage {
        Storage::File { relative, .. } => Some((
            settings.models_claim.clone(),
            workload::claim_path(relative),
        )),
        Storage::Pvc { claim, path } => Some((claim.clone(), path.clone())),
        // Downloaded by the sidecar into its scratch volume.
        Storage::Remote { .. } | Storage::Spec { .. } => None,
    };
    if let Some((claim, sub_path)) = claim {
        let mut model_mount = json!({"name": "models", "mountPath": workload::model_path(&revision.storage), "readOnly": true});
        if !sub_path.is_empty()
            && let Some(map) = model_mount.as_object_mut()
        {
            map.insert("subPath".into(), json!(sub_path));
        }
        mounts.insert(0, model_mount);
        volumes.insert(
            0,
            json!({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}}),
        );
    }
    if isvc.transformer.is_some() {
        mounts.push(json!({"name": "transformer", "mountPath": TRANSFORMER_DIR, "readOnly": true}));
        volumes.push(
            json!({"name": "transformer", "configMap": {"name": transformer_map(&isvc.name)}}),
        );
    }
    if revision.logger.is_some() {
        // Survives container restarts; a pod that is deleted hands its undelivered events
        // to nobody (docs/deployment.md says how to keep them).
        mounts.push(json!({"name": "spool", "mountPath": SPOOL_DIR}));
        volumes.push(json!({"name": "spool", "emptyDir": {}}));
    }
    let probe = |path: &str, period: u64, failures: u64| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures});
    let mut container = json!({
        "name": CONTAINER,
        "image": settings.image,
        "args": workload::sidecar_args(isvc, revision, settings),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        // Loading a large model can take minutes: the startup probe allows 5.
        "startupProbe": probe("/v2/health/ready", 5, 60),
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(map) = container.as_object_mut() {
        if let Some(resources) = &revision.pod.resources {
            map.insert("resources".into(), resources.clone());
        }
        let mut env: Vec<Value> = revision
            .pod
            .env
            .as_ref()
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Storage::Spec {
            key, parameters, ..
        } = &revision.storage
        {
            // What KServe's webhook gives its storage initializer.
            let secret = isvc
                .annotations
                .get(STORAGE_SECRET_ANNOTATION)
                .map_or(DEFAULT_STORAGE_SECRET, String::as_str);
            env.push(json!({"name": STORAGE_CONFIG, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}));
            if !parameters.is_empty() {
                env.push(json!({"name": STORAGE_OVERRIDE_CONFIG, "value": serde_json::to_string(parameters).unwrap_or_default()}));
            }
        }
        if !env.is_empty() {
            map.insert("env".into(), Value::Array(env));
        }
    }
    let mut pod = json!({
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                            "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    });
    if let Some(map) = pod.as_object_mut() {
        let p = &revision.pod;
        for (key, value) in [
            (
                "serviceAccountName",
                p.service_account_name.clone().map(Value::from),
            ),
            ("nodeSelector", p.node_selector.clone()),
            ("tolerations", p.tolerations.clone()),
            ("affinity", p.affinity.clone()),
            ("imagePullSecrets", p.image_pull_secrets.clone()),
        ] {
            if let Some(value) = value {
                map.insert(key.into(), value);
            }
        }
    }
    let mut pod_labels = labels(isvc, Some(revision));
    pod_labels.extend(
        revision
            .pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v))),
    );
    let mut annotations: Map<String, Value> = revision
        .pod
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    for (k, v) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "8080"),
        ("prometheus.io/path", "/metrics"),
    ] {
        annotations.insert(k.into(), json!(v));
    }
    let mut spec = json!({
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod},
    });
    if let Some(map) = spec.as_object_mut() {
        // An autoscaler owns the count; `kubectl apply` must not reset it.
        if let Scaler::Fixed(Some(n)) = scaler {
            map.insert("replicas".into(), json!(n));
        }
        if let Some(strategy) = &revision.pod.deployment_strategy {
            map.insert("strategy".into(), strategy.clone());
        }
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, isvc, Some(revision)),
        "spec": spec,
    })
}

fn service(isvc: &InferenceService, revision: &RevisionSpec, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, isvc, Some(revision)),
        "spec": {
            "selector": {"app": name},
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            ],
        },
    })
}

fn hpa(isvc: &InferenceService, revision: &RevisionSpec, name: &str, scale: Scale) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(name, isvc, Some(revision)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": scale.min,
            "maxReplicas": scale.max,
            "metrics": [{"type": "Resource", "resource": {"name": scale.metric.as_str(),
                "target": {"type": "Utilization", "averageUtilization": scale.target}}}],
        },
    })
}

/// The request rate Istio's proxies (the gateway, callers' sidecars) report for a revision's
/// Service; present while the revision has no pod, so it wakes a revision scaled to zero.
pub fn request_rate_query(isvc: &InferenceService, workload: &str) -> String {
    format!(
        r#"sum(rate(istio_requests_total{{reporter="source",destination_service_name="{workload}",destination_service_namespace="{}"}}[1m]))"#,
        isvc.namespace
    )
}

/// Requests in flight across a revision's pods (the sidecars' gauge).
pub fn concurrency_query(isvc: &InferenceService, workload: &str) -> String {
    format!(
        r#"sum(meshserve_requests_in_flight{{namespace="{}",pod=~"{workload}-.*"}})"#,
        isvc.namespace
    )
}

/// Requests the gateways' activators hold for a revision waking from zero: the router's
/// `wasmcustom.meshserve.held.revision.<name>` gauge as Istio's proxies export it (no tag
/// extraction there, so the revision is in the name; the gateway must include
/// `wasmcustom.meshserve` stats, docs/deployment.md).
pub fn held_query(revision: &RevisionSpec) -> String {
    let name: String = format!("envoy_wasmcustom_meshserve_held_revision_{}", revision.name)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("sum({name}) or vector(0)")
}

/// The wake scaler of each namespace that has a revision at `minReplicas: 0`: a Deployment
/// running `meshserve wake-scaler` and its Service (KEDA's gRPC port, the activator's HTTP
/// port).
pub fn wake_scalers(services: &[InferenceService], settings: &Settings) -> Vec<Value> {
    let mut namespaces: Vec<&str> = services
        .iter()
        .filter(|isvc| {
            workload::revisions(isvc)
                .any(|r| matches!(scaler(isvc, r), Scaler::Keda(s) if s.min == 0))
        })
        .map(|isvc| isvc.namespace.as_str())
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut out = Vec::new();
    for namespace in namespaces {
        let name = workload::WAKE_SCALER;
        let labels = json!({"app": name, "app.kubernetes.io/managed-by": "meshserve"});
        let metadata = json!({"name": name, "namespace": namespace, "labels": labels});
        let probe = json!({"tcpSocket": {"port": "grpc"}, "periodSeconds": 5});
        out.push(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": name,
                            "image": settings.image,
                            "args": ["wake-scaler", "--host", "0.0.0.0",
                                     "--grpc-port", workload::WAKE_GRPC_PORT.to_string(),
                                     "--http-port", workload::WAKE_HTTP_PORT.to_string(),
                                     "--log-format", "json"],
                            "ports": [
                                {"name": "grpc", "containerPort": workload::WAKE_GRPC_PORT, "protocol": "TCP"},
                                {"name": "http", "containerPort": workload::WAKE_HTTP_PORT, "protocol": "TCP"},
                            ],
                            "readinessProbe": probe,
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                                          "limits": {"memory": "64Mi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }],
                    },
                },
            },
        }));
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata,
            "spec": {
                "selector": {"app": name},
                "ports": [
                    {"name": "grpc", "port": workload::WAKE_GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
                    {"name": "http", "port": workload::WAKE_HTTP_PORT, "targetPort": "http", "appProtocol": "http"},
                ],
            },
        }));
    }
    out
}

fn keda(
    isvc: &InferenceService,
    revision: &RevisionSpec,
    name: &str,
    scale: Scale,
    settings: &Settings,
) -> Value {
    let Scale {
        min,
        max,
        metric,
        target,
    } = scale;
    let prometheus = |query: String, threshold: u32| {
        json!({"type": "prometheus", "metadata": {
            "serverAddress": settings.prometheus,
            "query": query,
            "threshold": threshold.to_string(),
            "activationThreshold": "0",
        }})
    };
    let mut triggers = vec![match metric {
        ScaleMetric::Rps => prometheus(request_rate_query(isvc, name), target),
        ScaleMetric::Concurrency => prometheus(concurrency_query(isvc, name), target),
        ScaleMetric::Cpu | ScaleMetric::Memory => json!({
            "type": metric.as_str(), "metricType": "Utilization",
            "metadata": {"value": target.to_string()},
        }),
    }];
    // A revision with no pod has no cpu and no sidecar gauge: the request rate Istio reports
    // keeps it (and adds a replica per 200 requests a second, Knative's rps default).
    if min == 0 && metric != ScaleMetric::Rps {
        triggers.push(prometheus(
            request_rate_query(isvc, name),
            ScaleMetric::Rps.default_target(),
        ));
    }
    if min == 0 {
        // Woken at once: the gateway's activator holds the request and calls the
        // namespace's wake scaler, which pushes "active" to KEDA over this trigger's stream.
        triggers.push(json!({"type": "external-push", "metadata": {
            "scalerAddress": format!(
                "{}:{}",
                workload::wake_host(&isvc.namespace, &settings.cluster_domain),
                workload::WAKE_GRPC_PORT
            ),
        }}));
        // And on the requests the activator holds (its gauge, from the gateway's stats),
        // should a wake call be lost.
        triggers.push(prometheus(
            held_query(revision),
            ScaleMetric::Concurrency.default_target(),
        ));
    }
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(name, isvc, Some(revision)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": min,
            "maxReplicaCount": max,
            "cooldownPeriod": COOLDOWN_SECONDS,
            "triggers": triggers,
        },
    })
}

/// Several objects as one multi-document YAML file.
pub fn to_yaml(objects: &[Value], header: &str) -> Result<String, String> {
    let mut out = String::from(header);
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object).map_err(|e| e.to_string())?);
    }
    Ok(out)
}
