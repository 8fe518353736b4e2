"""Experiment trackers behind one interface: `train.loggers: [console, jsonl, tensorboard, mlflow, wandb]`.

Every tracker gets the same three things: the resolved config when it opens, each iteration's metrics row (the
row `metrics.jsonl` holds, keyed `rollout/...`, `reward/...`, `learner/...`, `time/...`) at the end of the
iteration, and the run's report files (`report.md`, `report.json`, `curves.png`, `before_after.png`) when the
report is written. Where each one writes (`DIR` = `train.loggers_dir`, by default the run directory when it is
local, else `runs/<run id>`):

| logger | writes |
|---|---|
| console | one log line per iteration |
| jsonl | `metrics.jsonl` in the run directory (local or s3://) |
| tensorboard | `DIR/tensorboard/events.out.tfevents.*`: scalars, config and reports as text, plots as images |
| mlflow | `MLFLOW_TRACKING_URI` if set, else `sqlite:///DIR/mlflow.db` with artifacts in `DIR/mlartifacts/` |
| wandb | `DIR/wandb/`, online or offline as `WANDB_MODE` says (`wandb sync DIR/wandb/offline-run-*` uploads) |

The non-default backends are optional extras (`pip install 'mosaic-ray[tensorboard]'`, `[mlflow]`, `[wandb]`, or
`[trackers]` for all three); the config check names the extra when one is missing (`TrainConfig.loggers`).
A resumed run appends to the same TensorBoard directory, MLflow run (found by its `mosaic.run_uri` tag) and W&B
run id, from the iteration after its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mosaic_ray.config import MosaicConfig, to_dict, to_yaml
from mosaic_ray.storage import RunStorage

__all__ = ["ConsoleTracker", "JsonlTracker", "MlflowTracker", "TensorBoardTracker", "Tracker", "TrackerContext",
           "Trackers", "WandbTracker", "flat_params", "open_trackers"]

log = logging.getLogger("mosaic_ray.train")


@dataclass(frozen=True)
class TrackerContext:
    """What a tracker needs to open: the run, its config, and where local stores go."""

    cfg: MosaicConfig
    storage: RunStorage
    run_id: str
    local_dir: str
    """Directory of the file-based stores (tensorboard/, mlflow.db, mlartifacts/, wandb/)."""
    resume: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    """Rows already logged by the run being resumed (the JSONL file is rewritten whole)."""


class Tracker(Protocol):
    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        """One iteration's metrics row; `step` is the iteration."""

    def log_artifact(self, name: str, data: bytes) -> None:
        """A report file (`.md`, `.json`, `.png`) by its file name."""

    def close(self, ok: bool) -> None:
        """Flush and end the run (`ok=False`: it failed or was interrupted)."""


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (None and non-numbers are left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"learner": {"lr": 3e-4}}` → `{"learner.lr": "0.0003"}` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


# ------------------------------------------------------------------------------------------------ backends


class ConsoleTracker:
    """One log line per iteration with the headline rates, reward, loss, KL and time."""

    KEYS = ("rollout/harmful_refusal_rate", "rollout/injection_success_rate", "rollout/benign_success_rate",
            "rollout/over_refusal_rate", "reward/mean", "learner/loss", "learner/approx_kl_old", "time/iteration_s")

    def __init__(self, ctx: TrackerContext) -> None:
        pass

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        log.info("iteration %d: %s", step, ", ".join(f"{k.split('/')[-1]}={row[k]:.3f}" for k in self.KEYS
                                                     if row.get(k) is not None))

    def log_artifact(self, name: str, data: bytes) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class JsonlTracker:
    """`metrics.jsonl` in the run directory, rewritten whole each iteration (S3 objects cannot be appended to)."""

    def __init__(self, ctx: TrackerContext) -> None:
        self.storage = ctx.storage
        self.rows = list(ctx.history)

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        self.rows.append(dict(row))
        self.storage.put_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def log_artifact(self, name: str, data: bytes) -> None:
        pass  # the report files sit beside metrics.jsonl already

    def close(self, ok: bool) -> None:
        pass


class TensorBoardTracker:
    """Event files under `DIR/tensorboard`: scalars per iteration, config and reports as text, plots as images."""

    def __init__(self, ctx: TrackerContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(ctx.local_dir, "tensorboard"))
        if not ctx.resume:
            self.writer.add_text("config", _code_block(to_yaml(ctx.cfg), "yaml"), 0)
        self.writer.flush()
        self.last_step = 0

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # live: TensorBoard shows each iteration as it ends
        self.last_step = step

    def log_artifact(self, name: str, data: bytes) -> None:
        if name.endswith(".png"):
            from tensorboard.compat.proto.summary_pb2 import Summary

            width, height = struct.unpack(">II", data[16:24])  # the PNG header's IHDR chunk
            image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), self.last_step)
        else:
            text = data.decode()
            self.writer.add_text(name, text if name.endswith(".md") else _code_block(text, "json"), self.last_step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run: params = the flattened config, metrics per iteration (step = iteration), report files and
    `config.yaml` as artifacts. Store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///DIR/mlflow.db`; experiment
    `MLFLOW_EXPERIMENT_NAME` or `mosaic-ray`."""

    def __init__(self, ctx: TrackerContext) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(ctx.local_dir, "mlflow.db")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mosaic-ray")
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            exp_id = self.client.create_experiment(name)  # the server's artifact store
        else:
            exp_id = self.client.create_experiment(name, artifact_location="file://" + os.path.join(
                ctx.local_dir, "mlartifacts"))
        previous = self.client.search_runs([exp_id], f"tags.`mosaic.run_uri` = '{ctx.storage.uri}'",
                                           max_results=1) if ctx.resume else []
        if previous:
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(exp_id, run_name=ctx.run_id, tags={
            "mosaic.run_uri": ctx.storage.uri, "mosaic.config": ctx.cfg.name}).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_params(to_dict(ctx.cfg)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, to_yaml(ctx.cfg), "config.yaml")

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(row).items()]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_artifact(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="mosaic-mlflow-") as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, path)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class WandbTracker:
    """A W&B run in `DIR/wandb/` (`WANDB_MODE=offline` keeps it local; `WANDB_PROJECT`, default `mosaic-ray`).
    The config is the run's config, each row a history step, the report files are run files."""

    ID_FILE = "mosaic-run-id"

    def __init__(self, ctx: TrackerContext) -> None:
        import wandb

        root = os.path.join(ctx.local_dir, "wandb")
        os.makedirs(root, exist_ok=True)
        id_path = os.path.join(root, self.ID_FILE)
        if ctx.resume and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mosaic-ray"), dir=ctx.local_dir,
                              name=ctx.run_id, id=run_id, resume="allow", config=to_dict(ctx.cfg),
                              settings=wandb.Settings(console="off"))  # Ray owns stdout/stderr

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log(scalars(row), step=step)

    def log_artifact(self, name: str, data: bytes) -> None:
        path = os.path.join(self.run.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        self.run.save(path, base_path=self.run.dir, policy="now")

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS: dict[str, type] = {"console": ConsoleTracker, "jsonl": JsonlTracker, "tensorboard": TensorBoardTracker,
                             "mlflow": MlflowTracker, "wandb": WandbTracker}


# ------------------------------------------------------------------------------------------------ fan-out


class Trackers:
    """All trackers of a run, called in `train.loggers` order."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        step = int(row["iteration"])
        for t in self.trackers:
            t.log_metrics(row, step)

    def log_artifacts(self, files: Mapping[str, bytes]) -> None:
        for name, data in files.items():
            for t in self.trackers:
                t.log_artifact(name, data)

    def close(self) -> None:
        """End every tracker; inside a `finally`, a propagating exception marks the runs failed."""
        ok = sys.exc_info()[0] is None
        for t in self.trackers:
            t.close(ok)
        self.trackers = []


def tracker_dir(cfg: MosaicConfig, storage: RunStorage, run_id: str) -> str:
    """Local directory of the file-based stores: `train.loggers_dir`, else the run directory when it is local,
    else `runs/<run id>` in the working directory (TensorBoard, sqlite and W&B write local files)."""
    if cfg.train.loggers_dir:
        return os.path.abspath(cfg.train.loggers_dir)
    return storage.root if not storage.is_s3 else os.path.abspath(os.path.join("runs", run_id))


def open_trackers(cfg: MosaicConfig, storage: RunStorage, run_id: str, *, resume: bool = False,
                  history: list[dict[str, Any]] | None = None) -> Trackers:
    ctx = TrackerContext(cfg=cfg, storage=storage, run_id=run_id, local_dir=tracker_dir(cfg, storage, run_id),
                         resume=resume, history=list(history or []))
    stores = [n for n in cfg.train.loggers if n in ("tensorboard", "mlflow", "wandb")]
    if stores:
        os.makedirs(ctx.local_dir, exist_ok=True)
        log.info("trackers: %s under %s", ", ".join(stores), ctx.local_dir)
    opened = Trackers([])
    try:
        for name in cfg.train.loggers:
            opened.trackers.append(BACKENDS[name](ctx))
    except BaseException:
        opened.close()
        raise
    return opened


def _code_block(text: str, lang: str) -> str:
    return f"```{lang}\n{text}\n```"
