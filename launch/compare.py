"""Run FST, RL-only and GEPA-only on identical data and seeds (and a continual schedule), then print the
comparison the paper reports. A benchmark that prints numbers, not a test.

    python launch/compare.py                                   # configs/fst_tiny.py, runs under runs/compare
    python launch/compare.py --config configs/fst_tiny.py --out runs/compare --skip-continual
    python launch/compare.py --out /tmp/smoke --steps 4 --stage-steps 2 -- --config.cycle.rl_steps=2   # smoke

Each run is `launch/train.py` in its own workdir (re-running resumes finished runs instantly). The table:
sample efficiency (RL steps and total rollouts, GEPA's included, that FST needs to reach RL's peak validation
reward), final validation reward per method, KL(π_θ ‖ π_base) at matched reward and at the end — measured
under the seed prompt for every method, so all three are compared on the same conditioning (the KL under
FST's best prompt is listed too) — GEPA's spending per cycle (proposals, accepted, rollouts), forgetting
(other tasks' accuracy before and after), per-stage reward of the continual schedule with the population
carried across task switches and with it reset to the seed prompt (`gepa.reset_on_task_switch`), and the
2×2 decomposition {base, trained weights} × {seed, learned prompt}. Written to OUT/table.md as well.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import plot  # noqa: E402  (launch/plot.py)

CONTINUAL = "stage1:{n},stage2:{n},stage3:{n}"
# (workdir name, method, extra flags): FST with the population carried across task switches (the default),
# FST with it reset to the seed prompt at each switch, and RL.
CONTINUAL_RUNS = (("continual_fst", "fst", []),
                  ("continual_fst_reset", "fst", ["--config.gepa.reset_on_task_switch=true"]),
                  ("continual_rl", "rl", []))


def train(config: str, workdir: str, overrides: list[str]) -> None:
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--config={config}", f"--workdir={workdir}",
           "--noplot", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _evals(run: plot.Run) -> list[dict]:
    return [r for r in run.records if r.get("kind") == "eval"]


def _final(run: plot.Run, key: str) -> float | None:
    values = [r[key] for r in _evals(run) if plot._number(r.get(key)) is not None]
    return values[-1] if values else None


def _kl_at(run: plot.Run, reward: float) -> float | None:
    """KL to base (under the seed prompt) at the first evaluation whose validation reward reaches `reward`."""
    for r in _evals(run):
        if plot._number(r.get("val/reward")) is not None and r["val/reward"] >= reward - 1e-12:
            return r.get("kl_to_base")
    return None


def _gepa_spending(run: plot.Run) -> str:
    """Mean per cycle: proposals / accepted / metric calls (of which seed scoring), from gepa_cycle records."""
    cycles = [r for r in run.records if r.get("kind") == "gepa_cycle" and "proposals" in r]
    if not cycles:
        return "n/a"
    mean = lambda key: sum(r[key] for r in cycles) / len(cycles)  # noqa: E731
    return (f"{mean('proposals'):.1f} / {mean('accepted'):.1f} / {mean('metric_calls'):.0f} "
            f"({mean('seed_scoring_calls'):.0f})")


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


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
        elif old is None:  # an unset placeholder: a number if it reads as one
            value = next((t(text) for t in (int, float) if _parses(t, text)), text)
        else:
            value = text
        node[leaf] = value


def _parses(kind, text: str) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


def decomposition(config_path: str, workdir: str, overrides: list[str]) -> dict[str, float]:
    """mean@k of {base, trained} weights × {seed, learned} prompt, from the run's final checkpoint."""
    import importlib.util

    from fst_jax import evals
    from fst_jax.fst import FSTRunner

    spec = importlib.util.spec_from_file_location("cfg", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "fst_tiny.py"))
    ap.add_argument("--out", default=os.path.join("runs", "compare"))
    ap.add_argument("--steps", type=int, help="RL steps of the FST/RL/GEPA runs (default: the config's total_steps)")
    ap.add_argument("--stage-steps", type=int, default=16, help="RL steps per stage of the continual schedule")
    ap.add_argument("--skip-continual", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra --config.x=y flags for every run")
    args = ap.parse_args()

    dirs = {m: os.path.join(args.out, m) for m in ("fst", "rl", "gepa")}
    steps = [f"--config.total_steps={args.steps}"] if args.steps else []
    for method, workdir in dirs.items():
        train(args.config, workdir, [f"--config.method={method}", *steps, *args.overrides])
    if not args.skip_continual:
        n = args.stage_steps
        for name, method, extra in CONTINUAL_RUNS:
            train(args.config, os.path.join(args.out, name),
                  [f"--config.method={method}", f"--config.schedule={CONTINUAL.format(n=n)}",
                   f"--config.total_steps={3 * n}", *extra, *args.overrides])

    runs = {m: plot.load_run(d, m) for m, d in dirs.items()}
    lines = ["| | FST | RL | GEPA-only |", "|---|---|---|---|"]
    lines.append("| final validation reward (mean@k) | " +
                 " | ".join(_fmt(_final(runs[m], "val/reward")) for m in ("fst", "rl", "gepa")) + " |")
    lines.append("| peak validation reward | " + " | ".join(
        _fmt(max([r["val/reward"] for r in _evals(runs[m]) if plot._number(r.get("val/reward")) is not None],
                 default=None)) for m in ("fst", "rl", "gepa")) + " |")
    rl_xs, rl_ys = plot.series(runs["rl"].records, "val/reward")
    rl_peak = float(rl_ys.max()) if rl_ys.size else None
    efficiency = []
    for m in ("fst", "rl", "gepa"):
        xs, ys = plot.series(runs[m].records, "val/reward")
        rxs, rys = plot.series(runs[m].records, "val/reward", x="rollouts")
        efficiency.append((plot.first_reaching(xs, ys, rl_peak) if rl_peak is not None else None,
                           plot.first_reaching(rxs, rys, rl_peak) if rl_peak is not None and rxs.size else None))
    lines.append("| RL steps to reach RL's peak | " + " | ".join(_fmt(s, ".0f") for s, _ in efficiency) + " |")
    lines.append("| total rollouts to reach RL's peak | " + " | ".join(_fmt(r, ".0f") for _, r in efficiency) + " |")
    matched = min(v for v in (_final(runs["fst"], "val/reward"), _final(runs["rl"], "val/reward")) if v is not None)
    lines.append(f"| KL to base at matched reward ({matched:.3f}), seed prompt | " +
                 " | ".join(_fmt(_kl_at(runs[m], matched), ".4f") for m in ("fst", "rl", "gepa")) + " |")
    lines.append("| final KL to base, seed prompt | " + " | ".join(_fmt(_final(runs[m], "kl_to_base"), ".4f")
                                                            for m in ("fst", "rl", "gepa")) + " |")
    lines.append("| final KL to base, best prompt | " + " | ".join(_fmt(_final(runs[m], "kl_to_base_best"), ".4f")
                                                            for m in ("fst", "rl", "gepa")) + " |")
    lines.append("| GEPA per cycle: proposals / accepted / rollouts (seed scoring) | " +
                 " | ".join(_gepa_spending(runs[m]) for m in ("fst", "rl", "gepa")) + " |")
    for key in sorted({k for r in _evals(runs["fst"]) for k in r if k.startswith("forgetting/")}):
        cells = []
        for m in ("fst", "rl", "gepa"):
            ev = [r for r in _evals(runs[m]) if plot._number(r.get(key)) is not None]
            cells.append("n/a" if not ev else f"{ev[0][key]:.3f} → {ev[-1][key]:.3f}")
        lines.append(f"| {key} (before → after) | " + " | ".join(cells) + " |")

    if not args.skip_continual:
        cont = {name: plot.load_run(os.path.join(args.out, name), method) for name, method, _ in CONTINUAL_RUNS}
        lines += ["", "| continual stage | FST final reward (population kept) | FST (reset at switch) | "
                      "RL final reward |", "|---|---|---|---|"]
        for stage in ("stage1", "stage2", "stage3"):
            cells = []
            for m in cont:
                ev = [r for r in _evals(cont[m]) if r.get("task") == stage and plot._number(r.get("val/reward")) is not None]
                cells.append(_fmt(ev[-1]["val/reward"] if ev else None))
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")

    d = decomposition(args.config, dirs["fst"], ["--config.method=fst", *steps, *args.overrides])
    lines += ["", "| weights \\ prompt | seed | learned |", "|---|---|---|",
              f"| base | {d['base/seed']:.3f} | {d['base/learned']:.3f} |",
              f"| trained (FST) | {d['trained/seed']:.3f} | {d['trained/learned']:.3f} |",
              "", f"learned prompt: `{d['learned_prompt']}`"]
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot.main([dirs["fst"], dirs["rl"], dirs["gepa"], "--labels", "FST,RL,GEPA", "--out",
               os.path.join(args.out, "compare.png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
