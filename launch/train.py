"""Train with FST (or the RL-only / GEPA-only baselines) from a config file.

    python launch/train.py --config configs/fst_tiny.py
    python launch/train.py --config configs/fst_qwen3.py --workdir runs/qwen3-math \\
        --config.mesh.fsdp=4 --config.mesh.tensor=2 --config.rl.learning_rate=2e-6
    python launch/train.py --config configs/fst_qwen3.py --config.method=rl      # the RL-only baseline

Re-running the same command with the same --workdir resumes from its latest checkpoint. Metrics go to
WORKDIR/metrics.jsonl (and TensorBoard event files); `python launch/plot.py WORKDIR...` draws them.
Several processes (README "Several hosts"): start the same command on every host with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or under a scheduler JAX detects (SLURM,
Open MPI, TPU pods) without them. config.mesh sizes are global: the mesh spans every process's devices.
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
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a run over "
                                   "several processes (default: JAX's detection of SLURM/Open MPI/TPU pods)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..N-1 (with --coordinator_address)")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 60, "a process silent this long is declared dead and "
                                  "the others exit")
flags.mark_flags_as_required(["config"])


def _initialize_distributed() -> None:
    from fst_jax import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_s=_HEARTBEAT.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    del argv
    _initialize_distributed()  # before anything touches a device
    import jax

    from fst_jax.distributed import exit_when_a_peer_fails

    from fst_jax.fst import FSTRunner

    config = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", f"{name}-{config.method}")
    for noisy in ("absl", "jax", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fst_jax.checkpoint import CheckpointError

    try:
        with exit_when_a_peer_fails():
            runner = FSTRunner(config, workdir)
            result = runner.run()
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad config, paths, data, mesh: one line
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
