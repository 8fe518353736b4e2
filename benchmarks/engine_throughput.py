"""Generation throughput through EngineActor + EngineRouter vs raw `model.generate` on the same batch.

For each concurrency N (default 16, 32, 64): N prompts, each generating exactly T tokens (eos ignored on both
sides: `ignore_eos` for the engine, `min_new_tokens = max_new_tokens` for `generate`).

- baseline: one `model.generate(do_sample=True)` call on the left-padded batch, in this process, 1 torch thread.
- engine: N concurrent `router.generate(request)` calls (separate requests, as N episodes send them) to one
  HF `EngineActor` (1 CPU, 1 torch thread) on a private local Ray; the engine batches them itself.
- in-process engine: the same N concurrent calls to an `HFEngine` here (no Ray), to separate batching from Ray.

Ray delivers the N calls to the actor spread over several milliseconds; the engine's continuous batching lets the
late ones join the running batch between decode steps. The table shows, per run, how many prefill passes the
actor made and how many requests joined a batch that was already decoding.

Prints a table, the ratio engine / baseline (target >= 0.9) and one JSON line. The three measurements are
interleaved `--repeats` times and the best run counts on each side (the machine is shared; the best run is the
least disturbed one); the JSON also has each repeat's paired ratio, to judge the noise. The CPU ratio (baseline
CPU seconds / engine actor process CPU seconds, Linux /proc) is the engine's cost per token, which load on a
shared machine barely moves; the wall-clock ratio adds what the CPU ratio cannot see (Ray delivery, waiting).

    python -m mosaic_ray.benchmarks.engine_throughput [--model DIR] [--concurrency 16 32 64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import tempfile
import time


def _prompts(tok, n: int, prompt_len: int) -> list[list[int]]:
    base = tok.encode("Please pay my landlord 900 dollars to account AC123 and then email Bob the receipt. " * 8)
    return [base[i % 7: i % 7 + prompt_len] for i in range(n)]


def bench_generate(model, tok, prompts: list[list[int]], tokens: int) -> float:
    """Seconds for one raw `model.generate` over the left-padded batch."""
    import torch

    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=tokens,
                             min_new_tokens=tokens, pad_token_id=pad, top_k=0, top_p=1.0, temperature=1.0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == tokens, "generate stopped early"
    return elapsed


async def bench_engine(route, prompts: list[list[int]], tokens: int) -> float:
    """Seconds for N concurrent single-request calls through `route` (router.generate or engine)."""
    from mosaic_ray.actors.engines import GenerationRequest, SamplingParams

    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=tokens, ignore_eos=True, seed=i), request_id=str(i))
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    outs = await asyncio.gather(*(route(r) for r in reqs))
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == tokens for o in outs), "engine stopped early"
    return elapsed


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc), all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(cpu_seconds, bench, *args) -> tuple[float, float]:
    """(wall seconds as `bench(*args)` reports them, CPU seconds `cpu_seconds` counted meanwhile); a coroutine
    function runs in a fresh event loop."""
    before = cpu_seconds()
    wall = asyncio.run(bench(*args)) if asyncio.iscoroutinefunction(bench) else bench(*args)
    return wall, cpu_seconds() - before


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="engine actor + router vs raw model.generate throughput")
    ap.add_argument("--model", default=None, help="HF model dir (default: the cached tiny model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="engine.max_wait_ms for both engines")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mosaic_ray.hygiene import set_torch_threads

    set_torch_threads(1)
    import ray
    import torch
    from mosaic_ray.actors.engines import EngineRouter
    from mosaic_ray.actors.engines.actor import start_engine_actors
    from mosaic_ray.actors.engines.hf import HFEngine
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mosaic_ray.config import EngineConfig, TinyModelConfig

    model_dir = args.model
    if model_dir is None:
        from mosaic_ray.models.tiny import cached_tiny_model

        model_dir = str(cached_tiny_model(TinyModelConfig()))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    max_n = max(args.concurrency)
    cfg = EngineConfig(kind="hf", num_cpus=1, max_batch_size=max_n, max_wait_ms=args.max_wait_ms)
    local = HFEngine(model_dir, max_batch_size=max_n, max_wait_ms=args.max_wait_ms)

    temp = tempfile.mkdtemp(prefix="mr-bench-", dir="/tmp")
    rows = []
    try:
        # Ray starts workers at niceness 15 (its `worker_niceness` default) while the baseline runs here at 0: on a
        # shared, loaded machine that alone costs the actor a large share of the CPU. Same priority on both sides.
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                 _system_config={"worker_niceness": os.getpriority(os.PRIO_PROCESS, 0)},
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
        actor = start_engine_actors(cfg, model_dir, num_engines=1)[0]
        router = EngineRouter([actor])

        async def via_router(req):
            return await router.generate(req)

        async def via_local(req):
            return (await local.generate([req]))[0]

        warm = _prompts(tok, 4, args.prompt_len)
        bench_generate(model, tok, warm, 4)
        asyncio.run(bench_engine(via_router, warm, 4))
        asyncio.run(bench_engine(via_local, warm, 4))
        for n in args.concurrency:
            prompts = _prompts(tok, n, args.prompt_len)
            before = ray.get(actor.health.remote())
            actor_cpu = functools.partial(_proc_cpu_seconds, before["pid"])
            # Interleaved, so that a load swing on the shared machine hits all three alike.
            times = [(_timed(time.process_time, bench_generate, model, tok, prompts, args.tokens),
                      _timed(actor_cpu, bench_engine, via_router, prompts, args.tokens),
                      _timed(time.process_time, bench_engine, via_local, prompts, args.tokens))
                     for _ in range(args.repeats)]
            after = ray.get(actor.health.remote())
            prefills, joined = ((after.get(k, 0) - before.get(k, 0)) / args.repeats for k in ("batches", "joined_running"))
            (t_gen, c_gen), (t_actor, c_actor), (t_local, _) = (
                (min(w for w, _ in column), min(c for _, c in column)) for column in zip(*times))
            total = n * args.tokens
            rows.append({"concurrency": n, "new_tokens": total, "generate_tok_s": total / t_gen,
                         "actor_router_tok_s": total / t_actor, "inprocess_engine_tok_s": total / t_local,
                         "actor_prefills_per_run": prefills, "actor_joined_running_per_run": joined,
                         "ratio_actor_vs_generate": t_gen / t_actor,
                         "ratio_inprocess_vs_generate": t_gen / t_local,
                         "cpu_ratio_actor_vs_generate": c_gen / c_actor,
                         "paired_ratios_actor_vs_generate": [g[0] / a[0] for g, a, _ in times]})
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    print(f"model {model_dir} | {args.tokens} new tokens/request, prompt {args.prompt_len} | max_wait_ms "
          f"{args.max_wait_ms} | torch {torch.__version__}, 1 thread per process | load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'N':>4} {'generate tok/s':>15} {'actor+router tok/s':>19} {'in-proc engine tok/s':>21} "
          f"{'ratio actor/gen':>16} {'ratio in-proc/gen':>18} {'cpu ratio actor/gen':>20} {'prefills/run':>13} "
          f"{'joined running/run':>19}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['generate_tok_s']:>15.0f} {r['actor_router_tok_s']:>19.0f} "
              f"{r['inprocess_engine_tok_s']:>21.0f} {r['ratio_actor_vs_generate']:>16.2f} "
              f"{r['ratio_inprocess_vs_generate']:>18.2f} {r['cpu_ratio_actor_vs_generate']:>20.2f} "
              f"{r['actor_prefills_per_run']:>13.1f} "
              f"{r['actor_joined_running_per_run']:>19.1f}")
    worst = min(r["ratio_actor_vs_generate"] for r in rows)
    print(f"min ratio (engine actor + router / model.generate) = {worst:.2f} (target >= 0.9): "
          f"{'OK' if worst >= 0.9 else 'BELOW TARGET'}")
    result = {"benchmark": "engine_throughput", "tokens_per_request": args.tokens, "prompt_len": args.prompt_len,
              "max_wait_ms": args.max_wait_ms, "loadavg": os.getloadavg(), "rows": rows, "min_ratio": worst}
    from mosaic_ray.benchmarks.harness import emit

    return emit(result, args.json)


if __name__ == "__main__":
    main()
