"""deploy/k8s: the Kubernetes manifests (Kustomize base + cpu/gpu overlays), tested as kustomize renders them.
(The Dockerfile and .dockerignore: tests/test_dockerfile.py.)

- Schemas: every rendered object validates against the Kubernetes JSON schemas (kubernetes-validate, strict: an
  unknown field is an error) of the oldest and newest pinned versions; the custom resources (KEDA ScaledObject,
  prometheus-operator ServiceMonitor) against kubernetes-models' schemas for them (node; scripts/crd-validators),
  and against the published CRD files when ``CUBELM_CRD_DIR`` holds them.
- Security: checkov (its own venv: scripts/checkov) passes every check on the manifests and the Dockerfile, each
  skip carrying a reason annotation.
- Semantics against the code: the serve container's command line parses with cubelm's own CLI into valid
  options, probes hit routes the app has, the grace period outlasts the drain, the KEDA query names a metric
  the server exports, selectors and references resolve, one autoscaler per Deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import (ROOT, TREES, by_kind, crd_schemas, env_values, expand, kustomize_command, one, render)

K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes the manifests support, and the newest schema pinned
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

pytestmark = pytest.mark.skipif(kustomize_command() is None, reason="no kustomize: neither `kustomize` nor "
                                "`kubectl` (which embeds it) is on PATH")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {tree: render(tree) for tree in TREES}


@pytest.fixture(scope="module", params=TREES)
def docs(request, rendered) -> list[dict]:
    return rendered[request.param]


def serve_deployment(docs):
    return one(docs, "Deployment", "cubelm-serve")


def container(deployment, name, init=False):
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def configmaps(docs):
    return {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}


def serve_argv(docs) -> list[str]:
    c = container(serve_deployment(docs), "cubelm")
    return expand(c.get("args", []), env_values(c, configmaps(docs)))


# ---- schemas ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(docs, version):
    kv = pytest.importorskip("kubernetes_validate", reason="not installed (test extra)")
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]
    errors = []
    for d in core:
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")
    assert not errors, f"Kubernetes {version}: " + "; ".join(errors)
    assert len(core) >= 10  # Deployments, Services, PVC, PDB, NetworkPolicies, ConfigMap, ServiceAccounts


def test_a_field_the_schema_lacks_fails_validation(rendered):
    """The strict validation above can fail: a misspelt probe field is caught."""
    kv = pytest.importorskip("kubernetes_validate", reason="not installed (test extra)")
    d = json.loads(json.dumps(serve_deployment(rendered["overlays/cpu"])))
    container(d, "cubelm")["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kv.ValidationError):
        kv.validate(d, K8S_VERSIONS[-1], strict=True)


def crd_validators() -> Path | None:
    path = Path(os.environ.get("CUBELM_CRD_VALIDATORS") or ROOT / "tests" / "crd_validators" / "node_modules")
    return path if (path / "@kubernetes-models").is_dir() and shutil.which("node") else None


@pytest.mark.skipif(crd_validators() is None, reason="the custom-resource validators are not installed: run "
                    "scripts/crd-validators (npm; .ci/run does) and have node on PATH")
def test_custom_resources_validate_against_their_schemas(docs):
    """KEDA's and prometheus-operator's schemas as kubernetes-models generates them from the projects' Go API
    types (the types their published CRDs come from): field types, required fields, enums. A broken copy of each
    object is sent along and must be refused, so a validator that accepts anything fails the test."""
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS]
    assert custom, "the ServiceMonitor (and in the overlays the ScaledObject) should be rendered"
    broken = json.loads(json.dumps(custom))
    for d in broken:
        if d["kind"] == "ScaledObject":
            d["spec"]["minReplicaCount"] = "two"
        else:
            del d["spec"]["selector"]
    proc = subprocess.run(["node", str(ROOT / "tests" / "crd_validators" / "validate.mjs")],
                          input=json.dumps(custom + broken), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUBELM_CRD_VALIDATORS": str(crd_validators())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 2 * len(custom)
    good, bad = results[:len(custom)], results[len(custom):]
    assert all(r["ok"] for r in good), [r for r in good if not r["ok"]]
    assert not any(r["ok"] for r in bad), "the validator accepted a broken object"


def test_custom_resources_validate_against_published_crds(docs):
    directory = os.environ.get("CUBELM_CRD_DIR")
    if not directory:
        pytest.skip("the published CRD files (KEDA keda.sh_scaledobjects.yaml, prometheus-operator "
                    "monitoring.coreos.com_servicemonitors.yaml) ship with no package reachable offline: set "
                    "CUBELM_CRD_DIR to a directory holding them to validate against them too (unknown fields "
                    "rejected, as kubectl --validate=strict does)")
    import jsonschema
    schemas = crd_schemas(Path(directory))
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        if key in CUSTOM_KINDS:
            assert key in schemas, f"no CRD for {key} in {directory}"
            jsonschema.validate(d, schemas[key])


# ---- security scan ------------------------------------------------------------------------------------------------
def checkov_binary() -> str | None:
    return os.environ.get("CUBELM_CHECKOV") or shutil.which("checkov")


@pytest.mark.skipif(checkov_binary() is None, reason="checkov is not installed: it conflicts with the project's "
                    "pins (networkx<2.7, packaging 23), so it lives in its own venv: run scripts/checkov, which "
                    "installs it and sets CUBELM_CHECKOV (.ci/run does)")
def test_checkov_passes_on_the_rendered_manifests_and_the_dockerfile(rendered, tmp_path):
    import yaml
    for tree, objects in rendered.items():
        (tmp_path / (tree.replace("/", "-") + ".yaml")).write_text(yaml.safe_dump_all(objects))
    shutil.copy(ROOT / "deploy" / "Dockerfile", tmp_path / "Dockerfile")
    # --skip-download: offline, no platform lookups (so no severities either: every failed check counts)
    proc = subprocess.run([checkov_binary(), "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile",
                           "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300)
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, proc.stderr[-2000:]
    annotations = {}
    for objects in rendered.values():
        for d in objects:
            for k, v in d["metadata"].get("annotations", {}).items():
                if k.startswith("checkov.io/skip"):
                    check, _, reason = v.partition("=")
                    annotations[(d["kind"], d["metadata"]["name"], check)] = reason.strip()
    for r in reports:
        failed = [(c["check_id"], c["resource"], c["check_name"]) for c in r["results"]["failed_checks"]]
        assert not failed, failed
        assert r["summary"]["passed"] > 50
        for c in r["results"]["skipped_checks"]:
            kind, _, name = c["resource"].split(".", 2)
            assert annotations.get((kind, name.split(".")[-1], c["check_id"])), f"{c['check_id']} skipped on " \
                f"{c['resource']} without a reason annotation"


# ---- the serve Deployment against the code ------------------------------------------------------------------------
def test_serve_command_line_parses_into_valid_options(docs):
    from cubelm.cli import parse_options
    from cubelm.serve.commands import ServeOptions
    argv = serve_argv(docs)
    options, _ = parse_options(argv)  # an unknown flag exits (SystemExit), a bad value raises CubelmError
    assert isinstance(options, ServeOptions)
    assert options.host == "0.0.0.0"
    assert options.rate_limit_storage.startswith("redis://")
    assert options.model.startswith(("s3://", "http://", "https://", "file://", "gs://"))


def test_init_container_pulls_into_the_cache_the_server_reads(docs):
    from cubelm.cli import parse_options
    from cubelm.store.pull import default_name
    dep = serve_deployment(docs)
    init, serve = container(dep, "pull-model", init=True), container(dep, "cubelm")
    init_options, _ = parse_options(expand(init["args"], env_values(init, configmaps(docs))))
    serve_options, _ = parse_options(serve_argv(docs))
    # the server pulls the same URI under the same name, so it finds the init container's copy
    assert init_options.src == serve_options.model
    assert (init_options.name or default_name(init_options.src)) == default_name(serve_options.model)
    assert init["image"] == serve["image"]
    env_init, env_serve = (env_values(c, configmaps(docs)) for c in (init, serve))
    assert env_init["CUBELM_HOME"] == env_serve["CUBELM_HOME"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    for c, env in ((init, env_init), (serve, env_serve)):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        claim = volumes[mounts[env["CUBELM_HOME"]]]["persistentVolumeClaim"]["claimName"]
        one(docs, "PersistentVolumeClaim", claim)


def test_init_then_serve_command_lines_download_once(rendered, tmp_path, monkeypatch, capsys):
    """The rendered init and serve command lines, run against the real store with the ConfigMap's model URI
    pointed at a published tiny model (file://): the init container's pull downloads it, the server's --model
    resolves to that same verified directory and downloads nothing."""
    from helpers import make_tiny_model_dir

    from cubelm.cli import main, parse_options
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.store.pull import push_model
    docs = json.loads(json.dumps(rendered["overlays/cpu"]))
    published = tmp_path / "bucket" / "default"
    push_model(str(make_tiny_model_dir(tmp_path)), str(published))
    for cm in by_kind(docs, "ConfigMap"):
        cm["data"]["model-uri"] = published.as_uri()
    monkeypatch.setenv("CUBELM_HOME", str(tmp_path / "home"))
    dep = serve_deployment(docs)
    init = container(dep, "pull-model", init=True)
    assert main(expand(init["args"], env_values(init, configmaps(docs)))) == 0
    pulled = Path(capsys.readouterr().out.strip().splitlines()[-1])
    models = tmp_path / "home" / "models"
    before = sorted(p.name for p in models.iterdir())
    options, _ = parse_options(serve_argv(docs))
    assert resolve_model_dir(options.model) == pulled
    assert sorted(p.name for p in models.iterdir()) == before and "already in the store" in capsys.readouterr().err


def test_probes_hit_routes_the_server_has(docs):
    from cubelm.serve.app import create_app
    from cubelm.serve.commands import ServeOptions
    from cubelm.serve.state import ServerState
    routes = {r.path for r in create_app(ServerState(ServeOptions(model="m"))).routes}
    c = container(serve_deployment(docs), "cubelm")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    argv = serve_argv(docs)
    assert ports["http"] == int(argv[argv.index("--port") + 1])
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] in ports


def test_grace_period_outlasts_prestop_and_drain(docs):
    from cubelm.cli import parse_options
    from cubelm.serve.commands import UVICORN_GRACEFUL_SHUTDOWN_S
    dep = serve_deployment(docs)
    options, _ = parse_options(serve_argv(docs))  # --shutdown-timeout as given, or serve's default
    pre_stop = " ".join(container(dep, "cubelm")["lifecycle"]["preStop"]["exec"]["command"])
    sleep_s = float(re.search(r"sleep\(?\s*([\d.]+)", pre_stop).group(1))
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep_s + options.shutdown_timeout + UVICORN_GRACEFUL_SHUTDOWN_S


def test_rolling_update_never_drops_capacity(docs):
    dep = serve_deployment(docs)
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"


def test_workloads_are_hardened(docs):
    for dep in by_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 10000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
            assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"], c["name"]
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts an undefined volume {m['name']}"
        if dep["metadata"]["name"] == "cubelm-serve":
            tmp = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]]


# ---- wiring -------------------------------------------------------------------------------------------------------
def test_selectors_and_references_resolve(docs):
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in by_kind(docs, "Deployment")}

    def selects(selector: dict) -> list[str]:
        return [n for n, labels in pods.items() if selector.items() <= labels.items()]

    for svc in by_kind(docs, "Service"):
        assert len(selects(svc["spec"]["selector"])) == 1, svc["metadata"]["name"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for d in by_kind(docs, kind):
            sel = d["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
            assert selects(sel), f"{kind}/{d['metadata']['name']} selects no pod"
    for dep in by_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        one(docs, "ServiceAccount", pod["serviceAccountName"])
        assert dep["spec"]["selector"]["matchLabels"].items() <= pods[dep["metadata"]["name"]].items()
    # the rate-limit storage URI names the Redis Service and its port
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)", serve_argv(docs)[serve_argv(docs).index(
        "--rate-limit-storage") + 1]).groups()
    redis = one(docs, "Service", host)
    assert int(port) in [p["port"] for p in redis["spec"]["ports"]]
    # and the serve pods' NetworkPolicy lets them reach it
    egress = one(docs, "NetworkPolicy", "cubelm-serve")["spec"]["egress"]
    assert any(int(port) in [p["port"] for p in rule.get("ports", [])] and rule.get("to") for rule in egress)


def test_one_autoscaler_per_deployment_and_the_pdb_leaves_a_replica(docs):
    targets = [(d["kind"], d["spec"]["scaleTargetRef"]["name"]) for d in docs
               if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    names = [t for _, t in targets]
    assert names and len(names) == len(set(names)), f"two autoscalers fight over one Deployment: {targets}"
    for kind, target in targets:
        one(docs, "Deployment", target)
        scaler = next(d for d in docs if d["kind"] == kind)
        min_replicas = scaler["spec"].get("minReplicas", scaler["spec"].get("minReplicaCount"))
        pdb = one(docs, "PodDisruptionBudget", target)
        assert min_replicas - pdb["spec"]["maxUnavailable"] >= 1


def exported_series() -> tuple[set[str], set[str]]:
    """The metric families cubelm serve exports, and the series names Prometheus stores for them."""
    from cubelm.serve.metrics import ServerMetrics

    class Engine:  # every engine statistic reads 0
        def stats(self):
            return type("Stats", (), {"__getitem__": lambda self, key: 0})()

    metrics = ServerMetrics("m")
    metrics.attach(Engine())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    families = list(metrics.registry.collect())
    return {m.name for m in families}, {m.name + s for m in families for s in suffixes[m.type]}


def test_grafana_dashboard_charts_series_the_server_exports():
    text = (ROOT / "deploy" / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"cubelm:[a-z0-9_]+", text))
    _, series = exported_series()
    assert len(used) >= 10 and used <= series, sorted(used - series)


def test_keda_and_servicemonitor_read_metrics_the_server_exports(rendered):
    exported, _ = exported_series()
    for tree in ("overlays/cpu", "overlays/gpu"):
        docs = rendered[tree]
        so = one(docs, "ScaledObject", "cubelm-serve")
        prom = [t for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
        assert prom, tree
        query = prom[0]["metadata"]["query"]
        names = set(re.findall(r"cubelm:\w+", query))
        want = {"cubelm:num_requests_waiting"} | ({"cubelm:num_requests_running"} if tree.endswith("gpu") else set())
        assert names == want and names <= exported, (names, exported)  # gpu: in flight = running + waiting
        service = re.search(r'service="([\w-]+)"', query).group(1)
        svc = one(docs, "Service", service)
        sm = one(docs, "ServiceMonitor", service)
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
        assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    assert not by_kind(rendered["overlays/cpu"], "HorizontalPodAutoscaler")  # KEDA owns the HPA


def test_gpu_overlay_requests_a_gpu_and_runs_on_cuda(rendered):
    docs = rendered["overlays/gpu"]
    dep = serve_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep, "cubelm")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    from cubelm.cli import parse_options
    options, _ = parse_options(serve_argv(docs))
    assert options.device == "cuda" and c["image"].endswith("-cuda")
    cpu = serve_deployment(rendered["overlays/cpu"])
    assert "nvidia.com/gpu" not in container(cpu, "cubelm")["resources"]["limits"]
    assert parse_options(serve_argv(rendered["overlays/cpu"]))[0].device == "cpu"


# ---- the inference graph (overlays/rag = overlays/cpu + components/rag-graph) -----------------------------------
def graph_options(docs, name: str, container_name: str):
    from cubelm.cli import parse_options
    c = container(one(docs, "Deployment", name), container_name)
    options, _ = parse_options(expand(c["args"], env_values(c, configmaps(docs))))
    return options, c


def test_graph_routing_names_the_services_of_the_encoder_and_the_llm(rendered):
    """The router's --embed-url and --llm-url are the DNS names of Services that select the encoder and LLM pods,
    on ports that reach the ports those servers listen on; the router asks for the model the encoder serves."""
    from cubelm.serve.commands import ServeOptions
    from cubelm.serve.router_commands import RouterOptions
    docs = rendered["overlays/rag"]
    router, router_c = graph_options(docs, "cubelm-router", "router")
    encoder, _ = graph_options(docs, "cubelm-encoder", "encoder")
    llm, _ = parse_options_of_serve(docs)
    assert isinstance(router, RouterOptions) and isinstance(encoder, ServeOptions) and encoder.task == "embed"
    assert router.embed_model == encoder.served_model_name == encoder.model
    for url, target, listens in ((router.embed_url, "cubelm-encoder", encoder.port),
                                 (router.llm_url, "cubelm-serve", llm.port)):
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", url).groups()
        svc = one(docs, "Service", host)
        dep = one(docs, "Deployment", target)
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(), url
        target_port = next((p["targetPort"] for p in svc["spec"]["ports"] if p["port"] == int(port)), None)
        assert target_port is not None, f"{url}: Service {host} has no port {port}"
        ports = {p["name"]: p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        assert ports[target_port] == listens, url
    # the index is the claim, mounted read-only where --index points
    mount = next(m for m in router_c["volumeMounts"] if m["mountPath"] == router.index)
    volume = next(v for v in one(docs, "Deployment", "cubelm-router")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert mount["readOnly"] and one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    for name in ("cubelm-router", "cubelm-encoder"):  # Prometheus scrapes both (the per-hop metrics)
        sm, svc = one(docs, "ServiceMonitor", name), one(docs, "Service", name)
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


def parse_options_of_serve(docs):
    from cubelm.cli import parse_options
    return parse_options(serve_argv(docs))


def test_graph_probes_hit_routes_each_service_has(rendered):
    from types import SimpleNamespace

    from cubelm.serve.app import create_app
    from cubelm.serve.commands import ServeOptions
    from cubelm.serve.router import create_router_app
    from cubelm.serve.state import ServerState
    docs = rendered["overlays/rag"]
    routes = {
        "cubelm-encoder": {r.path for r in create_app(ServerState(ServeOptions(task="embed", model="e"))).routes},
        "cubelm-router": {r.path for r in create_router_app(
            SimpleNamespace(options=SimpleNamespace(max_request_bytes=1024))).routes}}
    assert "/v1/embeddings" in routes["cubelm-encoder"] and "/v1/chat/completions" in routes["cubelm-router"]
    for name, cname in (("cubelm-encoder", "encoder"), ("cubelm-router", "router")):
        c = container(one(docs, "Deployment", name), cname)
        ports = {p["name"] for p in c["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]["httpGet"]
            assert probe["path"] in routes[name] and probe["port"] in ports, (name, kind)
        # liveness never depends on another service: an upstream outage must not restart the pod
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"


def test_graph_network_policies_allow_only_the_graph_edges(rendered):
    docs = rendered["overlays/rag"]
    policies = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "NetworkPolicy")}

    def pods(peers):
        return sorted(p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in peers if "podSelector" in p)

    for upstream in ("cubelm-encoder", "cubelm-serve"):
        ingress = policies[upstream]["ingress"]
        assert all(rule.get("from") for rule in ingress), f"{upstream} takes traffic from anyone"
        assert pods(p for rule in ingress for p in rule["from"]) == ["cubelm-router"], upstream
        assert all(p.get("namespaceSelector") == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
                   for rule in ingress for p in rule["from"] if "podSelector" not in p)
    egress = policies["cubelm-router"]["egress"]
    assert pods(p for rule in egress for p in rule.get("to", [])) == ["cubelm-encoder", "cubelm-serve"]
    assert all(rule.get("to") or {p["port"] for p in rule["ports"]} == {53} for rule in egress)
    assert policies["cubelm-encoder"]["egress"] == []
    # without the graph (overlays/cpu) the LLM service still answers clients directly
    assert any(not rule.get("from") for rule in one(rendered["overlays/cpu"], "NetworkPolicy",
                                                    "cubelm-serve")["spec"]["ingress"])
