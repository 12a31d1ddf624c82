"""A real third-party plugin: examples/plugin-template installed with pip, found through its entry
point, served by a real gateway next to a built-in head; and the start-up checks that guard plugins.

The template is installed with ``pip install --target`` into a throw-away directory that this module
and its subprocesses put on their path; the running environment is never modified.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from splitserve.errors import PluginError
from splitserve.models.backbone import FeatureSpec
from splitserve.plugins import ENTRY_POINT_GROUP, PluginRegistry

from splitserve.gateway.process import GatewayProcess

from .conftest import Started, jpeg_bytes, texture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin-template"
SRC = TEMPLATE / "src"
DIST = "splitserve-embedding-example"
ENTRY = (ENTRY_POINT_GROUP, "embedding", "splitserve_embedding:EmbeddingPlugin")
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def run(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


def start(*args: str, cwd: Path = ROOT) -> Started:
    return Started(list(args), cwd=cwd, env=ENV)


def platform_cmd() -> list[str]:
    script = Path(sys.executable).with_name("platform")  # the console script pip installed
    return [str(script)] if script.is_file() else [sys.executable, "-m", "splitserve"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --target`` of examples/plugin-template into a throw-away directory, put on the
    path of this process and of every subprocess: the running environment is never modified."""
    import shutil

    source = tmp_path_factory.mktemp("template-src") / "plugin-template"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("template-site")
    base = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)]
    proc = run(*base[:5], "--no-build-isolation", "--no-index", *base[5:])  # offline: setuptools is here
    if proc.returncode != 0:  # an environment without a usable setuptools: let pip fetch one
        proc = run(*base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(target))
    try:
        dist = distribution(DIST)
        assert Path(str(dist.locate_file(""))).resolve() == target.resolve()
        assert ENTRY in {(ep.group, ep.name, ep.value) for ep in dist.entry_points}
        yield target
    finally:
        sys.path.remove(str(target))
        ENV.pop("PYTHONPATH", None)
        for name in [m for m in sys.modules if m == "splitserve_embedding" or m.startswith("splitserve_embedding.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def bundles(installed, tmp_path_factory) -> Path:
    """Built in a fresh process, through real discovery: ``embed-cls`` (embedding + classification
    heads), ``cls-only``, and ``t-emb``, an untrained teacher for the template's task."""
    out = tmp_path_factory.mktemp("plugin-bundles")
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import torch
        from splitserve.defaults import build_untrained_bundle
        from splitserve.plugins import PluginRegistry
        from splitserve.preprocess import Preprocessing
        from splitserve.training.teacher import Teacher, save_teacher

        out = Path(sys.argv[1])
        build_untrained_bundle(out / "embed-cls", input_size=(64, 64), tasks=["embed", "cls"])
        build_untrained_bundle(out / "cls-only", input_size=(64, 64), tasks=["cls"])
        plugin = PluginRegistry.discover().get("embed")
        torch.manual_seed(0)
        config = plugin.resolve_config("resnet18", {"dim": 32})
        stem, head = plugin.build_teacher("resnet18", config)
        save_teacher(out / "t-emb", Teacher(out / "t-emb", plugin.name, "resnet18", config,
                                            Preprocessing.fixed(64, 64), stem.eval(), head.eval(), {}, {}))
    """)
    proc = run(sys.executable, "-c", script, str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def server(bundles):
    s = GatewayProcess("--bundle", str(bundles / "embed-cls"), "--max-wait-ms", "20", env=ENV).start()
    yield s
    s.stop()


def plugins():
    from splitserve_embedding import EmbeddingPlugin
    from splitserve_tasks.classification import ClassificationPlugin

    return EmbeddingPlugin, ClassificationPlugin


# -- installation and discovery ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(installed):
    """The fresh processes that need only the installed template, started side by side: discovery,
    `platform tasks` and the template's own tests (checked last, so that it overlaps the gateway's)."""
    code = ("from splitserve.plugins import PluginRegistry; r = PluginRegistry.discover(); "
            "p = r.get('embed'); print(p.name, type(p).__module__, ','.join(r.names()))")
    started = {"discover": start(sys.executable, "-c", code), "tasks": start(*platform_cmd(), "tasks"),
               "own tests": start(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                                  cwd=TEMPLATE)}
    yield started
    for s in started.values():
        s.stop()


def test_entry_point_discovered_by_a_fresh_process(fresh):
    proc = fresh["discover"].result()
    assert proc.returncode == 0, proc.stderr
    name, module, names = proc.stdout.split()
    assert (name, module) == ("embedding", "splitserve_embedding.plugin")
    assert {"classification", "embedding"} <= set(names.split(","))


def test_platform_tasks_lists_it(fresh):
    proc = fresh["tasks"].result()
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert rows["embedding"] == ["embedding", "embed", "recall@1", "splitserve_embedding:EmbeddingPlugin"]
    assert rows["classification"][1] == "cls"


# -- served by a real gateway ------------------------------------------------------------------


def test_infer_answers_with_the_template_schema(server, bundles):
    from splitserve.bundle import load_head, read_manifest
    from splitserve.edge import EdgeEncoder
    from splitserve_embedding import EmbeddingResult

    EmbeddingPlugin, _ = plugins()
    bundle = bundles / "embed-cls"
    edge = EdgeEncoder.from_bundle(bundle)
    images = [texture("brick", (120, 90)), texture("coffee", (64, 48)), texture("brick", (120, 90))]
    encoded = edge.encode(images)
    r = httpx.post(server.url + "/infer", params={"tasks": "embed,cls"}, content=encoded.data,
                   headers={"Content-Type": "application/x-splitserve"}, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["tasks"] == ["embedding", "classification"]
    assert [x["original_size"] for x in answer["results"]] == [[90, 120], [48, 64], [90, 120]]
    results = [EmbeddingResult.model_validate(x["tasks"]["embedding"]) for x in answer["results"]]
    assert all(x["tasks"]["classification"]["top"] for x in answer["results"])
    vectors = np.array([e.vector for e in results])
    assert vectors.shape == (3, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)  # same image, same vector
    assert float(vectors[0] @ vectors[1]) < 1 - 1e-6  # different images, different vectors
    # the space id is the bundle's head weights, whichever process hashes them
    manifest = read_manifest(bundle)
    plugin = EmbeddingPlugin()
    head = plugin.build_head(manifest.backbone, manifest.tasks["embedding"].config)
    head = load_head(bundle, "embedding", head, manifest)
    assert {e.space for e in results} == {head.space_id()}

    # only what was asked runs; full offloading (a plain JPEG) reaches the plugin too
    r = httpx.post(server.url + "/infer", params={"tasks": "embedding"}, content=jpeg_bytes(texture("coffee")),
                   headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    only = r.json()["results"][0]["tasks"]
    assert only["classification"] is None
    assert EmbeddingResult.model_validate(only["embedding"]).dim == 128


def test_tasks_endpoint_and_openapi_publish_the_schema(server):
    from splitserve_embedding import EmbeddingResult

    tasks = {t["name"]: t for t in httpx.get(server.url + "/v1/tasks").json()}
    assert set(tasks) == {"embedding", "classification"}
    emb = tasks["embedding"]
    assert emb["aliases"] == ["embed"] and emb["config"] == {"dim": 128}
    assert emb["feature"] == {"channels": 64, "stride": 4}
    assert emb["description"].startswith("Global image embedding")
    assert emb["response_schema"] == EmbeddingResult.model_json_schema()

    spec = httpx.get(server.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    task_results = schemas["TaskResults"]["properties"]
    assert set(task_results) == {"embedding", "classification"}
    assert {"$ref": "#/components/schemas/EmbeddingResult"} in task_results["embedding"]["anyOf"]
    props = schemas["EmbeddingResult"]["properties"]
    assert set(props) == {"space", "dim", "vector"}
    assert "cosine similarity" in props["vector"]["description"]
    r = httpx.post(server.url + "/infer", params={"tasks": "embed,pose"}, content=b"x",
                   headers={"Content-Type": "application/x-splitserve"})
    assert r.status_code == 400 and "embedding (embed)" in r.json()["detail"]


# -- a rate–accuracy study of the template's task --------------------------------------------------


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """An ImageFolder tree of real photos: random 48×40 crops of three scikit-image textures."""
    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    for name in ("brick", "grass", "gravel"):
        photo = np.asarray(texture(name))
        for split, n in (("train", 2), ("val", 4)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                y, x = rng.integers(0, photo.shape[0] - 40), rng.integers(0, photo.shape[1] - 48)
                Image.fromarray(photo[y:y + 40, x:x + 48]).save(root / split / name / f"{i}.png")
    return root


def test_platform_evaluate_scores_the_template_task(installed, bundles, crops, tmp_path):
    """`platform evaluate` on a task the core has never heard of: the template's embedding head,
    from payload bytes through the gateway runtime and from WebP through its teacher, scored by the
    plugin's own scorer; the teacher's recall@1 equals the plugin's own ``evaluate`` on those images."""
    import json

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
data: {crops}
teachers: {{embed: {bundles / "t-emb"}}}
repeat: 1
anchors: {{delta_accuracy: ES}}
bitmaps: {{images: 1}}
methods:
  - {{name: ES, kind: bundle, points: [{bundles / "embed-cls"}]}}
  - {{name: WebP, kind: webp, points: [10, 90]}}
""")
    proc = run(*platform_cmd(), "evaluate", str(sweep), "--out", str(tmp_path / "out"), "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "points.json").read_text())
    ref = doc["reference"]["embedding"]
    assert (ref["metric"], ref["label"], ref["images"]) == ("recall@1", "recall@1 (%)", 12)
    points = [(p["method"], p["setting"], p["task"], p["metric"]) for p in doc["points"]]
    assert points == [("ES", "embed-cls", "embedding", "recall@1"), ("WebP", "q10", "embedding", "recall@1"),
                      ("WebP", "q90", "embedding", "recall@1")]
    assert "## embedding (recall@1 (%))" in (tmp_path / "out" / "report.md").read_text()

    from torch.utils.data import DataLoader

    from splitserve.training.teacher import load_teacher

    registry = PluginRegistry.discover()
    plugin = registry.get("embedding")
    teacher = load_teacher(bundles / "t-emb", registry)
    val = plugin.build_dataset(crops, "val", train=False, preprocessing=teacher.preprocessing)
    theirs = plugin.evaluate(teacher.head, teacher.stem, DataLoader(val, batch_size=5, collate_fn=plugin.collate))
    assert ref["accuracy"] == pytest.approx(theirs["recall@1"], abs=1e-9)


# -- start-up checks -----------------------------------------------------------------------------


def test_registry_refuses_duplicate_names(installed):
    EmbeddingPlugin, ClassificationPlugin = plugins()
    registry = PluginRegistry([EmbeddingPlugin(), ClassificationPlugin()])
    assert [p.name for p in registry.resolve("EMBED, cls,embedding")] == ["embedding", "classification"]

    class Retrieval(EmbeddingPlugin):
        name = "retrieval"
        aliases = ("embed",)

    class Greedy(EmbeddingPlugin):
        name = "greedy"
        aliases = ("cls",)

    with pytest.raises(PluginError, match="task name 'embed' is claimed by both 'embedding' and 'retrieval'"):
        PluginRegistry([EmbeddingPlugin(), Retrieval()])
    with pytest.raises(PluginError, match="task name 'cls' is claimed by both 'classification' and 'greedy'"):
        PluginRegistry([ClassificationPlugin(), Greedy()])
    with pytest.raises(PluginError, match="task name 'embedding' is claimed by both"):
        PluginRegistry([EmbeddingPlugin(), EmbeddingPlugin()])


def test_runtime_refuses_feature_mismatch_and_missing_head(bundles, caplog):
    from splitserve.gateway.runtime import Runtime

    EmbeddingPlugin, ClassificationPlugin = plugins()

    class Wide(EmbeddingPlugin):  # written for resnet50's h, whatever the bundle's backbone
        def feature_spec(self, backbone):
            return FeatureSpec(256, 4)

    class Coarse(EmbeddingPlugin):
        def feature_spec(self, backbone):
            return FeatureSpec(64, 8)

    for plugin, consumes in ((Wide(), "256 channels at stride 4"), (Coarse(), "64 channels at stride 8")):
        with pytest.raises(PluginError, match=f"task 'embedding' consumes {consumes}, but the bundle's codec "
                                              "produces 64 channels at stride 4"):
            Runtime(bundles / "embed-cls", PluginRegistry([plugin, ClassificationPlugin()]))
    with pytest.raises(PluginError, match="has no head for embedding"):
        Runtime(bundles / "cls-only", PluginRegistry([EmbeddingPlugin(), ClassificationPlugin()]), tasks=["embed"])
    # a head whose plugin is not installed is skipped (with a warning); the rest is served
    with caplog.at_level("WARNING", logger="splitserve.gateway"):
        runtime = Runtime(bundles / "embed-cls", PluginRegistry([ClassificationPlugin()]))
    assert [p.name for p in runtime.plugins] == ["classification"]
    assert "bundle head 'embedding' has no installed plugin" in caplog.text
    with pytest.raises(PluginError, match="has no head for any installed plugin"):
        Runtime(bundles / "embed-cls", PluginRegistry([]))


def test_platform_serve_exits_2_with_one_line(bundles):
    # a plugin whose feature spec disagrees with the bundle, swapped in for the installed one
    script = textwrap.dedent("""
        import sys
        import warnings
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")  # as cli.main does

        from splitserve import cli, plugins
        from splitserve.models.backbone import FeatureSpec
        from splitserve_embedding import EmbeddingPlugin

        class Wide(EmbeddingPlugin):
            def feature_spec(self, backbone):
                return FeatureSpec(256, 4)

        found = list(plugins.PluginRegistry.discover())
        swapped = [Wide() if p.name == "embedding" else p for p in found]
        plugins.PluginRegistry.discover = classmethod(lambda cls: cls(swapped))
        sys.exit(cli.main(sys.argv[1:]))
    """)
    wide = start(sys.executable, "-c", script, "serve", "--bundle", str(bundles / "embed-cls"), "--port", "0")
    # and a bundle without the task's head, side by side (both exit before they would listen)
    missing = start(*platform_cmd(), "serve", "--bundle", str(bundles / "cls-only"), "--tasks", "embed", "--port", "0")
    proc, other = wide.result(), missing.result()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("platform serve: error: task 'embedding' consumes 256 channels at stride 4, "
                                  "but the bundle's codec produces 64 channels at stride 4")

    proc = other
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "has no head for embedding (it has: classification)" in proc.stderr


def test_template_passes_its_own_tests(fresh):
    """Last: its run, started with the fresh processes above, overlaps the gateway's tests."""
    proc = fresh["own tests"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
