"""Checkpoints: everything a run needs to continue exactly, in `WORKDIR/checkpoints/<step>/`.

Each step is one orbax composite:
- `state/` — the array pytree (params, optimizer state, step, RNG key; any jax pytree incl. `nnx.State`),
  `StandardSave`; restored into abstract targets carrying the *current* shardings, so a run can resume on
  a different mesh.
- `meta/`  — JSON: {"format": {"schema_version", "step"}, "meta": <GEPA state, population, counters...>,
  "config": <redacted config snapshot>}.
- `data/`  — JSON: the data stream's state (`stream.get_state()`, e.g. grain's {"next_index": n}), or null.

Saves are atomic (orbax writes `<step>.orbax-checkpoint-tmp*` and renames on commit; leftovers of a killed
save are ignored and cleaned up) and asynchronous (`save` blocks only while orbax copies the arrays to host
memory, then writes in the background, so the caller may donate or delete them right after; `wait()` and
`close()` finish the write). The last `max_to_keep` steps are kept.

A latest step that cannot be read (no `_CHECKPOINT_METADATA`, a missing item, a truncated or deleted array
file, malformed JSON) is skipped by `restore_latest` with a warning naming the step and the reason; after an
older step restores, the bad ones are renamed `<step>.corrupt` (kept for inspection, invisible to orbax) so
the resumed run can save those steps again. A checkpoint that reads fine but does not fit the target (shapes,
tree structure: the model or optimizer changed) is a `CheckpointMismatchError`, never a silent fallback.

A save that fails to write (a full disk, a directory gone read-only) raises `CheckpointWriteError` from
`save`/`wait`/`close` in one line naming the step, the cause and the latest complete step; the failed step
stays a `.orbax-checkpoint-tmp` leftover, so the previous checkpoint remains the one a rerun resumes from.
Orbax's own error logs and its threads' tracebacks for such a failure (and for a damaged step being read)
are kept off the console: the exception carries what matters.

Multi-process: every process calls `save`/`restore_latest`; orbax coordinates the array writes, JSON is
written by process 0 only (so `meta` and `data` must be the same on every process, as they are when every
process runs the same host loop with the same seed), and processes agree on whether a step is usable.

One concept in ~400 lines on purpose: save, the fallback over damaged steps and the multi-process agreement
share the same step bookkeeping, and splitting them would spread one invariant over several files.
Credentials are never written: `meta`, `data` and the config snapshot pass through `redact`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fst_jax.runtime.metrics import redact, to_jsonable
from fst_jax.runtime.storage_errors import CheckpointError, is_disk_full, quiet_orbax_errors, root_cause, stderr_swallowed

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatchError", "CheckpointWriteError", "Restored",
           "SCHEMA_VERSION", "abstract_like", "config_snapshot", "redact"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"
_ITEMS = ("state", "meta", "data")
_STEP_METADATA = "_CHECKPOINT_METADATA"
# orbax's wording when a readable checkpoint does not fit the restore target (orbax-checkpoint 0.12.8).
_MISMATCH_MARKERS = ("is not compatible with the stored shape", "tree structures do not match")


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is readable but does not fit the state being restored (shapes, structure, version)."""


class CheckpointWriteError(CheckpointError):
    """A save failed (a full disk, a read-only or vanished directory); the steps saved before are intact."""


class _Unreadable(Exception):
    """A step that orbax cannot read back: the reason goes into the warning."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any                 # the array pytree, laid out with the target's shardings
    meta: dict                 # what was passed as `meta=`
    data: dict | None          # the data stream's state, for `stream.set_state(...)`
    config: dict | None        # the redacted config snapshot saved with the step


def _replicated():
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("replica",)),
                                      jax.sharding.PartitionSpec())


def abstract_like(tree: Any) -> Any:
    """`tree` with each array replaced by a ShapeDtypeStruct carrying its *current* sharding — the restore
    target. ShapeDtypeStructs without a sharding get a fully replicated one."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated())
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated())
        return x
    return jax.tree.map(leaf, tree)


# On several processes orbax saves only global arrays, but a step counter or an RNG key made with
# `jnp.asarray`/`jax.random.key` lives on one local device. Such host-local leaves (the same value on every
# process, as every process runs the same loop with the same seed) are saved as replicated global arrays
# and restored back onto the target's local sharding.
def _globalize(x):
    if not (isinstance(x, jax.Array) and x.is_fully_addressable):
        return x
    whole = jax.device_put(x, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return jax.make_array_from_single_device_arrays(
        x.shape, _replicated(), [jax.device_put(whole, d) for d in jax.local_devices()])


def _global_target(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding.is_fully_addressable:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated())
    return x


def _localize(restored, target):
    if isinstance(target, jax.ShapeDtypeStruct) and target.sharding.is_fully_addressable:
        return jax.device_put(restored.addressable_data(0), target.sharding)
    return restored


def config_snapshot(config: Any) -> dict:
    """A JSON-ready, credential-free copy of a config (ml_collections.ConfigDict, dataclass or dict)."""
    return redact(to_jsonable(config))


def _masked_paths(before, after, path=""):
    if isinstance(before, dict) and isinstance(after, dict):
        return [p for k in before for p in _masked_paths(before[k], after.get(k), f"{path}/{k}")]
    if isinstance(before, list) and isinstance(after, list):
        return [p for i, (b, a) in enumerate(zip(before, after)) for p in _masked_paths(b, a, f"{path}/{i}")]
    return [] if before == after or before != before else [path or "/"]  # before != before: NaN


def _safe_json(obj: Any, what: str) -> Any:
    plain = to_jsonable(obj, nonfinite="keep", strict=True, _path=what)
    clean = redact(plain, mask_numbers=False)
    masked = _masked_paths(plain, clean)
    if masked:
        log.warning("checkpoint %s: masked %s (they look like credentials); keep secrets out of run state",
                    what, ", ".join(masked))
    return clean


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0].rstrip(". ")  # the rest is a bound-method repr
    text = text if len(text) <= 240 else text[:240] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
    """Saves and restores {state, meta, data} per step under `WORKDIR/checkpoints`.

        ckpt = Checkpointer(workdir, max_to_keep=3, save_interval_steps=50)
        restored = ckpt.restore_latest(abstract_like(state))      # None on a fresh workdir
        ...
        ckpt.save(step, state, meta={"gepa": gepa.to_dict(), ...}, data=stream, config=config)
        ckpt.close()

    `read_only=True` reads another run's checkpoints (e.g. `init_from`) without saving, cleaning up, or
    renaming anything there.
    """

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True, read_only: bool = False, directory: str | os.PathLike | None = None):
        self.directory = Path(directory if directory is not None else Path(workdir) / CHECKPOINT_DIR).absolute()
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            read_only=read_only, create=not read_only)
        quiet_orbax_errors()
        self._pending: list[int] = []  # steps whose (asynchronous) save has started but is not known done
        self._failed = False
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointWriteError(f"cannot use checkpoint directory {self.directory}: "
                                       f"{e.strerror or e}") from e

    # -- saving -------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, meta: Mapping[str, Any] | None = None, data: Any = None,
             config: Any = None, force: bool = False) -> bool:
        """Start saving `step` in the background (`wait()` for the disk).

        Skipped (returns False) unless `step` is on the `save_interval_steps` grid or `force=True`, or when a
        step ≥ `step` is already saved. `data` is a JSON dict or an object with `get_state()`. Everything in
        `meta`/`data` must be JSON-able (numbers, strings, lists, dicts, numpy scalars); NaN/inf round-trip.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save step {step}")
        step = int(step)
        if force and step in self._manager.all_steps():
            raise CheckpointError(f"step {step} is already saved in {self.directory}")
        if data is not None and not isinstance(data, Mapping) and hasattr(data, "get_state"):
            data = data.get_state()
        meta_doc = {
            "format": {"schema_version": SCHEMA_VERSION, "step": step},
            "meta": _safe_json(dict(meta or {}), "meta"),
            "config": None if config is None else config_snapshot(config),
        }
        data_doc = None if data is None else _safe_json(data, "data")
        if jax.process_count() > 1:
            state = jax.tree.map(_globalize, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta_doc),
                                  data=ocp.args.JsonSave(data_doc))
        self.wait()  # the previous write (long done, a cycle ago): a failure there is reported as its own step
        self._pending.append(step)
        try:
            started = bool(self._manager.save(step, args=args, force=force))
        except Exception as e:  # this save, or an earlier asynchronous one, failed to write
            self._write_failed(e)
        if not started:
            self._pending.remove(step)
        return started

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(int(step))

    def wait(self):
        """Block until every started save is on disk. A failed write raises `CheckpointWriteError` (one
        line: which step, why, and the latest complete step, which is intact)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._write_failed(e)
        self._pending.clear()

    def close(self):
        """Finish the started saves (raising `CheckpointWriteError` if one failed) and release orbax."""
        if self._failed:  # already reported: tear down quietly
            with stderr_swallowed(), contextlib.suppress(Exception):
                self._manager.close()
            return
        try:
            self.wait()
        finally:
            if not self._failed:
                self._manager.close()

    def _write_failed(self, e: BaseException):
        self._failed = True
        step = self._pending[-1] if self._pending else None
        with stderr_swallowed(), contextlib.suppress(Exception):
            self._manager.close()  # stop the other writer threads of the failed save
        complete = self.complete_steps()
        kept = (f"the latest complete checkpoint is step {complete[-1]} (intact)" if complete
                else "no complete checkpoint was written yet")
        cause = root_cause(e)
        if is_disk_full(e):
            why, todo = "the disk is full", "free space (or point --workdir at a larger disk)"
        else:
            why, todo = _short(cause), "fix that"
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        raise CheckpointWriteError(f"could not write {what} to {self.directory}: {why}; {kept}; "
                                   f"{todo} and rerun the same command to resume") from e

    def complete_steps(self) -> list[int]:
        """Steps on disk with orbax's commit marker, read from the directory (the manager may be closed)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and (p / _STEP_METADATA).is_file())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inspecting ---------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps present on disk (a corrupt step is listed until `restore_latest` sets it aside)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # -- restoring ----------------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore `step` into `abstract_state` (ShapeDtypeStructs with shardings, or arrays whose current
        shardings are used). Raises CheckpointError if the step is missing or unreadable."""
        self.wait()
        self._manager.reload()
        step = int(step)
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {self.all_steps() or 'none'})")
        try:
            return self._restore_agreed(step, abstract_like(abstract_state))
        except _Unreadable as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {e}") from None

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """Restore the newest usable step; None when there is no checkpoint at all (a fresh run).

        Unreadable newer steps are skipped with a warning and then renamed `<step>.corrupt`. Raises
        CheckpointError when steps exist but none is usable, and CheckpointMismatchError when a readable
        step does not fit `abstract_state`."""
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if jax.process_count() > 1:  # a shared file system can list late on some hosts: process 0's list rules
            from fst_jax.runtime.distributed import broadcast_json

            steps = broadcast_json(steps)
        if not steps:
            return None
        target = abstract_like(abstract_state)
        bad = []
        for step in steps:
            try:
                restored = self._restore_agreed(step, target)
            except _Unreadable as e:
                bad.append((step, str(e)))
                continue
            if bad:  # one warning line for the whole fallback
                moved = self._set_aside([s for s, _ in bad])
                log.warning("unusable checkpoint in %s (%s); resuming from step %d%s", self.directory,
                            "; ".join(f"step {s}: {why}" for s, why in bad), step,
                            f" (the unusable one set aside as {', '.join(moved)})" if moved else "")
            return restored
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in bad)
            + ". Move the directory away to start fresh, or repair it.")

    def _restore_agreed(self, step: int, target: Any) -> Restored:
        error = None
        try:
            restored = self._restore_step(step, target)
        except _Unreadable as e:
            error = e
        # On several processes a truncated shard may be seen by one process only: all fall back together.
        if not _all_processes_agree(error is None):
            raise error or _Unreadable("unreadable on another process")
        return restored

    def _restore_step(self, step: int, target: Any) -> Restored:
        step_dir = self.directory / str(step)
        if not (step_dir / _STEP_METADATA).is_file():
            raise _Unreadable(f"missing {_STEP_METADATA}: not a finished orbax checkpoint")
        missing = [item for item in _ITEMS if not (step_dir / item).is_dir()]
        if missing:
            raise _Unreadable(f"missing item director{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)}")
        multi = jax.process_count() > 1
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(_global_target, target) if multi else target),
            meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore())
        try:
            with stderr_swallowed():
                out = self._manager.restore(step, args=args)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            if any(marker in str(e) for marker in _MISMATCH_MARKERS):
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {self.directory} does not fit the state being restored "
                    f"(did the model, optimizer or their config change?): {e}") from e
            raise _Unreadable(_short(e)) from e
        meta_doc = out["meta"]
        fmt = meta_doc.get("format") if isinstance(meta_doc, dict) else None
        if not isinstance(fmt, dict) or not isinstance(fmt.get("schema_version"), int):
            raise _Unreadable("meta has no format/schema_version")
        if fmt["schema_version"] > SCHEMA_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} has schema version {fmt['schema_version']}, newer "
                f"than this fst_jax's {SCHEMA_VERSION}; upgrade fst_jax to resume it")
        state = jax.tree.map(_localize, out["state"], target) if multi else out["state"]
        return Restored(step=step, state=state, meta=meta_doc.get("meta") or {}, data=out["data"],
                        config=meta_doc.get("config"))

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename unusable steps `<step>.corrupt` (invisible to orbax); the new names."""
        moved = []
        if self.read_only:
            return moved
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
                n = 1
                while dst.exists():
                    dst, n = self.directory / f"{step}{CORRUPT_SUFFIX}{n}", n + 1
                if src.exists():
                    os.rename(src, dst)
                    moved.append(dst.name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("fst_jax.runtime.checkpoint.set_aside")
        self._manager.reload()
        return moved
