"""Learner throughput vs a plain single-process torch loop, and weight-sync seconds per path.

    python -m mosaic_ray.benchmarks.learner_throughput [--model DIR] [--batch 16] [--seq 256] [--steps 5] [--rounds 3]
           [--out results.json] [--device cuda --bf16 --strategy fsdp2]

Both sides train the same model on the same batch with the same PG loss and AdamW; the ratio
(learner tokens/s ÷ plain tokens/s, target ≥ 0.9) is measured in the same run. Weight sync: object store
(`ray.put` + `ray.get` + `load_state_dict` in a receiver actor) vs a gloo/NCCL broadcast (`weight_transfer`).
On a CUDA machine `--device cuda --strategy fsdp2 --bf16` runs the learner step with FSDP2 on one GPU and
reports peak memory too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def make_batch(n: int, seq: int, vocab: int, seed: int = 0):
    import torch

    from mosaic_ray.algorithms.batch import PolicySample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        mask = [0] * (seq // 2) + [1] * (seq - seq // 2)
        out.append(PolicySample(ids, mask, [-3.0 if m else 0.0 for m in mask], 1.0 if i % 2 else -1.0))
    return out


def plain_loop(model_dir: str, samples, steps: int, device: str, bf16: bool) -> float:
    """The baseline: full logits, log_softmax + gather, −A·ratio over masked tokens, AdamW. Returns tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM

    from mosaic_ray.algorithms.batch import collate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    mb = collate(samples, 0).to(device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            logits = model(input_ids=mb.input_ids).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - mb.old_logp)
        loss = (-(mb.adv.unsqueeze(-1)) * ratio * mb.mask).sum() / mb.mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return mb.num_tokens * steps / (time.perf_counter() - t0)


def learner_loop(model_dir: str, samples, steps: int, cfg) -> tuple[float, float]:
    """LearnerGroup(num_learners=0) on the same batch in one micro-batch; (tokens/s, peak GPU GiB or 0)."""
    import torch
    from mosaic_ray.learners import LearnerGroup

    lg = LearnerGroup(model_dir, cfg)
    lg.update(samples)
    device = "cuda" if cfg.backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        lg.update(samples)
    _sync(device)
    tok_s = sum(len(s.input_ids) for s in samples) * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    lg.shutdown()
    return tok_s, peak


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def weight_sync(model_dir: str, repeats: int) -> dict[str, float]:
    """Median seconds per sync, learner (in-process) → one receiver actor, for both paths."""
    import ray
    from mosaic_ray.learners import LearnerGroup

    from mosaic_ray.config import LearnerConfig
    from mosaic_ray.hygiene import free_port

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self, model_dir: str):
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(1)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir)

        def load_ref(self, weights):   # Ray resolves the ref (object store) before the call runs
            self.model.load_state_dict(weights, strict=False)

        def join(self, port: int):
            from mosaic_ray.weight_transfer import WeightGroup

            self.group = WeightGroup.create("127.0.0.1", port, 1, 2)

        def recv(self):
            from mosaic_ray.weight_transfer import recv_weights

            self.model.load_state_dict(recv_weights(self.group), strict=False)

    lg = LearnerGroup(model_dir, LearnerConfig(num_learners=0))
    rx = Receiver.remote(model_dir)
    port = free_port()
    joined = rx.join.remote(port)
    lg.init_weight_group("127.0.0.1", port, 2)
    ray.get(joined)
    obj, bcast = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(rx.load_ref.remote(lg.weights_ref()))
        obj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        done = rx.recv.remote()
        lg.broadcast_weights()
        ray.get(done)
        bcast.append(time.perf_counter() - t0)
    mb = sum(t.numel() * t.element_size() for t in lg.get_weights().values()) / 2**20
    ray.kill(rx)
    return {"object_store_s": statistics.median(obj), "broadcast_s": statistics.median(bcast), "weights_mib": mb}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model dir (default: build the tiny model in a temp dir)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved baseline/learner rounds (medians)")
    ap.add_argument("--sync-repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-sync", action="store_true", help="skip the weight-sync part (no Ray)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    for var, value in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, value)
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    from transformers import AutoConfig

    from mosaic_ray.config import LearnerConfig

    model_dir = args.model
    if model_dir is None:
        from mosaic_ray.config import TinyModelConfig
        from mosaic_ray.models.tiny import build_tiny_model

        model_dir = str(build_tiny_model(tempfile.mkdtemp(prefix="lt-") + "/model", TinyModelConfig()))
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    samples = make_batch(args.batch, args.seq, vocab)
    cfg = LearnerConfig(num_learners=0, lr=1e-5, micro_batch_tokens=args.batch * args.seq,
                        logprob_chunk_size=args.seq, backend="nccl" if args.device == "cuda" else "gloo",
                        strategy=args.strategy, bf16=args.bf16)
    plains, ourss, peak = [], [], 0.0
    for _ in range(args.rounds):   # interleaved rounds: a shared machine's load drifts during the run
        plains.append(plain_loop(model_dir, samples, args.steps, args.device, args.bf16))
        tok_s, peak = learner_loop(model_dir, samples, args.steps, cfg)
        ourss.append(tok_s)
    plain, ours = statistics.median(plains), statistics.median(ourss)
    result = {"model": model_dir, "device": args.device, "strategy": args.strategy, "bf16": args.bf16,
              "batch": args.batch, "seq": args.seq, "plain_tokens_per_s": plain, "learner_tokens_per_s": ours,
              "ratio": ours / plain, "peak_gpu_gib": peak,
              "rounds": {"plain": plains, "learner": ourss}}
    if not args.no_sync:
        import ray

        tmp = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
        try:
            result.update(weight_sync(model_dir, args.sync_repeats))
        finally:
            ray.shutdown()
    rows = [("plain torch loop tokens/s", f"{plain:,.0f}"), ("LearnerGroup tokens/s", f"{ours:,.0f}"),
            ("ratio (target >= 0.9)", f"{result['ratio']:.3f}")]
    if peak:
        rows.append(("peak GPU memory GiB", f"{peak:.2f}"))
    for key in ("object_store_s", "broadcast_s", "weights_mib"):
        if key in result:
            rows.append((key, f"{result[key]:.4f}"))
    width = max(len(k) for k, _ in rows)
    print(f"learner throughput, batch {args.batch}x{args.seq}, {args.device}/{args.strategy}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>12}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
