"""[Fault tolerance & security] item 8, configs: every mistake fails at load with a ConfigError naming the key (or
the file), never later in the run and never as a TypeError or RecursionError."""

from __future__ import annotations

import pytest

from mosaic_ray.config import ConfigError, load_config
from mosaic_ray.errors import UserError


@pytest.mark.parametrize(("override", "message"), [
    ("scenarios.category_weights={harmfull: 1.0}", r"scenarios\.category_weights: unknown category 'harmfull'"),
    ("scenarios.categories=[benign, evil]", r"scenarios\.categories: unknown category 'evil'"),
    ("scenarios.domains=[mars]", r"scenarios\.domains: unknown domain 'mars'"),
    ("scenarios.category_weights={harmful: 0}", r"scenarios\.category_weights: at least one weight must be > 0"),
    ("scenarios.source=tasks.csv", r"scenarios\.source: expected 'builtin' or a path"),
    ("protocol.tool_timeout_s=-1", r"protocol\.tool_timeout_s: must be > 0"),
    ("learner.kl_coef=.nan", r"learner\.kl_coef: expected a finite number"),
    ("learner.kl_coef=-0.1", r"learner\.kl_coef: must be >= 0"),
    ("learner.lr=.inf", r"learner\.lr: expected a finite number"),
    ("train.checkpoint_every=0", r"train\.checkpoint_every: must be >= 1"),
    ("train.eval_every=-1", r"train\.eval_every: must be >= 0"),
])
def test_bad_values_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)


def test_base_cycles_are_named_not_recursed(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\ntrain:\n  iterations: 1\n")
    with pytest.raises(ConfigError, match=r"self\.yaml: base: cycle"):
        load_config(str(tmp_path / "self.yaml"))
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base: cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        load_config(str(tmp_path / "a.yaml"))


def test_relative_base_resolves_next_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "parent.yaml").write_text("base: smoke\ntrain:\n  iterations: 7\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nlearner:\n  lr: 0.01\n")
    monkeypatch.chdir("/")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.name, cfg.train.iterations, cfg.learner.lr) == ("smoke", 7, 0.01)


def test_empty_section_sets_nothing_and_takes_set_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("base: smoke\nlearner:\nrollout:\n")  # empty sections: YAML null
    smoke = load_config("smoke")
    assert load_config(str(path)).learner == smoke.learner
    cfg = load_config(str(path), ["learner.lr=0.5", "rollout.group_size=3"])
    assert (cfg.learner.lr, cfg.rollout.group_size, cfg.learner.num_learners) == (0.5, 3, smoke.learner.num_learners)
    (tmp_path / "scalar.yaml").write_text("learner: 3\n")
    with pytest.raises(ConfigError, match=r"learner: expected a mapping"):
        load_config(str(tmp_path / "scalar.yaml"), ["learner.lr=0.5"])


def test_non_utf8_config_file_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 9\)"):
        load_config(str(path))


@pytest.mark.parametrize(("overrides", "message"), [
    (["learner.algorithm=dpo"], r"learner\.algorithm: the training loop builds policy samples.*\(got 'dpo'\)"),
    (["learner.algorithm=scalar_grpo"], r"learner\.algorithm: expected one of 'mosaic_grpo', 'dpo', got 'scalar_grpo'"),
    (["learner.num_gpus=1"], r"learner\.num_gpus: a learner computes on GPUs only with learner\.backend: nccl.*\(got 1\.0\)"),
    (["engine.num_gpus=1", "engine.tensor_parallel_size=2"],
     r"engine\.num_gpus: one engine actor holds every GPU .*engine\.tensor_parallel_size=2 \(got 1\.0\)"),
])
def test_choices_no_run_can_make_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)


def test_choices_that_need_hardware_this_machine_lacks_still_load():
    """GPU and vLLM choices are checked where they run (a cluster), not here."""
    cfg = load_config("qwen2.5-7b")
    assert (cfg.engine.kind, cfg.learner.backend, cfg.learner.num_gpus, cfg.learner.strategy) == \
        ("vllm", "nccl", 1.0, "fsdp2")
    cfg = load_config("smoke", ["rollout.colocate_engine=false", "engine.kind=vllm", "engine.num_gpus=2", "engine.tensor_parallel_size=2",
                                "learner.backend=nccl", "learner.num_gpus=1", "learner.weight_sync=broadcast"])
    assert (cfg.engine.num_gpus, cfg.learner.num_gpus) == (2.0, 1.0)
