"""What a finished run says to a person: a few plain lines (`end_of_run_lines`) that `launch/train.py` prints when
a run ends — reward before → after under the learned and the seed prompt, steps and rollouts, the learned prompt,
KL to base and forgetting, where the plot and metrics are, and the exact commands that compare it with the other
method — while the last evaluation in full goes to `WORKDIR/final_eval.json` (`FINAL_EVAL`)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from fst_jax.runtime.metrics import METRICS_FILE, TENSORBOARD_DIR

__all__ = ["FINAL_EVAL", "PROMPT_CHARS_SHOWN", "end_of_run_lines", "other_method_command"]

FINAL_EVAL = "final_eval.json"
PROMPT_CHARS_SHOWN = 600


def _num(value, spec: str = ".3f") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value) if value is not None else "n/a"  # "nan"/"inf" as metrics.jsonl writes them


def _before_after(first: Mapping | None, last: Mapping, key: str) -> str:
    before = f"{_num(first.get(key))} → " if first is not None and key in first else ""
    return f"{before}{_num(last.get(key))}"


def other_method_command(argv: Sequence[str], method: str, other: str, workdir: str,
                         default_workdir: str) -> list[str]:
    """The command line that trains the same config with `--config.method=<other>` into a workdir beside this
    one: `argv` (as typed, `argv[0]` the script) with its method and workdir flags replaced."""
    out, skip = ["python", argv[0]], False
    for i, arg in enumerate(argv[1:], 1):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--config.method", "--workdir"):
            skip = "=" not in arg and i + 1 < len(argv)  # the value is the next word
            continue
        out.append(arg)
    out.append(f"--config.method={other}")
    if os.path.normpath(workdir) != os.path.normpath(default_workdir):  # the default names the method itself
        stem = workdir.rstrip("/")
        stem = stem[: -len(method) - 1] if stem.endswith(f"-{method}") else stem
        out.append(f"--workdir={stem}-{other}")
    return out


def _workdir_of(command: Sequence[str], default: str) -> str:
    return next((a.split("=", 1)[1] for a in command if a.startswith("--workdir=")), default)


def end_of_run_lines(*, evals: Sequence[Mapping[str, Any]], population: Sequence[str], seed_prompt: str,
                     method: str, workdir: str, plot_path: str | None, argv: Sequence[str], default_workdir: str,
                     eval_k: int | None = None) -> list[str]:
    """The closing lines of a run, from its "eval" records in step order (the last one is the result), the final
    population (its best first) and how it was launched (`argv`, `default_workdir` = runs/<config>-<method>)."""
    if not evals:
        return [f"no evaluation recorded in {os.path.join(workdir, METRICS_FILE)}"]
    last = evals[-1]
    task = last.get("task")
    first = next((r for r in evals if r is not last and r.get("task") == task), None)
    span = f"step {first['step']} → {last['step']}" if first is not None else f"step {last['step']} (no earlier " \
        "evaluation: eval.at_start=False)"
    mean = f"mean@{eval_k}" if eval_k else "mean@k"
    lines = [f"validation reward ({mean} on {task or 'the task'}, {span}):"]
    learned = population[0] if population else seed_prompt
    if learned != seed_prompt:
        lines.append(f"  learned prompt  {_before_after(first, last, 'val/reward')}")
        lines.append(f"  seed prompt     {_before_after(first, last, 'val/reward_seed')}")
    else:
        lines.append(f"  seed prompt     {_before_after(first, last, 'val/reward')}"
                     + ("  (method rl: the prompt stays the seed)" if method == "rl" else ""))
    rl, gepa = last.get("rl_rollouts"), last.get("gepa_rollouts")
    rollouts = " + ".join(p for p in (f"{rl} RL" if rl is not None else "", f"{gepa} GEPA" if gepa else "") if p)
    cycles = last.get("cycles", "?")
    lines.append(f"steps: {last.get('rl_steps', last['step'])} RL steps in {cycles} cycle{'' if cycles == 1 else 's'}; "
                 f"rollouts: {rollouts or 'n/a'}" + (f" ({last['reflection_calls']} reflections)"
                                                     if last.get("reflection_calls") else ""))
    if learned != seed_prompt:
        distinct = len(set(population))
        of = f", {distinct} distinct of {len(population)}" if distinct > 1 else ""
        lines.append(f"learned prompt (the population's best{of}):")
        shown = learned if len(learned) <= PROMPT_CHARS_SHOWN else \
            learned[:PROMPT_CHARS_SHOWN] + f"… ({len(learned) - PROMPT_CHARS_SHOWN} more characters; all of it in " \
                                           f"{os.path.join(workdir, 'gepa')})"
        lines += [f"  | {line}" for line in shown.splitlines() or [""]]  # verbatim: a terminal wraps long lines
    kl = [f"{_num(last[k], '.4g')} under the {w} prompt" for k, w in (("kl_to_base_best", "learned"),
                                                                         ("kl_to_base", "seed"))
          if k in last and not (k == "kl_to_base_best" and learned == seed_prompt)]
    if kl:
        lines.append(f"KL to the base model: {', '.join(kl)}")
    forgetting = sorted(k for k in last if k.startswith("forgetting/"))
    if forgetting:
        parts = [f"{k.split('/', 1)[1]} {_before_after(first, last, k)}" for k in forgetting]
        lines.append(f"forgetting (other tasks, {mean} under the seed prompt): {', '.join(parts)}")
    plot = plot_path if plot_path and os.path.isfile(plot_path) else None
    lines.append(f"plot:    {plot}" if plot else
                 f"plot:    not drawn; python launch/plot.py {workdir} --out {os.path.join(workdir, 'plot.png')}")
    lines.append(f"metrics: {os.path.join(workdir, METRICS_FILE)} (TensorBoard: tensorboard --logdir "
                 f"{os.path.join(workdir, TENSORBOARD_DIR)})")
    lines.append(f"this evaluation, every number: {os.path.join(workdir, FINAL_EVAL)}")
    other = "fst" if method == "rl" else "rl"
    command = other_method_command(argv, method, other, workdir, default_workdir)
    other_dir = _workdir_of(command, default_workdir.rsplit("-", 1)[0] + f"-{other}")
    what = "RL alone (the same run with the prompt fixed to the seed)" if other == "rl" else "FST"
    out = os.path.join(os.path.dirname(workdir.rstrip("/")) or ".", f"{method}-vs-{other}.png")
    lines += [f"compare with {what}:", f"  {shlex.join(command)}",
              f"  python launch/plot.py {shlex.quote(workdir)} {shlex.quote(other_dir)} --out {shlex.quote(out)}"]
    return lines
