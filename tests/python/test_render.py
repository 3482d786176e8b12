"""`meshserve render`'s Istio and Kubernetes YAML against the published schemas.

Kubernetes objects are checked with the standalone-strict JSON schemas of Kubernetes 1.32
(unknown fields rejected); Istio's and KEDA's custom resources with the OpenAPI schema of
their CRDs, made strict the same way (every object that lists its properties rejects others).
The schemas are test data in tests/schemas (see its README for their sources).
"""

import copy
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = REPO_ROOT / "tests" / "schemas"
BINARY = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))

K8S = {
    ("apps/v1", "Deployment"): "k8s-deployment-apps-v1.json",
    ("v1", "Service"): "k8s-service-v1.json",
    ("v1", "ConfigMap"): "k8s-configmap-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "k8s-horizontalpodautoscaler-autoscaling-v2.json",
}
CRDS = [
    "istio-crds.yaml",
    "istio-virtualservice-crd.yaml",
    "istio-gateway-crd.yaml",
    "istio-security-crds.yaml",
    "keda-scaledobjects.yaml",
]


def strict(schema, root=True):
    """Rejects unknown fields below the root, as the API server's strict field validation does."""
    schema = copy.deepcopy(schema)

    def walk(node, is_root):
        if isinstance(node, dict):
            if (
                not is_root
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key == "properties":
                    for child in value.values():
                        walk(child, False)
                elif isinstance(value, (dict, list)):
                    walk(value, False)
        elif isinstance(node, list):
            for item in node:
                walk(item, False)

    walk(schema, root)
    return schema


def load_validators():
    validators = {}
    for key, file in K8S.items():
        schema = json.loads((SCHEMAS / file).read_text())
        validators[key] = jsonschema.Draft7Validator(schema)
    for file in CRDS:
        for crd in yaml.safe_load_all((SCHEMAS / file).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


VALIDATORS = load_validators()


def errors(document):
    key = (document.get("apiVersion"), document.get("kind"))
    assert key in VALIDATORS, f"no schema for {key}"
    return sorted(
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in VALIDATORS[key].iter_errors(document)
    )


def render(tmp_path, source, *extra):
    out = tmp_path / Path(source).stem
    result = subprocess.run(
        [str(BINARY), "render", source, "--out", str(out), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    documents = []
    for file in sorted((out / "istio").glob("*.yaml")) + sorted((out / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(file.read_text()):
            if document:
                documents.append((file.relative_to(out), document))
    return out, documents


@pytest.mark.parametrize(
    "source",
    ["envoy-config/demo/inferenceservice.yaml", "envoy-config/examples/kserve-production.yaml"],
)
def test_every_rendered_object_matches_its_schema(tmp_path, source):
    _, documents = render(tmp_path, source, "--otlp-endpoint", "http://otel-collector.observability:4317", "--mtls-strict")
    assert documents
    for file, document in documents:
        assert errors(document) == [], f"{file}: {document['kind']} {document['metadata']['name']}"


def test_the_committed_demo_rendering_matches_its_schemas():
    rendered = REPO_ROOT / "envoy-config" / "demo" / "rendered"
    files = sorted((rendered / "istio").glob("*.yaml")) + sorted((rendered / "kubernetes").glob("*.yaml"))
    assert len(files) >= 6
    for file in files:
        for document in yaml.safe_load_all(file.read_text()):
            if document:
                assert errors(document) == [], f"{file}: {document['kind']}"


def test_the_production_example_renders_what_its_fields_ask(tmp_path):
    _, documents = render(tmp_path, "envoy-config/examples/kserve-production.yaml", "--mtls-strict")
    kinds = {}
    for _, document in documents:
        kinds.setdefault(document["kind"], []).append(document)
    assert sorted((k, len(v)) for k, v in kinds.items()) == [
        ("AuthorizationPolicy", 2),  # the control APIs; fraud's callers
        ("ConfigMap", 1),  # the mnist transformer
        ("Deployment", 4),  # mnist, fraud and its canary; payments' wake scaler
        ("EnvoyFilter", 1),
        ("Gateway", 1),
        ("HorizontalPodAutoscaler", 1),  # mnist: cpu at 70%, 2 to 10
        ("PeerAuthentication", 2),  # STRICT in payments and vision
        ("RequestAuthentication", 1),  # fraud's issuer
        ("ScaledObject", 2),  # fraud and its canary: to zero
        ("Service", 4),
        ("VirtualService", 2),
        ("WasmPlugin", 3),  # router, transformer, logger
    ]
    hpa = kinds["HorizontalPodAutoscaler"][0]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    fraud = next(s for s in kinds["ScaledObject"] if s["metadata"]["name"] == "fraud-predictor")["spec"]
    assert (fraud["minReplicaCount"], fraud["maxReplicaCount"]) == (0, 8)
    queries = [t["metadata"].get("query") for t in fraud["triggers"]]
    assert "meshserve_requests_in_flight" in queries[0] and fraud["triggers"][0]["metadata"]["threshold"] == "16"
    assert "istio_requests_total" in queries[1], "a revision at zero stays up on the request rate"
    # It wakes at once: the gateway's activator calls the namespace's wake scaler, which
    # pushes to KEDA over the external-push trigger; the held-requests gauge backs it up.
    push = fraud["triggers"][2]
    assert push["type"] == "external-push"
    assert push["metadata"]["scalerAddress"] == "meshserve-wake.payments.svc.cluster.local:9090"
    assert queries[3] == "sum(envoy_wasmcustom_meshserve_held_revision_fraud_predictor) or vector(0)"
    wake = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "meshserve-wake")
    assert wake["metadata"]["namespace"] == "payments"
    assert wake["spec"]["template"]["spec"]["containers"][0]["args"][0] == "wake-scaler"
    deployment = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "fraud-predictor")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "kserve-container"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}
    assert pod["serviceAccountName"] == "model-reader"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert deployment["spec"]["template"]["metadata"]["labels"]["cost-center"] == "4711"
    args = container["args"]
    assert args[args.index("--storage") + 1] == "/mnt/models/model.onnx"
    assert args[args.index("--max-in-flight") + 1] == "64"
    assert args[args.index("--batcher-max-batch-size") + 1] == "32"
    assert args[args.index("--log-sink") + 1].startswith("http://payload-sink.")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert mount["subPath"] == "fraud/v7/model.onnx"
    claim = next(v for v in pod["volumes"] if v["name"] == "models")
    assert claim["persistentVolumeClaim"]["claimName"] == "model-store"
    plugins = {p["spec"]["pluginName"]: p["spec"] for p in kinds["WasmPlugin"]}
    assert plugins["router"]["failStrategy"] == "FAIL_CLOSE"
    assert plugins["logger"]["failStrategy"] == "FAIL_OPEN"
    assert plugins["router"]["priority"] > plugins["transformer"]["priority"] > plugins["logger"]["priority"]
    assert plugins["router"]["phase"] == "AUTHN", "the router names the service before Istio's authn and authz"
    policies = {p["metadata"]["name"]: p["spec"] for p in kinds["AuthorizationPolicy"]}
    control = policies["meshserve-control-apis"]
    assert control["action"] == "DENY" and "/v2/repository/*" in control["rules"][0]["to"][0]["operation"]["paths"]
    callers = policies["meshserve-payments-fraud-callers"]["rules"][0]
    assert callers["from"][0]["source"]["notRequestPrincipals"] == [
        "https://login.payments.example.com/checkout",
        "https://login.payments.example.com/refunds",
    ]
    assert {"key": "request.headers[x-meshserve-isvc]", "values": ["fraud"]} in callers["when"]
    rule = kinds["RequestAuthentication"][0]["spec"]["jwtRules"][0]
    assert rule["jwksUri"].endswith("/jwks.json") and rule["outputClaimToHeaders"] == [{"header": "x-caller", "claim": "sub"}]
    assert {p["metadata"]["namespace"] for p in kinds["PeerAuthentication"]} == {"payments", "vision"}
    assert plugins["router"]["pluginConfig"]["services"][0]["name"] == "fraud"
    routes = kinds["VirtualService"][0]["spec"]["http"]
    # The router's choice, the VirtualService's match and the filters' call-outs all name
    # Istio's cluster for the Service port; the WasmPlugin cannot hold headers.
    grpc_cluster = "outbound|8081||fraud-predictor.payments.svc.cluster.local"
    assert routes[0]["match"][0]["headers"]["x-meshserve-cluster"]["exact"] == grpc_cluster
    default = plugins["router"]["pluginConfig"]["services"][0]["predictor"]["default"]
    assert default["grpc_cluster"] == grpc_cluster and default["cluster"] == grpc_cluster.replace("8081", "8080")
    assert default["scale_to_zero"]["wake"] == {
        "cluster": "outbound|9091||meshserve-wake.payments.svc.cluster.local",
        "path": "/wake/payments/fraud-predictor",
    }
    assert plugins["router"]["pluginConfig"]["hold_headers"] is False
    assert routes[0]["route"][0]["destination"]["port"]["number"] == 8081


@pytest.mark.parametrize(
    "kind, break_it",
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always")),
        ("Service", lambda d: d["spec"]["ports"][0].update(targetport=8080)),
        ("WasmPlugin", lambda d: d["spec"].update(phase="LATE")),
        ("WasmPlugin", lambda d: d["spec"].update(failstrategy="FAIL_OPEN")),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=16)),
        ("VirtualService", lambda d: d["spec"]["http"][0].update(rout=[])),
        ("EnvoyFilter", lambda d: d["spec"]["configPatches"][0].update(applyTo="SOMEWHERE")),
        ("RequestAuthentication", lambda d: d["spec"].update(jwtRule=[])),
        ("AuthorizationPolicy", lambda d: d["spec"].update(action="REFUSE")),
        ("PeerAuthentication", lambda d: d["spec"]["mtls"].update(mode="STRICTEST")),
    ],
)
def test_the_schemas_catch_mistakes(tmp_path, kind, break_it):
    _, documents = render(tmp_path, "envoy-config/examples/kserve-production.yaml", "--mtls-strict")
    document = copy.deepcopy(next(d for _, d in documents if d["kind"] == kind))
    assert errors(document) == []
    break_it(document)
    assert errors(document) != []
