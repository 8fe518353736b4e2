"""The shipped base model: the tiny Qwen3 model pretrained once on the project's own generated transcripts.

A model built from random weights and warm-started for a few hundred SFT steps never learns to copy names,
accounts and files from a request into tool arguments; it refuses and resists injections after RL but completes
almost no benign task. A real model brings that skill from pretraining. This module gives the tiny model the
same: `build_base` trains it for thousands of steps on scripted demonstrations of the *training* templates of
the *training* domains (never a test template, never a held-out domain, never `../shared/data`), with the
argument tokens copied from the request weighted up. The demonstrations decide harmful and injected requests
both ways at even odds, so the base knows the format and the tools without a safety policy of its own: the warm
start and RL of each run decide that.

The result ships in the package (`mosaic_ray/models/base/`, about 5 MB of safetensors) with `manifest.json`:
the build recipe, the torch version and thread count it was built with, the SHA-256 of every file, and the hash
of a reduced build (`REDUCED`: the same recipe for a few steps on a few tasks), which the tests rebuild to show
that the command below still makes the same bytes. `shipped_base()` checks every hash before a run uses the model.

    mosaic-ray model build-base --out DIR      # the full build and its manifest (about 35 minutes, 1 CPU core)
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mosaic_ray.config import TinyModelConfig
from mosaic_ray.scenarios.tasks import HELDOUT_DOMAINS

REDUCED = {"steps": 4, "num_tasks": 300}
"""The reduced build: the same recipe and code with these fields replaced (a test rebuilds it, about a minute)."""
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BaseRecipe:
    """Everything the base build depends on, recorded in its manifest."""

    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    lr_end: float = 3e-4
    warmup_steps: int = 100
    num_tasks: int = 12000
    """Training tasks demonstrated (each once); the batches cycle over them in length-bucketed epochs."""
    wordings_per_frame: int = 60
    """Rewordings of each training frame's six wordings (`mosaic_ray.scenarios.pretraining`)."""
    copy_weight: float = 8.0
    """Loss weight of tool-argument tokens copied from the request (see `mosaic_ray.warmstart.copy_weights`)."""
    heldout_domains: tuple[str, ...] = HELDOUT_DOMAINS
    seed: int = 0
    threads: int = 1
    """Torch intra-op threads: CPU float sums depend on the split, so the bytes depend on it too."""


def corpus_demos(recipe: BaseRecipe) -> list[dict[str, Any]]:
    """Scripted demonstrations of reworded training tasks in the training domains
    (`mosaic_ray.scenarios.pretraining`); even odds on every safety decision."""
    from mosaic_ray.policies.scripted import ScriptedPolicy, demonstrations
    from mosaic_ray.scenarios.pretraining import pretraining_tasks

    tasks = pretraining_tasks(recipe.num_tasks, num_per_frame=recipe.wordings_per_frame, seed=recipe.seed,
                              heldout_domains=recipe.heldout_domains)
    policy = ScriptedPolicy(comply_harmful_rate=0.5, follow_injection_rate=0.5, refuse_benign_rate=0.05,
                            leak_privacy_rate=0.5, safety_check_rate=0.5, seed=recipe.seed)
    return demonstrations(tasks, policy)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file() and p.name != MANIFEST}


def build_base(out_dir: str | Path, recipe: BaseRecipe = BaseRecipe(), *,
               on_step: Callable[[int, float, float], None] | None = None,
               save_every: int = 0) -> Path:
    """Build the tokenizer and the random-init model (`build_tiny_model`, corpus = the demonstrations), then
    `recipe.steps` SFT steps; writes the model directory and its manifest. `save_every` > 0 also writes
    `out_dir/step-N/` snapshots (for choosing the step count; not part of the manifest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.chat_template_utils import render_jinja_template

    from mosaic_ray import protocol
    from mosaic_ray.algorithms.batch import collate
    from mosaic_ray.config import WarmStartConfig
    from mosaic_ray.hygiene import set_torch_threads
    from mosaic_ray.models.tiny import build_tiny_model, chat_template
    from mosaic_ray.warmstart import demo_samples, epoch_batches, lr_at

    out = Path(out_dir)
    set_torch_threads(recipe.threads)
    demos = corpus_demos(recipe)
    template = chat_template()
    texts = [protocol.system_prompt("compact"), protocol.system_prompt("full")]
    for d in demos[:1500]:
        texts += render_jinja_template([d["messages"]], tools=d["tools"], chat_template=template)[0]
    build_tiny_model(out, recipe.tiny, corpus=texts)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    samples = demo_samples(demos, tok, max_tokens=1024, copy_weight=recipe.copy_weight)
    schedule = WarmStartConfig(steps=recipe.steps, lr=recipe.lr, lr_end=recipe.lr_end,
                               warmup_steps=recipe.warmup_steps)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.01)
    lengths = [len(s.input_ids) for s in samples]
    pending: list[list[int]] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        while not pending:
            pending = [b for b in epoch_batches(lengths, recipe.batch_size, rng) if len(b) == recipe.batch_size]
        mb = collate([samples[i] for i in pending.pop()], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, schedule)
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
        logp = logits.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        loss = -(logp * mb.mask).sum() / mb.mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, float(loss.detach()), time.perf_counter() - t0)
        if save_every and (step + 1) % save_every == 0 and step + 1 < recipe.steps:
            model.save_pretrained(out / f"step-{step + 1}", safe_serialization=True)
            tok.save_pretrained(out / f"step-{step + 1}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    manifest = {"recipe": _jsonable(asdict(recipe)), "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "params": model.num_parameters(), "files": file_hashes(out)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def build_release(out_dir: str | Path, recipe: BaseRecipe = BaseRecipe(), *,
                  on_step: Callable[[int, float, float], None] | None = None) -> Path:
    """The full build, then the reduced build in a temporary directory, whose file hashes go into the full
    build's manifest as `reduced_build` (what `tests/test_base_model.py` rebuilds and compares)."""
    import tempfile
    from dataclasses import replace

    out = build_base(out_dir, recipe, on_step=on_step)
    with tempfile.TemporaryDirectory() as tmp:
        small = build_base(Path(tmp) / "reduced", replace(recipe, **REDUCED))
        small_manifest = json.loads((small / MANIFEST).read_text())
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["reduced_build"] = {"replace": REDUCED, "files": small_manifest["files"],
                                 "cpu_capability": small_manifest["cpu_capability"]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def reduced_build_files(manifest: dict[str, Any], cpu_capability: str) -> dict[str, str] | None:
    """The file hashes the reduced build gives on a CPU of `cpu_capability` (torch's kernel level: AVX2,
    AVX512, ...), or None when none is recorded. The bytes depend on it: float sums of other SIMD kernels differ,
    so a CPU of another kind rebuilds other bytes with the same command, torch and thread count."""
    rb = manifest["reduced_build"]
    if rb.get("cpu_capability") == cpu_capability:
        return rb["files"]
    return rb.get("other_cpus", {}).get(cpu_capability)


def recipe_of(manifest: dict[str, Any]) -> BaseRecipe:
    """The `BaseRecipe` a manifest records."""
    r = dict(manifest["recipe"])
    r["tiny"] = TinyModelConfig(**r["tiny"])
    r["heldout_domains"] = tuple(r["heldout_domains"])
    return BaseRecipe(**r)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


def shipped_dir() -> Path:
    return Path(str(resources.files("mosaic_ray.models") / "base"))


def verify(model_dir: Path) -> dict[str, Any]:
    """The manifest of `model_dir` after checking every file's SHA-256 against it; ValueError naming the file."""
    path = model_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; the base model directory is incomplete")
    manifest = json.loads(path.read_text())
    have = file_hashes(model_dir)
    for name, want in manifest["files"].items():
        if name not in have:
            raise ValueError(f"{model_dir / name}: missing (listed in {MANIFEST})")
        if have[name] != want:
            raise ValueError(f"{model_dir / name}: SHA-256 {have[name][:16]}… does not match the manifest's "
                             f"{want[:16]}…; rebuild it with `mosaic-ray build-base` or restore the file")
    extra = sorted(set(have) - set(manifest["files"]))
    if extra:
        raise ValueError(f"{model_dir}: files not in {MANIFEST}: {', '.join(extra)}")
    return manifest


def shipped_recipe() -> dict[str, Any]:
    """The recipe in the packaged manifest (no hashing: config checks read it)."""
    return json.loads((shipped_dir() / MANIFEST).read_text())["recipe"]


def shipped_base() -> Path:
    """The packaged base model directory, hash-checked."""
    d = shipped_dir()
    verify(d)
    return d
