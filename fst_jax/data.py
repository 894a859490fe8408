"""Problem streams: seeded, repeating grain pipelines of batches, with look-ahead windows and exact resume.

    train, val = load_splits(task, "train.jsonl", fields={...}, val_fraction=0.05, seed=0)
    stream = ProblemStream(train, batch_size=32, seed=0)
    window = stream.window(6)          # the next 6 batches: GEPA optimises the population on these ...
    for _ in range(6):
        batch = stream.next_batch()    # ... and the next 6 RL steps train on exactly them, in order
    state = stream.get_state()         # JSON; ProblemStream(train, 32, 0).set_state(state) continues exactly

The pipeline (grain 0.2.18) runs over problem *indices*: `MapDataset.range(n).shuffle(seed).repeat()
.batch(B)`, read through an iterator whose state is `{"next_index": k}`. Shuffling before `repeat` gives a
fresh permutation every epoch; batches are always full and may straddle an epoch boundary. Batches are lists
of problem dicts (shared, treat them as read-only), so a problem can appear twice in a window that spans
epochs or when T·B exceeds the data.

`window(T)` pulls batches into a look-ahead buffer without consuming them; `next_batch()` consumes the
oldest buffered batch (pulling one if the buffer is empty). The state is the grain iterator's state after
the buffered batches plus the buffered batches' problem indices, so a run saved in the middle of a window
resumes with the same remaining batches.

Multi-process: every process builds the same stream (same data, same seed) and so sees the same *global*
batches and windows — which keeps GEPA's host-side decisions identical everywhere. `local(batch)` is this
process's contiguous, disjoint share of a global batch (process p of P gets rows [p·B/P, (p+1)·B/P)); the
shares of all processes concatenate to the global batch. We slice global batches rather than use grain's
per-process dataset sharding (`ShardOptions`) because the latter gives each process different problems, and
GEPA's window must be the same on every process.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fst_jax.tasks.base import Task
from fst_jax.tasks.io import DataError, PathLike, load_problems

STATE_VERSION = 1


def process_slice(batch: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
    """Process `process_index`'s contiguous share of a global batch (its length must divide evenly)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(batch) % process_count:
        raise ValueError(f"a batch of {len(batch)} problems does not split evenly over {process_count} processes")
    size = len(batch) // process_count
    return list(batch[process_index * size:(process_index + 1) * size])


class ProblemStream:
    """An endless, seeded stream of global batches of problems with a look-ahead window (module docstring).

    `process_index`/`process_count` default to `jax.process_index()`/`jax.process_count()`; they only
    affect `local()`.
    """

    def __init__(self, problems: Sequence[Mapping[str, Any]], batch_size: int, seed: int, *,
                 process_index: int | None = None, process_count: int | None = None):
        if not problems:
            raise DataError("cannot build a problem stream from no problems")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes "
                             f"({process_count}), so every process gets an equal share of each batch")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self._iterator = iter(self._dataset())
        self._buffer: deque[list[int]] = deque()
        self.batches_consumed = 0

    def _dataset(self):
        import grain

        # Indices, not records: cheap to batch and to record in the state. No worker threads: the work per
        # batch is a few index computations, and threads would only compete with JAX for the host.
        return (grain.MapDataset.range(len(self.problems)).shuffle(seed=self.seed).repeat()
                .batch(self.batch_size)
                .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def _pull(self) -> None:
        self._buffer.append([int(i) for i in next(self._iterator)])

    def _batch(self, indices: list[int]) -> list[Mapping[str, Any]]:
        return [self.problems[i] for i in indices]

    def next_batch(self) -> list[Mapping[str, Any]]:
        """Consume and return the next global batch (the oldest one in the look-ahead buffer, if any)."""
        if not self._buffer:
            self._pull()
        self.batches_consumed += 1
        return self._batch(self._buffer.popleft())

    def window(self, num_batches: int) -> list[list[Mapping[str, Any]]]:
        """The next `num_batches` global batches, without consuming them: `next_batch()` returns them next."""
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        while len(self._buffer) < num_batches:
            self._pull()
        return [self._batch(self._buffer[i]) for i in range(num_batches)]

    def local(self, batch: Sequence[Any]) -> list[Any]:
        """This process's share of a global batch."""
        return process_slice(batch, self.process_index, self.process_count)

    @property
    def buffered(self) -> int:
        """Batches pulled into the look-ahead window and not yet consumed."""
        return len(self._buffer)

    # ---- checkpointing -----------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, int]:
        return {"num_problems": len(self.problems), "batch_size": self.batch_size, "seed": self.seed}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: grain iterator state, buffered batches (indices), consumed count."""
        return {"version": STATE_VERSION, **self._fingerprint(),
                "iterator": json.loads(json.dumps(self._iterator.get_state())),
                "buffered": [list(b) for b in self._buffer], "batches_consumed": self.batches_consumed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the stream that produced `state` was. The data and settings must match."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"unsupported problem-stream state version {state.get('version')!r} "
                            f"(this code reads version {STATE_VERSION})")
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            diffs = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._fingerprint().items() if saved[k] != v)
            raise DataError(f"the problem stream cannot resume: the data or settings changed since the state "
                            f"was saved ({diffs})")
        buffered = [[int(i) for i in b] for b in state["buffered"]]
        if any(len(b) != self.batch_size or not all(0 <= i < len(self.problems) for i in b) for b in buffered):
            raise DataError("the saved problem-stream state has buffered batches that do not fit this data")
        self._iterator.set_state(dict(state["iterator"]))
        self._buffer = deque(buffered)
        self.batches_consumed = int(state["batches_consumed"])


def split_problems(problems: Sequence[Mapping[str, Any]], val_fraction: float,
                   seed: int) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """A deterministic (train, validation) split: round(fraction·n) problems, chosen by `seed`, held out.

    Both parts keep the original order. A positive fraction holds out at least one problem and leaves at
    least one for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(problems)
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    if n_val and n - n_val < 1:
        raise DataError(f"cannot hold out {val_fraction:.0%} of {n} problem(s) and still have some to train on")
    held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [p for i, p in enumerate(problems) if i not in held]
    val = [p for i, p in enumerate(problems) if i in held]
    return train, val


def load_splits(task: Task, train_files: PathLike | Sequence[PathLike], fields: Mapping[str, str] | None = None,
                *, val_files: PathLike | Sequence[PathLike] | None = None, val_fraction: float = 0.0,
                seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) problems: from separate files, or a seeded held-out fraction of the train files."""
    train = load_problems(train_files, task, fields)
    if val_files is not None:
        if val_fraction:
            raise ValueError("give either val_files or val_fraction, not both")
        return train, load_problems(val_files, task, fields)
    return split_problems(train, val_fraction, seed)


def _files(value, field: str):
    if not value:
        raise ValueError(f"{field} is empty: point it at local JSONL/Parquet problem files")
    return [os.path.expanduser(v.strip()) for v in value.split(",")] if isinstance(value, str) else value


def configured_problems(name: str, spec: Mapping[str, Any], task: Task, *, seed: int,
                        generated_seeds: tuple[int, int]) -> tuple[list[dict], list[dict]]:
    """(train, validation) problems of `config.tasks.<name>` (`spec`): from its local files (`train_files`,
    `fields`, `val_files` or `val_fraction`, split with `seed`), or, when `train_files` is empty, made by the
    task itself (synthetic tasks have `make_problems(n, seed)`: `num_train` and `num_val` problems from the
    two `generated_seeds`)."""
    if spec.get("train_files"):
        val_files = spec.get("val_files") or None
        fields = spec.get("fields")
        fields = (fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)) if fields else None
        return load_splits(task, _files(spec["train_files"], f"config.tasks.{name}.train_files"), fields or None,
                           val_files=val_files, val_fraction=0.0 if val_files else spec.get("val_fraction", 0.0),
                           seed=seed)
    if hasattr(task, "make_problems"):
        num_train, num_val = int(spec.get("num_train", 0)), int(spec.get("num_val", 0))
        if num_train < 1:
            raise ValueError(f"config.tasks.{name}: a generated task needs num_train ≥ 1 (and num_val for evals)")
        train_seed, val_seed = generated_seeds
        return task.make_problems(num_train, train_seed), task.make_problems(num_val, val_seed) if num_val else []
    raise ValueError(f"config.tasks.{name}.train_files is empty and task {task.name!r} cannot make its own "
                     "problems: point train_files at local JSONL/Parquet files")
