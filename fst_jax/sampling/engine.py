"""The request engine's host loop: streams requests through a fixed number of slots (`engine_programs` holds
the jitted insert / decode / compact programs and the design).

Per round: insert waiting prompts into free slots (one prefill per prompt, shared by its samples), run one
decode chunk over the attended width that covers the longest live row, read the finish flags, collect the
finished rows. Once no request waits, the live rows are compacted into smaller row buckets. Every decision is
taken from values read back from the device (gathered across processes), so every process of a multi-host run
schedules identically.
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

from fst_jax.models.config import canonical_dtype
from fst_jax.runtime import parallel
from fst_jax.sampling.engine_programs import length_buckets, programs, row_buckets

__all__ = ["Engine", "EngineStats", "Request", "insert_buckets", "kv_bytes", "lower_engine_programs",
           "prompt_bucket", "stop_array"]

MIN_BUCKET = 16
STOP_SLOTS = 8


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


def insert_buckets(slots: int, num_samples: int, sizes: int = 4) -> list[int]:
    """The prompt counts an insertion runs at: the `sizes` largest powers of two up to the most prompts that
    fit the slots (fewer prompts are padded to the smallest: a prefill row is cheap, a program is not)."""
    most = max(1, slots // num_samples)
    out = [1]
    while out[-1] * 2 <= most:
        out.append(out[-1] * 2)
    return out[-sizes:]


class Engine:
    """Continuous batching over `slots` rows of `columns` KV columns each (prompt bucket + completion).

    `chunk_steps`: decode steps between host round trips (the host inserts and collects between chunks);
    `refill`: the share of the slots that must be free before the engine stops decoding to insert waiting
    prompts; `compact`: shrink the batch to smaller row buckets in the tail. `stats` accumulates over calls.
    """

    def __init__(self, config, *, slots: int, columns: int, max_new_tokens: int, cache_dtype, mesh=None,
                 chunk_steps: int = 32, refill: float = 0.125, compact: bool = True):
        if slots < 1:
            raise ValueError(f"the engine needs at least one slot, got slots={slots}")
        self.config, self.slots, self.columns, self.max_new_tokens = config, slots, columns, max_new_tokens
        self.cache_dtype, self.mesh = cache_dtype, mesh
        self.chunk_steps, self.refill, self.compact = chunk_steps, refill, compact
        self.widths = length_buckets(columns)
        multiple = 1 if mesh is None else parallel.batch_size_multiple(mesh)
        self.rows = row_buckets(slots, multiple) if compact else [slots]
        self.stats = EngineStats()

    def run(self, weights, requests: Sequence[Request], *, seed: int, temperature: float, top_p: float,
            top_k: int, stop_ids: Sequence[int], pad_id: int = 0):
        """All requests' completions, request-major then sample: (tokens, logprobs, finished) lists; a
        completion's tokens include the stop token that ended it. `pad_id` is unused (kept for `generate`'s
        signature): finished rows are cut to their length on the host."""
        self._check(requests)
        insert_jit, decode_jit, compact_jit, _ = programs(self.config)
        params = (np.float32(temperature), np.float32(top_p), np.int32(top_k), stop_array(stop_ids))
        seed = np.uint32(seed % 2**32)
        rows = self.rows[0]
        state = self._empty_state(rows)
        occupant: list = [None] * rows  # (request, sample) per slot
        column = np.zeros(rows, np.int64)  # each live row's next column, as of the last read
        queue = collections.deque(range(len(requests)))
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
                fits = min(len(free) // n, insert_buckets(self.slots, n)[-1])
                group = []
                while queue and len(group) < fits and requests[queue[0]].num_samples == n:
                    group.append(queue.popleft())
                if group:
                    state = self._insert(insert_jit, state, weights, requests, group, free, rows, P, seed, params)
                    for g, r in enumerate(group):
                        for j in range(n):
                            occupant[free[g * n + j]] = (r, j)
                            column[free[g * n + j]] = P
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
                state, steps = decode_jit(weights, state, np.int32(self.chunk_steps), np.int32(want_free),
                                          *params, width=width)
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
                    state = compact_jit(state, self._place(np.asarray(keep, np.int32)))
                occupant, column, rows = [occupant[i] for i in keep], column[keep], target
                stats.compactions += 1
        if tail_start is not None:
            stats.tail_s += time.perf_counter() - tail_start
        out = [results[(r, j)] for r, req in enumerate(requests) for j in range(req.num_samples)]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

    def _insert(self, insert_jit, state, weights, requests, group, free, rows, P, seed, params):
        n = requests[group[0]].num_samples
        I = next(b for b in insert_buckets(self.slots, n) if b >= len(group))
        ids, mask = np.zeros((I, P), np.int32), np.zeros((I, P), bool)
        request_ids, limits = np.zeros(I, np.int32), np.ones(I, np.int32)
        for g, r in enumerate(group):
            prompt = requests[r].prompt
            ids[g, P - len(prompt):], mask[g, P - len(prompt):] = prompt, True
            request_ids[g], limits[g] = r, requests[r].max_new_tokens
        slot_ids = np.full(I * n, rows, np.int32)  # `rows` = no slot (dropped)
        slot_ids[:len(group) * n] = free[:len(group) * n]
        with self._mesh_context():
            return insert_jit(weights, state, ids, mask, slot_ids, request_ids, limits, seed, *params,
                              num_samples=n)

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
        empty_jit = programs(self.config)[3]
        with self._mesh_context():
            return self._place(empty_jit(rows=rows, columns=self.columns, max_new_tokens=self.max_new_tokens,
                                         cache_dtype=self.cache_dtype))

    def _place(self, x):
        if self.mesh is None:
            return x
        return jax.tree.map(lambda a: jax.device_put(a, parallel.batch_sharding(self.mesh, a.ndim)), x)

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


def lower_engine_programs(config, weights, *, slots: int, columns: int, max_new_tokens: int,
                          num_samples: Sequence[int], prompt_buckets: Sequence[int], cache_dtype,
                          compact: bool = True, stops: int = STOP_SLOTS) -> dict:
    """Every program `Engine(config, slots=, columns=, max_new_tokens=, cache_dtype=, compact=).run` can call
    for requests of these sample counts whose longest prompt falls in `prompt_buckets`, lowered without any
    array: {name: jax.stages.Lowered}, named empty_B{slots}, insert_I{prompts}_P{bucket}_n{samples}, decode_B{rows}_W{width},
    compact_B{rows}_to{rows}. `weights`: the sampling layout (`abstract_sampling_weights`). Compiling them
    all leaves a run of the engine nothing to compile. One device (no mesh) for now. The KV the engine holds is
    slots × columns per layer (`kv_bytes`)."""
    insert_jit, decode_jit, compact_jit, empty_jit = programs(config)
    sds = jax.ShapeDtypeStruct
    scalar = lambda dtype: sds((), dtype)  # noqa: E731
    params = (scalar(np.float32), scalar(np.float32), scalar(np.int32), sds((stops,), np.int32))
    rows_list = row_buckets(slots) if compact else [slots]
    statics = dict(columns=columns, max_new_tokens=max_new_tokens, cache_dtype=cache_dtype)
    out = {f"empty_B{slots}": empty_jit.lower(rows=slots, **statics)}
    states = {rows: jax.eval_shape(functools.partial(empty_jit, rows=rows, **statics)) for rows in rows_list}
    for n in sorted(set(num_samples)):
        for I in insert_buckets(slots, n):
            for P in prompt_buckets:
                if P + 1 > columns:
                    continue
                for rows, state in states.items():  # an insertion happens only before the first compaction
                    if rows != slots:
                        continue
                    out[f"insert_I{I}_P{P}_n{n}"] = insert_jit.lower(
                        weights, state, sds((I, P), np.int32), sds((I, P), np.bool_), sds((I * n,), np.int32),
                        sds((I,), np.int32), sds((I,), np.int32), scalar(np.uint32), *params, num_samples=n)
    for rows, state in states.items():
        for width in length_buckets(columns):
            out[f"decode_B{rows}_W{width}"] = decode_jit.lower(weights, state, scalar(np.int32), scalar(np.int32),
                                                               *params, width=width)
        for smaller in rows_list:
            if smaller < rows:
                out[f"compact_B{rows}_to{smaller}"] = compact_jit.lower(state, sds((smaller,), np.int32))
    return out


def kv_bytes(config, slots: int, columns: int, cache_dtype) -> int:
    """Bytes of the engine's KV buffers: 2 × layers × slots × kv heads × columns × head dim."""
    return (2 * config.num_layers * slots * config.num_kv_heads * columns * config.head_dim
            * np.dtype(canonical_dtype(cache_dtype)).itemsize)
