"""[Train driver]: a tiny end-to-end run leaves a complete run directory; an interrupted run resumes with the
same data accounting as an uninterrupted one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import pytest

from mosaic_ray.config import load_config
from mosaic_ray.driver.train import Trainer
from mosaic_ray.scenarios import load_tasks
from mosaic_ray.storage import RunStorage

# Small enough for CI on 2 cores; still every stage: warm start, evaluation, 3 iterations, checkpoints, report.
FAST = ["warmstart.steps=4", "warmstart.num_demos=40", "train.iterations=3", "train.eval_size=8",
        "rollout.tasks_per_iteration=4", "protocol.max_steps=3", "protocol.max_new_tokens=24",
        "scenarios.train_size=100", "scenarios.test_size=40", "warmstart.replay_coef=1.0",
        "warmstart.replay_batch_size=4", "warmstart.copy_weight=4.0", "checkpoint.keep_last=2", "train.eval_every=2"]
EVAL_KEYS = ("harmful_refusal_rate", "harmful_action_rate", "injection_success_rate", "benign_success_rate",
             "over_refusal_rate", "privacy_leak_rate", "format_error_rate", "safety_check_rate", "mean_tokens")


DRIVER_READS: list[str] = []
"""The datasets the driver process read during `full_run` (the learners are actors: their reads are not here)."""
DRIVER_RECEIVED: Counter = Counter()
"""What the fleet handed the driver during `full_run`, by type."""


@pytest.fixture(scope="module")
def full_run(ray_session, tmp_path_factory):
    from mosaic_ray.actors.fleet import RolloutFleet

    cfg = load_config("smoke", FAST)
    run = tmp_path_factory.mktemp("runs") / "full"
    read, deliver = RunStorage.read_dataset, RolloutFleet.deliver

    def spy_read(self, dataset, *args, **kwargs):
        DRIVER_READS.append(dataset)
        return read(self, dataset, *args, **kwargs)

    def spy_deliver(self, *args, **kwargs):
        for receipts in deliver(self, *args, **kwargs):
            DRIVER_RECEIVED.update(type(r).__name__ for r in receipts)
            yield receipts

    with mock.patch.object(RunStorage, "read_dataset", spy_read), \
            mock.patch.object(RolloutFleet, "deliver", spy_deliver):
        report = Trainer(cfg, str(run), progress=False).run()
    return cfg, run, report


def test_training_data_never_passes_through_the_driver(full_run):
    cfg = full_run[0]
    # workers -> pair builder -> storage -> learners: the driver saw receipts and read no dataset back
    assert DRIVER_RECEIVED == {"EpisodeReceipt": cfg.train.iterations * cfg.rollout.tasks_per_iteration
                               * cfg.rollout.group_size}
    assert not {"trajectories", "pairs", "rewards"} & set(DRIVER_READS), DRIVER_READS


def relative_ids(run: Path, dataset: str, column: str = "traj_id") -> Counter:
    """Ids with the run id prefix stripped, counted (a resumed run must hold each exactly once)."""
    table = RunStorage(str(run)).read_dataset(dataset)
    return Counter(v.split("/", 1)[1] for v in table.column(column).to_pylist())


def test_run_directory_is_complete(full_run):
    cfg, run, _ = full_run
    assert load_config(str(run / "config.yaml")) == cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("rollout/episodes", "reward/mean", "update/samples", "time/weight_sync_s", "policy_version",
                    "replay/nll"):
            assert key in r, key
        assert r["replay/samples"] == 4 and 0 < r["replay/nll"] < 20
        # a group whose G rewards tie carries no signal and is skipped; any sample left means an update ran
        assert ("learner/loss" in r) == (r["update/samples"] > 0)
    assert any("learner/loss" in r for r in rows)
    assert [r["policy_version"] for r in rows] == [2, 3, 4]  # 1 = warm start, +1 per update
    # train.eval_every=2: an evaluation after iteration 1 (the last iteration's is the "after" one)
    assert [("eval/templates/harmful_refusal_rate" in r) for r in rows] == [False, True, False]
    assert (run / "eval" / "iter-00001.json").is_file() and not (run / "eval" / "iter-00000.json").exists()

    G, n_tasks = cfg.rollout.group_size, cfg.rollout.tasks_per_iteration
    storage = RunStorage(str(run))
    traj = storage.read_dataset("trajectories")
    assert traj.num_rows == cfg.train.iterations * n_tasks * G
    assert len(set(traj.column("traj_id").to_pylist())) == traj.num_rows
    pairs = storage.read_dataset("pairs")
    assert pairs.num_rows == cfg.train.iterations * n_tasks * G * (G - 1) // 2
    assert storage.read_dataset("rewards").num_rows == traj.num_rows
    for path in storage.shard_paths("trajectories"):  # plain pyarrow reads every committed shard
        assert pq.read_table(path).num_rows > 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run / "checkpoints" / "iter-00002"
    # checkpoint.keep_last=2: iter-00000 was deleted once iter-00002 was written; the warm start stays
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter-00001", "iter-00002", "warmstart"]
    assert AutoModelForCausalLM.from_pretrained(ckpt).num_parameters() > 0
    assert AutoTokenizer.from_pretrained(ckpt).eos_token == "<|im_end|>"

    # the KL term (tiny-cpu's learner.kl_coef) pulls towards the warm start, not towards the untrained model
    import torch
    from safetensors.torch import load_file

    assert cfg.learner.kl_coef > 0
    warm = load_file(run / "checkpoints" / "warmstart" / "model.safetensors")
    ref = load_file(ckpt / "trainer_state" / "reference.safetensors")
    final = load_file(ckpt / "model.safetensors")
    shared = ref.keys() & warm.keys()
    assert shared and all(torch.equal(ref[k], warm[k]) for k in shared)
    assert any(not torch.equal(final[k], warm[k]) for k in shared)  # while the policy itself moved on
    assert all(r["learner/kl_ref"] >= 0 for r in rows if "learner/loss" in r)

    saved = json.loads((run / "report.json").read_text())
    assert saved["complete"] is True and saved["iterations"] == 3 and saved["wall_time_s"] > 0
    for side in ("before", "after"):
        assert set(EVAL_KEYS) <= set(saved[side]), side
    for name in ("report.md", "curves.png", "before_after.png", "eval/before.json", "eval/after.json"):
        assert (run / name).is_file(), name
    assert "| harmful_refusal_rate |" in (run / "report.md").read_text()


class InterruptedTrainer(Trainer):
    """Ctrl-C in the middle of iteration 1, after its rollouts were committed but before the update."""

    def update(self, groups, m):
        if int(m["iteration"]) == 1:
            raise KeyboardInterrupt
        return super().update(groups, m)


def test_resume_after_interrupt_has_identical_accounting(full_run, tmp_path):
    cfg, full, _ = full_run
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        InterruptedTrainer(cfg, str(run), progress=False).run()
    state = json.loads((run / "state.json").read_text())
    assert state["next_iteration"] == 1 and state["checkpoint"] == "checkpoints/iter-00000"
    assert json.loads((run / "report.json").read_text())["complete"] is False

    with pytest.raises(FileExistsError):
        Trainer(cfg, str(run), progress=False)  # a run dir is never overwritten without --resume
    report = Trainer(cfg, str(run), resume=True, progress=False).run()
    assert report["complete"] and report["iterations"] == cfg.train.iterations

    for dataset in ("trajectories", "rewards"):
        got, want = relative_ids(run, dataset), relative_ids(full, dataset)
        assert got == want and set(got.values()) == {1}, dataset
    got_pairs = relative_ids(run, "pairs", "pair_id")
    assert got_pairs == relative_ids(full, "pairs", "pair_id") and set(got_pairs.values()) == {1}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["rollout/reused_groups"] == cfg.rollout.tasks_per_iteration  # iteration 1's data was reused


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no state.json"):
        Trainer(load_config("smoke"), str(tmp_path / "nothing"), resume=True)


def test_training_tasks_can_come_from_a_task_file(tmp_path):
    from mosaic_ray.driver.train import scenario_splits
    from mosaic_ray.scenarios import load_tasks, write_tasks

    path = tmp_path / "tasks.jsonl"
    write_tasks(load_tasks("train", size=12) + load_tasks("test", size=8), path)
    train, evals = scenario_splits(load_config("smoke", [f"scenarios.source={path}", "scenarios.categories=[harmful]",
                                                          "train.eval_splits=[templates]"]))
    test = evals["templates"]
    assert train and test and {t.category for t in train + test} == {"harmful"}
    assert {t.split for t in train} == {"train"} and {t.split for t in test} == {"test"}
    only_train = tmp_path / "train.jsonl"
    write_tasks(load_tasks("train", size=4), only_train)
    with pytest.raises(ValueError, match="needs tasks of both splits"):
        scenario_splits(load_config("smoke", [f"scenarios.source={only_train}"]))


def test_heldout_domains_never_reach_training_and_form_their_own_split():
    from mosaic_ray.driver.train import scenario_splits

    cfg = load_config("smoke", ["scenarios.heldout_domains=[calendar,social]",
                                "train.eval_splits=[templates,domains]", "train.eval_size=0"])
    train, evals = scenario_splits(cfg)
    held = {"calendar", "social"}
    assert train and not {t.domain for t in train} & held
    assert not {t.domain for t in evals["templates"]} & held
    assert {t.domain for t in evals["domains"]} == held
    assert {t.split for t in evals["domains"]} == {"test"}
    with pytest.raises(ValueError, match="train.eval_splits: 'domains' evaluates scenarios.heldout_domains"):
        load_config("smoke", ["train.eval_splits=[templates,domains]", "scenarios.heldout_domains=[]"])
    with pytest.raises(ValueError, match="scenarios.heldout_domains: unknown domain 'moon'"):
        load_config("smoke", ["scenarios.heldout_domains=[moon]"])


def test_warm_start_demonstrations_stay_in_the_training_domains(tiny_model_dir):
    from transformers import AutoTokenizer

    from mosaic_ray.config import WarmStartConfig
    from mosaic_ray.warmstart import warmstart_samples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples = warmstart_samples(WarmStartConfig(num_demos=40), tok, domains=("bank", "email"))
    domain = {t.task_id: t.domain for t in load_tasks("train", size=400)}
    assert samples and {domain[s.traj_id] for s in samples} == {"bank", "email"}
