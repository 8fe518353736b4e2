"""Transformers engine (CPU and GPU): continuous batching over a hand-written KV-cache decode loop.

Why our own loop instead of `model.generate`: we need (1) the log-prob of every sampled token under the raw
model distribution, taken from the very logits the token was sampled from (gather - logsumexp, no second
forward pass), and (2) per-request seeded sampling that does not depend on which other requests share the
batch. `generate` offers neither.

Continuous batching: `generate()` only enqueues. One worker thread runs the decode loop (`_run`), so the
event loop keeps accepting requests meanwhile. Between two decode steps the loop admits whatever was queued
in the meantime (up to `max_batch_size` rows): the newcomers are prefilled as their own left-padded batch and
their KV cache is merged into the running one (both left-padded to the wider of the two). Rows that finish
leave the batch and its cache at once. A request that arrives while others decode thus waits one decode step
plus its prefill, not for the running batch to end. This matters because Ray delivers N concurrent calls
spread over several milliseconds: a "collect for max_wait_ms, then run to the end" batcher split them into
two batches run one after the other. When the engine is idle the first request waits for company: the
collection window lasts `max_wait_ms` after the latest arrival (at most `BURST_WINDOW_FACTOR * max_wait_ms` in
all), so a burst is prefilled in one forward pass, and the worker sleeps instead of decoding a few early rows
while it competes for the GIL with the thread that is still receiving the rest of the burst.

Exactness: every row keeps its own positions (0..len-1 over its real tokens, whatever the padding), its own
attention mask (padding, including the zero keys a merge adds, is masked out) and its own sampling generator,
so its tokens and log-probs do not depend on which rows share the batch or when it joined, up to float
reassociation in batched matmuls (~1e-6).

Weight versions (drain, then load): the worker holds the model lock for a whole run, from the first admission
until the batch is empty. `update_weights` first stops admission, lets the running rows finish on the old
weights, then loads; admission resumes on the new weights. So no completion mixes versions, and each is
stamped with the version it was admitted under. A bucketed update (`begin_weight_update` → `load_weight_bucket`
per bucket, in place → `finish_weight_update`) holds admission from begin to finish, so no row is admitted on a
half-loaded model and the only extra memory is the bucket in hand. `pause(WAIT)` drains the same way;
`pause(ABORT)` cuts the running rows at their next token.

Prefix reuse: an episode's turn k+1 prompt is its turn-k prompt, the model's own output and a tool result, and
every episode of a domain starts with the same system prompt. When a row finishes, the engine keeps its K/V
(prompt plus generated tokens, all but the last sampled one, whose K/V was never computed) under its
`session_id` in a `PrefixCache`, an LRU bounded by bytes (`prefix_cache_mb`) with a block-hash index over token
prefixes. A new request reuses the longest common token prefix with its session's entry or with whatever entry
the index finds for its leading blocks (another episode's system prompt, a retried episode's turns). Within a
burst of newcomers, prompts that start alike (a task's G samples, one domain's system prompt) get their common
start prefilled once and shared. At least one prompt token is always fed, for the next-token logits. Rows with
different reused lengths are laid out as [left padding, reused K/V | padding, new tokens]: the padding between a
row's reused and new tokens is masked like any other, and every real token keeps its own position. K/V computed
with old weights is never reused: every entry carries the version it was computed under, an entry of another
version is dropped at lookup, and a weight update clears the cache. Log-probs equal those of a full recompute up
to float reassociation (tests/test_engines.py checks 1e-5 in fp32).

Merging caches needs plain full-attention `DynamicLayer`s. For models whose cache has sliding-window or
linear-attention layers the engine admits no one into a running batch: newcomers wait for it to end (plain
dynamic batching), and prefixes are not kept.

Sampling per row: temperature (0 = argmax), then top-p, then inverse-CDF sampling with one uniform drawn from
the row's own `torch.Generator` (seeded from `SamplingParams.seed`, else from the engine's generator). The
uniform is drawn on the CPU whatever the device, so a seed gives the same stream everywhere.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .base import (
    Completion,
    Engine,
    FinishReason,
    GenerationRequest,
    PauseMode,
    StaleWeightsError,
    WeightMeta,
    WeightsLike,
    check_version,
    validate_request,
)

__all__ = ["BURST_WINDOW_FACTOR", "HFEngine", "PrefixCache", "resolve_device", "torch_dtype"]

BURST_WINDOW_FACTOR = 10
"""An idle engine collects a burst for at most this many times `max_wait_ms` (see the module docstring)."""


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected one of {', '.join(table)}, got {name!r}")
    return table[name]


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when a CUDA device is visible, else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but torch sees no CUDA device (torch {torch.__version__})")
    return device


@dataclass
class _Prefix:
    """K/V of `tokens`: `keys[l]`, `values[l]` are (heads, len(tokens), head_dim) for layer l."""

    tokens: list[int]
    keys: list[Any]
    values: list[Any]
    version: int
    blocks: list[int] = field(default_factory=list)
    """Chained hashes of its whole `PREFIX_BLOCK`-token blocks (the cache's index)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


PREFIX_BLOCK = 16
"""Tokens per block of the prefix index: a prompt finds the entries that share its leading whole blocks."""

MIN_SHARED = 2 * PREFIX_BLOCK
"""Prompts of one burst are prefilled through a shared prefix when they start with at least this many equal tokens."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def block_hashes(tokens: Sequence[int]) -> list[int]:
    """h_k = hash(h_{k-1}, block k): equal hashes mean (up to collisions, which an exact comparison catches)
    equal tokens up to the end of block k."""
    out, h = [], 0
    for k in range(len(tokens) // PREFIX_BLOCK):
        h = hash((h, tuple(tokens[k * PREFIX_BLOCK:(k + 1) * PREFIX_BLOCK])))
        out.append(h)
    return out


class PrefixCache:
    """K/V of earlier prompts, found by token prefix, least recently used first out, at most `budget_bytes` in
    all. Thread-safe.

    Entries are keyed: a session's entry (its last turn) is replaced by its next one; a shared prefix (the
    common start of a burst's prompts, e.g. the system prompt) is keyed by its tokens. A lookup takes the
    longest common prefix among the session's own entry and the entry the block index finds for the prompt's
    leading blocks, so another episode's system prompt or a retried episode's turns are reused too. Entries
    are never modified (a lookup slices them), so one entry may serve many rows at once."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Prefix] = OrderedDict()
        self._index: dict[int, str] = {}  # block hash → key of the newest entry holding that block
        self._lock = threading.Lock()
        self.nbytes = 0

    def lookup(self, key: str | None, prompt: Sequence[int], version: int) -> tuple[_Prefix | None, int]:
        """The entry covering the most leading tokens of `prompt`, and how many (0: none). At least the prompt's
        last token is left to feed. Entries of another weights version are dropped, never used."""
        cap = len(prompt) - 1
        with self._lock:
            deepest = None  # the entry holding the most of the prompt's leading whole blocks
            for h in block_hashes(prompt[:cap]):
                if (holder := self._index.get(h)) is None:
                    break
                deepest = holder
            candidates = [k for k in dict.fromkeys((key, deepest)) if k is not None]
            best, n, best_key = None, 0, None
            for k in candidates:
                entry = self._entries.get(k)
                if entry is None:
                    continue
                if entry.version != version:
                    self._remove(k)
                    continue
                c = min(common_prefix(entry.tokens, prompt), cap)
                if c > n:
                    best, n, best_key = entry, c, k
            if best is not None:
                self._entries.move_to_end(best_key)
        return best, n

    def put(self, key: str, entry: _Prefix) -> None:
        entry.blocks = block_hashes(entry.tokens)
        with self._lock:
            self._remove(key)
            if entry.nbytes > self.budget_bytes:
                return
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            for h in entry.blocks:
                self._index[h] = key
            while self.nbytes > self.budget_bytes:
                self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.nbytes -= entry.nbytes
        for h in entry.blocks:
            if self._index.get(h) == key:
                del self._index[h]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Pending:
    """A queued request and the caller's future (resolved from the worker thread via the caller's loop)."""

    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Completion | None = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():  # the caller gave up (cancelled)
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the caller's loop is closed: nobody waits for this result any more
            pass


@dataclass
class _Row:
    """One request while it decodes."""

    pending: _Pending
    generator: Any  # torch.Generator (CPU)
    stops: frozenset[int]
    budget: int
    version: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass
class _Batch:
    """The running batch. `rows` and every tensor are aligned on dim 0; the cache has `attn.shape[1]` slots."""

    rows: list[_Row]
    cache: Any  # transformers DynamicCache
    attn: Any  # (B, L) long, 1 = real token
    last_pos: Any  # (B,) position of the last token fed to the model
    logits: Any  # (B, V) float32 logits of the next token, not sampled yet
    temps: Any  # (B,)
    top_ps: Any  # (B,)

    def select(self, idx, rows: list[_Row]) -> _Batch:
        """Keep rows `idx` (a tensor of batch indices); then drop leading cache slots that are padding in
        every remaining row (left behind by a long row that finished)."""
        self.cache.batch_select_indices(idx)
        attn = self.attn[idx]
        first = int(attn.any(0).long().argmax())
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            attn = attn[:, first:]
        return _Batch(rows, self.cache, attn, self.last_pos[idx], self.logits[idx], self.temps[idx],
                      self.top_ps[idx])

    def merge(self, other: _Batch) -> _Batch:
        """Append `other`'s rows; both caches are left-padded (masked slots) to the wider one's length."""
        import torch

        width = max(self.attn.shape[1], other.attn.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        attn = torch.cat([_left_pad(self.attn, width, -1), _left_pad(other.attn, width, -1)])
        return _Batch(self.rows + other.rows, self.cache, attn, *(
            torch.cat([a, b]) for a, b in ((self.last_pos, other.last_pos), (self.logits, other.logits),
                                           (self.temps, other.temps), (self.top_ps, other.top_ps))))


def _session_key(request: GenerationRequest) -> str | None:
    return f"session:{request.session_id}" if request.session_id else None


def _left_pad(x, width: int, dim: int):
    """Zeros prepended along `dim` up to `width` (the matching attention-mask slots are 0)."""
    import torch

    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class HFEngine(Engine):
    """A Hugging Face causal LM served with continuous batching. See the module docstring for the design."""

    def __init__(self, model_path: str, *, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 dtype: str = "float32", device: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 cpu_threads: int = 1, prefix_cache_mb: float = 512.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
        from transformers.cache_utils import DynamicLayer

        from mosaic_ray.hygiene import set_torch_threads

        set_torch_threads(cpu_threads)
        if max_batch_size < 1:
            raise ValueError(f"HFEngine: max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"HFEngine: the tokenizer at {self.model_path} has no eos token")
        self.eos_id = int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        model_max = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_model_len = min(max_model_len or model_max, model_max)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        # Whether requests may join a running batch (module docstring). No layers = DynamicLayers made lazily.
        self.continuous = all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers)
        if prefix_cache_mb < 0:
            raise ValueError(f"HFEngine: prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        self.prefixes = (PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 and self.continuous
                         else None)
        self._rng = torch.Generator().manual_seed(seed)  # rows without a seed draw from here
        self._version = 0
        self._model_lock = threading.Lock()  # held by the worker for a whole run, or by a weight update
        self._cv = threading.Condition()  # guards everything below; notified on every change of it
        self._queue: deque[_Pending] = deque()
        self._worker_busy = False
        self._paused = False
        self._closed = False
        self._updates_waiting = 0
        self._staged: int | None = None  # the version a bucketed update is loading (admission held meanwhile)
        self._abort = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._running_rows = 0
        self._stats = {"batches": 0, "requests": 0, "generated_tokens": 0, "max_batch_rows": 0,
                       "joined_running": 0, "prompt_tokens": 0, "prefill_tokens": 0, "reused_tokens": 0,
                       "prefix_hits": 0, "decode_steps": 0, "decode_rows": 0}

    # ------------------------------------------------------------------------------------ data plane

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        for req in requests:
            validate_request(req, self.vocab_size)
            if len(req.prompt_ids) >= self.max_model_len:
                raise ValueError(f"GenerationRequest(request_id={req.request_id!r}).prompt_ids: {len(req.prompt_ids)} "
                                 f"tokens leave no room to generate (max_model_len={self.max_model_len})")
        if self._closed:
            raise RuntimeError("HFEngine.generate: the engine is closed")
        loop = asyncio.get_running_loop()
        pending = [_Pending(req, loop.create_future(), loop) for req in requests]
        with self._cv:
            self._queue.extend(pending)
            self._start_worker_locked()
            self._cv.notify_all()
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _start_worker_locked(self) -> None:
        if self._queue and not (self._worker_busy or self._paused or self._closed):
            self._worker_busy = True
            self._executor.submit(self._serve)

    def _held(self) -> bool:
        """Admission is stopped (caller holds `_cv`)."""
        return self._paused or self._closed or self._updates_waiting > 0

    def _serve(self) -> None:
        """Worker thread: one run after another while there is admissible work; yields to weight updates."""
        import torch

        while True:
            with self._cv:
                while self._updates_waiting and not self._closed:
                    self._cv.wait()
                if not self._queue or self._held():
                    self._worker_busy = False
                    self._cv.notify_all()
                    return
            with self._model_lock, torch.inference_mode():
                self._run()

    def _run(self) -> None:
        """The decode loop: admit newcomers, sample one token per row, retire finished rows, feed the rest."""
        batch: _Batch | None = None
        while True:
            fresh = self._admit(batch)
            try:
                if fresh:
                    joined = self._prefill(fresh)
                    if batch is not None:
                        self._stats["joined_running"] += len(fresh)
                        joined = batch.merge(joined)
                    batch = joined
                if batch is None:
                    return
                batch = self._step(batch)
            except Exception as exc:  # noqa: BLE001 - a failing step fails its own callers, never the worker
                for p in fresh + ([r.pending for r in batch.rows] if batch else []):
                    p.settle(error=exc)
                batch = None
            self._running_rows = len(batch.rows) if batch else 0

    def _admit(self, batch: _Batch | None) -> list[_Pending]:
        """Take queued requests that fit. With an empty batch, first let a burst finish arriving."""
        room = self.max_batch_size - (len(batch.rows) if batch else 0)
        with self._cv:
            if room <= 0 or self._held() or (batch is not None and not self.continuous):
                return []
            if batch is None and self._queue:
                now = time.monotonic()
                deadline, cap = now + self.max_wait_s, now + BURST_WINDOW_FACTOR * self.max_wait_s
                while len(self._queue) < room and not self._held() and (left := min(deadline, cap) - now) > 0:
                    seen = len(self._queue)
                    self._cv.wait(left)
                    now = time.monotonic()
                    if len(self._queue) > seen:  # the burst is still arriving: keep collecting
                        deadline = now + self.max_wait_s
                if self._held():
                    return []
            fresh: list[_Pending] = []
            while self._queue and len(fresh) < room:
                p = self._queue.popleft()
                if not p.future.done():  # skip callers that gave up while queued
                    fresh.append(p)
            return fresh

    def _prefill(self, fresh: list[_Pending]) -> _Batch:
        """Forward the newcomers' prompts into a new cache; their first logits are pending.

        Row i reuses `c_i` tokens of its session's cached K/V and feeds its `s_i` other tokens. The cache holds
        max(c) slots (each row's reused K/V right-aligned, left-padded), the input max(s) (left-padded)."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        reqs = [p.request for p in fresh]
        reuse: list[tuple[_Prefix | None, int]] = [(None, 0)] * len(reqs)
        if self.prefixes is not None:
            reuse = [self.prefixes.lookup(_session_key(r), r.prompt_ids, self._version) for r in reqs]
            if len(reqs) > 1:
                reuse = self._share_within_burst(reqs, reuse)
        n = len(reqs)
        past = max(c for _, c in reuse)
        width = max(len(r.prompt_ids) - c for r, (_, c) in zip(reqs, reuse))
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((n, past + width), dtype=torch.long)
        for i, (r, (_, c)) in enumerate(zip(reqs, reuse)):
            new = r.prompt_ids[c:]
            input_ids[i, width - len(new):] = torch.tensor(new, dtype=torch.long)
            attn[i, past - c:past] = 1
            attn[i, past + width - len(new):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        # Real tokens get positions 0..len-1 whatever the padding; pad slots get 1 (masked out anyway).
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)[:, past:]
        cache = DynamicCache(config=self.model.config)
        if past:
            ref = next(e for e, c in reuse if c)  # rows that reuse nothing take zero slots of its shape
            for li, layer in enumerate(cache.layers):
                layer.update(*(torch.cat([_left_pad(getattr(e if c else ref, kind)[li][None, :, :c], past, -2)
                                          for e, c in reuse]) for kind in ("keys", "values")))
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        rows = [_Row(p, torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else self._rng,
                     frozenset({*r.sampling.stop_token_ids, *(() if r.sampling.ignore_eos else (self.eos_id,))}),
                     min(r.sampling.max_new_tokens, self.max_model_len - len(r.prompt_ids)), self._version)
                for p, r in zip(fresh, reqs)]
        reused = sum(c for _, c in reuse)
        prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
        self._stats["batches"] += 1
        self._stats["requests"] += n
        self._stats["prompt_tokens"] += prompt_tokens
        self._stats["prefill_tokens"] += prompt_tokens - reused  # (shared prefixes count when computed)
        self._stats["reused_tokens"] += reused
        self._stats["prefix_hits"] += sum(c > 0 for _, c in reuse)
        return _Batch(rows, cache, attn, positions[:, -1], out.logits[:, -1, :].float(),
                      torch.tensor([r.sampling.temperature for r in reqs], dtype=torch.float32, device=dev),
                      torch.tensor([r.sampling.top_p for r in reqs], dtype=torch.float32, device=dev))

    def _share_within_burst(self, reqs: list[GenerationRequest],
                            reuse: list[tuple[_Prefix | None, int]]) -> list[tuple[_Prefix | None, int]]:
        """Prompts of one burst that start alike (one system prompt, a task's G samples) get their common start
        computed once: prompts sorted, neighbours sharing at least `MIN_SHARED` tokens grouped, each group's
        common prefix prefilled in one batched forward pass and kept as a shared entry, then reused by every
        row of the group that had less of it cached."""
        import torch
        from transformers import DynamicCache

        order = sorted(range(len(reqs)), key=lambda i: reqs[i].prompt_ids)
        groups: list[tuple[list[int], int]] = []
        members, common = [order[0]], len(reqs[order[0]].prompt_ids) - 1
        for i in order[1:]:
            c = min(common, common_prefix(reqs[members[-1]].prompt_ids, reqs[i].prompt_ids),
                    len(reqs[i].prompt_ids) - 1)
            if c >= MIN_SHARED:
                members, common = [*members, i], c
                continue
            groups.append((members, common))
            members, common = [i], len(reqs[i].prompt_ids) - 1
        groups.append((members, common))
        # worth it when the rows save more tokens than the shared pass costs
        groups = [(g, c) for g, c in groups if len(g) > 1 and sum(max(0, c - reuse[i][1]) for i in g) > c]
        if not groups:
            return reuse
        width = max(c for _, c in groups)
        ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(groups), width), dtype=torch.long)
        for j, (g, c) in enumerate(groups):
            ids[j, width - c:] = torch.tensor(reqs[g[0]].prompt_ids[:c], dtype=torch.long)
            attn[j, width - c:] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).masked_fill(attn == 0, 1),
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
        self._stats["prefill_tokens"] += sum(c for _, c in groups)
        reuse = list(reuse)
        for j, (g, c) in enumerate(groups):
            real = attn[j].bool()
            tokens = reqs[g[0]].prompt_ids[:c]
            entry = _Prefix(tokens, [layer.keys[j][:, real] for layer in cache.layers],
                            [layer.values[j][:, real] for layer in cache.layers], self._version)
            self.prefixes.put(f"shared:{hash(tuple(tokens))}", entry)
            for i in g:
                if reuse[i][1] < c:
                    reuse[i] = (entry, c)
        return reuse

    def _keep_prefix(self, batch: _Batch, j: int, row: _Row) -> None:
        """Store a finished row's K/V (its real slots) under its session for the session's next turn."""
        request = row.pending.request
        tokens = [*request.prompt_ids, *row.tokens[:-1]]
        real = batch.attn[j].bool()
        if int(real.sum()) != len(tokens):  # never expected: the mask and the tokens disagree, so keep nothing
            return
        self.prefixes.put(_session_key(request), _Prefix(
            tokens, [layer.keys[j][:, real] for layer in batch.cache.layers],
            [layer.values[j][:, real] for layer in batch.cache.layers], row.version))

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample every row's next token; retire rows that are done; feed the rest one decode step."""
        import torch

        self._stats["max_batch_rows"] = max(self._stats["max_batch_rows"], len(batch.rows))
        self._stats["decode_steps"] += 1
        self._stats["decode_rows"] += len(batch.rows)
        tok, lp = sample_tokens(batch.logits, batch.temps, batch.top_ps, [r.generator for r in batch.rows])
        abort = self._abort.is_set()
        keep: list[int] = []
        for j, (row, t, logprob) in enumerate(zip(batch.rows, tok.tolist(), lp.tolist())):
            row.tokens.append(t)
            row.logprobs.append(logprob)
            reason: FinishReason | None = ("stop" if t in row.stops else "length" if len(row.tokens) >= row.budget
                                           else "abort" if abort or row.pending.future.done() else None)
            if reason is None:
                keep.append(j)
                continue
            self._stats["generated_tokens"] += len(row.tokens)
            if self.prefixes is not None and row.pending.request.session_id and reason in ("stop", "length"):
                self._keep_prefix(batch, j, row)
            row.pending.settle(Completion(row.pending.request.request_id, row.tokens, row.logprobs, reason,
                                          row.version))
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            idx = torch.tensor(keep, device=self.device)
            batch, tok = batch.select(idx, [batch.rows[j] for j in keep]), tok[idx]
        batch.attn = torch.cat([batch.attn, batch.attn.new_ones((len(keep), 1))], dim=1)
        batch.last_pos = batch.last_pos + 1
        out = self.model(input_ids=tok[:, None], attention_mask=batch.attn, position_ids=batch.last_pos[:, None],
                         past_key_values=batch.cache, use_cache=True)
        batch.logits = out.logits[:, -1, :].float()
        return batch

    # --------------------------------------------------------------------------------- control plane

    def update_weights(self, weights: WeightsLike, version: int) -> None:
        """Drain, then load (see the module docstring): blocks until the running rows finished."""
        check_version(self._version, version)
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        self._check_shapes([(n, t.shape) for n, t in items], f"update_weights(version={version})")
        with self._cv:  # stop admission so the running batch drains and the worker lets go of the model
            self._updates_waiting += 1
            self._cv.notify_all()
        try:
            with self._model_lock:
                check_version(self._version, version)  # another update may have won the lock meanwhile
                if self._staged is not None:
                    raise RuntimeError(f"update_weights(version={version}): a bucketed update to version "
                                       f"{self._staged} is in progress")
                self._copy(items)
                self._version = version
                self._drop_prefixes()
        finally:
            with self._cv:
                self._updates_waiting -= 1
                self._cv.notify_all()

    async def begin_weight_update(self, version: int, meta: WeightMeta | None = None) -> None:
        check_version(self._version, version)
        if meta is not None:
            self._check_shapes([(n, shape) for n, shape, _ in meta], f"begin_weight_update(version={version})")
        with self._cv:
            if self._staged is not None and version < self._staged:  # the same version: a retried push restarts it
                raise StaleWeightsError(f"begin_weight_update: version {version} is older than the update to "
                                        f"version {self._staged} in progress")
            if self._staged is None:   # admission stops (and stays stopped until finish)
                self._updates_waiting += 1
            self._staged = version
            self._cv.notify_all()
        await asyncio.to_thread(self._drain)
        self._drop_prefixes()

    def _drop_prefixes(self) -> None:
        """K/V computed with the old weights is never reused (lookups also check each entry's version)."""
        if self.prefixes is not None:
            self.prefixes.clear()

    def _drain(self) -> None:
        with self._model_lock:   # taken once the running batch has finished on the old weights
            pass

    async def load_weight_bucket(self, weights: WeightsLike) -> None:
        if self._staged is None:
            raise RuntimeError("load_weight_bucket: no update in progress (call begin_weight_update first)")
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        self._check_shapes([(n, t.shape) for n, t in items], f"load_weight_bucket(version={self._staged})")
        await asyncio.to_thread(self._locked_copy, items)

    async def finish_weight_update(self, version: int) -> None:
        with self._cv:
            if self._staged != version:
                raise RuntimeError(f"finish_weight_update({version}): the update in progress is to version "
                                   f"{self._staged}")
            self._version = version   # nothing runs: admission has been stopped since begin
            self._staged = None
            self._updates_waiting -= 1
            self._start_worker_locked()
            self._cv.notify_all()

    def _targets(self) -> dict[str, Any]:
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        return targets

    def _check_shapes(self, named_shapes: Sequence[tuple[str, Any]], where: str) -> None:
        """ValueError naming up to five unknown names or wrong shapes; nothing has been loaded then."""
        targets = self._targets()
        errors = []
        for name, shape in named_shapes:
            if name not in targets:
                errors.append(f"{name}: no such parameter")
            elif tuple(shape) != tuple(targets[name].shape):
                errors.append(f"{name}: shape {tuple(shape)} != model's {tuple(targets[name].shape)}")
        if errors:
            raise ValueError(f"{where}: {len(errors)} bad tensor(s), nothing loaded: " + "; ".join(errors[:5]))

    def _locked_copy(self, items: list[tuple[str, Any]]) -> None:
        with self._model_lock:
            self._copy(items)

    def _copy(self, items: list[tuple[str, Any]]) -> None:
        import torch

        targets = self._targets()
        with torch.no_grad():
            for name, tensor in items:
                dst = targets[name]
                dst.copy_(torch.as_tensor(tensor).to(device=dst.device, dtype=dst.dtype))

    @property
    def version(self) -> int:
        return self._version

    def health(self) -> dict:
        return {"ok": not self._closed, "kind": "hf", "version": self._version, "loading": self._staged,
                "device": self.device,
                "dtype": self.dtype, "continuous": self.continuous, "pending": len(self._queue),
                "running": self._running_rows, "paused": self._paused, **self._stats,
                "prefix_cache_sessions": len(self.prefixes) if self.prefixes is not None else 0,
                "prefix_cache_bytes": self.prefixes.nbytes if self.prefixes is not None else 0}

    async def pause(self, mode: PauseMode = PauseMode.WAIT) -> None:
        """Stop admitting requests; with ABORT also cut the running rows. Returns once nothing runs."""
        with self._cv:
            self._paused = True
            if mode is PauseMode.ABORT:
                self._abort.set()
            self._cv.notify_all()
        await asyncio.to_thread(self._wait_idle)
        self._abort.clear()

    def _wait_idle(self) -> None:
        with self._cv:
            while self._worker_busy:
                self._cv.wait()

    async def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._start_worker_locked()
            self._cv.notify_all()

    async def close(self) -> None:
        """Abort running rows, cancel queued requests, stop the worker."""
        with self._cv:
            self._closed = True
            self._abort.set()
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for p in queued:
            p.loop.call_soon_threadsafe(p.future.cancel)
        await asyncio.to_thread(self._executor.shutdown, True)


def sample_tokens(logits, temps, top_ps, generators) -> tuple[Any, Any]:
    """Sample one token per row and return (tokens (B,), raw log-probs of those tokens (B,)).

    logits: (B, V) float32 raw model logits. temps, top_ps: (B,). generators: one CPU torch.Generator per row.
    The returned log-prob is gather - logsumexp of the *raw* logits, whatever temperature/top-p chose the token.
    """
    import torch

    greedy = temps == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    if bool((top_ps < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass strictly before it is below top_p (the first token is always kept).
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_ps[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep_sorted)
    # Inverse-CDF sampling with u in (0, 1]: the first index whose cumulative mass reaches u * total always has
    # non-zero probability, so filtered tokens can never be drawn.
    u = torch.stack([1.0 - torch.rand((), generator=g) for g in generators]).to(logits.device)
    cdf = probs.cumsum(-1)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)
    return tokens, logprobs
