"""Dashboard metrics of the driver's stages via `ray.util.metrics` (exported as `ray_mosaic_*` on each node's
Prometheus endpoint, and so in the Ray dashboard's Grafana panels).

Every numeric key of an iteration's row becomes a gauge named `mosaic_<key>` with `/` turned into `_`,
e.g. `rollout/harmful_refusal_rate` → `ray_mosaic_rollout_harmful_refusal_rate`. The same numbers go to
`metrics.jsonl` (and to the `train.loggers` trackers); the rollout workers and the fleet export their own
counters and gauges beside these. `clusters/monitoring/` has the Prometheus scrape config and the Grafana
dashboard over them; `tests/test_monitoring.py` checks every dashboard query against a real Prometheus.
"""

from __future__ import annotations

import re
from typing import Any


def metric_name(key: str) -> str:
    return "mosaic_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class DriverMetrics:
    """Gauges created on first use (Ray wants one object per metric name and process)."""

    def __init__(self, run_id: str = "") -> None:
        self.run_id = run_id
        self._gauges: dict[str, Any] = {}

    def record(self, row: dict[str, Any]) -> None:
        from ray.util.metrics import Gauge

        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric_name(key)
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = Gauge(name, description=f"MOSAIC-Ray driver: {key}",
                                                   tag_keys=("run_id",))
            gauge.set(float(value), tags={"run_id": self.run_id})
