"""FST against RL alone and GEPA alone, several seeds each, on identical data: the paper's comparison as
numbers with their spread. A benchmark that prints numbers, not a test.

    python launch/compare.py --stage-steps 12 --rl-steps 512      # docs/coupling.md's table (≈1.5 h on 2 CPU cores)
    python launch/compare.py                          # configs/fst_tiny_coupling.py, seeds 0 1 2, runs/compare
    python launch/compare.py --seeds 0 --skip-continual --skip-reuse --skip-ablation      # one seed, main runs
    python launch/compare.py --out /tmp/smoke --seeds 0 --steps 4 --stage-steps 2 --docs /tmp/smoke/docs \\
        -- --config.cycle.rl_steps=2                                                      # a smoke run

    python launch/compare.py --study ceiling -- --config.log.progress=false            # the ceiling study
    python launch/compare.py --study plasticity --from runs/compare -- --config.log.progress=false  # plasticity

Every run is `launch/train.py` in its own workdir under `--out`, one at a time, each with its progress bar;
re-running the same command resumes an interrupted run and skips finished ones instantly. The runs:

- `{fst,rl,gepa}_s{seed}`: the three methods on the config's task, one per seed; RL alone runs `--rl-steps`
  (default 4× the others; on the coupling testbed RL finds the rule only after 250-350 steps, hence 512 for
  docs/coupling.md) so that its curve has flattened: FST is measured against RL's plateau, not against RL cut off
  while still climbing. Raising `--rl-steps` later resumes the finished RL runs where they stopped (the
  learning rate is constant after warm-up, so the result is that of one longer run).
- `fst_nondominated_s{seed}`: FST with its population drawn from the non-dominated set
  (`cycle.population_rule=nondominated`) instead of every candidate best on some problem, ties at zero included;
  paired by seed with `fst_s{seed}` (`--skip-population` leaves it out).
- `fst_dominated_s{seed}` (ablation): FST with the population topped up with dominated prompts when the
  Pareto front holds fewer than K (`gepa.population_fill=dominated`) instead of repeating front members.
- `fst_reuse_s{seed}`: FST with GEPA's evaluation rollouts standing in for RL rollouts
  (`cycle.reuse_gepa_rollouts`): the fraction of RL rollouts reused and the wall time per cycle saved.
- `continual_{fst,fst_reset,gepa,gepa_reset,rl}_s{seed}`: the config's three continual stages in turn, the
  population carried across task switches or reset to the seed prompt (`gepa.reset_on_task_switch`).

`--study ceiling` (runs/ceiling): FST, RL alone (`--rl-steps`, default 4×), GEPA-only and `fst_nondominated`
on exact-match "sort, then shift 3", where RL alone gets no reward variance under the seed prompt; writes
DOCS/compare.json's "ceiling" (the rest of the file kept), DOCS/compare_ceiling.md/.png and the page's
`ceiling:start/end` block. `--study plasticity` (runs/plasticity): fresh RL (`--plastic-steps`, a new optimizer,
`config.init_from`) on the held-out "rotate 1, then reverse" from each seed's coupling-study checkpoints in
`--from` (FST at its end, RL alone at its plateau), from RL run here to FST's step count (`rl48_s{seed}`), and
from the base model; DOCS/compare.json's "plasticity", compare_plasticity.md/.png, the `plasticity:start/end`
block. A run whose source is not finished yet (a longer RL run later moves its checkpoint) is skipped and named
(exit 2 after the report of the rest); the same command later runs it.

Measures, per seed, then mean ± std over seeds: final and peak validation reward (mean@k under the run's best
prompt); RL steps and total rollouts (GEPA's included) to reach the same seed's RL peak; KL(π_θ ‖ π_base) under
the seed prompt at matched reward (the lower of FST's and RL's final reward) and at the end; forgetting (other
tasks under the seed prompt, first → last evaluation); GEPA's spending per cycle; per-stage final reward of the
continual schedule. Written to DOCS/compare.json, DOCS/compare.md and DOCS/compare.png (one band per method),
and the table between the `compare:start` / `compare:end` markers of docs/coupling.md (`--page`) is replaced
by compare.md's main table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from fst_jax.analysis.compare_plot import band_plot, section_plot  # noqa: E402
from fst_jax.analysis.compare_report import (STAGES, ceiling_measures, continual_measures,  # noqa: E402
                                             continual_target, markdown, method_measures, plasticity_measures,
                                             population_measures, reuse_measures, section_markdown, span_seconds,
                                             targets, update_doc_block)
from fst_jax.analysis.runs import load_run  # noqa: E402
from fst_jax.config import parse_schedule  # noqa: E402

# the ceiling study's task: a composition from the tiny model's training family that it carries out ~65% of the
# time when told and never exactly under the seed prompt; exact-match reward (RL alone gets no reward variance)
CEILING_RULE = "sort, then shift 3"
CEILING_TASK = "--config.tasks.rule.options=" + json.dumps({"rule": CEILING_RULE, "reward": "exact"})
# the plasticity probe's rule: held out of the tiny model's training (HELD_OUT_RULES) and of every source run.
# A pilot (fresh RL from the base model, seed 0, 96 steps) chose it: "rotate 1, then reverse" 0.144 → 0.270 by
# step 32, then flat (0.282 at 96); "sort, then rotate 2" 0.118 → 0.201; "shift 4" 0.025 → 0.062; "reverse,
# then shift 1" (128 steps, 3 seeds) 0.044 → 0.065. A probe learned within the run shows how fast each start
# learns; one that barely moves shows nothing.
PLASTICITY_RULE = "rotate 1, then reverse"
PLASTICITY_THRESHOLD = 0.25  # dense reward a fresh RL run must reach; steps to it measure how fast it learns
# (source name, coupling-study run it starts from: None = the base model) of the plasticity probe; RL at its
# plateau last: its 512-step coupling runs are the longest to make
PLASTICITY_SOURCES = (("fst", "fst"), ("rl48", "rl48"), ("base", None), ("rl", "rl"))
# FST with its population drawn from the non-dominated set, paired by seed with plain FST (the front)
POPULATION_VARIANT = ("fst_nondominated", ["--config.cycle.population_rule=nondominated"])

STUDY_SECTIONS = ("ceiling", "plasticity")  # compare.json keys written by --study, kept by the coupling report

# (name, method, extra flags) of the continual runs
CONTINUAL_RUNS = (("fst", "fst", []), ("fst_reset", "fst", ["--config.gepa.reset_on_task_switch=true"]),
                  ("gepa", "gepa", []), ("gepa_reset", "gepa", ["--config.gepa.reset_on_task_switch=true"]),
                  ("rl", "rl", []))


def train(config: str, workdir: str, overrides: list[str], label: str) -> None:
    """One run (or its resumption); prints what it runs. A finished run returns at once."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--config={config}", f"--workdir={workdir}",
           "--noplot", *overrides]
    print(f"\n== {label}\n$ {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd).returncode
    if code:  # train.py has said why in its own line; the runs finished so far stay finished
        print(f"compare: {label} stopped (exit {code}); rerun the same command to resume", file=sys.stderr)
        sys.exit(code)


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
    from fst_jax.trainer import evals
    from fst_jax.trainer.runner import FSTRunner

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


def plasticity(args, command: str) -> int:
    """Fresh RL (a new optimizer, the held-out rule, `--plastic-steps` steps) from each seed's coupling-study
    checkpoints, FST at its end and RL at its plateau (`--from`), RL at FST's step count (run here as `rl48`,
    the same run as RL's first steps), and the base model; DOCS/compare.json's "plasticity"."""
    if args.out == os.path.join("runs", "compare"):
        args.out = os.path.join("runs", "plasticity")
    config = _load_config(args.config)
    _apply_overrides(config, [o for o in args.overrides if o.startswith("--config.")])
    steps = args.steps or int(config.total_steps)
    task = "--config.tasks.rule.options=" + json.dumps({"rule": PLASTICITY_RULE})
    plan = []  # (label, workdir, overrides)
    for seed in args.seeds:  # the RL source at FST's step count: the checkpoint a longer run does not keep
        plan.append((f"rl{steps}_s{seed}", os.path.join(args.out, f"rl{steps}_s{seed}"),
                     ["--config.method=rl", f"--config.seed={seed}", f"--config.total_steps={steps}",
                      *args.overrides]))
    sources = {}
    for name, run in PLASTICITY_SOURCES:
        for seed in args.seeds:
            src = (None if run is None else os.path.join(args.out, f"rl{steps}_s{seed}") if run == "rl48"
                   else os.path.abspath(os.path.join(args.source, f"{run}_s{seed}")))
            sources[name, seed] = src
            plan.append((f"from_{name}_s{seed}", os.path.join(args.out, f"from_{name}_s{seed}"),
                         ["--config.method=rl", f"--config.seed={seed}", f"--config.total_steps={args.plastic_steps}",
                          task, *([f"--config.init_from={os.path.abspath(src)}"] if src else []),
                          *args.overrides]))
    waiting = []  # runs whose source is not finished yet: the rest run, then the report says what is pending
    for i, (label, workdir, overrides) in enumerate([] if args.report_only else plan, 1):
        src = next((o.split("=", 1)[1] for o in overrides if o.startswith("--config.init_from=")), None)
        if src and not _finished(src):
            print(f"compare: {label} starts from {src}, which is not a finished run yet: run the coupling study "
                  "(--from) first; skipped", file=sys.stderr)
            waiting.append(label)
            continue
        train(args.config, workdir, overrides, f"[{i}/{len(plan)}] {label}")
    report_started = time.time()
    done = lambda name: all(os.path.isfile(os.path.join(args.out, f"from_{name}_s{s}", "metrics.jsonl"))  # noqa: E731
                            for s in args.seeds)
    runs = {name: [load_run(os.path.join(args.out, f"from_{name}_s{s}")) for s in args.seeds]
            for name, _ in PLASTICITY_SOURCES if done(name)}  # --report-only while some are still to run
    section = plasticity_measures(runs, PLASTICITY_THRESHOLD)
    section["pending"] = [name for name, _ in PLASTICITY_SOURCES if name not in runs]
    section.update(task=f"rule: rule = {PLASTICITY_RULE!r} (dense reward), held out of the tiny model's training",
                   seeds=args.seeds, steps=args.plastic_steps, command=command.strip(),
                   sources={f"{n}_s{s}": v for (n, s), v in sources.items()})
    spans = [span_seconds(load_run(workdir)) for _, workdir, _ in plan
             if os.path.isfile(os.path.join(workdir, "metrics.jsonl"))]
    section["wall_time_s"] = sum(spans) + (time.time() - report_started)
    code = _write_section(args, "plasticity", section)
    if waiting:
        print(f"compare: {len(waiting)} runs wait for their sources ({', '.join(waiting)}); rerun this command "
              "when those have finished", file=sys.stderr)
        return 2
    return code


def _finished(workdir: str) -> bool:
    """A run that reached its config's total_steps (its last checkpoint is then its end)."""
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return False
    run = load_run(workdir)
    total = (run.config or {}).get("total_steps")
    steps = [r.get("step") for r in run.records if r.get("kind") == "train"]
    return bool(steps) and total is not None and max(steps) >= int(total)


def _write_section(args, key: str, section: dict) -> int:
    """DOCS/compare.json's `key` (the rest of the file kept), DOCS/compare_KEY.md and .png, and the page's
    `KEY:start` / `KEY:end` block."""
    os.makedirs(args.docs, exist_ok=True)
    path = os.path.join(args.docs, "compare.json")
    report = {}
    if os.path.isfile(path):
        with open(path) as f:
            report = json.load(f)
    report[key] = section
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    table = section_markdown(key, section)
    with open(os.path.join(args.docs, f"compare_{key}.md"), "w") as f:
        f.write(table)
    section_plot(key, section, os.path.join(args.docs, f"compare_{key}.png"))
    print("\n" + table)
    if args.page and update_doc_block(table, args.page, key):
        print(f"updated the {key} block in {args.page}")
    print(f"wrote {path} ({key!r}), compare_{key}.md and compare_{key}.png")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "fst_tiny_coupling.py"))
    ap.add_argument("--out", default=os.path.join("runs", "compare"), help="run workdirs go here")
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="compare.json / .md / .png go here")
    ap.add_argument("--page", "--readme", dest="page", default=os.path.join(ROOT, "docs", "coupling.md"),
                    help="the docs page whose compare:start/end block gets the table ('' = none)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--continual-seeds", type=int, nargs="*", default=None,
                    help="seeds of the continual runs (default: the first of --seeds)")
    ap.add_argument("--reuse-seeds", type=int, nargs="*", default=None,
                    help="seeds of the GEPA-rollout reuse runs (default: all of --seeds)")
    ap.add_argument("--steps", type=int, help="RL steps of each run (default: the config's total_steps)")
    ap.add_argument("--rl-steps", type=int, help="RL steps of the RL-alone runs, long enough for RL to plateau "
                    "(default: 4 × --steps)")
    ap.add_argument("--stage-steps", type=int, default=16, help="RL steps per stage of the continual schedule")
    ap.add_argument("--skip-continual", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--skip-reuse", action="store_true")
    ap.add_argument("--skip-decomposition", action="store_true")
    ap.add_argument("--skip-population", action="store_true",
                    help="no fst_nondominated runs (FST's population from the non-dominated set)")
    ap.add_argument("--study", choices=("coupling", "ceiling", "plasticity"), default="coupling",
                    help="coupling: the config's task (all the runs above); ceiling: FST, RL alone, GEPA-only and "
                    f"the population variant on exact-match {CEILING_RULE!r} (--out default runs/ceiling); "
                    f"plasticity: fresh RL on {PLASTICITY_RULE!r} from the coupling study's checkpoints "
                    "(--from, default runs/compare) and the base (--out default runs/plasticity)")
    ap.add_argument("--from", dest="source", default=os.path.join("runs", "compare"),
                    help="plasticity: the coupling study's --out, whose fst_s*/rl_s* runs are the sources")
    ap.add_argument("--plastic-steps", type=int, default=64, help="plasticity: RL steps of each fresh run")
    ap.add_argument("--report-only", action="store_true", help="run nothing: report on the runs already in --out")
    ap.add_argument("overrides", nargs="*", help="extra --config.x=y flags for every run (after --)")
    args = ap.parse_args(argv)
    command = "python launch/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.study == "plasticity":
        return plasticity(args, command)
    if args.study == "ceiling":
        args.skip_continual = args.skip_reuse = args.skip_ablation = args.skip_decomposition = True
        if args.out == os.path.join("runs", "compare"):
            args.out = os.path.join("runs", "ceiling")
        args.overrides = [CEILING_TASK, *args.overrides]

    common = ([f"--config.total_steps={args.steps}"] if args.steps else []) + args.overrides
    config = _load_config(args.config)
    _apply_overrides(config, [o for o in common if o.startswith("--config.")])
    rl_steps = args.rl_steps or 4 * int(config.total_steps)
    plan = []  # (label, workdir, overrides)
    variants = [("fst", []), ("rl", []), ("gepa", [])]  # (name, extra flags); run seed-major within each
    if not args.skip_population:
        variants.append(POPULATION_VARIANT)
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
        flags = common if name != "rl" else [f"--config.total_steps={rl_steps}", *(
            o for o in common if not o.startswith("--config.total_steps="))]
        plan.append((f"{name}_s{seed}", [f"--config.method={name.split('_')[0]}", f"--config.seed={seed}", *extra,
                                          *flags]))
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
    if args.study == "ceiling":
        load = lambda name: [load_run(os.path.join(args.out, f"{name}_s{s}"), name) for s in args.seeds]  # noqa: E731
        section = ceiling_measures({name: load(name) for name, _ in variants})
        section.update(task=f"rule: rule = {CEILING_RULE!r}, reward = 'exact'", seeds=args.seeds,
                       steps=int(config.total_steps), rl_steps=rl_steps, command=command.strip())
        if not args.skip_population:
            section["population"] = population_measures(load("fst"), load("fst_nondominated"),
                                                        config.gepa.seed_prompt)
        section["wall_time_s"] = sum(span_seconds(load_run(os.path.join(args.out, label))) for label, _ in plan) + (
            time.time() - report_started)
        return _write_section(args, "ceiling", section)
    load = lambda name: [load_run(os.path.join(args.out, f"{name}_s{s}"), name) for s in args.seeds]  # noqa: E731
    rl_runs = load("rl")
    names = [name for name, _ in variants]
    runs = {name: load(name) for name in names if name != "fst_reuse"}
    if "fst_reuse" in names:  # reuse against the same seeds' FST runs
        runs["fst_reuse"] = [load_run(os.path.join(args.out, f"fst_reuse_s{s}")) for s in reuse_seeds]
    spec = config.tasks[parse_schedule(config)[0][0]]
    report = {"task": f"{spec.task}: " + ", ".join(f"{k} = {v!r}" for k, v in dict(spec.options).items()), "config": os.path.relpath(args.config, ROOT),
              "seeds": args.seeds, "steps": int(config.total_steps), "rl_steps": rl_steps, "overrides": args.overrides,
              "methods": {name: method_measures(runs[name], rl_runs) for name in names if name != "fst_reuse"}}
    report["targets"] = targets(report["methods"])
    if not args.skip_population:
        report["population"] = population_measures(runs["fst"], runs["fst_nondominated"], config.gepa.seed_prompt)
    if not args.skip_reuse:
        plain = [runs["fst"][args.seeds.index(s)] for s in reuse_seeds]
        report["reuse"] = reuse_measures(runs["fst_reuse"], plain)
        report["reuse"]["seeds"] = reuse_seeds
        report["methods"]["fst_reuse"] = method_measures(runs["fst_reuse"],
                                                         [rl_runs[args.seeds.index(s)] for s in reuse_seeds])
    if not args.skip_continual:
        report["continual"] = continual_measures(
            {name: [load_run(os.path.join(args.out, f"continual_{name}_s{s}")) for s in continual_seeds]
             for name, _, _ in CONTINUAL_RUNS})
        report["continual_seeds"] = continual_seeds
        report["targets"]["continual_fst_at_least_rl"] = continual_target(report["continual"])
    if not args.skip_decomposition:
        report["decomposition"] = decomposition(
            args.config, os.path.join(args.out, f"fst_s{args.seeds[0]}"),
            ["--config.method=fst", f"--config.seed={args.seeds[0]}", *common])
    report["command"] = command.strip()
    # every run's own span (a run resumed later counts its recorded time), then this invocation's report
    spans = [span_seconds(load_run(os.path.join(args.out, label))) for label, _ in plan]
    report["run_seconds"] = dict(zip([label for label, _ in plan], spans))
    report["wall_time_s"] = sum(spans) + (time.time() - report_started)

    os.makedirs(args.docs, exist_ok=True)
    table = markdown(report)
    path = os.path.join(args.docs, "compare.json")
    if os.path.isfile(path):  # the ceiling and plasticity studies' sections stay
        with open(path) as f:
            report.update({k: v for k, v in json.load(f).items() if k in STUDY_SECTIONS})
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    with open(os.path.join(args.docs, "compare.md"), "w") as f:
        f.write(table)
    band_plot(report, os.path.join(args.docs, "compare.png"))
    print("\n" + table)
    if args.page and update_doc_block(table, args.page):
        print(f"updated the compare table in {args.page}")
    print(f"wrote {os.path.join(args.docs, 'compare.json')}, compare.md and compare.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("compare: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
