"""`mosaic-ray plan`: the memory arithmetic on known configs, the node table against `clusters/`, every GPU preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mosaic_ray.cli import main
from mosaic_ray.config import ConfigError, LearnerConfig, load_config
from mosaic_ray.plan import GIB, NODE_TYPES, ModelShape, activation_bytes, learner_plan, model_shape, plan

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESETS = ("qwen2.5-7b", "qwen3-4b-thinking", "phi-4")


def test_parameter_count_equals_the_built_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    shape, _ = model_shape(load_config("tiny-cpu", [f"model.path={tiny_model_dir}"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.num_params == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_qwen25_7b_is_its_published_size():
    shape, source = model_shape(load_config("qwen2.5-7b"))
    assert source.endswith("Qwen--Qwen2.5-7B-Instruct.json")
    # 2 * 152064 * 3584 embeddings + 28 layers of 233,057,792 + the final norm
    assert shape.layer_params == 233_057_792
    assert shape.num_params == 7_615_616_512


def test_learner_terms_by_hand():
    shape = ModelShape(vocab_size=1000, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, tied_embeddings=True, attention_bias=False, qk_norm=False)
    # layer: q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*256 + norms 2*64
    assert shape.layer_params == 4096 + 4096 + 4096 + 49152 + 128
    p = 1000 * 64 + 2 * shape.layer_params + 64
    assert shape.num_params == p
    cfg = LearnerConfig(num_learners=4, strategy="fsdp2", kl_coef=0.1, micro_batch_tokens=512,
                        logprob_chunk_size=128, activation_checkpointing=True)
    terms = learner_plan(shape, cfg, "bfloat16")
    assert terms["parameters"] == 4 * p // 4 and terms["gradients"] == 4 * p // 4
    assert terms["optimizer"] == 8 * p // 4 and terms["kl_reference"] == 2 * p // 4
    assert terms["gathered_parameters"] == 2 * (2 * shape.layer_params + 64000)
    per_layer = 2 * 64 + 2 * 64 + 2 * 32 + 3 * 256
    assert terms["activations"] == 512 * 2 * (2 * 64 + per_layer)
    assert activation_bytes(shape, 512, 2, checkpointing=False) == 512 * 2 * 2 * per_layer
    assert terms["logits"] == 8 * 128 * 1000
    # DDP does not shard, and no KL term means no reference
    ddp = learner_plan(shape, LearnerConfig(num_learners=4, strategy="ddp", kl_coef=0.0), "bfloat16")
    assert ddp["parameters"] == 4 * p and ddp["kl_reference"] == 0 and ddp["gathered_parameters"] == 0


def test_node_types_are_those_of_the_cluster_configs():
    for cluster in ("aws", "gcp"):
        spec = yaml.safe_load((ROOT / "clusters" / f"{cluster}.yaml").read_text())["available_node_types"]
        for node in (n for n in NODE_TYPES if n.cluster == cluster):
            cfg = spec[node.node_type]
            instance = cfg["node_config"].get("InstanceType") or cfg["node_config"].get("machineType")
            assert instance == node.instance
            assert cfg["resources"]["GPU"] == node.gpus


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_every_gpu_preset_fits_by_its_plan(preset, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", preset, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fits_on"] == ["aws", "gcp"]
    assert "does not fit" not in capsys.readouterr().out


def test_a_learner_that_cannot_fit_is_reported(tmp_path, capsys):
    cfg = load_config("qwen2.5-7b", ["learner.strategy=ddp"])  # unsharded: 16 bytes per parameter > 80 GiB
    result = plan(cfg)
    assert result["learner_total"] > 80 * GIB and result["fits_on"] == []
    assert main(["plan", "--config", "qwen2.5-7b", "--set", "learner.strategy=ddp"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_a_model_without_a_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        model_shape(load_config("qwen2.5-7b", [f"model.path={tmp_path / 'missing'}"]))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="vocab_size"):
        model_shape(load_config("qwen2.5-7b"), str(tmp_path))
