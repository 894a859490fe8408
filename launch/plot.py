"""Plot and compare runs from their `WORKDIR/metrics.jsonl` (one line per run).

    python launch/plot.py runs/fst runs/rl --out plot.png
    python launch/plot.py runs/fst runs/rl --metrics val/reward,kl_to_base --labels FST,RL --out cmp.png

`--out` gets one row per metric: the metric against RL steps and against total rollouts (RL + GEPA, when the
records count them), and a last row with KL to base against reward (`kl_to_base` is measured under the seed
prompt for every method, so FST, RL and GEPA-only share the conditioning; `--kl kl_to_base_best` draws the KL
under each run's best prompt instead). A continual run (its records' `task`
changes) also gets `<out stem>_stages.png`: the reward per stage, against steps since the stage began.

Printed, per run (the paper's measures): final and peak reward; the steps and rollouts it needs to
reach the reference run's running peak (the run whose `method` is "rl", or `--reference`); and the asymptote
A of the 4-parameter sigmoid R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) fitted to reward against steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fst_jax.analysis.runs import (Run, fit_sigmoid, first_reaching, load_run, number, pick_metrics,  # noqa: E402,F401
                                   rollouts, series, sigmoid, stages, summarize, DEFAULT_METRICS)

def learned_prompt(run: Run) -> str | None:
    """The population's best prompt at the run's last GEPA cycle (None for a run that never evolved prompts)."""
    populations = [r["population"] for r in run.records if isinstance(r.get("population"), list) and r["population"]]
    return str(populations[-1][0]) if populations else None


def _title(runs: list[Run]) -> str:
    def one(run):
        tasks = list(dict.fromkeys(r["task"] for r in run.records if isinstance(r.get("task"), str)))
        steps = max((r.get("step", 0) for r in run.records if r.get("kind") == "train"), default=0)
        return f"{run.label}: {(run.method or '?').upper()} on {' → '.join(tasks) or '?'}, {steps} RL steps"

    return "\n".join(one(run) for run in runs) if len(runs) <= 3 else " vs ".join(r.label for r in runs)


READING = {"val/reward": "validation reward, the learned prompt",
           "val/reward_seed": "the seed prompt on the same weights",
           "train/reward": "reward of the RL rollouts",
           "kl_to_base": "drift from the base model (seed prompt)"}


def _note(run: Run, workdir: str | None, metrics: list[str]) -> str:
    """What a single run's plot says besides its curves: what each curve is, the learned prompt, and the
    comparison it lacks."""
    reading = [f"{m:<16} {READING[m]}" for m in metrics if m in READING]
    prompt = learned_prompt(run)
    other = "fst" if run.method == "rl" else "rl"
    text = (f"learned prompt (the population's best):\n{textwrap.fill(repr(prompt), 60)}" if prompt else
            "prompt: the seed prompt (not evolved in this run)")
    return "\n".join(reading + ["", text, "", "One run, no baseline. To compare, train the same config",
                                 f"with --config.method={other} into another workdir, then:",
                                 f"python launch/plot.py {workdir or run.label} <that workdir>"]).lstrip("\n")


def plot(runs: list[Run], metrics: list[str], reward: str, kl: str, out: Path,
         workdirs: list[str] | None = None) -> list[Path]:
    """Draw `out` (one row per metric, against steps and rollouts, and KL against reward); a continual run adds
    `<out stem>_stages.png`. A single run's figure also shows its learned prompt and how to get a comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_rollouts = any(rollouts(r) is not None for run in runs for r in run.records)
    with_kl = any(series(run.records, kl)[0].size and series(run.records, reward)[0].size for run in runs)
    cols = 2 if with_rollouts else 1
    note = _note(runs[0], (workdirs or [None])[0], metrics) if len(runs) == 1 else None
    note_row = note is not None and not (with_kl and cols == 2)  # else the KL row's free panel holds the note
    rows = len(metrics) + int(with_kl) + int(note_row)
    # constrained layout sizes the margins to the tick and axis labels (tight_layout cut `kl_to_base` at the left)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.2 * rows + 0.6), squeeze=False, layout="constrained")
    fig.suptitle(_title(runs), fontsize="large")
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    for i, metric in enumerate(metrics):
        for j, x in enumerate(["step", "rollouts"][:cols]):
            ax = axes[i][j]
            for run in runs:
                xs, ys = series(run.records, metric, x=x)
                if xs.size:
                    ax.plot(xs, ys, marker="." if xs.size < 50 else None, color=colors[run.label], label=run.label)
            if x == "step":
                _mark_stages(ax, runs, colors)
            ax.set(xlabel="RL steps" if x == "step" else "rollouts (RL + GEPA)", ylabel=metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    if with_kl:
        ax = axes[len(metrics)][0]
        for run in runs:
            by_step = {s: v for s, v in zip(*series(run.records, reward))}
            points = [(by_step[s], v) for s, v in zip(*series(run.records, kl)) if s in by_step]
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[run.label], label=run.label)
        ax.set(xlabel=reward, ylabel=kl, title=f"{kl} against {reward} (same steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        for extra in axes[len(metrics)][1:]:
            extra.axis("off")
    if note is not None:
        ax = axes[-1][0] if note_row else axes[-1][1]
        for extra in (axes[-1] if note_row else [ax]):
            extra.axis("off")
        ax.text(0.0, 1.0, note, transform=ax.transAxes, va="top", ha="left", fontsize="small", family="monospace",
                wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    written = [out]

    continual = [run for run in runs if len(stages(run.records)) > 1]
    if continual:
        order = list(dict.fromkeys(task for task, _ in stages(continual[0].records)))
        order += [t for run in continual for t, _ in stages(run.records) if t not in order]
        fig, axes = plt.subplots(1, len(order), figsize=(4.5 * len(order), 3.4), squeeze=False, layout="constrained")
        for ax, task in zip(axes[0], order):
            for run in runs:
                for k, (_, recs) in enumerate(s for s in stages(run.records) if s[0] == task):
                    xs, ys = series(recs, reward)
                    if xs.size:
                        start = min(r.get("step", 0) for r in recs)
                        ax.plot(xs - start, ys, color=colors[run.label], label=run.label if k == 0 else None)
            ax.set(title=f"stage: {task}", xlabel="steps in stage", ylabel=reward)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        stage_out = out.with_name(f"{out.stem}_stages{out.suffix}")
        fig.savefig(stage_out, dpi=100)
        plt.close(fig)
        written.append(stage_out)
    return written


def _mark_stages(ax, runs, colors):
    for run in runs:
        for task, recs in stages(run.records)[1:]:
            step = min(r.get("step", 0) for r in recs)
            ax.axvline(step, color=colors[run.label], linestyle=":", alpha=0.6)
            ax.annotate(task, (step, 1), xycoords=("data", "axes fraction"), fontsize="x-small",
                        rotation=90, va="top", ha="right")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default="plot.png", help="PNG to write (default: plot.png)")
    parser.add_argument("--metrics", help=f"comma-separated metric names (default: those of "
                                          f"{','.join(DEFAULT_METRICS)} that the runs have)")
    parser.add_argument("--labels", help="comma-separated run labels (default: the workdir names)")
    parser.add_argument("--reward", help="reward metric for the summary and KL plot (default: val/reward, "
                                         "else the first plotted metric with 'reward' in its name)")
    parser.add_argument("--kl", default="kl_to_base", help="KL metric (default: kl_to_base, under the seed prompt)")
    parser.add_argument("--reference", help="label of the run whose peak the others must reach "
                                            "(default: the run with method 'rl')")
    args = parser.parse_args(argv)

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("launch/plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    labels = args.labels.split(",") if args.labels else [None] * len(args.workdirs)
    if len(labels) != len(args.workdirs):
        parser.error(f"--labels has {len(labels)} names for {len(args.workdirs)} runs")
    try:
        runs = [load_run(w, label) for w, label in zip(args.workdirs, labels)]
    except (FileNotFoundError, ValueError) as e:
        print(f"launch/plot.py: {e}", file=sys.stderr)
        return 1
    metrics = pick_metrics(runs, args.metrics)
    if not metrics:
        print("launch/plot.py: the runs have no numeric metrics to plot", file=sys.stderr)
        return 1
    reward = args.reward or next((m for m in metrics if "reward" in m), metrics[0])
    for line in summarize(runs, reward, args.reference):
        print(line)
    for path in plot(runs, metrics, reward, args.kl, Path(args.out), workdirs=args.workdirs):
        print(f"wrote {path}")
    return 0


def draw(workdir: str, out: str) -> list[Path]:
    """Draw one run's default plot to `out` without printing the summary table (the end of `launch/train.py`);
    nothing without matplotlib (the end of the run then says how to draw it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    run = load_run(workdir)
    metrics = pick_metrics([run], None)
    if not metrics:
        return []
    reward = next((m for m in metrics if "reward" in m), metrics[0])
    return plot([run], metrics, reward, "kl_to_base", Path(out), workdirs=[workdir])


if __name__ == "__main__":
    sys.exit(main())
