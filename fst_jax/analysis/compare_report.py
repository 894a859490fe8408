"""The measures and the report of `launch/compare.py`: per-run numbers from `metrics.jsonl`, mean ± std over
seeds, the issue's targets met or missed, DOCS/compare.md and docs/coupling.md's compare block. The band plot
is `compare_plot.band_plot`.

Over 400 lines on purpose: one report whose sections (the coupling table, continual, reuse, the ceiling, the
population rule, plasticity) share one set of per-run measures and number formats; split by section, every
file would reach into the others' helpers."""

from __future__ import annotations

import os

import numpy as np

from fst_jax.analysis import runs as run_records

# the plasticity study's sources, as its table and plot name them
PLASTICITY_SOURCES = {"fst": "FST at its end", "rl48": "RL at FST's step count", "rl": "RL at its plateau",
                      "base": "the base model"}
LABELS = {"fst": "FST", "rl": "RL", "gepa": "GEPA-only", "fst_dominated": "FST, population topped up (ablation)",
          "fst_reuse": "FST, GEPA rollouts reused", "fst_nondominated": "FST, population from the non-dominated set",
          "rl48": "RL at FST's steps", "base": "base"}
STAGES = ("stage1", "stage2", "stage3")
PLATEAU = 0.15  # RL has plateaued when its last third gained at most this fraction of its whole run's gain
NEAR_PEAK = 0.99  # the second sample-efficiency measure: steps to this fraction of RL's peak


# ------------------------------------------------------------------------------------------ per-run measures

def _evals(run: run_records.Run, task: str | None = None) -> list[dict]:
    return [r for r in run.records if r.get("kind") == "eval" and run_records.number(r.get("val/reward")) is not None
            and (task is None or r.get("task") == task)]


def _final(run: run_records.Run, key: str = "val/reward", task: str | None = None) -> float | None:
    values = [r[key] for r in _evals(run, task) if run_records.number(r.get(key)) is not None]
    return values[-1] if values else None


def _peak(run: run_records.Run) -> float | None:
    return max((r["val/reward"] for r in _evals(run)), default=None)


def _kl_at(run: run_records.Run, reward: float) -> float | None:
    """KL to base (seed prompt) at the first evaluation whose validation reward reaches `reward`."""
    return next((r.get("kl_to_base") for r in _evals(run) if r["val/reward"] >= reward - 1e-12), None)


def _reach(run: run_records.Run, target: float | None, x: str) -> float | None:
    if target is None:
        return None
    xs, ys = run_records.series(run.records, "val/reward", x=x)
    return run_records.first_reaching(xs, ys, target) if xs.size else None


def _forgetting(run: run_records.Run) -> dict[str, list]:
    keys = sorted({k for r in _evals(run) for k in r if k.startswith("forgetting/")})
    out = {}
    for key in keys:
        values = [r[key] for r in _evals(run) if run_records.number(r.get(key)) is not None]
        out[key.removeprefix("forgetting/")] = [values[0], values[-1]] if values else None
    return out


def _gepa_cycles(run: run_records.Run) -> dict[str, float] | None:
    cycles = [r for r in run.records if r.get("kind") == "gepa_cycle" and "proposals" in r]
    if not cycles:
        return None
    return {key: float(np.mean([r[key] for r in cycles]))
            for key in ("proposals", "accepted", "metric_calls", "seed_scoring_calls", "front")}


def _cycle_seconds(run: run_records.Run) -> float | None:
    """Mean wall time of one cycle: GEPA (its sampling and reflection included) + RL sampling + update seconds,
    evaluations excluded, over the cycles run."""
    last = [r for r in run.records if r.get("kind") == "eval" and r.get("cycles") and "time_rl_sampling" in r]
    if not last:
        return None
    r = last[-1]
    return (r["time_gepa"] + r["time_rl_sampling"] + r["time_update"]) / r["cycles"]


def _last_third_gain(run: run_records.Run) -> float | None:
    """Validation reward gained over the last third of the run (final − the first evaluation at or after ⅔ of
    the last evaluated step): ≈ 0 once the curve has flattened."""
    evals = _evals(run)
    if len(evals) < 2:
        return None
    cut = next(r for r in evals if r["step"] >= 2 * evals[-1]["step"] / 3)
    return evals[-1]["val/reward"] - cut["val/reward"]


def _curve(run: run_records.Run) -> dict[str, list]:
    xs, ys = run_records.series(run.records, "val/reward")
    _, kl = run_records.series(run.records, "kl_to_base")
    return {"steps": xs.tolist(), "reward": ys.tolist(), "kl_to_base": kl.tolist() if kl.size == xs.size else None}


def method_measures(runs: list[run_records.Run], rl_runs: list[run_records.Run]) -> dict:
    """Per-seed measures of one method's runs, against the same seeds' RL runs."""
    out = {k: [] for k in ("final", "peak", "steps_to_rl_peak", "rollouts_to_rl_peak", "steps_to_99pct_rl_peak",
                           "rollouts_to_99pct_rl_peak", "kl_at_matched_reward",
                           "final_kl", "final_kl_best_prompt", "final_seed_prompt", "cycle_seconds",
                           "last_third_gain", "total_gain")}
    out["forgetting"], out["gepa_per_cycle"], out["curves"] = [], [], []
    for run, rl in zip(runs, rl_runs):
        rl_peak = _peak(rl)
        matched = min((v for v in (_final(run), _final(rl)) if v is not None), default=None)
        out["final"].append(_final(run))
        out["peak"].append(_peak(run))
        out["steps_to_rl_peak"].append(_reach(run, rl_peak, "step"))
        out["rollouts_to_rl_peak"].append(_reach(run, rl_peak, "rollouts"))
        near = None if rl_peak is None else NEAR_PEAK * rl_peak
        out["steps_to_99pct_rl_peak"].append(_reach(run, near, "step"))
        out["rollouts_to_99pct_rl_peak"].append(_reach(run, near, "rollouts"))
        out["kl_at_matched_reward"].append(None if matched is None else _kl_at(run, matched))
        out["final_kl"].append(_final(run, "kl_to_base"))
        out["final_kl_best_prompt"].append(_final(run, "kl_to_base_best"))
        out["final_seed_prompt"].append(_final(run, "val/reward_seed"))
        out["cycle_seconds"].append(_cycle_seconds(run))
        out["last_third_gain"].append(_last_third_gain(run))
        evals = _evals(run)
        out["total_gain"].append(evals[-1]["val/reward"] - evals[0]["val/reward"] if evals else None)
        out["forgetting"].append(_forgetting(run))
        out["gepa_per_cycle"].append(_gepa_cycles(run))
        out["curves"].append(_curve(run))
    return out


def _sampling_seconds_per_step(run: run_records.Run) -> float | None:
    """Median seconds of one RL step's rollout sampling: the step-to-step increments of the run's cumulative
    `time_rl_sampling`. The median leaves out the steps that compiled a program (seconds, not tenths) and is
    little moved by a busy machine's slow steps, so runs whose GEPA searches took different paths compare."""
    times = [r["time_rl_sampling"] for r in run.records
             if r.get("kind") == "train" and run_records.number(r.get("time_rl_sampling")) is not None]
    steps = np.diff([0.0, *times])
    return float(np.median(steps)) if len(steps) else None


def reuse_measures(reuse_runs: list[run_records.Run], plain_runs: list[run_records.Run]) -> dict:
    """Fraction of RL rollouts taken from GEPA's evaluations, and the wall time per cycle saved against the same
    seeds' FST runs without reuse (GEPA + sampling + update seconds, evaluations excluded). Because the two runs'
    searches take different paths, their cycle times differ for reasons of their own; so also: the share of a
    cycle that RL sampling takes without reuse (reuse can save at most fraction × share of it) and the median
    RL sampling seconds per step with and without reuse."""
    fractions, saved, sampling_saved, share, per_step, per_step_plain = [], [], [], [], [], []
    for run, plain in zip(reuse_runs, plain_runs):
        train = [r for r in run.records if r.get("kind") == "train" and "reused_rollouts" in r]
        total = sum(r["rollouts_this_step"] for r in train)
        fractions.append(sum(r["reused_rollouts"] for r in train) / total if total else None)
        cycle, plain_cycle = _cycle_seconds(run), _cycle_seconds(plain)
        saved.append(None if cycle is None or not plain_cycle else 1.0 - cycle / plain_cycle)
        sampling, plain_sampling = _final(run, "time_rl_sampling"), _final(plain, "time_rl_sampling")
        sampling_saved.append(None if sampling is None or not plain_sampling else 1.0 - sampling / plain_sampling)
        cycles = _final(plain, "cycles")  # RL sampling seconds per cycle over the seconds of a cycle
        share.append(None if plain_sampling is None or not cycles or not plain_cycle
                     else plain_sampling / cycles / plain_cycle)
        per_step.append(_sampling_seconds_per_step(run))
        per_step_plain.append(_sampling_seconds_per_step(plain))
    step_saved = [None if a is None or not b else 1.0 - a / b for a, b in zip(per_step, per_step_plain)]
    fraction, rl_share = _mean(fractions), _mean(share)
    # the reuse run's reward at each evaluation against the range the runs without reuse span there
    inside, points = 0, 0
    for run in reuse_runs:
        for step, reward in zip(*run_records.series(run.records, "val/reward")):
            others = [y for p in plain_runs for x, y in zip(*run_records.series(p.records, "val/reward")) if x == step]
            if others:
                points += 1
                inside += min(others) - 1e-9 <= reward <= max(others) + 1e-9
    return {"fraction": fraction, "fraction_per_seed": fractions, "wall_time_saved": _mean(saved),
            "wall_time_saved_per_seed": saved, "rl_sampling_time_saved": _mean(sampling_saved),
            "rl_sampling_time_saved_per_seed": sampling_saved,
            "rl_sampling_share_of_cycle": rl_share, "rl_sampling_share_of_cycle_per_seed": share,
            "wall_time_saved_ceiling": None if fraction is None or rl_share is None else fraction * rl_share,
            "rl_sampling_s_per_step": {"reuse": per_step, "plain": per_step_plain},
            "rl_sampling_per_step_saved": _mean(step_saved), "rl_sampling_per_step_saved_per_seed": step_saved,
            "final": [_final(r) for r in reuse_runs],
            "evaluations_inside_the_seed_range": [inside, points]}


def span_seconds(run: run_records.Run) -> float:
    """A run's wall time: for each session of it (from a "config" record, which every start or resumption writes,
    to the last train or eval record before the next one), the seconds from its first to its last record,
    summed. So the hours between an interrupted run and its resumption do not count, and rerunning a finished
    run, as a repeated compare.py does, adds nothing."""
    total, start, end = 0.0, None, None
    for r in run.records:
        t = run_records.number(r.get("time"))
        if t is None:
            continue
        if r.get("kind") == "config":
            total += (end - start) if end is not None else 0.0
            start, end = t, None
        else:
            start = t if start is None else start
            end = t
    return total + ((end - start) if end is not None else 0.0)


def continual_measures(runs: dict[str, list[run_records.Run]]) -> dict:
    return {name: {stage: [_final(r, task=stage) for r in rs] for stage in STAGES} for name, rs in runs.items()}


def _flat(gain: float | None, total: float | None) -> bool:
    """A curve is flat when its last third gained at most PLATEAU of the whole run's gain (or lost)."""
    return bool(gain is not None and (gain <= 0 or (total and total > 0 and gain <= PLATEAU * total)))


def ceiling_measures(runs: dict[str, list[run_records.Run]]) -> dict:
    """The ceiling study: per method (fst, rl, gepa and any variant), per seed, the final and peak validation
    reward, the steps run, whether the curve is flat, and the curves; the target FST > max(RL, GEPA-only) by
    more than the largest seed std."""
    methods = {}
    for name, rs in runs.items():
        m = method_measures(rs, rs)
        methods[name] = {"final": m["final"], "peak": m["peak"], "steps": [_final(r, "step") for r in rs],
                         "last_third_gain": m["last_third_gain"], "total_gain": m["total_gain"],
                         "flat": [_flat(g, t) for g, t in zip(m["last_third_gain"], m["total_gain"])],
                         "final_seed_prompt": m["final_seed_prompt"], "final_kl": m["final_kl"],
                         "curves": m["curves"]}
    fst, rl, gepa = methods["fst"], methods["rl"], methods["gepa"]
    best_other = max(_mean(rl["final"]) or 0.0, _mean(gepa["final"]) or 0.0)
    spread = max(_std(rl["final"]) or 0.0, _std(gepa["final"]) or 0.0, _std(fst["final"]) or 0.0)
    margin = (_mean(fst["final"]) or 0.0) - best_other
    rl_steps, fst_steps = _mean(rl["steps"]), _mean(fst["steps"])
    return {"methods": methods, "targets": {
        "final_above_both": {"fst": _mean(fst["final"]), "rl": _mean(rl["final"]), "gepa": _mean(gepa["final"]),
                             "best_other": best_other, "margin": margin, "largest_std": spread,
                             "met": margin > spread},
        "fst_and_gepa_flat": {"fst": fst["flat"], "gepa": gepa["flat"],
                              "met": all(fst["flat"]) and all(gepa["flat"])},
        "rl_at_least_4x_steps": {"rl": rl_steps, "fst": fst_steps,
                                 "met": bool(rl_steps and fst_steps and rl_steps >= 4 * fst_steps)}}}


def _seed_prompt_share(run: run_records.Run, seed_prompt: str) -> float | None:
    """Mean share of the rollout population that is the seed prompt, over the cycles after GEPA first put another
    prompt into it (before that the seed prompt is all there is)."""
    shares, started = [], False
    for r in run.records:
        if r.get("kind") == "gepa_cycle" and r.get("population"):
            pop = r["population"]
            started = started or any(p != seed_prompt for p in pop)
            if started:
                shares.append(sum(p == seed_prompt for p in pop) / len(pop))
    return float(np.mean(shares)) if shares else None


def population_measures(front: list[run_records.Run], nondominated: list[run_records.Run],
                        seed_prompt: str) -> dict:
    """FST with the population from the non-dominated set against the front (today's), paired by seed: the
    per-seed difference of final rewards, and the verdict: better when the mean difference exceeds the larger of
    the two arms' seed stds."""
    a, b = [_final(r) for r in front], [_final(r) for r in nondominated]
    diffs = [None if x is None or y is None else y - x for x, y in zip(a, b)]
    spread = max(_std(a) or 0.0, _std(b) or 0.0)
    mean_diff = _mean(diffs)
    return {"final": {"front": a, "nondominated": b}, "peak": {"front": [_peak(r) for r in front],
                                                                "nondominated": [_peak(r) for r in nondominated]},
            "paired_difference": diffs, "mean_difference": mean_diff, "largest_std": spread,
            "seed_prompt_share": {"front": [_seed_prompt_share(r, seed_prompt) for r in front],
                                  "nondominated": [_seed_prompt_share(r, seed_prompt) for r in nondominated]},
            "nondominated_better": bool(mean_diff is not None and mean_diff > spread)}


def steps_to(run: run_records.Run, threshold: float) -> float | None:
    """The first evaluated step whose validation reward reaches `threshold` (None: never)."""
    return next((float(r["step"]) for r in _evals(run) if r["val/reward"] >= threshold - 1e-12), None)


def plasticity_measures(runs: dict[str, list[run_records.Run]], threshold: float) -> dict:
    """Fresh RL from each source checkpoint: per seed, final reward, steps to `threshold`, the curves; the claim
    (FST's checkpoint learns at least as fast as RL's: steps to the threshold, a run that never reaches it
    counting as the run's length + 1, and final reward) checked against each RL source."""
    out = {"threshold": threshold, "from": {}}
    for name, rs in runs.items():
        starts = [(_evals(r) or [{}])[0].get("val/reward") for r in rs]
        finals = [_final(r) for r in rs]
        out["from"][name] = {"final": finals, "start": starts,
                             "gain": [None if a is None or b is None else b - a for a, b in zip(starts, finals)],
                             "steps_to_threshold": [steps_to(r, threshold) for r in rs],
                             "steps_run": [_final(r, "step") for r in rs], "curves": [_curve(r) for r in rs]}

    def slowness(name):
        f = out["from"][name]
        return _mean([s if s is not None else (n or 0) + 1 for s, n in zip(f["steps_to_threshold"], f["steps_run"])])
    claims = {}
    for other in (n for n in runs if n.startswith("rl") and "fst" in runs):
        a, b = slowness("fst"), slowness(other)
        gain_a, gain_b = _mean(out["from"]["fst"]["gain"]), _mean(out["from"][other]["gain"])
        claims[f"fst_at_least_as_fast_as_{other}"] = {
            "fst_steps": a, f"{other}_steps": b,
            "fst_final": _mean(out["from"]["fst"]["final"]), f"{other}_final": _mean(out["from"][other]["final"]),
            "fst_gain": gain_a, f"{other}_gain": gain_b,
            # fewer steps to the threshold; at equal steps (neither reached it, say) the larger gain
            "met": bool(a is not None and b is not None and (a < b or (a == b and gain_a is not None
                                                                        and gain_b is not None and gain_a >= gain_b)))}
    out["targets"] = claims
    return out


def section_markdown(key: str, section: dict) -> str:
    """The docs table of the ceiling or plasticity section."""
    lines = []
    if key == "ceiling":
        m, t = section["methods"], section["targets"]
        cols = [k for k in ("fst", "rl", "gepa", "fst_nondominated") if k in m]
        lines += [f"Task: `{section['task']}`; seeds {section['seeds']}; {section['steps']} RL steps per run, RL "
                  f"alone {section['rl_steps']}. Mean ± std over seeds.", "",
                  "| | " + " | ".join(LABELS[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for title, field, spec in (("final validation reward (mean@k, best prompt)", "final", ".3f"),
                                   ("peak validation reward", "peak", ".3f"),
                                   ("final reward under the seed prompt", "final_seed_prompt", ".3f"),
                                   ("final KL to base, seed prompt", "final_kl", ".4f"),
                                   ("reward gained over the last third of the run", "last_third_gain", ".3f"),
                                   ("steps run", "steps", ".0f")):
            lines.append(f"| {title} | " + " | ".join(_ms(m[k][field], spec) for k in cols) + " |")
        lines += ["", "| seed | " + " | ".join(LABELS[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for i, seed in enumerate(section["seeds"]):
            lines.append(f"| {seed} | " + " | ".join(_ms([m[k]["final"][i]]) for k in cols) + " |")
        f = t["final_above_both"]
        lines += ["", "Targets:", "",
                  f"- FST's final > max(RL, GEPA-only) by more than the largest seed std: FST {_fmt(f['fst'])}, RL "
                  f"{_fmt(f['rl'])}, GEPA-only {_fmt(f['gepa'])}; margin {f['margin']:+.3f} vs std "
                  f"{f['largest_std']:.3f} — **{'met' if f['met'] else 'missed'}**",
                  f"- FST and GEPA-only flat (last third ≤ {PLATEAU:.0%} of the run's gain) on every seed: FST "
                  f"{t['fst_and_gepa_flat']['fst']}, GEPA-only {t['fst_and_gepa_flat']['gepa']} — "
                  f"**{'met' if t['fst_and_gepa_flat']['met'] else 'missed'}**",
                  f"- RL alone ran ≥ 4× FST's steps: {_fmt(t['rl_at_least_4x_steps']['rl'], '.0f')} vs "
                  f"{_fmt(t['rl_at_least_4x_steps']['fst'], '.0f')} — "
                  f"**{'met' if t['rl_at_least_4x_steps']['met'] else 'missed'}**"]
    else:
        fr = section["from"]
        names = list(fr)
        titles = PLASTICITY_SOURCES
        lines += [f"Fresh RL on `{section['task']}` ({section['steps']} steps, a new optimizer) from each checkpoint; "
                  f"seeds {section['seeds']}; threshold {section['threshold']} validation reward.", "",
                  "| from | reward at the start | final reward | gain | steps to the threshold |",
                  "|---|---|---|---|---|"]
        for n in names:
            reached = fr[n]["steps_to_threshold"]
            cell = _ms(reached, ".0f") if any(x is not None for x in reached) else \
                f"not reached in {section['steps']} steps"
            lines.append(f"| {titles.get(n, n)} | {_ms(fr[n].get('start', []))} | {_ms(fr[n]['final'])} | "
                         f"{_ms(fr[n].get('gain', []), '+.3f')} | {cell} |")
        if section.get("pending"):
            lines += ["", f"Not run yet (no runs from): {', '.join(titles.get(n, n) for n in section['pending'])}."]
        lines += ["", "Targets (steps to the threshold, a run that never reaches it counted as its length + 1; at equal "
                      "steps the larger gain):", ""]
        for name, c in section["targets"].items():
            other = name.removeprefix("fst_at_least_as_fast_as_")
            lines.append(f"- from FST's checkpoint at least as fast as from {titles.get(other, other)}: "
                         f"{_fmt(c['fst_steps'], '.1f')} vs {_fmt(c[other + '_steps'], '.1f')} steps, gain "
                         f"{_fmt(c.get('fst_gain'), '+.3f')} vs {_fmt(c.get(other + '_gain'), '+.3f')}, final "
                         f"{_fmt(c['fst_final'])} vs {_fmt(c[other + '_final'])} — **{'met' if c['met'] else 'missed'}**")
    pop = section.get("population")
    if pop:
        lines += ["", population_markdown(pop)]
    lines += ["", f"Made by `{section['command']}` on 2 CPU cores: {section['wall_time_s'] / 60:.0f} min (the runs' "
                  "own wall times, summed, and the report)."]
    return "\n".join(lines) + "\n"


def population_markdown(pop: dict) -> str:
    share = pop["seed_prompt_share"]
    return (f"Population from the non-dominated set vs the front (today's), paired by seed: final "
            f"{_ms(pop['final']['nondominated'])} vs {_ms(pop['final']['front'])}; per-seed difference "
            f"{', '.join(_fmt(d, '+.3f') for d in pop['paired_difference'])} (mean {_fmt(pop['mean_difference'], '+.3f')}"
            f" vs the larger seed std {pop['largest_std']:.3f}: "
            f"**{'better' if pop['nondominated_better'] else 'not better'}**); share of the population that is the "
            f"seed prompt once GEPA found another: {_ms(share['nondominated'])} vs {_ms(share['front'])}.")


# ----------------------------------------------------------------------------------------------- statistics

def _valid(values) -> list[float]:
    return [float(v) for v in values if run_records.number(v) is not None]


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
    for key, name in (("steps_to_rl_peak", "steps_to_rl_peak_half"),
                      ("steps_to_99pct_rl_peak", "steps_to_99pct_rl_peak_half")):
        steps_fst, steps_rl = _mean(fst[key]), _mean(rl[key])
        reached = len(_valid(fst[key]))
        out[name] = {"fst": steps_fst, "rl": steps_rl, "fst_seeds_reaching": reached,
                     "met": bool(reached == len(fst[key]) and steps_fst is not None and steps_rl
                                 and steps_fst <= 0.5 * steps_rl)}
    gain, total = _mean(rl["last_third_gain"]), _mean(rl["total_gain"])
    out["rl_plateaued"] = {"last_third_gain": gain, "total_gain": total, "threshold": PLATEAU,
                           "met": bool(gain is not None and total and gain <= PLATEAU * total)}
    kl_fst, kl_rl = _mean(fst["kl_at_matched_reward"]), _mean(rl["kl_at_matched_reward"])
    out["kl_at_matched_30pct_lower"] = {"fst": kl_fst, "rl": kl_rl,
                                        "met": bool(kl_fst is not None and kl_rl and kl_fst <= 0.7 * kl_rl)}
    return out


def _not_all(target: dict, seeds: int) -> str:
    reached = target.get("fst_seeds_reaching", seeds)
    return "" if reached == seeds else f" (FST reached it on {reached} of {seeds} seeds; the mean is over those)"


def continual_target(continual: dict) -> dict:
    """Continual FST (population kept) ≥ RL on every stage after the first."""
    stages = {stage: {"fst": _mean(continual["fst"][stage]), "rl": _mean(continual["rl"][stage])}
              for stage in STAGES[1:]}
    met = all(v["fst"] is not None and v["rl"] is not None and v["fst"] >= v["rl"] for v in stages.values())
    return {"stages": stages, "met": met}


# ------------------------------------------------------------------------------------------------ the report

def markdown(report: dict) -> str:
    m = report["methods"]
    cols = [k for k in ("fst", "rl", "gepa", "fst_nondominated", "fst_dominated", "fst_reuse") if k in m]
    rl_steps = report.get("rl_steps", report["steps"])
    lines = [f"Task: `{report['task']}`; seeds {report['seeds']}; {report['steps']} RL steps per run, RL alone "
             f"{rl_steps} (to its plateau). Mean ± std over seeds; every method's final is at the end of its "
             "own run.", "",
             "| | " + " | ".join(LABELS[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = (("final validation reward (mean@k, best prompt)", "final", ".3f"),
            ("peak validation reward", "peak", ".3f"),
            ("final reward under the seed prompt", "final_seed_prompt", ".3f"),
            ("RL steps to reach RL's peak (same seed)", "steps_to_rl_peak", ".1f"),
            ("total rollouts to reach RL's peak", "rollouts_to_rl_peak", ".0f"),
            ("RL steps to reach 99% of RL's peak", "steps_to_99pct_rl_peak", ".1f"),
            ("total rollouts to reach 99% of RL's peak", "rollouts_to_99pct_rl_peak", ".0f"),
            ("KL to base at matched reward, seed prompt", "kl_at_matched_reward", ".4f"),
            ("final KL to base, seed prompt", "final_kl", ".4f"),
            ("final KL to base, best prompt", "final_kl_best_prompt", ".4f"),
            ("reward gained over the last third of the run", "last_third_gain", ".3f"),
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
    p = t.get("rl_plateaued")
    lines += ["", "Targets:", ""]
    if p:
        lines.append(f"- RL alone has plateaued (its last third gained ≤ {p['threshold']:.0%} of its whole run's "
                     f"gain): {_fmt(p['last_third_gain'])} of {_fmt(p['total_gain'])} over {rl_steps} steps — "
                     f"**{'met' if p['met'] else 'missed'}**")
    lines += [
              f"- final reward FST > max(RL, GEPA-only) by more than the largest seed std: FST "
              f"{t['final_above_both']['fst']:.3f}, best other {t['final_above_both']['best_other']:.3f}, margin "
              f"{t['final_above_both']['margin']:+.3f} vs std {t['final_above_both']['largest_std']:.3f} — "
              f"**{'met' if t['final_above_both']['met'] else 'missed'}**",
              f"- steps to RL's peak ≤ ½ of RL's: FST {_fmt(t['steps_to_rl_peak_half']['fst'], '.1f')} vs RL "
              f"{_fmt(t['steps_to_rl_peak_half']['rl'], '.1f')} — "
              f"**{'met' if t['steps_to_rl_peak_half']['met'] else 'missed'}**"
              + _not_all(t['steps_to_rl_peak_half'], len(report["seeds"])),
              f"- the same at 99% of RL's peak (a peak at the ceiling, 1.000, is missed by one wrong character in "
              f"any of k samples): FST {_fmt(t['steps_to_99pct_rl_peak_half']['fst'], '.1f')} vs RL "
              f"{_fmt(t['steps_to_99pct_rl_peak_half']['rl'], '.1f')} — "
              f"**{'met' if t['steps_to_99pct_rl_peak_half']['met'] else 'missed'}**"
              + _not_all(t['steps_to_99pct_rl_peak_half'], len(report["seeds"])),
              f"- KL (seed prompt) at matched reward ≥ 30% lower than RL's: FST "
              f"{_fmt(t['kl_at_matched_30pct_lower']['fst'], '.4f')} vs RL "
              f"{_fmt(t['kl_at_matched_30pct_lower']['rl'], '.4f')} — "
              f"**{'met' if t['kl_at_matched_30pct_lower']['met'] else 'missed'}**"]
    if report.get("continual"):
        names = list(report["continual"])
        titles = {"fst": "FST, population kept", "fst_reset": "FST, reset at each switch",
                  "gepa": "GEPA-only, kept", "gepa_reset": "GEPA-only, reset", "rl": "RL"}
        lines += ["", f"Continual schedule ({' → '.join(STAGES)}, held-out rules; seed "
                      f"{', '.join(map(str, report.get('continual_seeds', [])))}): validation reward at the end of "
                      "each stage.", "",
                  "| stage | " + " | ".join(titles.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
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
                      f"{', '.join(_fmt(x, '.1%') for x in r['wall_time_saved_per_seed'])}), RL sampling time "
                      f"saved {_fmt(r.get('rl_sampling_time_saved'), '.1%')} over a run, compiles included, and "
                      f"{_fmt(r.get('rl_sampling_per_step_saved'), '.1%')} per step (median, steady state). "
                      f"Without reuse, RL sampling is {_fmt(r.get('rl_sampling_share_of_cycle'), '.1%')} of a cycle, "
                      f"so reuse can save at most {_fmt(r.get('wall_time_saved_ceiling'), '.1%')} of it here; final reward "
                      f"{_ms(r['final'])} vs {_ms(m['fst']['final'])} without reuse; at "
                      f"{r['evaluations_inside_the_seed_range'][0]} of {r['evaluations_inside_the_seed_range'][1]} "
                      "evaluations its reward lies within the range of the runs without reuse."]
    if report.get("population"):
        lines += ["", population_markdown(report["population"])]
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


def update_doc_block(table: str, readme: str, key: str = "compare") -> bool:
    """Replace the text between `<!-- KEY:start -->` and `<!-- KEY:end -->` in a docs page (README or
    docs/coupling.md); False when the file or its markers are missing."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
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
