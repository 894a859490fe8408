"""What a run carries from step to step and across a restart: its counters, the seeds it derives, and the
checkpoint of everything (params, optimizer, RNG, population, data streams, counters) written at cycle ends
and restored on resume — or, for `config.init_from`, another run's weights with a fresh optimizer."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from fst_jax.rl import TrainState
from fst_jax.runtime.checkpoint import Checkpointer, abstract_like
from fst_jax.trainer import run_config

if TYPE_CHECKING:
    from fst_jax.trainer.runner import FSTRunner

log = logging.getLogger("fst_jax")
COMPONENT = "system_prompt"  # the one GEPA component a candidate has: the system prompt


@dataclasses.dataclass
class Counters:
    """Run totals, saved with every checkpoint."""

    rl_steps: int = 0
    rl_rollouts: int = 0
    gepa_rollouts: int = 0
    reflection_calls: int = 0
    reflection_failures: int = 0
    consecutive_reflection_failures: int = 0  # carried across cycles: an endpoint down for good stops the run
    cycles: int = 0
    time_gepa: float = 0.0
    time_sampling: float = 0.0
    time_update: float = 0.0
    time_rl_sampling: float = 0.0  # the RL steps' share of time_sampling (the rest: GEPA's and reflection's)
    time_eval: float = 0.0


def derive_seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (no Python hash randomisation)."""
    key = jax.random.PRNGKey(0)
    for p in parts:
        key = jax.random.fold_in(key, int(p) % (2**31))
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def in_dtype(params, dtype):
    """A copy of `params` in `dtype` with the same shardings (the same arrays when already in it)."""
    target = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x if x.dtype == target else x.astype(target), params)


def plain_dict(x) -> dict:
    """A ConfigDict / dict / None as a plain dict."""
    if x is None:
        return {}
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def arrays(runner: FSTRunner) -> dict[str, Any]:
    s = runner.state
    return {"params": s.params, "opt_state": s.opt_state, "step": s.step, "rng": s.rng,
            "num_rollouts": s.num_rollouts}

def restore_target(runner: FSTRunner) -> dict[str, Any]:
    """Restore targets with the current shardings; scalars replicated over the mesh (fresh ones are
    uncommitted single-device arrays, which a restore would pin to one device)."""
    target = abstract_like(arrays(runner))
    replicated = jax.sharding.NamedSharding(runner.mesh, jax.sharding.PartitionSpec())
    for key in ("step", "rng", "num_rollouts"):
        target[key] = jax.ShapeDtypeStruct(target[key].shape, target[key].dtype, sharding=replicated)
    return target

def save(runner: FSTRunner) -> None:
    meta = {"population": runner.population, "current_task": runner.current_task,
            "counters": dataclasses.asdict(runner.counters)}
    data = {name: stream.get_state() for name, stream in runner.streams.items()}
    runner.checkpointer.save(runner.counters.rl_steps, arrays(runner), meta=meta, data=data,
                           config=runner.config.to_dict(), force=True)

def restore(runner: FSTRunner) -> bool:
    restored = runner.checkpointer.restore_latest(restore_target(runner))
    if restored is None:
        return False
    # the config must continue the run it resumes: refused changes stop here, accepted ones are logged
    runner.config_changes = run_config.check_resume(
        restored.config, runner.config, allow=getattr(runner, "allow_config_change", False),
        workdir=runner.workdir, source=f"its checkpoint at step {restored.step}")
    a = restored.state
    runner.state = runner.state.replace(params=a["params"], opt_state=a["opt_state"], step=a["step"],
                                    rng=a["rng"], num_rollouts=a["num_rollouts"])
    runner.population = list(restored.meta["population"])
    runner.current_task = restored.meta["current_task"]
    runner.counters = Counters(**restored.meta["counters"])
    for name, state in (restored.data or {}).items():
        runner.streams[name].set_state(state)
    log.info("resumed from %s at RL step %d", runner.checkpointer.directory, runner.counters.rl_steps)
    return True

def init_from(runner: FSTRunner, other_workdir: str) -> None:
    """Start from another run's latest params (fresh optimizer, counters and data): the plasticity probe."""
    other = Checkpointer(os.path.expanduser(other_workdir), read_only=True)
    try:
        restored = other.restore_latest(restore_target(runner))
    finally:
        other.close()
    if restored is None:
        raise ValueError(f"config.init_from={other_workdir!r} holds no checkpoint to start from")
    fresh = TrainState.create((runner.graphdef, restored.state["params"]), runner.rl_config, seed=runner.config.seed)
    runner.state = fresh
    log.info("initialised params from %s (step %d)", other_workdir, restored.step)
