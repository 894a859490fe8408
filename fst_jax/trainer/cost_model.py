"""What a run costs on a named accelerator: the dry run's compiled programs × calls per cycle ÷ the device's peaks.

The dry run (`launch/train.py --dry_run`) compiles every program a run calls; `program_cost` reads each one's
FLOPs and bytes per device from its optimized HLO (`hlo_cost`: loops counted by their trip counts, the
decode loop as one step, XLA:CPU's bf16 → f32 converts left out). `program_uses` says how often the recipe
calls each program in one cycle of T RL steps; `cycle_cost` turns that into a roofline time per phase:

    seconds of a call = max(FLOPs ÷ (peak × compute_efficiency), bytes ÷ (HBM bandwidth × bandwidth_efficiency))

taken per decode step for the sampler's loop (a step reads every weight and the KV columns it attends over:
memory-bound; the engine's decode at the width that holds a prompt and a mean answer, `decode_steps` steps with
every slot busy) and once for every other program (an insertion's prefill once per slot-full of rows). GPU-hours = devices × (cycles × cycle seconds + the evaluation at the start)
÷ 3600.

Left out: host time (tokenizing, reward scoring, GEPA's bookkeeping, data loading), compile time, checkpoints,
communication between devices (the FSDP all-gathers and reduce-scatters of the update), a hosted reflection
LM's time, GEPA's window evaluations of accepted children (their rollouts are counted as minibatch
iterations, which cost more calls per rollout), rollouts reused from GEPA (`cycle.reuse_gepa_rollouts`),
forgetting-task evaluations, and prompts shorter than the largest bucket.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from fst_jax.sampling.engine_programs import length_buckets, row_buckets
from fst_jax.sampling.sampler import MIN_ROWS, bucket_length
from fst_jax.trainer.hlo_cost import HloCost, hlo_cost
from fst_jax.trainer.shapes import mesh_config, sampler_calls, sampler_slots, update_lengths

__all__ = ["Device", "DEVICES", "PHASES", "ProgramUse", "device_named", "program_cost", "answer_range", "decode_steps", "sampler_work", "update_micro_batches",
           "mean_answer_tokens", "program_uses", "roofline_seconds", "cycle_cost", "cost_table"]


@dataclasses.dataclass(frozen=True)
class Device:
    """An accelerator's dense bf16 peak (FLOP/s) and HBM bandwidth (bytes/s), from the vendor's datasheet."""

    name: str
    peak_flops: float
    hbm_bytes_per_s: float


DEVICES = {
    "H100": Device("NVIDIA H100 SXM 80 GB", 989e12, 3.35e12),
    "H200": Device("NVIDIA H200 SXM 141 GB", 989e12, 4.8e12),
    "TPU v5p": Device("Google TPU v5p", 459e12, 2.76e12),
}


def device_named(kind: str) -> str | None:
    """The DEVICES key whose name a jax `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5p") contains, else None."""
    return next((key for key in DEVICES if key.lower() in kind.lower()), None)
PHASES = ("rollouts", "gepa", "reflection", "update", "evaluations")
# The dry run's sampler call kinds (trainer/shapes.py `sampler_calls`) by phase of a cycle.
_PHASE_OF_CALL = {"rollout": "rollouts", "gepa": "gepa", "gepa_minibatch": "gepa", "reflection": "reflection",
                  "eval": "evaluations", "kl_sample": "evaluations"}


@dataclasses.dataclass(frozen=True)
class ProgramUse:
    """One compiled program in a cycle: its phase, its cost per device, `calls` per cycle and, for a decode
    program, the loop `steps` each call runs."""

    name: str
    phase: str
    cost: HloCost
    calls: float
    steps: float = 0.0

    def seconds_per_call(self, device: Device, compute_efficiency: float, bandwidth_efficiency: float) -> float:
        """Roofline seconds of one call: its fixed part, plus `steps` times its loop step."""
        eff = (device, compute_efficiency, bandwidth_efficiency)
        return (roofline_seconds(self.cost.flops, self.cost.bytes, *eff)
                + self.steps * roofline_seconds(self.cost.step_flops, self.cost.step_bytes, *eff))


def program_cost(compiled) -> HloCost:
    """A compiled program's FLOPs and bytes per device (`hlo_cost` of its optimized HLO), with XLA's own
    `cost_analysis()` numbers beside them (`xla_flops`, `xla_bytes`: loop bodies once, CPU upcasts included)."""
    xla = compiled.cost_analysis() or {}
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    return dataclasses.replace(hlo_cost(compiled.as_text()), xla_flops=float(xla.get("flops", 0.0)),
                               xla_bytes=float(xla.get("bytes accessed", 0.0)))


def roofline_seconds(flops: float, nbytes: float, device: Device, compute_efficiency: float,
                     bandwidth_efficiency: float) -> float:
    """max(compute time, memory time) at the stated fractions of the device's peaks."""
    return max(flops / (device.peak_flops * compute_efficiency), nbytes / (device.hbm_bytes_per_s * bandwidth_efficiency))


def answer_range(max_new_tokens: int, mean_tokens: float) -> tuple[float, float]:
    """The answer lengths the cost model assumes: uniform on [mean − w, mean + w], w = min(mean, cap − mean)
    (the mean clipped to [1, cap]), so that no answer is longer than its cap."""
    mean = min(max(float(mean_tokens), 1.0), float(max_new_tokens))
    w = min(mean, max_new_tokens - mean)
    return mean - w, mean + w


def _answer_length(rank: int, rows: int, max_new_tokens: int, mean_tokens: float) -> float:
    """The expected `rank`-th shortest of `rows` answer lengths (`answer_range`): lo + (hi − lo)·rank/(rows + 1)."""
    lo, hi = answer_range(max_new_tokens, mean_tokens)
    return lo + (hi - lo) * rank / (rows + 1)


def decode_steps(rows: int, max_new_tokens: int, mean_tokens: float, slots: int | None = None) -> float:
    """Decode steps of one call of `rows` rows through the request engine with `slots` rows in flight (None:
    as many as rows). When every row fits, the call runs until its longest row stops: the expected longest of
    `rows` answers, mean − w + 2w·n/(n + 1). With more rows than slots, rows stream through: rows × mean ÷
    slots steps with every slot busy, plus the drain of the last slot-full (its longest answer less the mean).
    Each step is costed with every slot (the tail's compaction into fewer rows is not modelled)."""
    slots = rows if slots is None else slots
    if rows <= slots:
        return _answer_length(rows, rows, max_new_tokens, mean_tokens)
    lo, hi = answer_range(max_new_tokens, mean_tokens)
    mean = (lo + hi) / 2
    return rows * mean / slots + _answer_length(slots, slots, max_new_tokens, mean_tokens) - mean


def update_micro_batches(rows: int, micro_batch_rows: int, lengths: tuple[int, ...], prompt_tokens: int,
                         max_new_tokens: int, mean_tokens: float) -> dict[int, int]:
    """Micro-batches per planned length in one update (`rl.policy_update.update`): the rows sorted longest
    first in groups of `micro_batch_rows`, each group at the smallest planned length that holds its longest
    row, prompt + the expected answer of that rank (every row taken to carry loss)."""
    counts: dict[int, int] = {}
    for group in range(-(-rows // micro_batch_rows)):
        longest = prompt_tokens + _answer_length(rows - group * micro_batch_rows, rows, max_new_tokens, mean_tokens)
        length = min((n for n in lengths if n >= longest), default=max(lengths))
        counts[length] = counts.get(length, 0) + 1
    return counts


def mean_answer_tokens(config) -> int:
    """`plan.mean_answer_tokens`, default half of `sampling.max_new_tokens`."""
    value = config.plan.get("mean_answer_tokens")
    return int(value) if value else int(config.sampling.max_new_tokens) // 2


def _evaluations(config) -> tuple[float, float]:
    """(evaluations per cycle, evaluations over the run): at cycle ends every `eval.every` steps and at the end,
    plus one at the start with `eval.at_start`."""
    T, total, every = int(config.cycle.rl_steps), int(config.total_steps), int(config.eval.every)
    cycles = total / T
    if every:
        interval = math.ceil(every / T) * T
        later = total // interval + (1 if total % interval else 0)
    else:
        later = 1
    return later / cycles, later + (1 if config.eval.at_start else 0)


def sampler_work(config) -> dict[str, dict[str, Any]]:
    """Per sampler call kind: calls per cycle, rows per call, the slots it starts with, its KV columns, the mean
    answer, the width a mean answer's decode attends over, decode steps per call and `typical` — the name the
    dry run gives that width's decode program ("<kind>@decode_B…_C…_W…:engine")."""
    c = config
    T, B, G = int(c.cycle.rl_steps), int(c.cycle.problems_per_step), int(c.cycle.rollouts_per_problem)
    calls = sampler_calls(c)
    mean = mean_answer_tokens(c)
    window, proposals, minibatch = B * T, int(c.gepa.proposals_per_iteration), int(c.gepa.minibatch_size)
    seed_rollouts = min(int(c.gepa.budget_rollouts), math.ceil(float(c.gepa.seed_scoring_passes) * window))
    iterations = (int(c.gepa.budget_rollouts) - seed_rollouts) // (2 * proposals * minibatch)
    evals_per_cycle, _ = _evaluations(c)
    problems = int(c.eval.num_problems) or int(c.plan.eval_problems)
    # (calls per cycle, rows per call) of each kind: every request is one call, streamed through the slots
    gepa_prompts = calls["gepa"].prompts if "gepa" in calls else 1
    per_cycle = {"rollout": (T, B * G), "gepa": (math.ceil(seed_rollouts / gepa_prompts), min(seed_rollouts, gepa_prompts)),
                 "gepa_minibatch": (2 * iterations, proposals * minibatch), "reflection": (iterations, proposals),
                 "eval": (evals_per_cycle, problems * int(c.eval.k)), "kl_sample": (evals_per_cycle, int(c.eval.kl_prompts))}
    slots, axes = sampler_slots(c), mesh_config(c)
    multiple = axes.get("data", 1) * axes.get("fsdp", 1)
    out = {}
    for kind, (n_calls, rows) in per_cycle.items():
        if kind not in calls:
            continue
        call = calls[kind]
        start = min((b for b in row_buckets(slots, multiple, MIN_ROWS) if b >= rows), default=slots)
        prompt = bucket_length(call.prompt_tokens)
        columns = prompt + call.max_new_tokens
        # a reflection's length: the answers' mean as a fraction of their cap, applied to its own cap
        tokens = mean * call.max_new_tokens / int(c.sampling.max_new_tokens) if kind == "reflection" else mean
        width = min(w for w in length_buckets(columns) if w >= min(columns, prompt + tokens + 32))
        out[kind] = dict(calls=n_calls, rows=rows, start=start, columns=columns, tokens=tokens, width=width,
                         steps=decode_steps(rows, call.max_new_tokens, tokens, start),
                         typical=f"{kind}@decode_B{start}_C{columns}_W{width}:engine")
    return out


def program_uses(config, costs: Mapping[str, HloCost]) -> tuple[list[ProgramUse], list[str]]:
    """The recipe's calls per cycle of each program the dry run compiled (`costs`: name → cost); also the
    names it has no count for (reported, never silently costed as 0).

    rollouts: one call of B·G rows per step, T steps. gepa: the seeds' `seed_scoring_passes` passes over the
    window (B·T problems), then iterations of 2 × proposals × minibatch rollouts (parents and children) until
    `budget_rollouts` is spent, each with one reflection call. evaluations: mean@k on `eval.num_problems` (0:
    `plan.eval_problems`) problems and the KL evaluation's sampling and scoring. A sampler call's insertions
    ("<kind>_prefill") run once per slot-full of rows; its decode steps (`decode_steps`) are costed with the
    program at the width a mean answer attends over (`sampler_work`), else with "<kind>_decode" (the whole
    buffer). update: per RL step, its micro-batches at each planned length (`update_micro_batches`; "update" is
    the longest, "update@N:gradients" the others), one zeroing of the sums and one optimizer step. The engine's
    other programs and smaller prompt buckets ("<kind>@…") are not costed.
    """
    c = config
    T, B, G = int(c.cycle.rl_steps), int(c.cycle.problems_per_step), int(c.cycle.rollouts_per_problem)
    mean = mean_answer_tokens(c)
    work = sampler_work(c)
    evals_per_cycle, _ = _evaluations(c)
    n = B * G
    lengths = update_lengths(c)
    micro_batches = update_micro_batches(n, int(c.rl.micro_batch_size or n), lengths,
                                         int(c.sampling.max_prompt_tokens), int(c.sampling.max_new_tokens), mean)
    uses, unknown = [], []
    for name, cost in costs.items():
        kind, _, part = name.rpartition("_")
        update_at = re.fullmatch(r"update@(\d+)(:gradients)?", name)
        length = int(update_at.group(1)) if update_at else max(lengths)
        if kind in work and part in ("prefill", "decode"):
            w = work[kind]
            if part == "prefill":  # one insertion per slot-full of rows
                uses.append(ProgramUse(name, _PHASE_OF_CALL[kind], cost, w["calls"] * math.ceil(w["rows"] / w["start"])))
            elif w["typical"] in costs:
                uses.append(ProgramUse(name, _PHASE_OF_CALL[kind], cost, 0.0, w["steps"]))
                uses.append(ProgramUse(w["typical"], _PHASE_OF_CALL[kind], costs[w["typical"]], w["calls"], w["steps"]))
            else:
                uses.append(ProgramUse(name, _PHASE_OF_CALL[kind], cost, w["calls"], w["steps"]))
        elif (name == "update" or update_at) and length in lengths:
            uses.append(ProgramUse(name, "update", cost, T * micro_batches.get(length, 0)))
        elif name in ("update_apply", "update_zero:zero"):
            uses.append(ProgramUse(name, "update", cost, T))
        elif name == "kl":
            uses.append(ProgramUse(name, "evaluations", cost, evals_per_cycle))
        elif name.startswith("rollout_rest") or ("@" in name and not update_at):
            continue  # GEPA's rollouts reused: not modelled (costed as sampled); the engine's other programs
        else:
            unknown.append(name)
    return uses, unknown


def cycle_cost(config, uses: list[ProgramUse], devices: int, unknown: tuple[str, ...] = ()) -> dict[str, Any]:
    """The plan's `"cost"`: seconds per phase of one cycle, per RL step, and the run's GPU-hours on
    `plan.device`, with every assumption stated beside the numbers."""
    p = config.plan
    device = DEVICES[p.device]
    eff = (device, float(p.compute_efficiency), float(p.bandwidth_efficiency))
    phases = {phase: 0.0 for phase in PHASES}
    programs = {}
    for use in uses:
        per_call = use.seconds_per_call(*eff)
        phases[use.phase] += use.calls * per_call
        flops, nbytes = use.cost.total(use.steps)
        step_bound = ("memory" if use.cost.step_bytes / (device.hbm_bytes_per_s * eff[2])
                      > use.cost.step_flops / (device.peak_flops * eff[1]) else "compute")
        bound = step_bound if use.steps else (
            "memory" if nbytes / (device.hbm_bytes_per_s * eff[2]) > flops / (device.peak_flops * eff[1]) else "compute")
        programs[use.name] = {"phase": use.phase, "calls_per_cycle": round(use.calls, 3),
                              "steps_per_call": round(use.steps, 1), "flops": flops, "bytes": nbytes,
                              "step_flops": use.cost.step_flops, "step_bytes": use.cost.step_bytes,
                              "xla_cost_analysis": {"flops": use.cost.xla_flops, "bytes": use.cost.xla_bytes},
                              "seconds_per_call": _round(per_call), "bound": bound,
                              "uncounted_custom_calls": list(use.cost.uncounted)}
    T = int(config.cycle.rl_steps)
    cycle = sum(phases.values())
    evals_per_cycle, _ = _evaluations(config)
    one_evaluation = phases["evaluations"] / evals_per_cycle if evals_per_cycle else 0.0
    at_start = one_evaluation if config.eval.at_start else 0.0
    run_seconds = int(config.total_steps) / T * cycle + at_start
    mean = mean_answer_tokens(config)
    lo, hi = answer_range(int(config.sampling.max_new_tokens), mean)
    return {"device": device.name, "devices": devices, "peak_tflops": device.peak_flops / 1e12,
            "hbm_tb_per_s": device.hbm_bytes_per_s / 1e12, "compute_efficiency": eff[1],
            "bandwidth_efficiency": eff[2], "mean_answer_tokens": mean,
            "answer_lengths": f"uniform on [{lo:g}, {hi:g}] tokens; a sampler call streams its rows through the "
                              "slots, then drains; prompts at sampling.max_prompt_tokens",
            "cycle_seconds": {k: _round(v) for k, v in phases.items()}, "cycle_total_seconds": _round(cycle),
            "step_seconds": _round(cycle / T), "total_steps": int(config.total_steps),
            "total_gpu_hours": _round(devices * run_seconds / 3600), "programs": programs,
            "programs_without_calls": list(unknown),
            "leaves_out": "host time (tokenizing, reward scoring, GEPA bookkeeping), compile time, checkpoints, "
                          "communication between devices, a hosted reflection LM, GEPA's window evaluations of "
                          "accepted children, rollouts reused from GEPA, forgetting-task evaluations, prompts "
                          "shorter than the largest bucket"}


def _round(x: float) -> float:
    """Six significant digits: readable in plan.json, and a tiny model's microseconds stay non-zero."""
    return float(f"{x:.6g}")


def cost_table(cost: Mapping[str, Any]) -> str:
    """The cost lines the dry run prints under its memory table."""
    width = max([24] + [len(name) + 2 for name in cost["programs"]])  # engine names run long
    lines = [f"cost on {cost['devices']} × {cost['device']} ({cost['peak_tflops']:g} TFLOP/s bf16 at "
             f"{cost['compute_efficiency']:.0%}, {cost['hbm_tb_per_s']:g} TB/s at {cost['bandwidth_efficiency']:.0%}); "
             f"answers {cost['answer_lengths']}", "",
             f"{'program':<{width}}{'phase':<12}{'calls/cycle':>12}{'steps':>7}{'TFLOP':>10}{'GB':>10}{'s/call':>9}  bound"]
    for name, p in cost["programs"].items():
        lines.append(f"{name:<{width}}{p['phase']:<12}{p['calls_per_cycle']:>12g}{p['steps_per_call']:>7.0f}"
                     f"{p['flops'] / 1e12:>10.3g}{p['bytes'] / 1e9:>10.4g}{p['seconds_per_call']:>9.3g}  {p['bound']}")
    phases = ", ".join(f"{k} {v:.4g} s" for k, v in cost["cycle_seconds"].items())
    lines += ["", f"cycle: {phases}; total {cost['cycle_total_seconds']:.4g} s ({cost['step_seconds']:.4g} s per RL "
                  f"step); {cost['total_steps']} steps: {cost['total_gpu_hours']:.4g} GPU-hours",
              f"left out: {cost['leaves_out']}"]
    if cost["programs_without_calls"]:
        lines.append(f"NOT COSTED (no calls per cycle known): {', '.join(cost['programs_without_calls'])}")
    return "\n".join(lines)
