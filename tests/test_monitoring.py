"""[Ops & ecosystem] Dashboard: clusters/monitoring/ holds a Grafana dashboard over the `ray_mosaic_*` metrics and
a Prometheus scrape config that follows Ray's service-discovery file. The slow test proves them against real
scrapes: a real Prometheus (Debian's `prometheus` package) on 127.0.0.1 scrapes a `ray start` cluster while a
smoke training run executes on it, and every PromQL expression of the dashboard returns data through
Prometheus' HTTP API."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mosaic_ray.benchmarks.cluster import RayHead

from mosaic_ray.hygiene import free_port

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "clusters" / "monitoring"
DASHBOARD = MONITORING / "mosaic-ray-dashboard.json"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
KUBERAY = ROOT / "clusters" / "kuberay"

# What the issue asks the dashboard to show, as the metric each topic needs.
TOPICS = {
    "rollout episodes/s": "ray_mosaic_episodes_total", "rollout tokens/s": "ray_mosaic_tokens_total",
    "harmful refusal": "ray_mosaic_rollout_harmful_refusal_rate",
    "injection success": "ray_mosaic_rollout_injection_success_rate",
    "over-refusal": "ray_mosaic_rollout_over_refusal_rate", "leak": "ray_mosaic_rollout_privacy_leak_rate",
    "reward": "ray_mosaic_reward_mean", "judge": "ray_mosaic_pairs_per_s", "loss": "ray_mosaic_learner_loss",
    "KL": "ray_mosaic_learner_approx_kl_old", "clip": "ray_mosaic_learner_clipfrac",
    "weight sync": "ray_mosaic_time_weight_sync_s", "policy version": "ray_mosaic_policy_version",
    "staleness": "ray_mosaic_staleness_mean", "fleet size": "ray_mosaic_rollout_active_workers",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


# -------------------------------------------------------------------------------------------- static


def test_dashboard_has_the_grafana_dashboard_shape():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    cells = set()
    for p in dash["panels"]:
        box = p["gridPos"]
        assert 0 <= box["x"] and box["x"] + box["w"] <= 24 and box["h"] > 0, p["title"]
        cell = [(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])]
        assert cells.isdisjoint(cell), f"panel {p['title']!r} overlaps another"
        cells.update(cell)
        if p["type"] == "row":
            continue
        assert p["type"] == "timeseries" and p["title"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert isinstance(t["expr"], str) and "ray_mosaic_" in t["expr"], (p["title"], t)
    used = " ".join(expr for _, expr in targets(dash))
    missing = {topic: metric for topic, metric in TOPICS.items() if metric not in used}
    assert not missing, f"no panel for {missing}"


def test_scrape_config_follows_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = cfg["scrape_configs"]
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert files == [f"/tmp/ray/session_latest/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_kubernetes_monitoring_wires_the_dashboard_and_every_ray_pod():
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    (gen,) = kust["configMapGenerator"]
    assert gen["files"] == [DASHBOARD.name] and gen["options"]["labels"] == {"grafana_dashboard": "1"}
    for res in kust["resources"]:
        assert (MONITORING / res).is_file(), res
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"ray.io/is-ray-node": "yes"}  # KubeRay's label on head and worker pods

    for manifest in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"):
        text = manifest.read_text()
        assert "clusters/monitoring" in text, f"{manifest.name} does not point at the dashboard"
        doc = yaml.safe_load(text)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            container = group["template"]["spec"]["containers"][0]
            named = {p.get("name"): p["containerPort"] for p in container["ports"]}
            assert str(named.get(port)) == group["rayStartParams"]["metrics-export-port"], (manifest.name, group)
        head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= head_env


# ------------------------------------------------------------------------------------------- real scrapes


class Prometheus:
    """A Prometheus server on 127.0.0.1 with a private data dir, stopped by its PID."""

    def __init__(self, binary: str, config: Path, data: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = data.parent / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
                                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Prometheus not ready in 60 s: {self.log.read_text()[-2000:]}")

    def api(self, path: str, **params: str | float) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        assert body["status"] == "success", body
        return body["data"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.slow
def test_prometheus_scrapes_a_smoke_run_and_every_dashboard_query_has_data(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no `prometheus` binary: install Debian's package (apt-get install -y prometheus) to run the "
                    "dashboard-against-real-scrapes test")
    promtool = shutil.which("promtool")  # shipped with the same package
    if promtool:
        check = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                               check=False)
        assert check.returncode == 0, check.stdout + check.stderr

    temp = f"/tmp/mr-mon-{os.getpid()}"  # Ray's socket paths must stay short
    head = RayHead(temp_dir=temp, num_cpus=2,  # every port a free one from hygiene.quiet_ports()
                   env={"RAY_metrics_report_interval_ms": "1000"})  # metrics reach the endpoint within a second
    # the shipped scrape config, pointed at this cluster's temp dir and scraping every second
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for sd in cfg["scrape_configs"][0]["file_sd_configs"]:
        sd["files"] = [f.replace("/tmp/ray/", f"{temp}/") for f in sd["files"]]
        sd["refresh_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    head.start()
    prom = None
    try:
        prom = Prometheus(binary, tmp_path / "prometheus.yml", tmp_path / "tsdb", free_port())
        t0 = time.time()
        run = tmp_path / "run"
        sets = ["warmstart.steps=2", "warmstart.num_demos=20", "warmstart.first_turn_steps=0", "train.eval_size=4",
                "rollout.tasks_per_iteration=8",  # every category in the training rollouts, so every rate exists
                "protocol.max_steps=2", "protocol.max_new_tokens=16"]
        env = {**head.process_env(), "RAY_ADDRESS": head.address}
        res = subprocess.run([str(Path(sys.executable).parent / "mosaic-ray"), "train", "--config", "smoke",
                              "--run-dir", str(run), "--quiet", *[a for s in sets for a in ("--set", s)]],
                             env=env, capture_output=True, text=True, timeout=900, check=False)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        time.sleep(4)  # the last report interval and scrape

        up = [t for t in prom.api("targets")["activeTargets"] if t["health"] == "up"]
        assert any(t["labels"]["instance"].endswith(f":{head.metrics_port}") for t in up), up
        session = Path(os.path.realpath(f"{temp}/session_latest")).name
        values = {"$SessionName": session, "$run_id": run.name, "$__rate_interval": "30s"}
        empty = []
        for title, expr in [*targets(dashboard()), ("control", 'ray_mosaic_policy_version{run_id="no-such-run"}')]:
            query = expr
            for var, value in values.items():
                query = query.replace(var, value)
            assert "$" not in query, f"{title}: unresolved variable in {expr}"
            data = prom.api("query_range", query=query, start=t0, end=time.time(), step="2s")
            points = [float(v) for series in data["result"] for _, v in series["values"]]
            if not any(math.isfinite(v) for v in points):
                empty.append(f"{title}: {query}")
        names = prom.api("label/__name__/values")
        assert empty and empty[-1].startswith("control:"), "a query for another run's series returned data"
        assert not empty[:-1], "no data for:\n" + "\n".join(empty[:-1]) + "\nexported: " + \
            ", ".join(n for n in names if n.startswith("ray_mosaic"))
    finally:
        if prom is not None:
            prom.stop()
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)
