"""The Kubernetes manifests of deploy/, offline: they render (deploy/kustomize.py, checked against
`kubectl kustomize` where kubectl is installed), every core resource validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail), the Gateway API Inference
Extension objects carry and cross-reference what the extension needs, and the container's
command, ports and probe paths are what `conveyor serve` accepts and answers: the args are
parsed by conveyor's own argparse parser (a renamed flag fails here), and a server built from
the manifests' config is started in process and probed on the manifests' paths."""
from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conveyor.cli import build_parser
from engine.async_engine import AsyncEngine
from server.app import build_app
from server.config_file import config_from_dict
from server.settings import ServerSettings
from tests.test_server_harness import ServerThread, tiny_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OVERLAYS = ["overlays/cpu", "overlays/gpu"]  # the full stacks; external-redis is rendered too
K8S_VERSION = "1.33"
GIE_KINDS = {("inference.networking.k8s.io", "InferencePool"),
             ("inference.networking.x-k8s.io", "InferenceObjective"),
             ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "HTTPRoute")}


def _kustomize():
    spec = importlib.util.spec_from_file_location("deploy_kustomize", DEPLOY / "kustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KUSTOMIZE = _kustomize()


def render(folder: str) -> dict[tuple[str, str, str], dict]:
    return {KUSTOMIZE.object_id(o): o for o in KUSTOMIZE.build(DEPLOY / folder)}


def one(objs: dict, kind: str, name: str) -> dict:
    found = [o for (g, k, n), o in objs.items() if k == kind and n == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def serve_args(objs: dict):
    """The conveyor container's argv parsed by conveyor's own parser (SystemExit on an unknown flag)."""
    c = container(one(objs, "Deployment", "conveyor"), "conveyor")
    assert c["command"][:2] == ["conveyor", "serve"]
    env = {e["name"]: f"<{e['name']}>" for e in c.get("env", [])}
    argv = [expand(a, env) for a in c["command"][1:] + c.get("args", [])]
    unresolved = [a for a in argv if "$(" in a]
    assert not unresolved, f"args refer to variables the container does not define: {unresolved}"
    return build_parser().parse_args(argv), c


def merged_config(objs: dict) -> dict:
    """What the init container writes: the ConfigMap's settings followed by the Secret's tenants."""
    settings = one(objs, "ConfigMap", "conveyor-config")["data"]["conveyor.toml"]
    tenants = one(objs, "Secret", "conveyor-tenants")["stringData"]["tenants.toml"]
    return tomllib.loads(settings + "\n" + tenants)


@pytest.mark.parametrize("folder", ["base", "gie", *OVERLAYS, "overlays/external-redis"])
def test_renders_like_kubectl_kustomize(folder):
    objs = render(folder)
    assert objs
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: rendered with deploy/kustomize.py only")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    ref = {KUSTOMIZE.object_id(o): o for o in yaml.safe_load_all(out) if o}
    assert objs == ref


def test_external_redis_overlay_drops_redis():
    kinds = {(k, n) for _, k, n in render("overlays/external-redis")}
    assert ("StatefulSet", "conveyor-redis") not in kinds and ("Secret", "conveyor-redis") not in kinds
    assert ("Deployment", "conveyor") in kinds


@pytest.mark.parametrize("folder", OVERLAYS)
def test_core_resources_validate_against_kubernetes_schemas(folder):
    for oid, obj in render(folder).items():
        if oid[:2] in GIE_KINDS:
            continue  # custom resources: checked field by field below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field():
    bad = copy.deepcopy(one(render("base"), "Deployment", "conveyor"))
    container(bad, "conveyor")["readinesProbe"] = container(bad, "conveyor").pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("folder", OVERLAYS)
def test_gie_objects_reference_each_other_and_the_pods(folder):
    objs = render(folder)
    kinds = {oid[:2] for oid in objs}
    assert GIE_KINDS <= kinds
    pool = one(objs, "InferencePool", "conveyor")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    deployment = one(objs, "Deployment", "conveyor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector and all(pod_labels.get(k) == v for k, v in selector.items())
    # the EPP's pods are not in the pool
    epp = one(objs, "Deployment", "conveyor-epp")
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    assert not all(epp_labels.get(k) == v for k, v in selector.items())
    ports = pool["spec"]["targetPorts"]
    assert 1 <= len(ports) <= 8
    assert ports[0]["number"] in {p["containerPort"] for p in container(deployment, "conveyor")["ports"]}

    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")
    svc = one(objs, "Service", ref["name"])
    svc_port = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert all(epp_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    epp_c = container(epp, "epp")
    assert svc_port["targetPort"] in {p.get("name") for p in epp_c["ports"]} | {p["containerPort"] for p in epp_c["ports"]}
    args = dict(a.lstrip("-").split("=", 1) for a in epp_c["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-group"] == "inference.networking.k8s.io"
    assert int(args["grpc-port"]) == ref["port"]["number"] or svc_port["targetPort"] == "grpc"

    for name in ("interactive", "batch"):
        objective = one(objs, "InferenceObjective", name)
        assert objective["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
        assert isinstance(objective["spec"]["priority"], int)
        assert objective["spec"]["poolRef"] == {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                                "name": pool["metadata"]["name"]}
    assert one(objs, "InferenceObjective", "interactive")["spec"]["priority"] > \
        one(objs, "InferenceObjective", "batch")["spec"]["priority"]

    route = one(objs, "HTTPRoute", "conveyor")
    gateway = one(objs, "Gateway", route["spec"]["parentRefs"][0]["name"])
    assert gateway["spec"]["gatewayClassName"] and gateway["spec"]["listeners"]
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "conveyor"} in \
        [{k: b[k] for k in ("group", "kind", "name")} for b in backends]

    rules = one(objs, "Role", epp["spec"]["template"]["spec"]["serviceAccountName"])["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               if {"get", "list", "watch"} <= set(rule["verbs"])}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools"),
            ("inference.networking.x-k8s.io", "inferenceobjectives")} <= granted


def epp_config(objs: dict) -> dict:
    epp = one(objs, "Deployment", "conveyor-epp")
    args = dict(a.lstrip("-").split("=", 1) for a in container(epp, "epp")["args"])
    path = Path(args["config-file"])
    mount = next(m for m in container(epp, "epp")["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    return yaml.safe_load(one(objs, "ConfigMap", volume["configMap"]["name"])["data"][path.name])


def engine_metric_specs(objs: dict) -> tuple[str, dict]:
    """(the pods' engine type, the EPP's metric specs for it)."""
    config = epp_config(objs)
    assert config["kind"] == "EndpointPickerConfig"
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    pod_labels = one(objs, "Deployment", "conveyor")["spec"]["template"]["metadata"]["labels"]
    engine = pod_labels.get(extractor["engineLabelKey"], extractor["defaultEngine"])
    spec = next(e for e in extractor["engineConfigs"] if e["name"] == engine)
    names = {p.get("name", p["type"]) for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert {ref["pluginRef"] for ref in profile["plugins"]} <= names
    for source in config["data"]["sources"]:
        assert source["pluginRef"] in names and {e["pluginRef"] for e in source["extractors"]} <= names
    return engine, spec


@pytest.mark.parametrize("folder", OVERLAYS)
def test_container_command_parses_and_fits_the_pod(folder):
    objs = render(folder)
    args, c = serve_args(objs)
    pod = one(objs, "Deployment", "conveyor")["spec"]["template"]["spec"]
    assert args.host == "0.0.0.0"
    assert args.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", args.port)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    # drain + uvicorn's 5 s backstop + the 5 s wait for pending settlements, after preStop
    assert pre_stop + args.shutdown_timeout + 10 < pod["terminationGracePeriodSeconds"]
    assert args.redis_url == "<CONVEYOR_REDIS_URL>"
    assert any(Path(args.config).parent == Path(m["mountPath"]) for m in c["volumeMounts"])
    init = pod["initContainers"][0]
    assert args.config in " ".join(init["command"])
    config = config_from_dict(merged_config(objs))  # the file the server loads
    assert config.tenants and all(t.api_key_sha256 for t in config.tenants)
    assert len(config.models) == 1  # one model per pod: the picker reads one queue per endpoint
    if folder.endswith("gpu"):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and args.device == "cuda"
    else:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_served_paths_and_the_metrics_the_endpoint_picker_reads(tmp_path):
    objs = render("overlays/cpu")
    args, c = serve_args(objs)
    engine_type, specs = engine_metric_specs(objs)
    assert engine_type == "vllm"
    production = config_from_dict(merged_config(objs))
    engine = AsyncEngine(tiny_config(str(tmp_path / "tiny")))
    app = build_app(engine, ServerSettings(shutdown_timeout=args.shutdown_timeout), production=production)
    srv = ServerThread(engine, app=app).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as client:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = c[probe]["httpGet"]["path"]
                assert client.get(path).status_code == 200, probe
            client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                        headers={"Authorization": "Bearer sk-acme-example"}).raise_for_status()
            families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
            for field, spec in specs.items():
                if field == "name" or not spec:
                    continue
                name = spec.split("{")[0]
                assert name in families, f"{field}: {name} is not exported"
                assert families[name].type == "gauge", f"{field}: {name} is a {families[name].type}"
                samples = families[name].samples
                assert len(samples) == 1, f"{name}: one model per pod, one sample"
                if field == "kvUsageSpec":
                    assert 0.0 <= samples[0].value <= 1.0
                if field == "cacheInfoSpec":
                    labels = samples[0].labels
                    assert int(labels["block_size"]) > 0 and int(labels["num_gpu_blocks"]) > 0
            assert "vllm:lora_requests_info" not in families and specs["loraSpec"] == ""
            srv.app.state.drain.begin()  # what SIGTERM does: readiness turns 503, liveness stays 200
            for _ in range(100):
                if client.get(c["readinessProbe"]["httpGet"]["path"]).status_code == 503:
                    break
            assert client.get(c["readinessProbe"]["httpGet"]["path"]).status_code == 503
            assert client.get(c["livenessProbe"]["httpGet"]["path"]).status_code == 200
    finally:
        srv.stop()
