"""FST against RL alone and GEPA alone, several seeds each, on identical data: the paper's comparison as
numbers with their spread. A benchmark that prints numbers, not a test.

    python launch/compare.py                          # configs/fst_tiny_coupling.py, seeds 0 1 2, runs/compare
    python launch/compare.py --seeds 0 --skip-continual --skip-reuse --skip-ablation      # one seed, main runs
    python launch/compare.py --out /tmp/smoke --seeds 0 --steps 4 --stage-steps 2 --docs /tmp/smoke/docs \\
        -- --config.cycle.rl_steps=2                                                      # a smoke run

Every run is `launch/train.py` in its own workdir under `--out`, one at a time, each with its progress bar;
re-running the same command resumes an interrupted run and skips finished ones instantly. The runs:

- `{fst,rl,gepa}_s{seed}`: the three methods on the config's task, one per seed.
- `fst_dominated_s{seed}` (ablation): FST with the population topped up with dominated prompts when the
  Pareto front holds fewer than K (`gepa.population_fill=dominated`) instead of repeating front members.
- `fst_reuse_s{seed}`: FST with GEPA's evaluation rollouts standing in for RL rollouts
  (`cycle.reuse_gepa_rollouts`): the fraction of RL rollouts reused and the wall time per cycle saved.
- `continual_{fst,fst_reset,gepa,gepa_reset,rl}_s{seed}`: the config's three continual stages in turn, the
  population carried across task switches or reset to the seed prompt (`gepa.reset_on_task_switch`).

Measures, per seed, then mean ± std over seeds: final and peak validation reward (mean@k under the run's best
prompt); RL steps and total rollouts (GEPA's included) to reach the same seed's RL peak; KL(π_θ ‖ π_base) under
the seed prompt at matched reward (the lower of FST's and RL's final reward) and at the end; forgetting (other
tasks under the seed prompt, first → last evaluation); GEPA's spending per cycle; per-stage final reward of the
continual schedule. Written to DOCS/compare.json, DOCS/compare.md and DOCS/compare.png (one band per method),
and the table between the `compare:start` / `compare:end` markers of README.md is replaced by compare.md's
main table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import plot  # noqa: E402  (launch/plot.py)

from fst_jax.config import parse_schedule  # noqa: E402

METHODS = ("fst", "rl", "gepa")
LABELS = {"fst": "FST", "rl": "RL", "gepa": "GEPA-only", "fst_dominated": "FST, population topped up (ablation)",
          "fst_reuse": "FST, GEPA rollouts reused"}
STAGES = ("stage1", "stage2", "stage3")
# (name, method, extra flags) of the continual runs
CONTINUAL_RUNS = (("fst", "fst", []), ("fst_reset", "fst", ["--config.gepa.reset_on_task_switch=true"]),
                  ("gepa", "gepa", []), ("gepa_reset", "gepa", ["--config.gepa.reset_on_task_switch=true"]),
                  ("rl", "rl", []))


def train(config: str, workdir: str, overrides: list[str], label: str) -> None:
    """One run (or its resumption); prints what it runs. A finished run returns at once."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--config={config}", f"--workdir={workdir}",
           "--noplot", *overrides]
    print(f"\n== {label}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------ per-run measures

def _evals(run: plot.Run, task: str | None = None) -> list[dict]:
    return [r for r in run.records if r.get("kind") == "eval" and plot._number(r.get("val/reward")) is not None
            and (task is None or r.get("task") == task)]


def _final(run: plot.Run, key: str = "val/reward", task: str | None = None) -> float | None:
    values = [r[key] for r in _evals(run, task) if plot._number(r.get(key)) is not None]
    return values[-1] if values else None


def _peak(run: plot.Run) -> float | None:
    return max((r["val/reward"] for r in _evals(run)), default=None)


def _kl_at(run: plot.Run, reward: float) -> float | None:
    """KL to base (seed prompt) at the first evaluation whose validation reward reaches `reward`."""
    return next((r.get("kl_to_base") for r in _evals(run) if r["val/reward"] >= reward - 1e-12), None)


def _reach(run: plot.Run, target: float | None, x: str) -> float | None:
    if target is None:
        return None
    xs, ys = plot.series(run.records, "val/reward", x=x)
    return plot.first_reaching(xs, ys, target) if xs.size else None


def _forgetting(run: plot.Run) -> dict[str, list]:
    keys = sorted({k for r in _evals(run) for k in r if k.startswith("forgetting/")})
    out = {}
    for key in keys:
        values = [r[key] for r in _evals(run) if plot._number(r.get(key)) is not None]
        out[key.removeprefix("forgetting/")] = [values[0], values[-1]] if values else None
    return out


def _gepa_cycles(run: plot.Run) -> dict[str, float] | None:
    cycles = [r for r in run.records if r.get("kind") == "gepa_cycle" and "proposals" in r]
    if not cycles:
        return None
    return {key: float(np.mean([r[key] for r in cycles]))
            for key in ("proposals", "accepted", "metric_calls", "seed_scoring_calls", "front")}


def _cycle_seconds(run: plot.Run) -> float | None:
    """Mean wall time of one cycle: GEPA (its sampling and reflection included) + RL sampling + update seconds,
    evaluations excluded, over the cycles run."""
    last = [r for r in run.records if r.get("kind") == "eval" and r.get("cycles") and "time_rl_sampling" in r]
    if not last:
        return None
    r = last[-1]
    return (r["time_gepa"] + r["time_rl_sampling"] + r["time_update"]) / r["cycles"]


def _curve(run: plot.Run) -> dict[str, list]:
    xs, ys = plot.series(run.records, "val/reward")
    _, kl = plot.series(run.records, "kl_to_base")
    return {"steps": xs.tolist(), "reward": ys.tolist(), "kl_to_base": kl.tolist() if kl.size == xs.size else None}


def method_measures(runs: list[plot.Run], rl_runs: list[plot.Run]) -> dict:
    """Per-seed measures of one method's runs, against the same seeds' RL runs."""
    out = {k: [] for k in ("final", "peak", "steps_to_rl_peak", "rollouts_to_rl_peak", "kl_at_matched_reward",
                           "final_kl", "final_kl_best_prompt", "final_seed_prompt", "cycle_seconds")}
    out["forgetting"], out["gepa_per_cycle"], out["curves"] = [], [], []
    for run, rl in zip(runs, rl_runs):
        rl_peak = _peak(rl)
        matched = min((v for v in (_final(run), _final(rl)) if v is not None), default=None)
        out["final"].append(_final(run))
        out["peak"].append(_peak(run))
        out["steps_to_rl_peak"].append(_reach(run, rl_peak, "step"))
        out["rollouts_to_rl_peak"].append(_reach(run, rl_peak, "rollouts"))
        out["kl_at_matched_reward"].append(None if matched is None else _kl_at(run, matched))
        out["final_kl"].append(_final(run, "kl_to_base"))
        out["final_kl_best_prompt"].append(_final(run, "kl_to_base_best"))
        out["final_seed_prompt"].append(_final(run, "val/reward_seed"))
        out["cycle_seconds"].append(_cycle_seconds(run))
        out["forgetting"].append(_forgetting(run))
        out["gepa_per_cycle"].append(_gepa_cycles(run))
        out["curves"].append(_curve(run))
    return out


def reuse_measures(reuse_runs: list[plot.Run], plain_runs: list[plot.Run]) -> dict:
    """Fraction of RL rollouts taken from GEPA's evaluations, and the wall time per cycle saved against the same
    seeds' FST runs without reuse (GEPA + sampling + update seconds, evaluations excluded)."""
    fractions, saved = [], []
    for run, plain in zip(reuse_runs, plain_runs):
        train = [r for r in run.records if r.get("kind") == "train" and "reused_rollouts" in r]
        total = sum(r["rollouts_this_step"] for r in train)
        fractions.append(sum(r["reused_rollouts"] for r in train) / total if total else None)
        a, b = _cycle_seconds(run), _cycle_seconds(plain)
        saved.append(None if a is None or not b else 1.0 - a / b)
    # the reuse run's reward at each evaluation against the range the runs without reuse span there
    inside, points = 0, 0
    for run in reuse_runs:
        for step, reward in zip(*plot.series(run.records, "val/reward")):
            others = [y for p in plain_runs for x, y in zip(*plot.series(p.records, "val/reward")) if x == step]
            if others:
                points += 1
                inside += min(others) - 1e-9 <= reward <= max(others) + 1e-9
    return {"fraction": _mean(fractions), "fraction_per_seed": fractions, "wall_time_saved": _mean(saved),
            "wall_time_saved_per_seed": saved, "final": [_final(r) for r in reuse_runs],
            "evaluations_inside_the_seed_range": [inside, points]}


def _span_seconds(run: plot.Run) -> float:
    """Seconds from a run's first to its last record: its wall time when it ran without interruption."""
    times = [r["time"] for r in run.records if plot._number(r.get("time")) is not None]
    return max(times) - min(times) if times else 0.0


def continual_measures(runs: dict[str, list[plot.Run]]) -> dict:
    return {name: {stage: [_final(r, task=stage) for r in rs] for stage in STAGES} for name, rs in runs.items()}


# ----------------------------------------------------------------------------------------------- statistics

def _valid(values) -> list[float]:
    return [float(v) for v in values if plot._number(v) is not None]


def _mean(values) -> float | None:
    v = _valid(values)
    return float(np.mean(v)) if v else None


def _std(values) -> float | None:
    v = _valid(values)
    return float(np.std(v)) if v else None


def _ms(values, spec=".3f") -> str:
    """'mean ± std (n)' of the finite values; n shown when some seeds have none (e.g. never reached)."""
    v = _valid(values)
    if not v:
        return "n/a"
    text = format(np.mean(v), spec) + (f" ± {format(np.std(v), spec)}" if len(v) > 1 else "")
    return text + (f" ({len(v)}/{len(values)} seeds)" if len(v) < len(values) else "")


def targets(methods: dict) -> dict:
    """The issue's targets, each with its numbers and met / missed."""
    fst, rl, gepa = methods["fst"], methods["rl"], methods["gepa"]
    out = {}
    best_other = max(_mean(rl["final"]) or 0.0, _mean(gepa["final"]) or 0.0)
    spread = max(_std(rl["final"]) or 0.0, _std(gepa["final"]) or 0.0, _std(fst["final"]) or 0.0)
    margin = (_mean(fst["final"]) or 0.0) - best_other
    out["final_above_both"] = {"fst": _mean(fst["final"]), "best_other": best_other, "margin": margin,
                               "largest_std": spread, "met": margin > spread}
    steps_fst, steps_rl = _mean(fst["steps_to_rl_peak"]), _mean(rl["steps_to_rl_peak"])
    all_reached = len(_valid(fst["steps_to_rl_peak"])) == len(fst["steps_to_rl_peak"])
    out["steps_to_rl_peak_half"] = {"fst": steps_fst, "rl": steps_rl,
                                    "met": bool(all_reached and steps_fst is not None and steps_rl
                                                and steps_fst <= 0.5 * steps_rl)}
    kl_fst, kl_rl = _mean(fst["kl_at_matched_reward"]), _mean(rl["kl_at_matched_reward"])
    out["kl_at_matched_30pct_lower"] = {"fst": kl_fst, "rl": kl_rl,
                                        "met": bool(kl_fst is not None and kl_rl and kl_fst <= 0.7 * kl_rl)}
    return out


def continual_target(continual: dict) -> dict:
    """Continual FST (population kept) ≥ RL on every stage after the first."""
    stages = {stage: {"fst": _mean(continual["fst"][stage]), "rl": _mean(continual["rl"][stage])}
              for stage in STAGES[1:]}
    met = all(v["fst"] is not None and v["rl"] is not None and v["fst"] >= v["rl"] for v in stages.values())
    return {"stages": stages, "met": met}


# ------------------------------------------------------------------------------------------------ the report

def markdown(report: dict) -> str:
    m = report["methods"]
    cols = [k for k in ("fst", "rl", "gepa", "fst_dominated", "fst_reuse") if k in m]
    lines = [f"Task: `{report['task']}`; seeds {report['seeds']}; {report['steps']} RL steps per run. "
             "Mean ± std over seeds.", "",
             "| | " + " | ".join(LABELS[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = (("final validation reward (mean@k, best prompt)", "final", ".3f"),
            ("peak validation reward", "peak", ".3f"),
            ("final reward under the seed prompt", "final_seed_prompt", ".3f"),
            ("RL steps to reach RL's peak (same seed)", "steps_to_rl_peak", ".1f"),
            ("total rollouts to reach RL's peak", "rollouts_to_rl_peak", ".0f"),
            ("KL to base at matched reward, seed prompt", "kl_at_matched_reward", ".4f"),
            ("final KL to base, seed prompt", "final_kl", ".4f"),
            ("final KL to base, best prompt", "final_kl_best_prompt", ".4f"),
            ("wall seconds per cycle (GEPA + RL sampling + update)", "cycle_seconds", ".1f"))
    for title, key, spec in rows:
        lines.append(f"| {title} | " + " | ".join(_ms(m[k][key], spec) for k in cols) + " |")
    gepa_cells = []
    for k in cols:
        cycles = [c for c in m[k]["gepa_per_cycle"] if c]
        gepa_cells.append("n/a" if not cycles else "{:.1f} / {:.1f} / {:.0f} / {:.1f}".format(
            *(np.mean([c[f] for c in cycles]) for f in ("proposals", "accepted", "metric_calls", "front"))))
    lines.append("| GEPA per cycle: proposals / accepted / metric calls / front size | " + " | ".join(gepa_cells) + " |")
    forgetting_tasks = sorted({t for k in cols for f in m[k]["forgetting"] for t in f})
    for task in forgetting_tasks:
        cells = []
        for k in cols:
            pairs = [f[task] for f in m[k]["forgetting"] if f.get(task)]
            cells.append("n/a" if not pairs else f"{_ms([p[0] for p in pairs])} → {_ms([p[1] for p in pairs])}")
        lines.append(f"| forgetting: {task} under the seed prompt (first → last) | " + " | ".join(cells) + " |")
    full = [k for k in cols if len(m[k]["final"]) == len(report["seeds"])]
    per_seed = ["", "Final validation reward per seed:", "", "| seed | " + " | ".join(LABELS[k] for k in full) + " |",
                "|---" * (len(full) + 1) + "|"]
    for i, seed in enumerate(report["seeds"]):
        per_seed.append(f"| {seed} | " + " | ".join(_ms([m[k]["final"][i]]) for k in full) + " |")
    lines += per_seed
    t = report["targets"]
    lines += ["", "Targets:", "",
              f"- final reward FST > max(RL, GEPA-only) by more than the largest seed std: FST "
              f"{t['final_above_both']['fst']:.3f}, best other {t['final_above_both']['best_other']:.3f}, margin "
              f"{t['final_above_both']['margin']:+.3f} vs std {t['final_above_both']['largest_std']:.3f} — "
              f"**{'met' if t['final_above_both']['met'] else 'missed'}**",
              f"- steps to RL's peak ≤ ½ of RL's: FST {_fmt(t['steps_to_rl_peak_half']['fst'], '.1f')} vs RL "
              f"{_fmt(t['steps_to_rl_peak_half']['rl'], '.1f')} — "
              f"**{'met' if t['steps_to_rl_peak_half']['met'] else 'missed'}**",
              f"- KL (seed prompt) at matched reward ≥ 30% lower than RL's: FST "
              f"{_fmt(t['kl_at_matched_30pct_lower']['fst'], '.4f')} vs RL "
              f"{_fmt(t['kl_at_matched_30pct_lower']['rl'], '.4f')} — "
              f"**{'met' if t['kl_at_matched_30pct_lower']['met'] else 'missed'}**"]
    if report.get("continual"):
        names = list(report["continual"])
        lines += ["", "Continual schedule (final validation reward of each stage; population kept across task "
                      "switches unless `reset`):", "",
                  "| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for stage in STAGES:
            lines.append(f"| {stage} | " + " | ".join(_ms(report["continual"][n][stage]) for n in names) + " |")
        ct = t.get("continual_fst_at_least_rl")
        if ct:
            lines += ["", "- continual: FST ≥ RL on every stage after the first: " + ", ".join(
                f"{stage} {_fmt(v['fst'])} vs {_fmt(v['rl'])}" for stage, v in ct["stages"].items())
                + f" — **{'met' if ct['met'] else 'missed'}**"]
    if report.get("reuse"):
        r = report["reuse"]
        lines += ["", f"GEPA-rollout reuse: {_fmt(r['fraction'], '.1%')} of RL rollouts reused; wall time per cycle "
                      f"saved {_fmt(r['wall_time_saved'], '.1%')} (per seed: "
                      f"{', '.join(_fmt(x, '.1%') for x in r['wall_time_saved_per_seed'])}); final reward "
                      f"{_ms(r['final'])} vs {_ms(m['fst']['final'])} without reuse; at "
                      f"{r['evaluations_inside_the_seed_range'][0]} of {r['evaluations_inside_the_seed_range'][1]} "
                      "evaluations its reward lies within the range of the runs without reuse."]
    if report.get("decomposition"):
        d = report["decomposition"]
        lines += ["", f"Weights × prompt (FST, seed {report['seeds'][0]}, mean@k):", "",
                  "| weights \\ prompt | seed | learned |", "|---|---|---|",
                  f"| base | {d['base/seed']:.3f} | {d['base/learned']:.3f} |",
                  f"| trained (FST) | {d['trained/seed']:.3f} | {d['trained/learned']:.3f} |",
                  "", f"Learned prompt: `{d['learned_prompt']}`"]
    lines += ["", f"Made by `{report['command']}` on 2 CPU cores: {report['wall_time_s'] / 60:.0f} min (the runs' "
                  "own wall times, summed, and the report)."]
    return "\n".join(lines) + "\n"


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def band_plot(report: dict, path: str) -> None:
    """Validation reward and KL to base (seed prompt) against RL steps: mean over seeds, a band of ± std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, color in zip(("fst", "rl", "gepa", "fst_dominated", "fst_reuse"), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        if key not in report["methods"]:
            continue
        curves = report["methods"][key]["curves"]
        for ax, metric in zip(axes, ("reward", "kl_to_base")):
            rows = [c for c in curves if c[metric] is not None and c["steps"]]
            if not rows:
                continue
            steps = sorted(set.intersection(*(set(c["steps"]) for c in rows)))
            ys = np.array([[dict(zip(c["steps"], c[metric]))[s] for s in steps] for c in rows])
            mean, std = ys.mean(axis=0), ys.std(axis=0)
            ax.plot(steps, mean, color=color, label=f"{LABELS[key]} (n={len(rows)})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    axes[0].set(xlabel="RL step", ylabel="validation reward (mean@k, best prompt)", title=report["task"])
    axes[1].set(xlabel="RL step", ylabel="KL(π_θ ‖ π_base), seed prompt")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(table: str, readme: str) -> bool:
    """Replace the text between `<!-- compare:start -->` and `<!-- compare:end -->` in the README."""
    start, end = "<!-- compare:start -->", "<!-- compare:end -->"
    if not os.path.isfile(readme):
        return False
    text = open(readme, encoding="utf-8").read()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{table}{end}{tail}")
    os.replace(readme + ".tmp", readme)
    return True


# ------------------------------------------------------------------------------------------------------ main

def _apply_overrides(config, overrides: list[str]) -> None:
    """`--config.a.b=value` flags onto a ConfigDict, each value parsed as the field's current type."""
    for flag in overrides:
        path, _, text = flag.removeprefix("--config.").partition("=")
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        old = node[leaf]
        if isinstance(old, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            value = type(old)(text)
        elif isinstance(old, (dict,)) or hasattr(old, "to_dict"):
            value = json.loads(text)
        else:
            value = text
        node[leaf] = value


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def decomposition(config_path: str, workdir: str, overrides: list[str]) -> dict:
    """mean@k of {base, trained} weights × {seed, learned} prompt, from the run's final checkpoint."""
    from fst_jax import evals
    from fst_jax.fst import FSTRunner

    config = _load_config(config_path)
    _apply_overrides(config, overrides)  # the run's own settings, or its data streams cannot resume
    runner = FSTRunner(config, workdir)  # restores the finished run
    task_name = runner.current_task
    problems = runner.val[task_name][: config.eval.num_problems or None]
    out = {}
    for weights_name, params in (("base", runner.base_params), ("trained", runner.state.params)):
        runner.sampler.set_params(params)
        for prompt_name, prompt in (("seed", config.gepa.seed_prompt), ("learned", runner.population[0])):
            r = evals.mean_at_k(runner.sampler, runner.tokenizer, runner.tasks[task_name], problems, prompt,
                                k=config.eval.k, temperature=config.eval.temperature, top_p=config.eval.top_p,
                                max_new_tokens=config.eval.max_new_tokens, seed=config.seed,
                                enable_thinking=config.model.enable_thinking)
            out[f"{weights_name}/{prompt_name}"] = r["mean_at_k"]
    runner.checkpointer.close()
    runner.metrics.close()
    out["learned_prompt"] = runner.population[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "fst_tiny_coupling.py"))
    ap.add_argument("--out", default=os.path.join("runs", "compare"), help="run workdirs go here")
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="compare.json / .md / .png go here")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                    help="README whose compare:start/end block gets the table ('' = none)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--continual-seeds", type=int, nargs="*", default=None,
                    help="seeds of the continual runs (default: the first of --seeds)")
    ap.add_argument("--reuse-seeds", type=int, nargs="*", default=None,
                    help="seeds of the GEPA-rollout reuse runs (default: all of --seeds)")
    ap.add_argument("--steps", type=int, help="RL steps of each run (default: the config's total_steps)")
    ap.add_argument("--stage-steps", type=int, default=16, help="RL steps per stage of the continual schedule")
    ap.add_argument("--skip-continual", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--skip-reuse", action="store_true")
    ap.add_argument("--skip-decomposition", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="run nothing: report on the runs already in --out")
    ap.add_argument("overrides", nargs="*", help="extra --config.x=y flags for every run (after --)")
    args = ap.parse_args(argv)
    command = "python launch/compare.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))

    common = ([f"--config.total_steps={args.steps}"] if args.steps else []) + args.overrides
    plan = []  # (label, workdir, overrides)
    variants = [("fst", []), ("rl", []), ("gepa", [])]  # (name, extra flags); run seed-major within each
    if not args.skip_ablation:
        variants.append(("fst_dominated", ["--config.gepa.population_fill=dominated"]))
    if not args.skip_reuse:
        variants.append(("fst_reuse", ["--config.cycle.reuse_gepa_rollouts=true"]))
    # the three methods seed by seed first, then the ablation's seeds, then reuse's
    order = [[(name, extra, seed) for name, extra in variants[:3]] for seed in args.seeds]
    reuse_seeds = args.seeds if args.reuse_seeds is None else args.reuse_seeds
    order += [[(name, extra, seed) for seed in (reuse_seeds if name == "fst_reuse" else args.seeds)]
              for name, extra in variants[3:]]
    for name, extra, seed in (entry for group in order for entry in group):
        plan.append((f"{name}_s{seed}", [f"--config.method={name.split('_')[0]}", f"--config.seed={seed}", *extra,
                                          *common]))
    continual_seeds = args.seeds[:1] if args.continual_seeds is None else args.continual_seeds
    if not args.skip_continual:
        n = args.stage_steps
        schedule = [f"--config.schedule={','.join(f'{s}:{n}' for s in STAGES)}", f"--config.total_steps={3 * n}"]
        for seed in continual_seeds:
            for name, method, extra in CONTINUAL_RUNS:
                plan.append((f"continual_{name}_s{seed}", [f"--config.method={method}", f"--config.seed={seed}",
                                                          *schedule, *extra, *args.overrides]))
    for i, (label, overrides) in enumerate([] if args.report_only else plan, 1):
        train(args.config, os.path.join(args.out, label), overrides, f"[{i}/{len(plan)}] {label}")

    report_started = time.time()
    load = lambda name: [plot.load_run(os.path.join(args.out, f"{name}_s{s}"), name) for s in args.seeds]  # noqa: E731
    rl_runs = load("rl")
    names = [name for name, _ in variants]
    runs = {name: load(name) for name in names if name != "fst_reuse"}
    if "fst_reuse" in names:  # reuse against the same seeds' FST runs
        runs["fst_reuse"] = [plot.load_run(os.path.join(args.out, f"fst_reuse_s{s}")) for s in reuse_seeds]
    config = _load_config(args.config)
    _apply_overrides(config, [o for o in common if o.startswith("--config.")])
    spec = config.tasks[parse_schedule(config)[0][0]]
    report = {"task": f"{spec.task}: " + ", ".join(f"{k} = {v!r}" for k, v in dict(spec.options).items()), "config": os.path.relpath(args.config, ROOT),
              "seeds": args.seeds, "steps": int(config.total_steps), "overrides": args.overrides,
              "methods": {name: method_measures(runs[name], rl_runs) for name in names if name != "fst_reuse"}}
    report["targets"] = targets(report["methods"])
    if not args.skip_reuse:
        plain = [runs["fst"][args.seeds.index(s)] for s in reuse_seeds]
        report["reuse"] = reuse_measures(runs["fst_reuse"], plain)
        report["reuse"]["seeds"] = reuse_seeds
        report["methods"]["fst_reuse"] = method_measures(runs["fst_reuse"],
                                                         [rl_runs[args.seeds.index(s)] for s in reuse_seeds])
    if not args.skip_continual:
        report["continual"] = continual_measures(
            {name: [plot.load_run(os.path.join(args.out, f"continual_{name}_s{s}")) for s in continual_seeds]
             for name, _, _ in CONTINUAL_RUNS})
        report["continual_seeds"] = continual_seeds
        report["targets"]["continual_fst_at_least_rl"] = continual_target(report["continual"])
    if not args.skip_decomposition:
        report["decomposition"] = decomposition(
            args.config, os.path.join(args.out, f"fst_s{args.seeds[0]}"),
            [f"--config.method=fst", f"--config.seed={args.seeds[0]}", *common])
    report["command"] = command.strip()
    # every run's own span (a run resumed later counts its recorded time), then this invocation's report
    spans = [_span_seconds(plot.load_run(os.path.join(args.out, label))) for label, _ in plan]
    report["run_seconds"] = dict(zip([label for label, _ in plan], spans))
    report["wall_time_s"] = sum(spans) + (time.time() - report_started)

    os.makedirs(args.docs, exist_ok=True)
    table = markdown(report)
    with open(os.path.join(args.docs, "compare.json"), "w") as f:
        json.dump(report, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    with open(os.path.join(args.docs, "compare.md"), "w") as f:
        f.write(table)
    band_plot(report, os.path.join(args.docs, "compare.png"))
    print("\n" + table)
    if args.readme and update_readme(table, args.readme):
        print(f"updated the compare table in {args.readme}")
    print(f"wrote {os.path.join(args.docs, 'compare.json')}, compare.md and compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
