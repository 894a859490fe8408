"""The run's config in its workdir (`WORKDIR/config.json`) and what a resume may change.

`config.json` is written atomically by process 0 when a run starts or resumes — after the resume check,
so a refused resume leaves it as it was: {"config": <the config, credentials redacted like a checkpoint's
copy>, "command": <the command line>, "fst_jax_version", "host", "written_at", "resumed_at_step",
"config_changes"}. `launch/plot.py` and the compare report read a run's method and task from it.

A resume compares the new config with the copy saved in the checkpoint it restores (and, before the weights
load, with `config.json`, so a refusal costs seconds). A field absent from the older config counts as its
default in `default_config()`, so fields added to the project later do not refuse old runs.

- Accepted, and logged (the `config` record's `config_changes`): what changes how a run computes or where it
  writes, not what — `ACCEPTED` below: the mesh, micro-batch and chunk sizes, sampler rows/slots/buckets,
  the attention kernel, remat, the evaluation cadence, logging, checkpointing, `total_steps`, how a hosted
  reflection LM is reached, a task the run does not use, and moved paths (`model.path`, a task's
  `train_files`/`val_files` whose file names stay the same).
- Refused, in one line listing each field as old → new: everything else — the model, task and data, the
  recipe's numbers, seeds, the method. `--allow_config_change` resumes anyway, and the changes are logged.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Mapping
from typing import Any

from fst_jax.runtime.metrics import REDACTED

log = logging.getLogger("fst_jax")

__all__ = ["ACCEPTED", "CONFIG_NAME", "ConfigChangeError", "check_resume", "check_workdir", "compare", "flatten",
           "read_config_json", "snapshot", "write_config_json"]

CONFIG_NAME = "config.json"

# (field pattern, why a resume may change it). Patterns are fnmatch patterns over dotted field paths.
ACCEPTED: tuple[tuple[str, str], ...] = (
    ("mesh.*", "the mesh (a checkpoint restores on any topology)"),
    ("model.remat", "rematerialisation"),
    ("model.attention", "the attention kernel"),
    ("model.preset", "the dry run's shapes"),
    ("plan.*", "the dry run's cost model"),
    ("rl.micro_batch_size", "micro-batching"),
    ("rl.logprob_chunk_size", "chunking"),
    ("sampling.max_rows", "sampler rows"),
    ("sampling.*slots*", "sampler slots"),
    ("sampling.*chunk*", "sampler chunks"),
    ("*bucket*", "length buckets"),
    ("sampling.min_prompt_tokens", "the planned prompt buckets"),
    ("sampling.max_prompt_tokens", "a buffer size"),
    ("gepa.reflection.max_prompt_tokens", "a buffer size"),
    ("eval.every", "the evaluation cadence"),
    ("eval.at_start", "the evaluation cadence"),
    ("log.*", "logging"),
    ("wandb.*", "logging"),
    ("checkpoint.*", "checkpointing"),
    ("init_from", "read by a fresh start only"),
    ("total_steps", "the run's length"),  # stages are `schedule`'s own numbers; the last one runs to the end
    ("gepa.reflection.base_url", "where the reflection LM is reached"),
    ("gepa.reflection.api_key_env", "where the reflection LM is reached"),
    ("gepa.reflection.timeout_s", "where the reflection LM is reached"),
    ("gepa.reflection.max_retries", "where the reflection LM is reached"),
    ("gepa.reflection.max_concurrency", "where the reflection LM is reached"),
    ("gepa.reflection.max_consecutive_failures", "where the reflection LM is reached"),
)
# Paths that may move: accepted when the file (or directory) names stay the same.
MOVABLE = ("model.path", "tasks.*.train_files", "tasks.*.val_files")


class ConfigChangeError(ValueError):
    """A resume with a config that changes what the run computes; one line, old → new per field."""


def snapshot(config: Any) -> dict:
    """The config as the checkpoint saves it: plain JSON, credentials redacted."""
    from fst_jax.runtime.checkpoint import config_snapshot

    return config_snapshot(config)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested mapping (lists and other values are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _default_flat() -> dict[str, Any]:
    from fst_jax.config import default_config

    return flatten(snapshot(default_config()))


def _used_tasks(flat: Mapping[str, Any]) -> set[str]:
    names = {str(flat.get("task") or "")}
    for part in str(flat.get("schedule") or "").split(","):
        names.add(part.strip().partition(":")[0])
    names |= {n.strip() for n in str(flat.get("forgetting_tasks") or "").split(",")}
    return {n for n in names if n}


def _file_names(value: Any) -> list[str]:
    return [os.path.basename(os.path.normpath(p.strip())) for p in str(value or "").split(",") if p.strip()]


def _rule(path: str, old: Any, new: Any, used: set[str]) -> str | None:
    """Why a change of `path` is accepted, or None when it is refused."""
    for pattern, why in ACCEPTED:
        if fnmatch.fnmatchcase(path, pattern):
            return why
    if path.startswith("tasks.") and path.split(".")[1] not in used:
        return "a task the run does not use"
    if any(fnmatch.fnmatchcase(path, p) for p in MOVABLE) and _file_names(old) == _file_names(new):
        return "a moved path (same file names)"
    return None


def compare(saved: Mapping, config: Any) -> list[dict[str, Any]]:
    """Each field whose value differs between `saved` (an older run's config snapshot) and `config`:
    {"field", "old", "new", "accepted": why, or None when a resume must refuse it}. A field absent from
    either side counts as its default."""
    defaults = _default_flat()
    old, new = flatten(dict(saved)), flatten(snapshot(config))
    used = _used_tasks(old) | _used_tasks(new)
    changes = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path, defaults.get(path)), new.get(path, defaults.get(path))
        if a == b or (a in (None, {}) and b in (None, {})):
            continue
        # a value masked on one side only (an older copy masked more, e.g. paths under $PWD) cannot be judged
        why = "masked in one copy" if REDACTED in (a, b) else _rule(path, a, b, used)
        changes.append({"field": path, "old": a, "new": b, "accepted": why})
    return changes


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "(unset)"
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(saved: Mapping | None, config: Any, *, allow: bool = False, workdir: str = "",
                 source: str = "its checkpoint") -> list[dict]:
    """Compare a resumed run's `config` with the `saved` snapshot (from `source`) of the run in `workdir`.

    Returns the changes to log (accepted ones, and with `allow` the refused ones too, marked "allowed by
    --allow_config_change"); raises `ConfigChangeError` naming every refused field old → new otherwise.
    `saved` None (a checkpoint written before configs were saved) checks nothing."""
    if saved is None:
        log.warning("resume: %s in %s holds no config to compare with; the run continues unchecked", source, workdir)
        return []
    changes = compare(saved, config)
    refused = [c for c in changes if c["accepted"] is None]
    if refused and not allow:
        fields = "; ".join(f"config.{c['field']}: {_show(c['old'])} → {_show(c['new'])}" for c in refused)
        raise ConfigChangeError(
            f"cannot resume {workdir}: the config changes what its run computes (compared with {source}): "
            f"{fields}; rerun with the original values, start a new run in another --workdir, or pass "
            "--allow_config_change to resume anyway (the change is logged in metrics.jsonl)")
    logged = []
    for c in changes:
        why = c["accepted"] or "allowed by --allow_config_change"
        (log.warning if c["accepted"] is None else log.info)("resume: config.%s changed %s → %s (%s)", c["field"],
                                                              _show(c["old"]), _show(c["new"]), why)
        logged.append({"field": c["field"], "old": c["old"], "new": c["new"], "accepted": why})
    return logged


def read_config_json(workdir: str) -> dict | None:
    """WORKDIR/config.json as written by `write_config_json` (None when absent or unreadable)."""
    try:
        with open(os.path.join(os.path.expanduser(workdir), CONFIG_NAME)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _has_checkpoint(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return False
    return any(name.isdigit() and os.path.isfile(os.path.join(directory, name, "_CHECKPOINT_METADATA"))
               for name in os.listdir(directory))


def check_workdir(workdir: str, config: Any, *, allow: bool = False) -> None:
    """Before the weights load: refuse (`ConfigChangeError`) a resume whose config changes what the run in
    `workdir` computes, judged against its config.json. Nothing to check for a workdir without a checkpoint
    or a config.json; the restore checks the checkpoint's own copy again."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    doc = read_config_json(workdir)
    if doc is None or not isinstance(doc.get("config"), dict) or not _has_checkpoint(workdir):
        return
    if not allow and any(c["accepted"] is None for c in compare(doc["config"], config)):
        check_resume(doc["config"], config, workdir=workdir, source=f"its {CONFIG_NAME}")


def write_config_json(workdir: str, config: Any, *, resumed_at_step: int | None = None,
                      changes: list[dict] | None = None, command: list[str] | None = None) -> str | None:
    """Write WORKDIR/config.json atomically (process 0 only; returns its path there, None elsewhere)."""
    import jax

    import fst_jax
    from fst_jax.runtime.metrics import redact

    if jax.process_index() != 0:
        return None
    argv = redact(list(sys.argv if command is None else command))  # an argument holding a key: "<redacted>"
    python = ["python"] if argv and argv[0].endswith(".py") else []
    doc = redact({"config": snapshot(config), "command": argv, "command_line": shlex.join(python + argv),
                  "fst_jax_version": fst_jax.__version__, "host": socket.gethostname(),
                  "written_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "resumed_at_step": resumed_at_step, "config_changes": changes or []})
    path = os.path.join(workdir, CONFIG_NAME)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
