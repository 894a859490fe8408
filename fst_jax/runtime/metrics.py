"""Run metrics: one JSON object per line in `WORKDIR/metrics.jsonl`, mirrored to TensorBoard, plus progress bars.

File format (what `read_metrics` and `launch/plot.py` rely on):
- one record per line, each a JSON object with at least `step` (int) and `kind` (the phase that wrote it:
  "train", "eval", "gepa", "cycle", ...), and `time` (unix seconds) unless disabled;
- numpy / jax scalars become Python numbers, arrays become (nested) lists;
- non-finite floats are written as the *strings* "nan", "inf", "-inf" — the file stays strict JSON (jq,
  pandas, other languages read it) and NaN stays distinguishable from ±inf. `read_metrics` turns exactly
  these three strings back into floats;
- fields whose name looks like a credential are masked (see `redact`), and so is any string containing the
  value of a credential-named environment variable.

Only process 0 (`jax.process_index() == 0`) writes; every other process's writer is a no-op.

Resume contract: a record at step s is written before the checkpoint of step s is saved. A run resumed from
the checkpoint at step s therefore opens the writer with `resume_step=s`: records with step > s (written by
the killed run after its last checkpoint, and about to be written again) are dropped, so the file matches
an uninterrupted run. A restart with no checkpoint passes `resume_step=-1` (drop everything);
`resume_step=None` appends without dropping anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REDACTED = "<redacted>"

# ---------------------------------------------------------------------------------------------------------
# Redaction: API keys must never reach a file (DESIGN §4). Names are split into words ("OPENAI_API_KEY",
# "apiKey", "hf-token" → api/key, hf/token) so that "max_tokens" or "keyword" survive but "api_key",
# "hf_token", "openaikey", "client_secret" do not.
_SENSITIVE_SUFFIXES = ("key", "token", "secret", "password", "passwd", "credential", "credentials")
_SENSITIVE_WORDS = frozenset({"secrets", "pwd", "auth", "authorization", "bearer", "cookie"})
_SECRET_PATTERN = re.compile(r"(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|Bearer\s+\S{8,})")
_MIN_ENV_SECRET_LEN = 8


def is_sensitive_name(name: str) -> bool:
    """True if a field called `name` may hold a credential (api_key, hfToken, client-secret, PASSWORD...)."""
    words = re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", str(name))
    for word in filter(None, words):
        word = word.lower()
        if word in _SENSITIVE_WORDS or word.endswith(_SENSITIVE_SUFFIXES):
            return True
    return False


# The shell's working directories: "pwd" reads as a password field, but $PWD is a path every path under it contains
_NOT_SECRETS = frozenset({"PWD", "OLDPWD"})


def _env_secrets() -> list[str]:
    return [v for k, v in os.environ.items()
            if is_sensitive_name(k) and len(v) >= _MIN_ENV_SECRET_LEN and k not in _NOT_SECRETS]


def _scrub(text: str, env_secrets: list[str]) -> str:
    if any(s in text for s in env_secrets) or _SECRET_PATTERN.search(text):
        return REDACTED
    return text


def redact(obj: Any, *, mask_numbers: bool = True) -> Any:
    """A copy of `obj` (nested dicts/lists) safe to write to disk.

    A field whose name looks like a credential (`is_sensitive_name`) has its value replaced by "<redacted>";
    None stays None (it shows the field was unset) and a nested dict/list under such a name is masked leaf by
    leaf. With `mask_numbers=False` numeric values of such fields are kept — metrics like "token_entropy" are
    numbers, never secrets. Independently of names, any string that contains the value of a credential-named
    environment variable (e.g. $OPENAI_API_KEY), or looks like an API key (sk-..., hf_...), is masked.
    """
    return _redact(obj, _env_secrets(), mask_numbers, sensitive=False)


def _redact(obj, env_secrets, mask_numbers, sensitive):
    if isinstance(obj, Mapping):
        return {k: _redact(v, env_secrets, mask_numbers, sensitive or is_sensitive_name(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_redact(v, env_secrets, mask_numbers, sensitive) for v in obj]
        return tuple(items) if type(obj) is tuple else items
    if obj is None:
        return None
    if sensitive and (mask_numbers or not isinstance(obj, (bool, int, float, np.number))):
        return REDACTED
    if isinstance(obj, bytes):
        obj = obj.decode("utf-8", "replace")
    if isinstance(obj, str):
        return _scrub(obj, env_secrets)
    return obj


# ---------------------------------------------------------------------------------------------------------
_NONFINITE_TO_STR = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_jsonable(obj: Any, *, nonfinite: str = "string", strict: bool = False, _path: str = "") -> Any:
    """Plain-JSON form of `obj`: numpy/jax scalars → numbers, arrays → lists, tuples → lists, dataclasses →
    dicts. `nonfinite="string"` writes NaN/±inf as "nan"/"inf"/"-inf"; `"keep"` leaves them as floats
    (Python's json then writes NaN/Infinity, which it reads back exactly). Unknown objects become `str(obj)`,
    or raise TypeError naming the path with `strict=True`."""
    kw = dict(nonfinite=nonfinite, strict=strict)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj) or nonfinite == "keep":
            return obj
        return "nan" if math.isnan(obj) else _NONFINITE_TO_STR[obj]
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, _path=f"{_path}/{k}", **kw) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, _path=f"{_path}/{i}", **kw) for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), _path=_path, **kw)
    if hasattr(obj, "__array__") and hasattr(obj, "shape") and hasattr(obj, "dtype"):  # np / jax arrays
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist(), _path=_path, **kw)
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict(), _path=_path, **kw)
    if strict:
        raise TypeError(f"{_path or 'value'}: {type(obj).__name__} is not JSON-serialisable; "
                        "store plain dicts/lists/strings/numbers")
    return str(obj)


def _restore_nonfinite(obj):
    if isinstance(obj, str):
        return _STR_TO_NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_nonfinite(v) for v in obj]
    return obj


def _process_index() -> int:
    import jax

    return jax.process_index()


# ---------------------------------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike, *, parse_nonfinite: bool = True) -> list[dict]:
    """Records of a metrics.jsonl file (or of `path/metrics.jsonl` when `path` is a workdir), in file order.

    A malformed *last* line — a record cut off when the writer was killed — is skipped with a warning; a
    malformed line anywhere else is a ValueError naming the file and line. With `parse_nonfinite`, the
    strings "nan"/"inf"/"-inf" become floats again."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[i + 1:]):
                log.warning("%s:%d: skipping a truncated last record (%s)", path, i + 1, e)
                break
            raise ValueError(f"{path}:{i + 1}: malformed metrics record ({e})") from None
        records.append(_restore_nonfinite(record) if parse_nonfinite else record)
    return records


def _keep_through_step(path: Path, resume_step: int) -> int:
    """Rewrite `path` keeping records with step <= resume_step (atomically: temp file + rename)."""
    kept, dropped = [], 0
    for record in read_metrics(path, parse_nonfinite=False):
        if isinstance(record.get("step"), int) and record["step"] > resume_step:
            dropped += 1
        else:
            kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Appends records to `WORKDIR/metrics.jsonl` and mirrors numeric fields to TensorBoard.

        with MetricsWriter(workdir, resume_step=restored_step) as writer:
            writer.write(step, "train", {"train/reward": r, "kl_to_base": kl}, method="fst", task="codeio")

    TensorBoard (`WORKDIR/tensorboard`, via tensorboardX when installed and `tensorboard=True`) gets every
    numeric field, tagged by its name if it contains "/" (e.g. "val/reward") else "<kind>/<name>"; on resume
    its events after `resume_step` are purged too. With `wandb` (config.log.wandb) enabled, a
    Weights & Biases run gets the same fields and `run_config` once (runtime/wandb_log.py). No-op on processes
    other than 0.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True,
                 timestamps: bool = True, process_index: int | None = None, wandb: Mapping[str, Any] | None = None,
                 run_config: Any = None):
        self.path = Path(workdir) / METRICS_FILE
        self.active = (_process_index() if process_index is None else process_index) == 0
        self._timestamps = timestamps
        self._file = None
        self._tb = None
        self.wandb = None  # a wandb_log.WandbRun when `wandb` (config.log.wandb) is enabled, on process 0
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if resume_step is not None:
                dropped = _keep_through_step(self.path, resume_step)
                if dropped:
                    log.info("%s: dropped %d records after resumed step %d", self.path, dropped, resume_step)
            else:
                self._cut_partial_last_line()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("tensorboardX not installed; metrics go to %s only", self.path)
            else:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR), purge_step=purge)
        if wandb is not None and wandb.get("enabled"):
            from fst_jax.runtime.wandb_log import WandbRun

            try:
                self.wandb = WandbRun.start(wandb, workdir, redact(to_jsonable(run_config or {})))
            except BaseException:
                self.close()
                raise

    def _cut_partial_last_line(self):
        # A killed writer can leave a record without its newline; appending after it would glue two records.
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: removing a truncated last record (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def write(self, step: int, kind: str, metrics: Mapping[str, Any] | None = None, **fields) -> dict | None:
        """Append one record {step, kind, time, **metrics, **fields}; return it as written (None if inactive)."""
        if not self.active:
            return None
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        record = {"step": int(step), "kind": str(kind)}
        if self._timestamps:
            record["time"] = round(time.time(), 3)
        record.update(metrics or {})
        record.update(fields)
        record = redact(to_jsonable(record), mask_numbers=False)
        # One write() of a whole line on an O_APPEND file: a crash leaves at most one partial last line.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._write_tensorboard(record)
        if self.wandb is not None:
            self.wandb.log(record)
        return record

    def _write_tensorboard(self, record):
        for name, value in _numeric_leaves(record):
            if name in ("step", "time"):
                continue
            tag = name if "/" in name else f"{record['kind']}/{name}"
            self._tb.add_scalar(tag, value, record["step"])

    def save_json(self, relative_path: str, obj: Any) -> Path | None:
        """Write `obj` (redacted, JSON) to WORKDIR/relative_path atomically — e.g. the population and GEPA
        candidates per cycle, "gepa/cycle_0003.json". Returns the path (None on processes other than 0)."""
        if not self.active:
            return None
        path = self.path.parent / relative_path
        if self.path.parent.resolve() not in path.resolve().parents:
            raise ValueError(f"{relative_path!r} is outside the workdir {self.path.parent}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(redact(to_jsonable(obj), mask_numbers=False), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def flush(self):
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _numeric_leaves(record, prefix=""):
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, (bool, int, float)):
            yield name, float(v)
        elif isinstance(v, str) and v in _STR_TO_NONFINITE:
            yield name, _STR_TO_NONFINITE[v]
        elif isinstance(v, dict):
            yield from _numeric_leaves(v, prefix=f"{name}/")


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, initial: int = 0,
             enabled: bool | None = None, **kwargs):
    """A tqdm progress bar, shown only on process 0 and only when stderr is a terminal (so logs of batch jobs
    and CI stay clean); `enabled` forces it on or off. Without tqdm installed, a silent stand-in."""
    if enabled is None:
        enabled = _process_index() == 0 and sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress(iterable)
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True,
                **kwargs)


class _NoProgress:
    def __init__(self, iterable=None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
