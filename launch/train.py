"""Train with FST (or the RL-only / GEPA-only baselines) from a config file.

    python launch/train.py --config configs/fst_tiny.py
    python launch/train.py --config configs/fst_qwen3.py --workdir runs/qwen3-math \\
        --config.mesh.fsdp=4 --config.mesh.tensor=2 --config.rl.learning_rate=2e-6
    python launch/train.py --config configs/fst_qwen3.py --config.method=rl      # the RL-only baseline

Re-running the same command with the same --workdir resumes from its latest checkpoint. Metrics go to
WORKDIR/metrics.jsonl (and TensorBoard event files); `python launch/plot.py WORKDIR...` draws them.
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a scheduler
jax.distributed.initialize() detects) and start the same command on every host.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs import fst_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>-<method>)")
_PLOT = flags.DEFINE_bool("plot", True, "draw WORKDIR/plot.png from the metrics at the end")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "plan the run without weights: compile every program from abstract "
                             "shapes, print per-device memory, write WORKDIR/plan.json; exit 3 if it does not fit")
flags.mark_flags_as_required(["config"])


def _maybe_initialize_distributed() -> None:
    import jax

    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("SLURM_NTASKS", "1") != "1" or env.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()


def _dry_run(config, workdir: str) -> None:
    """--dry_run: exit 0 (fits), 3 (does not fit, one line why) or 1 (the plan failed, one line)."""
    mesh = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and min(mesh) > 0:
        # fake CPU devices stand in for the mesh (jax reads the flag when its backends start, i.e. later)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={mesh[0] * mesh[1] * mesh[2]}").strip()
    from fst_jax.plan import run_dry

    try:
        sys.exit(run_dry(config, workdir))
    except Exception as e:  # noqa: BLE001 - a plan never ends in a traceback (FST_JAX_TRACEBACK=1 shows it)
        if os.environ.get("FST_JAX_TRACEBACK"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: dry run failed: {first}  (set FST_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def main(argv) -> None:
    del argv
    if _DRY_RUN.value:
        config = _CONFIG.value
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        _dry_run(config, _WORKDIR.value or os.path.join("runs", f"{name}-{config.method}"))
    _maybe_initialize_distributed()
    import jax

    from fst_jax.fst import FSTRunner

    config = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", f"{name}-{config.method}")
    for noisy in ("absl", "jax", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fst_jax.checkpoint import CheckpointError
    from fst_jax.gepa import ReflectionLMError

    try:
        runner = FSTRunner(config, workdir)
        result = runner.run()
    except (ValueError, FileNotFoundError, CheckpointError, ReflectionLMError) as e:  # one line, exit 1
        if os.environ.get("FST_JAX_TRACEBACK"):
            raise
        print(f"error: {e}  (set FST_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(f"done: {runner.counters.rl_steps} steps in {workdir}")
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, indent=1))
        if _PLOT.value:
            import plot  # launch/plot.py, beside this file

            plot.main([workdir, "--out", os.path.join(workdir, "plot.png")])


def _parse_flags(argv):
    """absl's parser, with a bad --config.x override reported in one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        what = f"unknown config field {e}" if isinstance(e, (AttributeError, KeyError)) else str(e)
        print(f"error: bad command line: {what}; the fields are those of fst_jax/config.py default_config() "
              "and the config file", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
