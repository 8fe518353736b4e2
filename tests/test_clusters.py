"""Cluster configs (clusters/) checked without a cluster: Ray's own schema for `ray up`, KubeRay structure,
image pins against pyproject.toml, and the custom resource names against mosaic_ray.actors.resources.

The slow test runs scripts/autoscale_demo.py: Ray's real autoscaler (fake multi-node provider) adding
worker nodes for rollout-shaped demand and removing them when idle.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from mosaic_ray.actors.resources import (
    CLUSTER_RESOURCES_ENV,
    ENGINE_RESOURCE,
    LEARNER_RESOURCE,
    NODE_RESOURCE_AMOUNT,
    RESOURCE_BY_KIND,
    RESOURCE_FRACTION,
    ROLLOUT_RESOURCE,
    actor_options,
    as_bundle,
    declared_resources,
)
from packaging.requirements import Requirement

from mosaic_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_UP_FILES = ("aws.yaml", "gcp.yaml")
KUBERAY_CLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
KUBERAY_JOB = CLUSTERS / "kuberay" / "rayjob.yaml"
CUSTOM = set(RESOURCE_BY_KIND.values())
GPU_PRESETS = ("qwen2.5-7b", "qwen3-4b-thinking", "phi-4")
"""Presets meant for these clusters: their actors must fit the node types."""
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
KEYLIKE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\b[A-Za-z0-9/+]{40}\b|hf_[A-Za-z0-9]{30,}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------ resource hints


def test_actor_options_request_custom_resource_only_when_advertised():
    cfg = load_config("qwen2.5-7b")
    local = actor_options("rollout", cfg, advertised=set())
    assert local == {"num_cpus": 1.0, "num_gpus": 0.0}
    on_cluster = actor_options("rollout", cfg, advertised={"CPU", ROLLOUT_RESOURCE})
    assert on_cluster["resources"] == {ROLLOUT_RESOURCE: RESOURCE_FRACTION}
    engine = actor_options("engine", cfg, advertised=CUSTOM)
    assert (engine["num_cpus"], engine["num_gpus"], engine["resources"]) == (4.0, 1.0, {ENGINE_RESOURCE: 0.01})
    learner = actor_options("learner", cfg, advertised=CUSTOM)
    assert (learner["num_cpus"], learner["num_gpus"], learner["resources"]) == (8.0, 1.0, {LEARNER_RESOURCE: 0.01})
    assert as_bundle(engine) == {"CPU": 4.0, "GPU": 1.0, ENGINE_RESOURCE: 0.01}
    assert as_bundle(local) == {"CPU": 1.0}


def test_actor_options_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown actor kind 'judge'"):
        actor_options("judge", load_config("tiny-cpu"), advertised=set())  # type: ignore[arg-type]
    # a config built in code skips load's checks (which reject this too): placement still refuses it
    cfg = load_config("phi-4")  # tensor_parallel_size 2
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, num_gpus=1))
    with pytest.raises(ValueError, match=r"engine.num_gpus.*tensor_parallel_size=2"):
        actor_options("engine", cfg, advertised=set())


def test_declared_resources_parse_the_env_declaration(monkeypatch):
    assert declared_resources({CLUSTER_RESOURCES_ENV: " mosaic_rollout, ,mosaic_engine "}) == {
        ROLLOUT_RESOURCE, ENGINE_RESOURCE}
    assert declared_resources({}) == set()
    monkeypatch.setenv(CLUSTER_RESOURCES_ENV, LEARNER_RESOURCE)
    opts = actor_options("learner", load_config("tiny-cpu"))  # advertised=None: the declaration counts
    assert opts["resources"] == {LEARNER_RESOURCE: RESOURCE_FRACTION}


# ------------------------------------------------------------------------------------------- ray up


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_valid_against_rays_schema(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTERS / name)
    jsonschema.validate(config, ray_schema())  # the raw file, as written
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks after filling defaults


def test_schema_check_can_fail():
    import jsonschema

    bad = load(CLUSTERS / "aws.yaml")
    bad["available_node_types"]["rollout_cpu"]["resources"]["CPU"] = "sixteen"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def node_custom(resources: dict) -> set[str]:
    return {k for k in resources if k.startswith("mosaic_")}


def fits(node: dict[str, float], opts: dict) -> int:
    """How many actors with `opts` fit one node with `node` resources (CPU, GPU, custom)."""
    need = as_bundle(opts)
    return min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items())


def demand(cfg) -> dict[str, int]:
    return {"rollout": cfg.rollout.max_workers, "engine": cfg.engine.num_engines, "learner": cfg.learner.num_learners}


def check_capacity(groups: dict[str, tuple[dict[str, float], int]], where: str) -> None:
    """groups: custom resource → (Ray resources of one node, max nodes). Every GPU preset must fit."""
    for preset in GPU_PRESETS:
        cfg = load_config(preset)
        for kind, count in demand(cfg).items():
            node, max_nodes = groups[RESOURCE_BY_KIND[kind]]
            per_node = fits(node, actor_options(kind, cfg, advertised=CUSTOM))
            assert per_node >= 1, f"{where}: a {kind} actor of preset {preset} does not fit its node type {node}"
            assert per_node * max_nodes >= count, (
                f"{where}: {count} {kind} actors of preset {preset} need more than {max_nodes} nodes x {per_node}")


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_node_types_advertise_the_actors_resources(name):
    config = load(CLUSTERS / name)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert not node_custom(head["resources"]) and head["resources"].get("CPU") == 0, "the head runs no workloads"
    groups = {}
    for type_name, spec in types.items():
        custom = node_custom(spec["resources"])
        assert len(custom) == 1, f"{name}: node type {type_name} must advertise exactly one of {sorted(CUSTOM)}"
        (resource,) = custom
        assert spec["resources"][resource] == NODE_RESOURCE_AMOUNT
        assert spec.get("min_workers", 0) <= spec["max_workers"]
        groups[resource] = (spec["resources"], spec["max_workers"])
    assert set(groups) == CUSTOM, f"{name}: node types must cover {sorted(CUSTOM)}"
    check_capacity(groups, name)
    declared = [o for o in config["docker"]["head_run_options"] if CLUSTER_RESOURCES_ENV in o]
    assert len(declared) == 1 and declared_resources(dict([declared[0].split()[-1].split("=", 1)])) == CUSTOM


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_installs_the_project_with_vllm_extra(name):
    config = load(CLUSTERS / name)
    setup = " ".join(config["setup_commands"])
    assert re.search(r'pip install "?/home/ray/mosaic-ray\[vllm\]', setup), setup
    assert config["file_mounts"] == {"/home/ray/mosaic-ray": "."}
    assert config["docker"]["image"] == image_ref()


# ------------------------------------------------------------------------------------------ KubeRay


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["template"]["spec"]["containers"]


def groups_of(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def kuberay_problems(manifest: dict) -> list[str]:
    """Structural problems of a RayCluster (or the RayJob's embedded cluster); empty when fine."""
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {manifest.get('apiVersion')!r} is not ray.io/v1")
    if spec.get("enableInTreeAutoscaling") is not True or "autoscalerOptions" not in spec:
        problems.append("in-tree autoscaling is not enabled")
    for name, group in groups_of(spec):
        params = group.get("rayStartParams", {})
        if any(not isinstance(v, str) for v in params.values()):
            problems.append(f"{name}: rayStartParams values must be strings (map[string]string)")
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        if vols.get(mounts.get("/dev/shm"), {}).get("emptyDir", {}).get("medium") != "Memory":
            problems.append(f"{name}: /dev/shm is not a memory-backed emptyDir")
        if not all(c.get("image") for c in pod["containers"]):
            problems.append(f"{name}: container without image")
        if name == "head":
            continue
        if not 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"{name}: need 0 <= minReplicas <= replicas <= maxReplicas")
        if group["maxReplicas"] < 1:
            problems.append(f"{name}: maxReplicas < 1 can never run anything")
        custom = kuberay_custom_resources(group)
        gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["containers"]]
        if custom.keys() & {ENGINE_RESOURCE, LEARNER_RESOURCE}:
            if not all(gpus) or any(c["resources"]["requests"].get("nvidia.com/gpu") !=
                                    c["resources"]["limits"]["nvidia.com/gpu"] for c in pod["containers"]):
                problems.append(f"{name}: GPU group without equal nvidia.com/gpu requests and limits")
            if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
                problems.append(f"{name}: GPU group without a nvidia.com/gpu toleration")
            if not pod.get("nodeSelector"):
                problems.append(f"{name}: GPU group without a nodeSelector")
        elif any(gpus):
            problems.append(f"{name}: CPU group requests GPUs")
    problems += [f"inline secret: {p}" for p in inline_secrets(manifest)]
    return problems


def kuberay_custom_resources(group: dict) -> dict[str, float]:
    """KubeRay's quoting: rayStartParams.resources is a JSON string of a JSON object."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def all_env(node) -> list[dict]:
    """Every `env` entry anywhere in a manifest (containers of every group, sidecars, ...)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                found += value
            else:
                found += all_env(value)
    elif isinstance(node, list):
        for item in node:
            found += all_env(item)
    return found


def inline_secrets(manifest: dict) -> list[str]:
    bad = []
    for env in all_env(manifest):
        value = str(env.get("value", ""))
        if SECRETISH.search(env["name"]) and ("value" in env or "secretKeyRef" not in env.get("valueFrom", {})):
            bad.append(f"{env['name']} must come from valueFrom.secretKeyRef")
        if KEYLIKE.search(value):
            bad.append(f"{env['name']} holds a key-like value")
    return bad


@pytest.mark.parametrize("path", [KUBERAY_CLUSTER, KUBERAY_JOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_structure(path):
    manifest = load(path)
    assert manifest["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    assert kuberay_problems(manifest) == []


def test_kuberay_checker_catches_mistakes():
    manifest = load(KUBERAY_CLUSTER)
    rollout, engine = manifest["spec"]["workerGroupSpecs"][:2]
    rollout["minReplicas"], rollout["maxReplicas"] = 5, 2
    containers(engine)[0]["resources"]["limits"].pop("nvidia.com/gpu")
    containers(engine)[0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x" * 40})
    manifest["spec"]["enableInTreeAutoscaling"] = False
    problems = "\n".join(kuberay_problems(manifest))
    for needle in ("autoscaling is not enabled", "rollout-cpu: need 0 <= minReplicas", "engine-gpu: GPU group",
                   "AWS_SECRET_ACCESS_KEY must come from valueFrom.secretKeyRef", "key-like value"):
        assert needle in problems, problems


def test_kuberay_groups_advertise_the_actors_resources():
    spec = load(KUBERAY_CLUSTER)["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and not kuberay_custom_resources(head)
    ports = {p["containerPort"] for p in containers(head)[0]["ports"]}
    assert {6379, 8265, 10001, 8080} <= ports, "gcs, dashboard, client and metrics ports"
    declared = {e["name"]: e.get("value") for e in containers(head)[0]["env"]}
    assert declared_resources(declared) == CUSTOM
    groups = {}
    for group in spec["workerGroupSpecs"]:
        custom = kuberay_custom_resources(group)
        assert len(custom) == 1 and set(custom.values()) == {NODE_RESOURCE_AMOUNT}, group["groupName"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        limits = containers(group)[0]["resources"]["limits"]
        node = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)), **custom}
        groups[next(iter(custom))] = (node, group["maxReplicas"])
    assert set(groups) == CUSTOM
    check_capacity(groups, "raycluster.yaml")
    images = {c["image"] for _, g in groups_of(spec) for c in containers(g)}
    assert images == {image_ref()}


def test_rayjob_runs_the_preset_on_the_same_cluster():
    job = load(KUBERAY_JOB)["spec"]
    assert job["rayClusterSpec"] == load(KUBERAY_CLUSTER)["spec"], "rayjob.yaml drifted from raycluster.yaml"
    assert job["entrypoint"] == "mosaic-ray train --config qwen2.5-7b"
    load_config(job["entrypoint"].split("--config ")[1])  # the preset exists and resolves
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env == {k: v for k, v in load(CLUSTERS / "runtime_env.yaml").items() if k != "config"}


def test_runtime_env_is_valid_and_declares_the_resources():
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTERS / "runtime_env.yaml")
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert declared_resources(env["env_vars"]) == CUSTOM
    assert "working_dir" not in env and "py_modules" not in env, "the image ships the code; --working-dir is per job"


def test_no_credentials_anywhere_in_clusters():
    for path in sorted(CLUSTERS.rglob("*")):
        if path.is_file():
            text = path.read_text()
            assert not KEYLIKE.search(text), f"{path}: key-like string"
            assert not re.search(r"(aws_secret_access_key|AWS_SECRET_ACCESS_KEY)\s*[=:]\s*\S", text), path


# --------------------------------------------------------------------------------------------- image


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (CLUSTERS / "Dockerfile").read_text(), re.MULTILINE))


def image_ref() -> str:
    """The image every cluster config runs: <registry>/mosaic-ray:<pyproject version>."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"ghcr.io/your-org/mosaic-ray:{version}"


def test_dockerfile_pins_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    reqs.update({Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["vllm"]})
    pins = dockerfile_args()
    for package, arg in (("ray", "RAY_VERSION"), ("torch", "TORCH_VERSION"),
                         ("transformers", "TRANSFORMERS_VERSION"), ("vllm", "VLLM_VERSION")):
        assert reqs[package].specifier.contains(pins[arg]), f"Dockerfile {arg}={pins[arg]} vs pyproject {reqs[package]}"
    assert pins["TORCH_VERSION"].startswith("2.14."), "vllm 0.33 pins torch 2.14"
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project["requires-python"]).contains(pins["PYTHON_VERSION"] + ".0")
    text = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:13\.\S+", text, re.MULTILINE), "CUDA 13 base (torch 2.14 wheels are CUDA 13)"
    assert 'pip install "/home/ray/mosaic-ray[vllm]"' in text
    for folder in ("mosaic_ray", "actors", "learners", "benchmarks"):  # pyproject's package-dir roots
        assert re.search(rf"^COPY .*\b{folder} /home/ray/mosaic-ray/{folder}$", text, re.MULTILINE), folder


# --------------------------------------------------------------------------------- autoscaler (slow)


@pytest.mark.slow
def test_autoscaler_adds_nodes_for_rollout_demand_and_removes_them(tmp_path):
    out = tmp_path / "autoscale.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.pop(CLUSTER_RESOURCES_ENV, None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "autoscale_demo.py"), "--json-out", str(out)],
                          check=False, env=env, capture_output=True, text=True, timeout=240)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["actor_options"]["resources"] == {ROLLOUT_RESOURCE: RESOURCE_FRACTION}
    assert rec["nodes_added"] >= 1, "the autoscaler added no node for demand the head cannot hold"
    assert rec["actors_on_worker_nodes"] == rec["num_actors"], "actors must run on the autoscaled nodes"
    assert rec["nodes_removed"] == rec["nodes_added"], "idle nodes must be removed"
    assert max(rec["node_removed_at_s"]) > max(a["finished_s"] for a in rec["actors"])
    assert proc.returncode == 0, proc.stderr[-3000:]
