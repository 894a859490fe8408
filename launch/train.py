"""Train with FST (or the RL-only / GEPA-only baselines) from a config file.

    python launch/train.py --config configs/fst_tiny.py
    python launch/train.py --config configs/fst_qwen3.py --workdir runs/qwen3-math \\
        --config.mesh.fsdp=4 --config.mesh.tensor=2 --config.rl.learning_rate=2e-6
    python launch/train.py --config configs/fst_qwen3.py --config.method=rl      # the RL-only baseline

Re-running the same command with the same --workdir resumes from its latest checkpoint; a resume whose config
changes what the run computes is refused in one line (`--allow_config_change` resumes anyway, logged), and a
second run on a workdir that a live run holds exits 1 (docs/training.md "One workdir, one run"). Metrics go to
WORKDIR/metrics.jsonl (and TensorBoard event files); `python launch/plot.py WORKDIR...` draws them.
Several processes (README "Several hosts"): start the same command on every host with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or under a scheduler JAX detects (SLURM,
Open MPI, TPU pods) without them. config.mesh sizes are global: the mesh spans every process's devices.

Failures are one line on stderr and a non-zero exit (FST_JAX_TRACEBACK=1 shows the traceback): 2 for a bad
command line, 1 for a bad config, workdir, data, reward or a failed checkpoint write (the checkpoints already
written stay intact), 130 for Ctrl-C or SIGINT ("interrupted at step N; rerun the same command to resume"),
143 for SIGTERM (a scheduler's stop: "terminated at step N; …"). Both are honoured even when the run was
started with them ignored (`nohup cmd &` from a script ignores SIGINT, and the ignore is inherited).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

# transformers' advisory "PyTorch was not found" line: we never need PyTorch (its warnings and errors still show)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs import fst_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>-<method>)")
_PLOT = flags.DEFINE_bool("plot", True, "draw WORKDIR/plot.png from the metrics at the end")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "plan the run without weights: compile every program from abstract "
                             "shapes, print per-device memory, write WORKDIR/plan.json; exit 3 if it does not fit")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a run over "
                                   "several processes (default: JAX's detection of SLURM/Open MPI/TPU pods)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..N-1 (with --coordinator_address)")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "resume even though the config changes what the "
                                   "run computes (model, task, data, recipe numbers, seeds, method); the changes "
                                   "are logged in metrics.jsonl and config.json")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 60, "a process silent this long is declared dead and "
                                  "the others exit")
flags.mark_flags_as_required(["config"])


def _initialize_distributed() -> None:
    from fst_jax.runtime import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_s=_HEARTBEAT.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _dry_run(config, workdir: str) -> None:
    """--dry_run: exit 0 (fits), 3 (does not fit, one line why) or 1 (the plan failed, one line)."""
    mesh = [int(config.mesh[a]) for a in ("data", "fsdp", "tensor")]
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and min(mesh) > 0:
        # fake CPU devices stand in for the mesh (jax reads the flag when its backends start, i.e. later)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={mesh[0] * mesh[1] * mesh[2]}").strip()
    from fst_jax.trainer.dry_run import run_dry

    try:
        sys.exit(run_dry(config, workdir))
    except Exception as e:  # noqa: BLE001 - a plan never ends in a traceback (FST_JAX_TRACEBACK=1 shows it)
        if os.environ.get("FST_JAX_TRACEBACK"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: dry run failed: {first}  (set FST_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def _exit(message: str, code: int) -> None:
    """Print one line and leave now: orbax/tensorstore threads torn down by a normal interpreter exit print
    dozens of unrelated tracebacks after a failed write. Everything that must reach the disk is closed by
    then (the runner closes metrics and checkpoints on its way out)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    from fst_jax.runtime.workdir_lock import release_all

    release_all()  # os._exit skips atexit, where the workdir's lock is otherwise released
    os._exit(code)


def _preflight(config, workdir: str) -> None:
    """Cheap checks before anything heavy (devices, weights): the config's values, the workdir, and the
    model directory's files — each failure one line naming the path and the config field."""
    from fst_jax.runtime.storage_errors import check_writable_dir
    from fst_jax.config import validate

    validate(config)
    model = os.path.expanduser(config.model.path)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"config.model.path={config.model.path!r}: no such directory (a local HF Qwen3 "
                                "checkpoint with config.json, *.safetensors and tokenizer.json)")
    for needed, alternatives in (("config.json", ()), ("tokenizer.json", ("tokenizer.model", "vocab.json"))):
        if not any(os.path.isfile(os.path.join(model, f)) for f in (needed, *alternatives)):
            raise FileNotFoundError(f"config.model.path={config.model.path!r}: missing {os.path.join(model, needed)}"
                                    " (copy the checkpoint's full directory, tokenizer files included)")
    check_writable_dir(workdir, "--workdir")  # last: it creates the directory


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, like Ctrl-C's KeyboardInterrupt: it unwinds the same way (metrics and
    checkpoints closed; the last complete checkpoint is where a rerun resumes)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _install_stop_signals() -> None:
    """Ctrl-C / SIGINT raise KeyboardInterrupt and SIGTERM raises `Terminated`, whatever this process inherited."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)


def _stopped(e: KeyboardInterrupt) -> tuple[str, int]:
    return ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)


def main(argv) -> None:
    del argv
    if _DRY_RUN.value:
        config = _CONFIG.value
        name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        _dry_run(config, _WORKDIR.value or os.path.join("runs", f"{name}-{config.method}"))
    _initialize_distributed()  # before anything touches a device
    import jax

    from fst_jax.runtime.checkpoint import CheckpointError
    from fst_jax.runtime.distributed import exit_when_a_peer_fails
    from fst_jax.runtime.storage_errors import QuietTeardownStderr
    from fst_jax.trainer.runner import FSTRunner

    sys.stderr = QuietTeardownStderr(sys.stderr)

    config = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", f"{name}-{config.method}")
    for noisy in ("absl", "jax", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fst_jax.gepa import ReflectionLMError

    from fst_jax.runtime.workdir_lock import WorkdirBusyError, lock_for_run
    from fst_jax.trainer.run_config import ConfigChangeError, check_workdir

    runner = None
    try:
        _preflight(config, workdir)
        lock_for_run(workdir)  # one run per workdir: before anything in it is read or written
        check_workdir(workdir, config, allow=_ALLOW_CHANGE.value)  # a refused resume costs no model load
        with exit_when_a_peer_fails():
            runner = FSTRunner(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
            runner.run()  # its last evaluation is read back from metrics.jsonl by _report
    except (WorkdirBusyError, ConfigChangeError) as e:
        _exit(f"error: {e}", 1)
    except KeyboardInterrupt as e:
        what, code = _stopped(e)
        if runner is None:
            _exit(f"{what} during start-up; rerun the same command to resume", code)
        saved = runner.checkpointer.complete_steps()
        since = f" (from the checkpoint at step {saved[-1]})" if saved else " (no checkpoint yet: from the start)"
        _exit(f"{what} at step {runner.counters.rl_steps}; rerun the same command to resume{since}", code)
    except (ValueError, OSError, CheckpointError, ReflectionLMError) as e:  # config, paths, data, rewards, disk,
        # an unreachable reflector: one line
        if os.environ.get("FST_JAX_TRACEBACK"):
            raise
        _exit(f"error: {e}  (set FST_JAX_TRACEBACK=1 for the traceback)", 1)
    if jax.process_index() == 0:
        _report(runner, config, workdir, name)


_ARGV_AS_TYPED = list(sys.argv)  # before absl parses it: the end of a run prints the command to compare with


def _report(runner, config, workdir: str, config_name: str) -> None:
    """The end of a run, for a person: a few plain lines (analysis/run_report.py) after the plot is drawn; the
    last evaluation in full goes to WORKDIR/final_eval.json (atomically), equal to its record in metrics.jsonl."""
    from fst_jax.analysis.run_report import FINAL_EVAL, end_of_run_lines
    from fst_jax.runtime.metrics import read_metrics

    evals = [r for r in read_metrics(workdir, parse_nonfinite=False) if r.get("kind") == "eval"]
    if evals:
        runner.metrics.save_json(FINAL_EVAL, evals[-1])
    steps = runner.counters.rl_steps
    if runner.already_finished:
        print(f"already finished: {steps} steps in {workdir} (nothing to do); its last evaluation "
              f"(step {evals[-1]['step'] if evals else '?'}):")
    else:
        print(f"done: {steps} steps in {workdir}")
    plot_path = os.path.join(workdir, "plot.png")
    if _PLOT.value and not runner.already_finished:
        import plot  # launch/plot.py, beside this file

        plot.draw(workdir, plot_path)
    for line in end_of_run_lines(evals=evals, population=runner.population, seed_prompt=config.gepa.seed_prompt,
                                 method=config.method, workdir=workdir, plot_path=plot_path, argv=_ARGV_AS_TYPED,
                                 default_workdir=os.path.join("runs", f"{config_name}-{config.method}"),
                                 eval_k=config.eval.k):
        print(line)


# --config.tasks.<name>.fields.<canonical>=<record key>: `fields` is an open mapping whose keys the config
# file cannot all list, so these overrides are applied after parsing instead of by the (locked) config flag.
_FIELDS_OVERRIDE = re.compile(r"--config\.((?:[^=]+\.)?fields)\.([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)


def _config_file(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_field(argv) -> str | None:
    """'config.a.b' for the first --config.a.b...=v override naming a field the config does not have."""
    path = _config_file(argv)
    if not path or not os.path.isfile(path.split(":", 1)[0]):
        return None
    spec = importlib.util.spec_from_file_location("_fst_config_file", path.split(":", 1)[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, walked = config, "config"
        for part in arg[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                has = f"; {walked} has: {', '.join(sorted(node.keys()))}" if hasattr(node, "keys") else ""
                return f"{walked}.{part} (in {arg.split('=', 1)[0]}){has}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def _parse_flags(argv):
    """absl's parser, with a bad --config.x override reported in one line instead of a traceback, and
    `--config.<...>.fields.<name>=<key>` overrides applied (they may add keys)."""
    fields = [m.groups() for m in map(_FIELDS_OVERRIDE.fullmatch, argv) if m]
    argv = [a for a in argv if not _FIELDS_OVERRIDE.fullmatch(a)]
    sys.argv[:] = argv  # config_flags finds the --config.x overrides in sys.argv, not in the parser's argv
    try:
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        if isinstance(e, (AttributeError, KeyError)):
            try:
                field = _unknown_field(argv)
            except Exception:  # the config file itself is broken: absl's own message says how
                field = None
            what = f"unknown config field {field or str(e).strip(chr(34) + chr(39))}"
        else:
            what = str(e)
        _exit(f"error: bad command line: {what}; the fields are those of fst_jax/config.py default_config() "
              "and the config file", 2)
    config = _CONFIG.value
    for path, key, value in fields:
        node, walked = config, "config"
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                _exit(f"error: bad command line: unknown config field {walked}.{part} "
                      f"(in --config.{path}.{key})", 2)
            node, walked = node[part], f"{walked}.{part}"
        if not hasattr(node, "unlocked"):
            _exit(f"error: bad command line: config.{path} is not a mapping (in --config.{path}.{key})", 2)
        with node.unlocked():
            node[key] = value
    return rest


if __name__ == "__main__":
    _install_stop_signals()
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt as e:  # before main's own handler is in place (imports, flag parsing)
        what, code = _stopped(e)
        _exit(f"{what} during start-up; rerun the same command to resume", code)
