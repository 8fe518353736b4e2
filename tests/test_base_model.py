"""The shipped base model (`builtin:tiny-base`): hash-checked at load, and its build command still makes its bytes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from mosaic_ray.config import ConfigError, load_config
from mosaic_ray.models.base import (
    MANIFEST,
    REDUCED,
    build_base,
    recipe_of,
    reduced_build_files,
    shipped_base,
    shipped_dir,
    verify,
)
from mosaic_ray.scenarios.tasks import HELDOUT_DOMAINS


def test_the_shipped_base_passes_its_hashes_and_loads_with_transformers_alone():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = shipped_base()
    manifest = json.loads((d / MANIFEST).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert sum((d / f).stat().st_size for f in manifest["files"]) < 50 * 2**20
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.num_parameters() == manifest["params"]
    text = tok.apply_chat_template([{"role": "user", "content": "check my balance"}],
                                   tools=[{"type": "function", "function": {"name": "get_balance", "parameters": {}}}],
                                   tokenize=False, add_generation_prompt=True)
    assert "get_balance" in text and text.endswith("<|im_start|>assistant\n")
    # its pretraining text never showed the held-out domains
    assert tuple(manifest["recipe"]["heldout_domains"]) == HELDOUT_DOMAINS
    assert load_config("tiny-cpu").scenarios.heldout_domains == HELDOUT_DOMAINS


def test_a_changed_or_extra_file_fails_the_check_naming_it(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(shipped_dir(), copy)
    verify(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 .* does not match the manifest"):
        verify(copy)
    shutil.copy(shipped_dir() / "model.safetensors", weights)
    (copy / "optimizer.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="files not in manifest.json: optimizer.safetensors"):
        verify(copy)


@pytest.mark.slow
def test_the_build_command_reproduces_the_reduced_build_bit_for_bit(tmp_path):
    import torch

    manifest = json.loads((shipped_dir() / MANIFEST).read_text())
    assert manifest["reduced_build"]["replace"] == REDUCED
    cpu = torch.backends.cpu.get_cpu_capability()
    expected = reduced_build_files(manifest, cpu)
    if expected is None:
        pytest.skip(f"the manifest records no reduced build for {cpu} CPUs (the bytes depend on torch's SIMD kernel "
                    f"level); `build_release` on such a CPU records one")
    out = build_base(tmp_path / "reduced", replace(recipe_of(manifest), **REDUCED))
    built = json.loads((out / MANIFEST).read_text())
    assert built["cpu_capability"] == cpu
    assert built["files"] == expected


def test_a_builtin_model_must_exist_and_hold_out_what_the_run_holds_out():
    with pytest.raises(ConfigError, match="model.path: unknown built-in model 'builtin:nope'"):
        load_config("tiny-cpu", ["model.path=builtin:nope"])
    with pytest.raises(ConfigError, match="scenarios.heldout_domains: 'bank' is in the pretraining text"):
        load_config("tiny-cpu", ["scenarios.heldout_domains=[bank]"])
