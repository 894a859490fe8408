"""A run as its records: loading `metrics.jsonl`, the series of a metric against steps or rollouts, the step a
curve first reaches a value, the paper's 4-parameter sigmoid fit, the stages of a continual run, and the
per-run summary `launch/plot.py` prints (final, peak, steps and rollouts to the reference run's peak)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from fst_jax.runtime.metrics import read_metrics

__all__ = ["Run", "load_run", "number", "rollouts", "series", "first_reaching", "sigmoid", "fit_sigmoid",
           "stages", "pick_metrics", "summarize", "DEFAULT_METRICS"]


DEFAULT_METRICS = ("val/reward", "val/reward_seed", "train/reward", "kl_to_base")
BOOKKEEPING = frozenset({"step", "time", "rl_rollouts", "gepa_rollouts"})
ROLLOUT_FIELDS = ("rl_rollouts", "gepa_rollouts")


@dataclasses.dataclass
class Run:
    label: str
    method: str | None
    records: list[dict]
    config: dict | None = None  # the run's config from WORKDIR/config.json (None for runs older than it)


def load_run(workdir: str, label: str | None = None) -> Run:
    """A workdir's records, its config (WORKDIR/config.json) and its method: the config's, else the records'."""
    from fst_jax.trainer.run_config import read_config_json

    records = sorted(read_metrics(workdir), key=lambda r: r.get("step", 0))  # stable: file order within a step
    doc = read_config_json(workdir) or {}
    config = doc.get("config") if isinstance(doc.get("config"), dict) else None
    methods = [r["method"] for r in records if isinstance(r.get("method"), str)]
    method = config.get("method") if config and isinstance(config.get("method"), str) else \
        (methods[-1] if methods else None)
    return Run(label or Path(workdir).resolve().name, method, records, config)


def number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rollouts(record: dict) -> float | None:
    counts = [number(record.get(f)) for f in ROLLOUT_FIELDS if f in record]
    return sum(c for c in counts if c is not None) if counts else None


def series(records: list[dict], metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of the finite values of `metric`; x is "step" or "rollouts". The last record wins per x."""
    points = {}
    for record in records:
        y = number(record.get(metric))
        xv = rollouts(record) if x == "rollouts" else number(record.get(x))
        if y is not None and xv is not None:
            points[xv] = y
    xs = np.array(sorted(points), dtype=float)
    return xs, np.array([points[v] for v in xs], dtype=float)


def first_reaching(xs: np.ndarray, ys: np.ndarray, target: float) -> float | None:
    hits = np.nonzero(ys >= target)[0]
    return float(xs[hits[0]]) if hits.size else None


def sigmoid(c, r0, a, c_mid, b):
    return r0 + (a - r0) / (1.0 + (c_mid / c) ** b)


def fit_sigmoid(xs: np.ndarray, ys: np.ndarray) -> dict | None:
    """Least-squares fit of R(C) over C = xs > 0; None with fewer than 5 points or when it does not converge."""
    keep = xs > 0
    xs, ys = xs[keep], ys[keep]
    if xs.size < 5 or np.ptp(ys) == 0:
        return None
    from scipy.optimize import curve_fit

    span = float(np.ptp(ys))
    p0 = [float(ys[0]), float(ys.max()), float(np.median(xs)), 1.0]
    lower = [float(ys.min()) - 10 * span, float(ys.min()) - 10 * span, float(xs.min()) * 1e-3, 1e-2]
    upper = [float(ys.max()) + 10 * span, float(ys.max()) + 10 * span, float(xs.max()) * 1e3, 20.0]
    try:
        params, _ = curve_fit(sigmoid, xs, ys, p0=p0, bounds=(lower, upper), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return dict(zip(("r0", "a", "c_mid", "b"), map(float, params)))


def stages(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Consecutive runs of records with the same `task` (records without one join the current stage)."""
    out = []
    for record in records:
        task = record.get("task")
        if out and (task is None or task == out[-1][0]):
            out[-1][1].append(record)
        else:
            out.append((task, [record]))
    return [(task, recs) for task, recs in out if task is not None]


def pick_metrics(runs: list[Run], requested: str | None) -> list[str]:
    if requested:
        return [m.strip() for m in requested.split(",") if m.strip()]
    present = {k for run in runs for r in run.records for k, v in r.items() if number(v) is not None}
    chosen = [m for m in DEFAULT_METRICS if m in present]
    return chosen or sorted(present - BOOKKEEPING)[:8]


def summarize(runs: list[Run], reward: str, reference: str | None) -> list[str]:
    ref = next((r for r in runs if r.label == reference), None) if reference else \
        next((r for r in runs if r.method == "rl"), None)
    if reference and ref is None:
        raise SystemExit(f"--reference {reference!r} is not one of the runs: {[r.label for r in runs]}")
    peak = None
    if ref is not None:
        _, ref_ys = series(ref.records, reward)
        peak = float(ref_ys.max()) if ref_ys.size else None
    ref_steps = ref_rollouts = None
    lines = [f"reward metric: {reward}" + (f"; reference: {ref.label} (peak {peak:.4g})" if peak is not None
                                           else "; no reference run (none has method 'rl'; see --reference)")]
    header = f"{'run':<20} {'method':<7} {'last step':>9} {'final':>8} {'peak':>8} {'steps→ref peak':>15} " \
             f"{'rollouts→ref peak':>18} {'asymptote A':>12}"
    rows = []
    for run in runs:
        xs, ys = series(run.records, reward)
        if not ys.size:
            rows.append((run, None))
            continue
        steps = first_reaching(xs, ys, peak) if peak is not None else None
        rxs, rys = series(run.records, reward, x="rollouts")
        rolls = first_reaching(rxs, rys, peak) if peak is not None and rxs.size else None
        if run is ref:
            ref_steps, ref_rollouts = steps, rolls
        rows.append((run, dict(last=xs[-1], final=ys[-1], peak=ys.max(), steps=steps, rolls=rolls,
                               fit=fit_sigmoid(xs, ys))))
    lines.append(header)
    for run, row in rows:
        if row is None:
            lines.append(f"{run.label:<20} {run.method or '-':<7} (no '{reward}' values)")
            continue
        lines.append(f"{run.label:<20} {run.method or '-':<7} {row['last']:>9.0f} {row['final']:>8.4g} "
                     f"{row['peak']:>8.4g} {_reach(row['steps'], ref_steps, peak):>15} "
                     f"{_reach(row['rolls'], ref_rollouts, peak):>18} "
                     f"{(format(row['fit']['a'], '.4g') if row['fit'] else 'n/a'):>12}")
    return lines


def _reach(value, ref_value, peak) -> str:
    if peak is None:  # no reference run: nothing to reach
        return "-"
    if value is None:
        return "not reached"
    if ref_value and value > 0:
        return f"{value:.0f} ({ref_value / value:.2g}x)"
    return f"{value:.0f}"
