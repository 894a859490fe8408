"""The request engine's host loop: streams requests through a fixed number of slots (`engine_programs` holds
the jitted insert / decode / compact programs and the design).

Per round: insert waiting prompts into free slots (one prefill per prompt, shared by its samples), run one
decode chunk over the attended width that covers the longest live row, read the finish flags, collect the
finished rows. Once no request waits, the live rows are compacted into smaller row buckets. Every decision is
taken from values read back from the device (gathered across processes), so every process of a multi-host run
schedules identically.

Just over 400 lines on purpose: `lower_engine_programs`, which lists every program a call can run for the dry
run, sits beside the `Engine.run` whose choices (row buckets, insertion sizes, widths) it must mirror exactly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from typing import Sequence

import jax
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from fst_jax.models.config import canonical_dtype
from fst_jax.runtime import parallel
from fst_jax.sampling.engine_programs import (PREFILL_SCORES_MB, EngineState, empty_state, length_buckets, programs,
                                              tail_buckets)
from fst_jax.sampling.weights import hashable_rules

__all__ = ["Engine", "EngineStats", "Request", "fine_tail", "insert_buckets", "kv_bytes", "lower_engine_programs",
           "prompt_bucket", "slot_state", "state_shardings", "stop_array"]

MIN_BUCKET = 16
STOP_SLOTS = 8
CHUNK_STEPS = 32  # decode steps between host round trips
REFILL = 0.125  # the share of the slots that must be free before a round stops decoding to insert


def compacts(compact: bool, max_new_tokens: int, chunk_steps: int = CHUNK_STEPS) -> bool:
    """Whether an engine compacts its tail: asked to, and its completions may outlast two chunks (shorter
    calls end before a smaller batch would pay for its programs and round trips)."""
    return bool(compact) and max_new_tokens > 2 * chunk_steps


def fine_tail(mesh, platform: str | None = None) -> bool:
    """Whether the tail compacts in the finer steps (`tail_buckets(fine=True)`): on one CPU device, where a
    decode step costs in proportion to its rows; a mesh or an accelerator keeps the halving's fewer programs."""
    return mesh is None and (platform or jax.devices()[0].platform) == "cpu"


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids), `num_samples` completions of at most `max_new_tokens` tokens each."""

    prompt: Sequence[int]
    num_samples: int
    max_new_tokens: int


@dataclasses.dataclass
class EngineStats:
    """What a call computed: useful tokens, row-steps (rows × decode steps, live or not), chunks (host round
    trips), insertions, compactions, and the wall time after the queue emptied (`tail_s`)."""

    useful_tokens: int = 0
    row_steps: int = 0
    chunks: int = 0
    inserts: int = 0
    compactions: int = 0
    tail_s: float = 0.0

    @property
    def utilisation(self) -> float:
        """Useful tokens per row-step computed (1 = no row ever idles)."""
        return self.useful_tokens / max(self.row_steps, 1)


def stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of `STOP_SLOTS` (their number rarely changes a program)."""
    stop_ids = [int(t) for t in stop_ids if int(t) >= 0]
    out = np.full(max(1, -(-len(stop_ids) // STOP_SLOTS)) * STOP_SLOTS, -1, np.int32)
    out[:len(stop_ids)] = stop_ids
    return out


def prompt_bucket(n: int) -> int:
    """The padded prompt length of a prefill: the next power of two ≥ max(n, 16)."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def insert_buckets(slots: int, num_samples: int, multiple: int = 1, refill: float = REFILL) -> list[int]:
    """The prompt counts an insertion runs at: the most prompts that fit the slots, rounded down to a power of
    two (times `multiple`, the mesh's batch multiple, when that many fit: the prefill is then split over the
    batch shards), a quarter of that, the prompts a refill's free slots hold (`refill` of the slots, rounded
    down the same way) and the smallest (one prompt per shard: a small call's long prompts, e.g. reflection's).
    A round inserts at most the next size up (padding prompts) when the queue runs out, else rounds down
    (`Engine._insert_count`)."""
    most = max(1, slots // num_samples)
    unit = multiple if most >= multiple else 1

    def down(n: int) -> int:
        size = unit
        while size * 2 <= n:
            size *= 2
        return size
    top = down(most)
    return sorted({unit, max(unit, top // 4), min(top, down(int(refill * slots) // num_samples)), top})


def _insert_sharding(mesh, prompts: int):
    """How an insertion's prompt arrays are laid out: split over the batch axes when they divide, else whole."""
    if mesh is None:
        return None
    if prompts % parallel.batch_size_multiple(mesh) == 0:
        return parallel.batch_sharding(mesh, 1)
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(config, mesh, rules=parallel.SAMPLE_RULES) -> EngineState | None:
    """Where the slots live on a mesh: every array's rows over the batch axes (data × fsdp), the KV buffers'
    heads as the rules place "kv_heads" (split by `tensor`); None without a mesh."""
    if mesh is None:
        return None
    rules = hashable_rules(rules)
    kv = NamedSharding(mesh, parallel.logical_to_spec(
        ("batch", "kv_heads", None, "head_dim"), rules, mesh,
        (parallel.batch_size_multiple(mesh), config.num_kv_heads, 1, config.head_dim)))
    rows1, rows2 = parallel.batch_sharding(mesh, 1), parallel.batch_sharding(mesh, 2)
    layers = config.num_layers
    return EngineState(k=(kv,) * layers, v=(kv,) * layers, key_mask=rows2, token=rows1, column=rows1,
                       position=rows1, count=rows1, limit=rows1, live=rows1, finished=rows1, keys=rows2,
                       out_tokens=rows2, out_logprobs=rows2)


class Engine:
    """Continuous batching over `slots` rows of `columns` KV columns each (prompt bucket + completion).

    `chunk_steps`: decode steps between host round trips (the host inserts and collects between chunks);
    `refill`: the share of the slots that must be free before the engine stops decoding to insert waiting
    prompts; `compact`: shrink the batch to smaller row buckets in the tail (only when completions may
    outlast two chunks, `compacts`); `draw`: "gumbel" or
    "inverse_cdf" (`engine_programs`). On a `mesh` the slots are split over its batch axes (`slots` must be a
    multiple of data × fsdp) and `rules` lay the KV heads out. `prefill_scores_mb`: a prefill whose float32
    scores would exceed this runs in query chunks (`engine_programs.prefill_chunk`). `stats` accumulates over
    calls.
    """

    def __init__(self, config, *, slots: int, columns: int, max_new_tokens: int, cache_dtype, mesh=None,
                 rules=parallel.SAMPLE_RULES, draw: str = "gumbel", chunk_steps: int = CHUNK_STEPS,
                 refill: float = REFILL, compact: bool = True, prefill_scores_mb: float = PREFILL_SCORES_MB):
        if slots < 1:
            raise ValueError(f"the engine needs at least one slot, got slots={slots}")
        multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
        if slots % multiple:
            raise ValueError(f"slots={slots} does not split over the mesh's batch axes (data × fsdp = {multiple}): "
                             f"use a multiple of {multiple}")
        self.config, self.slots, self.columns, self.max_new_tokens = config, slots, columns, max_new_tokens
        self.cache_dtype, self.mesh, self.draw = canonical_dtype(cache_dtype).name, mesh, draw
        self.chunk_steps, self.refill, self.compact = chunk_steps, refill, compact
        self.prefill_scores_mb = prefill_scores_mb
        self.widths = length_buckets(columns)
        self.rows = (tail_buckets(slots, multiple, fine=fine_tail(mesh))
                     if compacts(compact, max_new_tokens, chunk_steps) else [slots])
        self.shardings = state_shardings(config, mesh, rules)
        self.stats = EngineStats()

    def _programs(self):
        return programs(self.config, self.draw, self.shardings, self.prefill_scores_mb)

    def run(self, weights, requests: Sequence[Request], *, seed: int, temperature: float, top_p: float,
            top_k: int, stop_ids: Sequence[int], pad_id: int = 0):
        """All requests' completions, request-major then sample: (tokens, logprobs, finished) lists; a
        completion's tokens include the stop token that ended it. `pad_id` is unused (kept for `generate`'s
        signature): finished rows are cut to their length on the host."""
        self._check(requests)
        insert_jit, decode_jit, compact_jit, _ = self._programs()
        params = (np.float32(temperature), np.float32(top_p), np.int32(top_k), stop_array(stop_ids))
        seed = np.uint32(seed % 2**32)
        rows = self.rows[0]
        state = self._empty_state(rows)
        occupant: list = [None] * rows  # (request, sample) per slot
        column = np.zeros(rows, np.int64)  # each live row's next column, as of the last read
        queue = collections.deque(range(len(requests)))
        first_ids = np.cumsum([0] + [r.num_samples for r in requests])[:-1]  # each request's sample 0
        results: dict = {}
        stats, tail_start = self.stats, None
        # One prompt bucket per call (the longest prompt's): one insert program per insertion size.
        P = prompt_bucket(max(len(r.prompt) for r in requests))
        if P + max(r.max_new_tokens for r in requests) > self.columns or max(
                r.max_new_tokens for r in requests) > self.max_new_tokens:
            raise ValueError(f"requests need prompt bucket {P} + up to "
                             f"{max(r.max_new_tokens for r in requests)} new tokens; the engine holds "
                             f"{self.columns} columns and {self.max_new_tokens} new tokens: build it larger")
        while queue or any(o is not None for o in occupant):
            if queue:  # insert as many waiting prompts as the free slots hold
                free = [i for i, o in enumerate(occupant) if o is None]
                n = requests[queue[0]].num_samples
                take = self._insert_count(n, len(free) // n, queue, requests)
                group = [queue.popleft() for _ in range(take)]
                if group:
                    state = self._insert(insert_jit, state, weights, requests, group, free, rows, P, seed,
                                         first_ids)
                    for g, r in enumerate(group):
                        for j in range(n):
                            occupant[free[g * n + j]] = (r, j)
                            column[free[g * n + j]] = P - 1  # the prompt's last token: fed at the first step
                    stats.inserts += 1
            if not queue and tail_start is None:
                tail_start = time.perf_counter()
            live_cols = [column[i] for i, o in enumerate(occupant) if o is not None]
            width = next((w for w in self.widths if w >= max(live_cols, default=0) + self.chunk_steps),
                         self.widths[-1])
            smaller = next((b for b in self.rows if b < rows), None)
            if queue:
                want_free = max(requests[queue[0]].num_samples, int(self.refill * rows))
            elif smaller is not None:
                want_free = rows - smaller  # stop when the live rows fit the next row bucket
            else:
                want_free = rows + 1
            with self._mesh_context():
                state, steps = decode_jit(weights, state, want_free=np.int32(want_free), temperature=params[0],
                                          top_p=params[1], top_k=params[2], stop_ids=params[3],
                                          max_steps=self.chunk_steps, width=width)
            live, finished, count, column_now = (parallel.to_host(x) for x in
                                                 (state.live, state.finished, state.count, state.column))
            steps = int(parallel.to_host(steps))
            stats.chunks += 1
            stats.row_steps += steps * rows
            done = [i for i, o in enumerate(occupant) if o is not None and not live[i]]
            column = column_now.astype(np.int64)
            if done:
                tokens, logprobs = parallel.to_host(state.out_tokens), parallel.to_host(state.out_logprobs)
                for i in done:
                    c = int(count[i])
                    results[occupant[i]] = (tokens[i, :c].tolist(), logprobs[i, :c].copy(), bool(finished[i]))
                    stats.useful_tokens += c
                    occupant[i] = None
            n_live = sum(o is not None for o in occupant)
            if not queue and smaller is not None and 0 < n_live <= smaller:
                target = min(b for b in self.rows if b >= n_live)
                keep = [i for i, o in enumerate(occupant) if o is not None]
                keep += [i for i, o in enumerate(occupant) if o is None][:target - len(keep)]
                with self._mesh_context():
                    state = compact_jit(state, self._replicated(np.asarray(keep, np.int32)))
                occupant, column, rows = [occupant[i] for i in keep], column[keep], target
                stats.compactions += 1
        if tail_start is not None:
            stats.tail_s += time.perf_counter() - tail_start
        out = [results[(r, j)] for r, req in enumerate(requests) for j in range(req.num_samples)]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

    def _insert(self, insert_jit, state, weights, requests, group, free, rows, P, seed, first_ids):
        n = requests[group[0]].num_samples
        I = next(b for b in self._insert_sizes(n) if b >= len(group))
        ids, mask = np.zeros((I, P), np.int32), np.zeros((I, P), bool)
        firsts, limits = np.zeros(I, np.int32), np.ones(I, np.int32)
        for g, r in enumerate(group):
            prompt = requests[r].prompt
            ids[g, P - len(prompt):], mask[g, P - len(prompt):] = prompt, True
            firsts[g], limits[g] = first_ids[r], requests[r].max_new_tokens
        slot_ids = np.full(I * n, rows, np.int32)  # `rows` = no slot (dropped)
        slot_ids[:len(group) * n] = free[:len(group) * n]
        with self._mesh_context():
            return insert_jit(weights, state, *(self._host(x, I) for x in (ids, mask, slot_ids, firsts, limits)),
                              seed, num_samples=n)

    def _insert_count(self, n: int, fits: int, queue, requests) -> int:
        """How many waiting prompts (all of `n` samples, from the queue's head) to insert when `fits` fit the free
        slots. When the free slots, not the queue, limit the insertion, it rounds down to an insertion size
        (keeping at least half of what fits; the rest wait for the next round) rather than up with padding
        prompts: a padding prompt costs a whole prompt's prefill (on the CPU rollout benchmark, 128 tokens ≈ 10
        decode row-steps), a slot left free until the next round a few row-steps."""
        sizes = self._insert_sizes(n)
        fits = min(fits, sizes[-1])
        waiting = 0
        while waiting < len(queue) and waiting <= fits and requests[queue[waiting]].num_samples == n:
            waiting += 1
        if waiting <= fits:  # the rest of these requests fit: insert them all (padded up to a size)
            return waiting
        floor = max((b for b in sizes if b <= fits), default=0)
        return floor if 2 * floor >= fits else fits

    def _insert_sizes(self, n: int) -> list[int]:
        return insert_buckets(self.slots, n, multiple=1 if self.mesh is None else parallel.batch_size_multiple(self.mesh),
                              refill=self.refill)

    def _host(self, x: np.ndarray, prompts: int):
        """An insertion's host array on the mesh (`_insert_sharding`; the same on every process)."""
        if self.mesh is None:
            return x
        split = _insert_sharding(self.mesh, prompts)
        sharding = (parallel.batch_sharding(self.mesh, x.ndim) if split.spec and split.spec[0] is not None
                    else NamedSharding(self.mesh, PartitionSpec()))
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    def _check(self, requests: Sequence[Request]) -> None:
        """One-line errors for requests the engine cannot serve (else it would wait forever or read garbage)."""
        if not requests:
            raise ValueError("the engine needs at least one request")
        V = self.config.vocab_size
        for i, r in enumerate(requests):
            if len(r.prompt) == 0:
                raise ValueError(f"request {i} has an empty prompt; every prompt needs at least one token")
            if not 1 <= r.num_samples <= self.slots:
                raise ValueError(f"request {i} asks for {r.num_samples} samples; the engine has {self.slots} slots "
                                 f"and needs 1 ≤ num_samples ≤ slots (raise slots)")
            if not 1 <= r.max_new_tokens <= self.max_new_tokens:
                raise ValueError(f"request {i} asks for max_new_tokens={r.max_new_tokens}; this engine serves 1 to "
                                 f"{self.max_new_tokens}")
            low, high = min(r.prompt), max(r.prompt)
            if low < 0 or high >= V:
                raise ValueError(f"request {i} has token id {low if low < 0 else high} outside the vocabulary "
                                 f"[0, {V})")

    def _empty_state(self, rows: int):
        empty_jit = self._programs()[3]
        with self._mesh_context():
            state = empty_jit(rows=rows, columns=self.columns, max_new_tokens=self.max_new_tokens,
                              cache_dtype=self.cache_dtype)
        # on one device, committed to it like every later state (the programs lowered ahead are lowered so)
        return jax.device_put(state, jax.devices()[0]) if self.mesh is None else state

    def _replicated(self, x: np.ndarray):
        """A host array every device reads whole (the same on every process: it comes from gathered values)."""
        if self.mesh is None:
            return x
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda i: x[i])

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


def lower_engine_programs(config, weights, *, slots: int, columns: int, max_new_tokens: int,
                          num_samples: Sequence[int], prompt_buckets: Sequence[int], cache_dtype, mesh=None,
                          rules=parallel.SAMPLE_RULES, draw: str = "gumbel", compact: bool = True,
                          chunk_steps: int = CHUNK_STEPS, refill: float = REFILL,
                          stops: int = STOP_SLOTS, platform: str | None = None, known: dict | None = None,
                          lazy: bool = False, prefill_scores_mb: float = PREFILL_SCORES_MB) -> dict:
    """Every program `Engine(config, slots=, columns=, max_new_tokens=, cache_dtype=, mesh=, rules=, draw=,
    compact=, chunk_steps=, refill=).run` can call for requests of these sample counts whose longest prompt falls in `prompt_buckets`,
    lowered without any array: {name: jax.stages.Lowered}, named empty_B{slots}_C{columns}, insert_B{slots}_C{columns}_I{prompts}_P{bucket}_n{samples},
    decode_B{rows}_C{columns}_W{width}, compact_B{rows}_C{columns}_to{rows}. `weights`: the sampling layout
    (`abstract_sampling_weights`, with its shardings on a mesh). Compiling them all leaves a run of the engine
    nothing to compile. `platform` ("cuda", "tpu"): lower for that backend (not compilable here); `known`:
    programs lowered before, by (name, max_new_tokens), reused rather than lowered again; `lazy`: each value is a
    `Deferred` that lowers on `.get()` (at 8B a lowering is a third of a second; a plan lowers what it
    compiles). The KV the engine holds is slots × columns per layer (`kv_bytes`)."""
    insert_jit, decode_jit, compact_jit, empty_jit = programs(config, draw, state_shardings(config, mesh, rules),
                                                              prefill_scores_mb)
    sds = jax.ShapeDtypeStruct
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    scalar = lambda dtype: sds((), dtype)  # noqa: E731
    params = (scalar(np.float32), scalar(np.float32), scalar(np.int32), sds((stops,), np.int32))
    multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
    rows_list = (tail_buckets(slots, multiple, fine=fine_tail(mesh, platform))
                 if compacts(compact, max_new_tokens, chunk_steps) else [slots])
    cache_dtype = canonical_dtype(cache_dtype).name
    statics = dict(columns=columns, max_new_tokens=max_new_tokens, cache_dtype=cache_dtype)
    known = {} if known is None else known

    def lower(name, jitted, *args, **kwargs):
        key = (name, max_new_tokens)  # the names leave out the completion cap, which changes the outputs
        if key not in known:
            def lowered(jitted=jitted, args=args, kwargs=kwargs):  # under the mesh, also when deferred
                with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
                    return parallel.lower_for(jitted, *args, platform=platform, **kwargs)
            known[key] = Deferred(lowered)
        out[name] = known[key] if lazy else known[key].get()

    abstract_state = functools.partial(slot_state, config, columns=columns, max_new_tokens=max_new_tokens,  # noqa: E731
                                       cache_dtype=cache_dtype, mesh=mesh, rules=rules)

    context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
    with context:
        C = columns
        out = {}
        lower(f"empty_B{slots}_C{C}", empty_jit, rows=slots, **statics)
        states = {rows: abstract_state(rows) for rows in rows_list}
        if mesh is None:  # the engine's arrays on one device are committed to it (a jit's outputs, loaded weights):
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # lower for exactly that
            pin = lambda tree: jax.tree.map(lambda a: sds(a.shape, a.dtype, sharding=one), tree)  # noqa: E731
            weights, states = pin(weights), {rows: pin(state) for rows, state in states.items()}
        def host(shape, dtype, split):
            """An insertion's host input: split over the batch shards when `_insert_sharding` splits it."""
            if split is None:
                return sds(shape, dtype)
            batched = split.spec and split.spec[0] is not None
            return sds(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)) if batched else replicated)

        for n in sorted(set(num_samples)):
            for I in insert_buckets(slots, n, multiple=multiple, refill=refill):
                split = _insert_sharding(mesh, I)
                for P in prompt_buckets:
                    if P + 1 > columns:
                        continue
                    # an insertion happens only before the first compaction, at the full slot count
                    lower(f"insert_B{slots}_C{C}_I{I}_P{P}_n{n}",
                        insert_jit, weights, states[slots], host((I, P), np.int32, split),
                        host((I, P), np.bool_, split), host((I * n,), np.int32, split), host((I,), np.int32, split),
                        host((I,), np.int32, split), scalar(np.uint32), num_samples=n)
        for rows, state in states.items():
            for width in length_buckets(columns):
                lower(f"decode_B{rows}_C{C}_W{width}", decode_jit, weights, state, want_free=scalar(np.int32),
                      temperature=params[0], top_p=params[1], top_k=params[2], stop_ids=params[3],
                      max_steps=chunk_steps, width=width)
            for smaller in rows_list:
                if smaller < rows:
                    lower(f"compact_B{rows}_C{C}_to{smaller}", compact_jit, state,
                          sds((smaller,), np.int32, sharding=replicated))
    return out


class Deferred:
    """A program lowered on first `.get()` (then kept until `.release()`)."""

    def __init__(self, lower):
        self._lower, self._lowered = lower, None

    def get(self):
        if self._lowered is None:
            self._lowered = self._lower()
        return self._lowered

    def release(self) -> None:
        """Drop the lowered program (and the executable compiled from it); a later `.get()` lowers again."""
        self._lowered = None


def slot_state(config, rows: int, *, columns: int, max_new_tokens: int, cache_dtype, mesh=None,
               rules=parallel.SAMPLE_RULES) -> EngineState:
    """The engine's slot arrays for `rows` slots as jax.ShapeDtypeStructs, with their shardings on a mesh
    (`state_shardings`): what a call holds on the devices while it runs."""
    state = jax.eval_shape(functools.partial(empty_state, config, rows, columns, max_new_tokens,
                                             canonical_dtype(cache_dtype).name))
    shardings = state_shardings(config, mesh, rules)
    if shardings is None:
        return state
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def kv_bytes(config, slots: int, columns: int, cache_dtype) -> int:
    """Bytes of the engine's KV buffers: 2 × layers × slots × kv heads × columns × head dim."""
    return (2 * config.num_layers * slots * config.num_kv_heads * columns * config.head_dim
            * np.dtype(canonical_dtype(cache_dtype)).itemsize)
