"""The dry run: every jitted program of a run lowered and compiled from abstract shapes, and its memory per device.

Nothing is read or allocated but shapes: the model's shapes come from `config.json` at `config.model.path` when
it exists, else from `config.model.preset`; parameters are `nnx.eval_shape`d and given the shardings the run
gives them on the configured mesh (fake CPU devices stand in for accelerators:
`XLA_FLAGS=--xla_force_host_platform_device_count=8`). Each program is lowered with the exact abstract arguments
the run passes (the shapes come from the same functions the run calls, `fst_jax.trainer.shapes`, and
`sampling.bucket_length`, `rl.step.abstract_state`) and compiled; `compiled.memory_analysis()` gives its
temporaries, per device.

Memory is accounted per phase, the phases running one after another:

    rollout     train params + Adam moments + frozen base + sampler weights (policy) + rollout KV cache
    gepa        the same, with GEPA's evaluation batches (and the minibatch batches)
    reflection  the same, the sampler holding the base weights instead (one sampler, weights swapped)
    eval        the same, with the mean@k evaluation sampler
    kl          train state + base + sampler weights + the KL program (policy and base log-probs)
    update      train state + base + gradient sums (sampler weights released) + the temporaries of the update's
                gradient program at its longest length (the shorter lengths compiled, not accounted)
    update_apply  the same resident buffers + the optimizer step's temporaries

A program's peak is the resident buffers alive in its phase plus its temporaries plus the outputs that are
not aliased to donated inputs; the plan's peak is the largest of these. Resident buffers are exact (shapes ×
shardings); temporaries are XLA:CPU's buffer assignment, an estimate of a GPU's.

Just over 400 lines: lowering and accounting every program of a run in one place is what keeps the plan and the run
from drifting apart; the shapes live in `shapes.py` and the cost in `cost_model.py` / `hlo_cost.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fst_jax.trainer import cost_model, evals
from fst_jax.runtime import parallel
from fst_jax import sampling
from fst_jax.config import validate
from fst_jax.models.config import Qwen3Config, canonical_dtype
from fst_jax.models.qwen3 import Qwen3
from fst_jax.rl import config as rl_config_lib, policy_update as rl_update
from fst_jax.sampling.engine import Deferred, slot_state
from fst_jax.trainer.shapes import (kl_length, mesh_config, prompt_buckets, sampler_calls, sampler_slots,
                                   update_length, update_lengths)

__all__ = ["Plan", "make_plan", "run_dry", "model_config", "HEADROOM", "EXIT_DOES_NOT_FIT"]

GB = 1e9
HEADROOM = 0.10          # the peak must stay under (1 − HEADROOM) × device memory
EXIT_DOES_NOT_FIT = 3
DEFAULT_DEVICE_MEMORY_GB = 80.0


def model_config(config) -> Qwen3Config:
    """Qwen3 shapes from `config.json` at `config.model.path`, else from `config.model.preset`."""
    m = config.model
    numerics = dict(dtype=canonical_dtype(m.dtype).name, param_dtype=canonical_dtype(m.param_dtype).name,
                    remat=m.remat, attention=m.get("attention", "xla"))
    path = os.path.expanduser(m.path or "")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return Qwen3Config.from_hf(path, **numerics)
    if m.get("preset"):
        return Qwen3Config.preset(m.preset, **numerics)
    where = f"no config.json at {path}" if path else "config.model.path is empty"
    raise ValueError(f"{where}: set config.model.preset (e.g. --config.model.preset=8B) to plan without a "
                     "checkpoint, or point config.model.path at a HF Qwen3 directory")


def abstract_params(model_cfg: Qwen3Config, mesh, rules=parallel.TRAIN_RULES, dtype=None):
    """(graphdef, params as ShapeDtypeStructs with the shardings `rules` give on `mesh`); nothing allocated."""
    abstract = nnx.eval_shape(lambda: Qwen3(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = parallel.param_shardings(state, mesh, rules)
    dtype = None if dtype is None else canonical_dtype(dtype)
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype or v.dtype, sharding=s),
                          nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    params = nnx.State(params) if not isinstance(params, nnx.State) else params
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


# --------------------------------------------------------------------------------------------- accounting

@dataclasses.dataclass
class ProgramMemory:
    """One compiled program's per-device memory (bytes) and the resident buffers alive while it runs."""

    temp: int
    argument: int
    output: int
    alias: int
    resident: tuple[str, ...]
    compile_s: float
    cpu_temp: int = 0
    cpu_upcast: int = 0
    compiled: bool = True
    cost: Any = None        # cost_model.program_cost: FLOPs and bytes per device

    def peak(self, resident_bytes: dict[str, int]) -> int:
        """Resident buffers alive (its arguments among them) + temporaries + outputs not written in place."""
        return sum(resident_bytes[r] for r in self.resident) + self.temp + self.output - self.alias


@dataclasses.dataclass
class Plan:
    """Per-device memory of a run: resident buffers, compiled programs, peak and verdict."""

    devices: int
    device_memory_gb: float
    resident: dict[str, int]
    programs: dict[str, ProgramMemory]
    model: str
    also_compiled: list[str] = dataclasses.field(default_factory=list)
    not_compiled: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    cost: dict | None = None  # cost_model.cycle_cost: seconds per phase and GPU-hours on config.plan.device
    lowered: dict[str, Any] = dataclasses.field(default_factory=dict)  # make_plan(platform=...): name → Lowered

    @property
    def peak_bytes(self) -> int:
        return max(p.peak(self.resident) for p in self.programs.values())

    @property
    def peak_program(self) -> str:
        return max(self.programs, key=lambda n: self.programs[n].peak(self.resident))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= (1 - HEADROOM) * self.device_memory_gb * GB

    def to_json(self) -> dict[str, Any]:
        gb = lambda b: round(b / GB, 3)  # noqa: E731
        return {"devices": self.devices, "device_memory_gb": self.device_memory_gb, "peak_gb": gb(self.peak_bytes),
                "peak_program": self.peak_program, "fits": self.fits, "headroom": HEADROOM, "model": self.model,
                "plan_seconds": round(self.seconds, 1), "also_compiled": self.also_compiled,
                "not_compiled": self.not_compiled,
                "resident": {k: gb(v) for k, v in self.resident.items()},
                "programs": {n: {"temp_gb": gb(p.temp), "argument_gb": gb(p.argument), "output_gb": gb(p.output),
                                 "alias_gb": gb(p.alias), "peak_gb": gb(p.peak(self.resident)),
                                 "cpu_temp_gb": gb(p.cpu_temp), "cpu_upcast_gb": gb(p.cpu_upcast),
                                 "compiled": p.compiled,
                                 "resident": list(p.resident), "compile_s": round(p.compile_s, 1)}
                             for n, p in self.programs.items()}, "cost": self.cost}

    def table(self) -> str:
        """The per-device memory table the dry run prints."""
        lines = [f"plan: {self.model} on {self.devices} devices, {self.device_memory_gb:g} GB each "
                 f"(fits below {(1 - HEADROOM) * self.device_memory_gb:.1f} GB)", "",
                 f"{'resident buffer':<28}{'GB/device':>10}"]
        lines += [f"{name:<28}{b / GB:>10.2f}" for name, b in self.resident.items()]
        lines += ["", f"{'program':<22}{'temp':>8}{'cpu temp':>9}{'args':>8}{'out':>8}{'peak':>8}  resident alive"]
        for name, p in self.programs.items():
            numbers = (f"{p.temp / GB:>8.2f}{p.cpu_temp / GB:>9.2f}{p.argument / GB:>8.2f}{p.output / GB:>8.2f}"
                       if p.compiled else f"{'not compiled':>33}")
            lines.append(f"{name:<22}{numbers}{p.peak(self.resident) / GB:>8.2f}  {', '.join(p.resident)}")
        lines += ["", "temp: the compiled temporaries less XLA:CPU's float32 copies of bf16 arguments (see "
                      "cpu_upcast_bytes); peak: resident alive + temp + outputs not written in place"]
        lines += ["", f"peak {self.peak_bytes / GB:.2f} GB/device in {self.peak_program}: "
                      f"{'fits' if self.fits else 'DOES NOT FIT'} ({self.seconds:.0f} s to plan)"]
        lines += ["", cost_model.cost_table(self.cost)] if self.cost else []
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: the peak, and when it does not fit, the three biggest items and the fields that shrink them."""
        limit = (1 - HEADROOM) * self.device_memory_gb
        if self.fits:
            return f"fits: peak {self.peak_bytes / GB:.1f} GB/device ≤ {limit:.1f} GB ({self.peak_program})"
        program = self.programs[self.peak_program]
        items = {name: self.resident[name] for name in program.resident}
        items[f"{self.peak_program} temporaries"] = program.temp
        biggest = sorted(items, key=items.get, reverse=True)[:3]
        described = "; ".join(f"{n} {items[n] / GB:.1f} GB ({_lever(n)})" for n in biggest)
        return (f"does not fit: peak {self.peak_bytes / GB:.1f} GB/device in {self.peak_program} > {limit:.1f} GB "
                f"(90% of config.mesh.device_memory_gb={self.device_memory_gb:g}); biggest: {described}")


# What shrinks each item: named in the one-line verdict when the plan does not fit.
_LEVERS = {
    "train_params": "config.mesh.fsdp",
    "optimizer_state": "config.mesh.fsdp",
    "base_params": "config.mesh.fsdp",
    "sampler_weights": "config.mesh.tensor",
    "rollout": "config.sampling.slots, sampling.max_new_tokens, sampling.max_prompt_tokens",
    "rollout_rest": "config.sampling.slots, sampling.max_new_tokens",
    "gepa": "config.sampling.slots, sampling.max_new_tokens",
    "gepa_minibatch": "config.gepa.proposals_per_iteration, gepa.minibatch_size",
    "reflection": "config.gepa.reflection.max_prompt_tokens, gepa.reflection.max_new_tokens",
    "eval": "config.eval.max_new_tokens, sampling.slots",
    "kl": "config.eval.kl_prompts, eval.kl_max_new_tokens",
    "update": "config.rl.micro_batch_size, model.remat, rl.logprob_chunk_size",
    "update_apply": "config.mesh.fsdp",
    "gradient_sums": "config.mesh.fsdp",
}


def _lever(item: str) -> str:
    """The config fields that shrink a resident buffer or a program's temporaries."""
    key = item.removesuffix(" temporaries").removesuffix("_kv_cache").removesuffix("_prefill").removesuffix("_decode")
    lever = _LEVERS.get(key, "config.mesh")
    if item.endswith("_prefill temporaries"):  # the insertion's attention scores
        lever += ", sampling.prefill_scores_mb"
    return lever


def _bytes(tree) -> int:
    """Per-device bytes of a pytree of ShapeDtypeStructs with shardings (the largest shard, every leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _compile(lowered, resident: tuple[str, ...]) -> ProgramMemory:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    upcast = cpu_upcast_bytes(compiled.as_text()) if jax.default_backend() == "cpu" else 0
    return ProgramMemory(temp=max(0, int(m.temp_size_in_bytes) - upcast), argument=int(m.argument_size_in_bytes),
                         output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes), resident=resident,
                         compile_s=time.perf_counter() - t0, cpu_temp=int(m.temp_size_in_bytes),
                         cpu_upcast=upcast, cost=cost_model.program_cost(compiled))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> (.*) \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\((.*)$")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def cpu_upcast_bytes(hlo_text: str, min_bytes: int = 1 << 20) -> int:
    """Bytes of float32 copies that XLA:CPU makes of bfloat16 arrays (≥ `min_bytes` each) in an optimized module.

    XLA:CPU has no bf16 × bf16 → bf16 matmul: it converts the operands to float32 first and, for loop-invariant
    weights, hoists the conversion out of the loop, so a bf16 program's temporaries hold a float32 copy of every
    weight (a [4096, 4096] bf16 matmul reports a 64 MiB temporary on CPU). GPUs multiply bf16 natively, so the
    plan subtracts these buffers from the CPU's temporaries (and reports both).
    """
    computations: dict[str, dict] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(1), {"params": header.group(2), "root": None, "lines": [],
                                                                "entry": line.startswith("ENTRY ")})
            continue
        if current is None:
            continue
        if " = " in line:
            current["lines"].append(line)
        if line.lstrip().startswith("ROOT "):
            current["root"] = line
    # computations whose whole job is bf16 → f32 (what a fusion of one convert calls)
    upcasts = {name for name, comp in computations.items()
               if comp["root"] and " convert(" in comp["root"] and "= f32[" in comp["root"]
               and "bf16[" in comp["params"] and len(comp["lines"]) <= 2}
    entry = next((name for name, comp in computations.items() if comp["entry"]), None)
    total = 0
    params: set[str] = set()
    for line in computations[entry]["lines"] if entry else []:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        inst, dtype, dims, op, rest = m.groups()
        if op == "parameter":
            params.add(inst)
        operand = re.match(r"%(\S+?)[),]", rest)
        called = re.search(r"calls=%(\S+?)[,\s}]", rest)
        # hoisted casts of the program's bf16 arguments (weights, caches): alive for the whole program
        if (dtype == "f32" and operand and operand.group(1) in params
                and ((op == "fusion" and called and called.group(1) in upcasts) or op == "convert")):
            size = 4 * math.prod(int(d) for d in dims.split(",") if d)
            total += size if size >= min_bytes else 0
    return total


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


# ------------------------------------------------------------------------------------------------ the plan

def device_memory_gb(config) -> float:
    """`config.mesh.device_memory_gb`, else what the first device reports, else 80."""
    if config.mesh.get("device_memory_gb"):
        return float(config.mesh.device_memory_gb)
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices report nothing, some backends raise
        stats = {}
    limit = stats.get("bytes_limit")
    return float(limit) / GB if limit else DEFAULT_DEVICE_MEMORY_GB


def make_plan(config, log=print, only: Sequence[str] | None = None, platform: str | None = None) -> Plan:
    """Lower and compile every jitted program of the run `config` describes, from abstract shapes; measure.

    When the resident buffers alone (state, sampler weights, one call kind's slot state) already exceed the
    budget, nothing is lowered or compiled and the plan reports that at once. Otherwise everything is lowered
    first, then compiled. `only`: plan just these
    programs (names of `sampler_calls`, "kl", "update"), e.g. to iterate on one. `platform` ("cuda", "tpu"):
    lower every program for that backend instead and compile nothing (they cannot be compiled without it);
    `plan.lowered` holds them by name — what shows, on a CPU, that no program holds a CPU-only construct.
    """
    t_start = time.perf_counter()
    validate(config, require_checkpoint=False)
    c = config
    model_cfg = model_config(c)
    mesh = parallel.make_mesh(mesh_config(c))
    rows_sharding = lambda ndim: parallel.batch_sharding(mesh, ndim)  # noqa: E731
    wanted = lambda name: only is None or name in only  # noqa: E731

    graphdef, params = abstract_params(model_cfg, mesh)
    _, base = abstract_params(model_cfg, mesh, dtype=model_cfg.dtype)
    rl_config = rl_config_lib.rl_config_from_run(c, sequence_length=update_length(c))
    state = rl_update.abstract_state(graphdef, params, rl_config)
    resident = {"train_params": _bytes(state.params), "optimizer_state": _bytes(state.opt_state),
                "base_params": _bytes(base)}
    state_items = ("train_params", "optimizer_state", "base_params")
    lowered: dict[str, tuple[Any, tuple[str, ...]]] = {}  # program -> (Lowered, resident items alive)
    smaller: list[tuple[str, Any]] = []                    # smaller prompt buckets: compiled, not accounted

    with jax.set_mesh(mesh):
        resident["sampler_weights"] = _bytes(sampling.abstract_sampling_weights(model_cfg, params, mesh=mesh))
        slots, seen, aliases, known = sampler_slots(c, mesh), {}, {}, {}
        calls = {name: call for name, call in sampler_calls(c).items() if wanted(name)}
        layout = {}  # name -> (prompt buckets, rows, slots it starts, KV columns)
        for name, call in calls.items():
            buckets, rows = prompt_buckets(c, call.prompt_tokens), call.rows(slots)
            start, columns = sampling.call_slots(rows, slots, mesh), buckets[-1] + call.max_new_tokens
            layout[name] = buckets, rows, start, columns
            resident[f"{name}_kv_cache"] = _bytes(slot_state(model_cfg, start, columns=columns,
                                                             max_new_tokens=call.max_new_tokens,
                                                             cache_dtype=model_cfg.dtype, mesh=mesh))
        if platform is None:  # before any lowering (a minute at 8B): the resident buffers alone may not fit
            bound = Plan(devices=mesh.size, device_memory_gb=device_memory_gb(c), resident=resident,
                         model=_describe(model_cfg, c),
                         programs={f"{name}_decode": ProgramMemory(0, 0, 0, 0, state_items + (
                             "sampler_weights", f"{name}_kv_cache"), 0.0, compiled=False) for name in calls})
            if bound.programs and not bound.fits:
                log("plan: the resident buffers alone exceed the budget; nothing lowered or compiled")
                bound.seconds = time.perf_counter() - t_start
                return bound
        for name, call in calls.items():
            buckets, rows, start, columns = layout[name]
            programs = sampling.lower_sampler_programs(
                model_cfg, params, mesh=mesh, slots=slots, rows=call.prompts or slots, prompt_buckets=buckets,
                max_new_tokens=call.max_new_tokens, num_samples=call.num_samples, draw=c.sampling.draw,
                fixed=call.fixed, platform=platform, known=known, lazy=platform is None,
                prefill_scores_mb=c.sampling.prefill_scores_mb)
            # accounted: the largest start, the largest prompt bucket — its KV buffer, its largest insertion
            # (a prefill) and its decode over the whole buffer; every other program is compiled, not accounted
            inserts = [n for n in programs if n.startswith(f"insert_B{start}_C{columns}_")
                       and n.endswith(f"_P{buckets[-1]}_n{call.num_samples}")]
            size = lambda n: int(re.search(r"_I(\d+)_", n).group(1))  # noqa: E731
            most = min(call.prompts or start, max(1, start // call.num_samples))  # the largest insertion it runs
            insert = min((n for n in inserts if size(n) >= most), key=size, default=max(inserts, key=size))
            decode = f"decode_B{start}_C{columns}_W{columns}"
            kv = f"{name}_kv_cache"
            log(f"plan: {name}: {start} slots × {columns} KV columns (prompt bucket {buckets[-1]} + "
                f"{call.max_new_tokens} new tokens), {call.num_samples} samples per prompt, slot state "
                f"{resident[kv] / GB:.2f} GB/device; {len(programs)} programs")
            lowered[f"{name}_prefill"] = (_lowered(programs[insert]), state_items + ("sampler_weights", kv))
            lowered[f"{name}_decode"] = (_lowered(programs[decode]), state_items + ("sampler_weights", kv))
            for program_name, program in programs.items():
                key, same = f"{name}@{program_name}:engine", (program_name, call.max_new_tokens)
                if program_name in (insert, decode):
                    seen.setdefault(same, f"{name}_{'prefill' if program_name == insert else 'decode'}")
                elif same in seen:  # the same program as another kind's: compiled once, costed for both
                    aliases[key] = seen[same]
                else:
                    seen[same] = key
                    smaller.append((f"{name}@{program_name}", {"engine": program}))

        if c.eval.kl_prompts and wanted("kl"):
            kl_rows = sampling.row_bucket(sampler_calls(c)["kl_sample"].prompts, mesh)
            new = int(c.eval.kl_max_new_tokens)
            for bucket in prompt_buckets(c, c.sampling.max_prompt_tokens):  # as for the sampler: largest accounted
                ids = _sds((kl_rows, evals.kl_sequence_length(bucket, new)), jnp.int32, rows_sharding(2))
                program = evals.lower_kl_program(graphdef, state.params, base, ids, ids,
                                                 chunk_size=c.rl.logprob_chunk_size, platform=platform)
                if bucket < sampling.bucket_length(int(c.sampling.max_prompt_tokens)):
                    smaller.append((f"kl@{bucket}", {"kl": program}))
                    continue
                log(f"plan: kl: {kl_rows} rows × {kl_length(c)} tokens")
                lowered["kl"] = (program, state_items + ("sampler_weights",))

        if c.method != "gepa" and wanted("update"):
            batch_rows = int(c.cycle.problems_per_step) * int(c.cycle.rollouts_per_problem)
            rows = rl_update.micro_batch_rows(rl_config, batch_rows, mesh)
            lengths = update_lengths(c)
            programs = rl_update.lower_update(state, base, rl_config, rows=rows, lengths=lengths, platform=platform)
            resident["gradient_sums"] = _bytes(programs["zero"].out_info)
            log(f"plan: update: micro-batches of {rows} rows at lengths {', '.join(map(str, lengths))}")
            # the sampler's copy is released after the rollouts (run_sampler), so it is not alive here; the
            # longest length is accounted, the shorter ones compiled
            update_items = state_items + ("gradient_sums",)
            lowered["update"] = (programs[f"gradients@{lengths[-1]}"], update_items)
            lowered["update_apply"] = (programs["apply"], update_items)
            smaller += [(f"update@{n}", {"gradients": programs[f"gradients@{n}"]}) for n in lengths[:-1]]
            smaller.append(("update_zero", {"zero": programs["zero"]}))

    plan = Plan(devices=mesh.size, device_memory_gb=device_memory_gb(c), resident=resident, programs={},
                model=_describe(model_cfg, c))
    # A lower bound first: the programs' resident buffers alone, no temporaries.
    plan.programs = {n: ProgramMemory(0, 0, 0, 0, items, 0.0, compiled=False) for n, (_, items) in lowered.items()}
    if platform is not None:
        plan.lowered = {name: program for name, (program, _) in lowered.items()}
        plan.lowered.update({f"{name}:{part}": _lowered(p) for name, programs in smaller
                             for part, p in programs.items()})
    elif plan.fits:
        for name, (program, items) in lowered.items():
            plan.programs[name] = _compile(program, items)
            log(f"plan: compiled {name} in {plan.programs[name].compile_s:.0f} s")
        costs = {n: p.cost for n, p in plan.programs.items()}
        t0 = time.perf_counter()
        held: list = []  # programs compiled below, whose costs are read (released near the map limit)
        typical = {w["typical"] for w in cost_model.sampler_work(c).values()}
        typical |= {aliases[t] for t in typical if t in aliases}  # the same program compiled under another kind
        for name, programs in smaller:
            if not (c.plan.compile_all or name.startswith("update") or f"{name}:engine" in typical):
                plan.not_compiled.append(name)
                continue
            for part, program in programs.items():
                costs[f"{name}:{part}"] = cost_model.program_cost(_lowered(program).compile())
                held.append(program)
                _release_if_near_map_limit(held, log)
            plan.also_compiled.append(name)
        costs.update({alias: costs[key] for alias, key in aliases.items() if key in costs})
        log(f"plan: compiled {len(plan.also_compiled)} more programs (other slot counts, widths, insertions, buckets "
            f"and lengths; not accounted) in {time.perf_counter() - t0:.0f} s"
            + (f"; {len(plan.not_compiled)} more neither lowered nor compiled (plan.compile_all=False)"
               if plan.not_compiled else ""))
        uses, unknown = cost_model.program_uses(c, costs)
        plan.cost = cost_model.cycle_cost(c, uses, mesh.size, unknown)
    else:
        log("plan: the resident buffers alone exceed the budget; nothing compiled")
    plan.seconds = time.perf_counter() - t_start
    return plan


def _memory_maps() -> tuple[int, int] | None:
    """(memory maps this process holds, the kernel's per-process limit), or None off Linux."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return None


def _release_if_near_map_limit(held: list, log, fraction: float = 0.6) -> None:
    """Drop the compiled programs in `held` (lowered lazily, `engine.Deferred`) when this process nears the
    kernel's memory-map limit.

    XLA:CPU's JIT maps its code in many small regions (~1,000 per Qwen3-8B decode program compiled for 8 fake
    devices, measured) and a lowered program keeps its compiled executable alive, so a full 8B plan (70-odd
    programs) crossed Linux's default of 65,530 and died in LLVM with "Cannot allocate memory". The plan keeps
    only the numbers it read, so those programs can go (re-lowered if asked for again); a small plan never comes
    near the limit and keeps its programs for the run after it."""
    maps = _memory_maps()
    if maps is None or maps[0] <= fraction * maps[1]:
        return
    released = [program for program in held if isinstance(program, Deferred)]
    for program in released:
        program.release()
    held.clear()
    jax.clear_caches()
    log(f"plan: released {len(released)} compiled programs (this process held {maps[0]:,} memory maps; the "
        f"kernel allows {maps[1]:,})")


def _lowered(program):
    """A jax Lowered, from an engine program lowered lazily (`engine.Deferred`) or not."""
    return program.get() if isinstance(program, Deferred) else program


def _describe(model_cfg: Qwen3Config, config) -> str:
    size = model_cfg.num_params() / 1e9
    return (f"Qwen3 {size:.2f}B params ({config.model.preset or os.path.basename(str(config.model.path))}), "
            f"params {model_cfg.param_dtype}, compute {model_cfg.dtype}, remat {model_cfg.remat}")


def run_dry(config, workdir: str, log=print) -> int:
    """`launch/train.py --dry_run`: plan, print the table, write WORKDIR/plan.json; the exit status (0 or 3)."""
    plan = make_plan(config, log=log)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump(plan.to_json(), f, indent=1)
    log(plan.table())
    log(plan.verdict())
    return 0 if plan.fits else EXIT_DOES_NOT_FIT
