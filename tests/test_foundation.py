"""[Foundation]: layout, installed package mapping, typed configs, the offline tiny model and its chat template."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic_ray.config import ConfigError, MosaicConfig, TinyModelConfig, from_dict, load_config, preset_names, to_dict
from mosaic_ray.models.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mosaic_ray.cli"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env, timeout=300, check=False)


def test_layout_and_mapped_packages():
    for d in ("mosaic_ray", "actors", "learners", "clusters", "benchmarks", "tests"):
        assert (ROOT / d).is_dir(), d
    import mosaic_ray.actors
    import mosaic_ray.benchmarks
    import mosaic_ray.learners

    assert Path(mosaic_ray.actors.__file__).parent == ROOT / "actors"
    assert Path(mosaic_ray.learners.__file__).parent == ROOT / "learners"
    assert Path(mosaic_ray.benchmarks.__file__).parent == ROOT / "benchmarks"


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_round_trips(name):
    cfg = load_config(name)
    assert isinstance(cfg, MosaicConfig) and cfg.name == name
    assert from_dict(to_dict(cfg)) == cfg


def test_presets_cover_embedded_and_cluster_models():
    assert {"tiny-cpu", "smoke", "qwen2.5-7b", "qwen3-4b-thinking", "phi-4"} <= set(preset_names())
    big = load_config("qwen2.5-7b")
    assert big.engine.kind == "vllm" and big.learner.strategy == "fsdp2" and big.run_dir.startswith("s3://")
    assert big.rollout.group_size == 4 and big.judge.length_budget == 400
    assert load_config("phi-4").model.family == "phi4"


def test_override_sets_typed_values():
    cfg = load_config("tiny-cpu", ["learner.lr=1e-3", "rollout.group_size=8", "scenarios.domains=[email, bank]"])
    assert cfg.learner.lr == 1e-3 and cfg.rollout.group_size == 8
    assert cfg.scenarios.domains == ("email", "bank")


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"learner\.lr: expected float, got 'abc'"):
        load_config("tiny-cpu", ["learner.lr=abc"])
    with pytest.raises(ConfigError, match=r"engine\.kind: expected one of 'hf', 'vllm', 'openai'"):
        load_config("tiny-cpu", ["engine.kind=tpu"])


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"nosuch\.key: unknown config key 'nosuch'"):
        load_config("tiny-cpu", ["nosuch.key=1"])
    with pytest.raises(ConfigError, match=r"learner\.nope"):
        load_config("tiny-cpu", ["learner.nope=1"])
    with pytest.raises(ConfigError, match=r"learner\.extra"):
        from_dict({"learner": {"extra": 1}})


def test_bad_values_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.group_size: must be >= 2"):
        load_config("tiny-cpu", ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match=r"learner\.cpu_threads: must be > 0"):
        load_config("tiny-cpu", ["learner.cpu_threads=0"])
    with pytest.raises(ConfigError, match=r"warmstart\.replay_coef: must be >= 0"):
        load_config("tiny-cpu", ["warmstart.replay_coef=-1"])
    with pytest.raises(ConfigError, match=r"warmstart\.copy_weight: must be >= 1"):
        load_config("tiny-cpu", ["warmstart.copy_weight=0.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such preset"):
        load_config("no-such-preset")


def test_config_show_cli_errors_name_key():
    ok = run_cli("config", "show", "tiny-cpu", "--set", "learner.lr=0.001")
    assert ok.returncode == 0 and "lr: 0.001" in ok.stdout
    bad = run_cli("config", "show", "tiny-cpu", "--set", "learner.lr=abc")
    assert bad.returncode != 0 and "learner.lr" in bad.stderr and "expected float" in bad.stderr
    bad = run_cli("config", "show", "tiny-cpu", "--set", "nosuch.key=1")
    assert bad.returncode != 0 and "nosuch" in bad.stderr


# -------------------------------------------------------------------------------------------- tiny model

CONVERSATION = [
    {"role": "system", "content": "Plan, check, then act or refuse."},
    {"role": "user", "content": "Pay my landlord 900 to AC123."},
    {"role": "assistant", "content": "<think>pay rent</think>",
     "tool_calls": [{"type": "function", "function": {"name": "transfer_money",
                                                      "arguments": {"to_account": "AC123", "amount": 900}}}]},
    {"role": "tool", "name": "transfer_money", "content": "Sent 900 to AC123."},
    {"role": "assistant", "content": "<think>done</think>\nPaid 900 to AC123."},
]
TOOLS = [{"type": "function", "function": {
    "name": "transfer_money", "description": "Send money to an account.",
    "parameters": {"type": "object", "properties": {"to_account": {"type": "string"}, "amount": {"type": "number"}},
                   "required": ["to_account", "amount"]}}}]


def test_model_init_cli_loads_offline_in_fresh_process(tmp_path):
    out = tmp_path / "m"
    res = run_cli("model", "init", "--out", str(out), "--seed", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", f"""
import json
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r}); m = AutoModelForCausalLM.from_pretrained({str(out)!r})
print(json.dumps({{"cls": type(m).__name__, "params": m.num_parameters(), "vocab": len(tok)}}))
"""], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr[-2000:]
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    assert info["cls"] == "Qwen3ForCausalLM" and info["params"] > 100_000 and info["vocab"] > 256
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "weights must be safetensors only"


def test_chat_template_and_assistant_mask_positions(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    assert '"name": "transfer_money"' in text.split("</tools>")[0]  # tools as JSON in the system turn
    assert '<tool_call>\n{"name": "transfer_money", "arguments": {"to_account": "AC123", "amount": 900}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nSent 900 to AC123.\n</tool_response><|im_end|>" in text

    enc = tok.apply_chat_template(CONVERSATION, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    # Expected: from the token after each "<|im_start|>assistant\n" header through its closing <|im_end|>.
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    expected = [0] * len(ids)
    for i, t in enumerate(ids):
        if t != start:
            continue
        header_end = next((j for j in range(i + 1, i + 24) if tok.decode(ids[i:j]) == "<|im_start|>assistant\n"), None)
        if header_end is None:
            continue
        j = header_end
        while True:
            expected[j] = 1
            if ids[j] == end:
                break
            j += 1
    assert sum(expected) > 0
    assert mask == expected
    masked = tok.decode([t for t, k in zip(ids, mask) if k])
    assert masked == ('<think>pay rent</think>\n<tool_call>\n{"name": "transfer_money", "arguments": '
                      '{"to_account": "AC123", "amount": 900}}\n</tool_call><|im_end|>'
                      "<think>done</think>\nPaid 900 to AC123.<|im_end|>")


def test_protocol_tags_are_single_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for tag in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "<think>", "</think>",
                "<safety_thoughts>", "</safety_thoughts>"):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    text = "<think>a</think>\n<safety_thoughts>b</safety_thoughts>\nDone: ok."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_same_seed_gives_byte_identical_weights(tmp_path):
    corpus = ["Pay my landlord 900 to AC123.", "<think>x</think>\nRefused."] * 20
    a = build_tiny_model(tmp_path / "a", TinyModelConfig(seed=7), corpus)
    b = build_tiny_model(tmp_path / "b", TinyModelConfig(seed=7), corpus)
    c = build_tiny_model(tmp_path / "c", TinyModelConfig(seed=8), corpus)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)
    with pytest.raises(FileExistsError):
        build_tiny_model(a, TinyModelConfig(seed=7), corpus)


def test_qwen_vocab_matches_real_ids(tmp_path):
    from mosaic_ray.models.tiny import qwen_tokenizer

    tok = qwen_tokenizer()
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<tool_call>") == 151657
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("</think>") == 151668


def test_every_python_package_is_declared_for_install():
    """Non-editable installs only ship the packages pyproject lists: a new subpackage must be declared."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared, mapping = set(meta["packages"]), meta["package-dir"]
    roots = {"mosaic_ray": ROOT / "mosaic_ray", "mosaic_ray.actors": ROOT / "actors",
             "mosaic_ray.learners": ROOT / "learners", "mosaic_ray.benchmarks": ROOT / "benchmarks"}
    for name, root in roots.items():
        assert mapping.get(name, name) == str(root.relative_to(ROOT)), name
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            pkg = ".".join([name, *rel.parts])
            assert pkg in declared, f"{pkg} ({init.parent}) is not listed in pyproject [tool.setuptools] packages"
