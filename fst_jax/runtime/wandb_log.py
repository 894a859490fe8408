"""Weights & Biases beside `metrics.jsonl` and TensorBoard (`config.log.wandb`, off by default; the `[wandb]` extra).

Turned on, process 0's `MetricsWriter` hands every record it writes to `WandbRun.log`: the numeric fields, named
as in TensorBoard ("val/reward" as is, a name without "/" as "<kind>/<name>"), plus `rl_step`, the record's RL
step. The run's config is logged once, at `wandb.init`, redacted like a checkpoint's copy (credential-named
fields and values that look like API keys masked).

Resume. `WORKDIR/wandb_run.json` keeps the W&B run id, so a resumed run (the same command again) continues
the *same* W&B run (`resume="allow"`). `metrics.jsonl` drops the killed run's records past the checkpoint it
resumes from; W&B cannot un-log them. We do not rewind (W&B's `resume_from`): it is a beta feature of the
server, so it cannot work offline, where a resumed run is a second local directory synced later. Instead every
chart's x axis is our own `rl_step` (`define_metric("*", step_metric="rl_step")`) and W&B's `_step` is a row
counter we own, saved in `wandb_run.json` before each row is logged: rows of a resumed run continue after the
killed run's rows (no row is rejected as "step not increasing", and the offline directories of one run hold
disjoint rows that `wandb sync` replays in order). The steps the killed run logged past its checkpoint are
logged again; our resume is exact (the records of a resumed run equal an uninterrupted run's, time aside), so
those points repeat the same values at the same `rl_step` and the curves are the uninterrupted run's.

A SIGKILL loses what W&B had not yet written: at most the last second of rows (W&B's own default is 15 s;
`metrics.jsonl` loses nothing). SIGTERM and Ctrl-C finish the W&B run on the way out and lose nothing.

Failures are one line: a missing package or login is found by `check_ready` when the config is validated,
before the model loads (the run stops: a user who asked for W&B wants to know before hours of training), and
a `wandb.init` that fails (network, permissions) stops the run as a `WandbError`.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("fst_jax")

__all__ = ["MODES", "RUN_FILE", "STEP_METRIC", "WandbError", "WandbRun", "check_ready", "wandb_metrics"]

RUN_FILE = "wandb_run.json"
STEP_METRIC = "rl_step"
MODES = ("", "online", "offline", "disabled")  # "": W&B's own choice (WANDB_MODE, `wandb offline`, else online)
INSTALL = "pip install '.[wandb]'"
FLUSH_SETTING = "x_transaction_log_flush_interval"


class WandbError(OSError):
    """W&B could not start a run (a network or permission problem reported by `wandb.init`)."""


def _mode(settings) -> str:
    return str(settings.get("mode") or os.environ.get("WANDB_MODE") or "online")


def _logged_in() -> bool:
    """Whether W&B will find credentials without asking: $WANDB_API_KEY, an identity token file, a netrc
    entry for the W&B host (what `wandb login` writes), or an api_key in W&B's settings file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    netrc_path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        if netrc.netrc(netrc_path).authenticators(host):
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    try:
        return "api_key" in (config_dir / "settings").read_text()
    except OSError:
        return False


def check_ready(settings) -> None:
    """Raise a one-line ValueError if `config.log.wandb` asks for W&B and W&B cannot run: the package missing,
    an unknown mode, or online mode without a login. Cheap (no network); called by `config.validate`."""
    if settings.get("mode", "") not in MODES:
        raise ValueError(f"config.log.wandb.mode must be one of {', '.join(repr(m) for m in MODES)}, got "
                         f"{settings.get('mode')!r}")
    if not settings.get("enabled"):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"config.log.wandb.enabled=True but the wandb package is not installed: {INSTALL} "
                         "(or turn it off: --config.log.wandb.enabled=false)") from None
    if _mode(settings) == "online" and not _logged_in():
        raise ValueError("config.log.wandb.enabled=True but W&B has no login here: run `wandb login` (or export "
                         "WANDB_API_KEY), or log offline with --config.log.wandb.mode=offline and upload later "
                         "with `wandb sync`")


def wandb_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The W&B row of one metrics record: numeric fields (nested dicts flattened with "/"), named as in
    TensorBoard, and `rl_step`. Strings (prompts, task names) and bookkeeping (`step`, `time`) stay out."""
    row: dict[str, float] = {}

    def visit(mapping, prefix):
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                visit(value, f"{name}/")
            elif name not in ("step", "time") and (isinstance(value, (bool, int, float))
                                                  or value in ("nan", "inf", "-inf")):  # non-finite as written
                row[name if "/" in name else f"{record['kind']}/{name}"] = float(value)

    visit(record, "")
    row[STEP_METRIC] = int(record["step"])
    return row


class WandbRun:
    """The W&B run of one workdir, started (or continued) by `WandbRun.start`; `log(record)` per metrics record."""

    def __init__(self, run, state_path: Path, rows: int):
        self.run, self._state_path, self._rows = run, state_path, rows

    @classmethod
    def start(cls, settings, workdir: str | os.PathLike, config: Mapping[str, Any]) -> "WandbRun":
        """Start the W&B run of `workdir`, or continue the one its `wandb_run.json` names. `settings` is
        `config.log.wandb`; `config` the redacted run config, logged once. Raises WandbError in one line."""
        import wandb

        workdir = Path(workdir)
        state_path = workdir / RUN_FILE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        run_id = state.get("id") or uuid.uuid4().hex[:8]
        files_dir = os.environ.get("WANDB_DIR") or str(workdir)
        # W&B's service writes its run file every 15 s and drops the unwritten part when our process is
        # SIGKILLed (a preemption, the OOM killer): write every second, where this W&B has the setting
        flush = {FLUSH_SETTING: 1.0} if FLUSH_SETTING in getattr(wandb.Settings, "model_fields", {}) else {}
        try:
            run = wandb.init(project=settings.get("project") or "fst_jax", entity=settings.get("entity") or None,
                             name=settings.get("name") or workdir.resolve().name, id=run_id, resume="allow",
                             dir=files_dir, mode=settings.get("mode") or None, config=dict(config),
                             settings=wandb.Settings(silent=True, **flush))  # the config: once per start
        except Exception as e:  # noqa: BLE001 - wandb's errors have no common base; the run stops in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WandbError(f"W&B could not start run {run_id} ({first}); check `wandb login` and the network, "
                             "or log offline: --config.log.wandb.mode=offline") from None
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        rows = max(int(state.get("rows", 0)), int(run.step or 0))
        self = cls(run, state_path, rows)
        self._save_state()
        where = (f"offline, in {Path(run.dir).parent} (upload: wandb sync {Path(run.dir).parent})" if run.offline
                 else run.url or "mode disabled: nothing is logged")
        log.info("W&B: %s run %s (%s) — %s", "continuing" if state else "started", run.name, run.id, where)
        return self

    def _save_state(self) -> None:
        tmp = self._state_path.with_name(f".{self._state_path.name}.tmp")
        tmp.write_text(json.dumps({"id": self.run.id, "project": self.run.project, "rows": self._rows}) + "\n")
        os.replace(tmp, self._state_path)

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one metrics record (already redacted and plain JSON) as the next W&B row."""
        row = wandb_metrics(record)
        if len(row) == 1:  # only rl_step: nothing to chart
            return
        step, self._rows = self._rows, self._rows + 1
        self._save_state()  # before the row: a kill in between leaves a gap, never a repeated row number
        self.run.log(row, step=step, commit=True)  # sent now, not held until the next row

    def close(self) -> None:
        """Finish the W&B run (uploads what is left in online mode)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
