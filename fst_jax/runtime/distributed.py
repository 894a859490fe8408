"""Several processes, one run: start-up, one decision everywhere, and a bounded exit when a peer dies.

JAX's multi-controller runtime runs one Python process per host; every process runs the same host loop on
its own devices, and every jitted call over the global mesh is a collective all processes must enter in
lockstep with the same inputs. The host loop is deterministic given the run's seed (problem windows, GEPA's
minibatches, parents, acceptance, sampling seeds), so it needs no communication, with two exceptions:

- Whatever could differ per process — a hosted reflection LM's reply, anything read from the clock or the
  file system — is decided on process 0 and broadcast: `broadcast_json`, and `OneReplyForAll`, which wraps a
  hosted reflection LM so only process 0 sends requests.
- Bugs and non-determinism would otherwise show up as a hang (processes waiting in different collectives):
  `check_same` compares digests of the population and the data cursor once per cycle and stops every
  process with a `DivergenceError` naming the processes that differ from process 0.

A dead peer, two ways out, both bounded: a collective with the dead process usually fails at once, and
`exit_when_a_peer_fails` turns that into one line naming the lost process and exit status 1 (without waiting
on the shutdown barrier); a process waiting elsewhere is terminated by JAX's coordination service once the
dead one has missed heartbeats for `heartbeat_timeout_s` (SIGABRT; its log lists the unhealthy process ids).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["DivergenceError", "OneReplyForAll", "broadcast_json", "check_same", "exit_when_a_peer_fails",
           "initialize", "is_multiprocess", "scheduler_detected"]

LOOPBACK = ("127.", "localhost", "[::1]")


class DivergenceError(RuntimeError):
    """Processes of one run hold different host state (they would otherwise hang in mismatched collectives)."""


def scheduler_detected(env: Mapping[str, str] | None = None) -> bool:
    """True under a launcher whose multi-process environment `jax.distributed.initialize()` reads by itself:
    JAX_COORDINATOR_ADDRESS, a SLURM job step of several tasks, Open MPI with several ranks, a Cloud TPU VM."""
    env = os.environ if env is None else env
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or (env is os.environ and _cloud_tpu_vm()))


def _cloud_tpu_vm() -> bool:
    try:  # jax's own detection (it reads the TPU VM's metadata); private, so a failure means "no"
        from jax._src.clusters import cloud_tpu_cluster as tpu

        return any(cluster.is_env_present() for cluster in (tpu.GceTpuCluster, tpu.GkeTpuCluster))
    except Exception:  # noqa: BLE001
        return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 60,
               initialization_timeout_s: int = 300, shutdown_timeout_s: int = 60) -> bool:
    """Join the run's processes with `jax.distributed.initialize`; call before anything touches a device.

    With `coordinator_address` ("HOST:PORT", process 0's host), `num_processes` and `process_id` are required.
    Without it, JAX's own detection applies when a scheduler is detected (`scheduler_detected`); otherwise
    this is a single-process run and nothing happens. Returns whether the distributed runtime was started.
    A process that stops sending heartbeats for `heartbeat_timeout_s` is declared dead and the others stop.
    """
    timeouts = dict(initialization_timeout=int(initialization_timeout_s),
                    heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                    shutdown_timeout_seconds=int(shutdown_timeout_s))
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes=N and --process_id=I (0 ≤ I < N, a "
                             "different I on every process)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. 127.0.0.1:12345")
        # On one machine, keep the coordinator off the network; across hosts it listens on every interface.
        bind = coordinator_address if host.startswith(LOOPBACK) else None
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, coordinator_bind_address=bind, **timeouts)
        return True
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError("--num_processes/--process_id need --coordinator_address=HOST:PORT (process 0's host)")
    if scheduler_detected():
        jax.distributed.initialize(**timeouts)
        return True
    return False


def is_multiprocess() -> bool:
    return jax.process_count() > 1


# ---- one decision everywhere ----------------------------------------------------------------------------

def broadcast_json(value: Any) -> Any:
    """Process 0's `value` (anything `json.dumps` takes) on every process; the others' `value` is ignored.

    Every process must call it at the same point of the program (it is a collective)."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    payload = json.dumps(value).encode() if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buffer = np.frombuffer(payload, np.uint8) if jax.process_index() == 0 else np.zeros(size, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    return json.loads(data.tobytes().decode())


def _digest(value: Any) -> np.ndarray:
    text = json.dumps(value, sort_keys=True, default=repr)
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint8)


def check_same(where: str, **values: Any) -> None:
    """Raise `DivergenceError` on every process unless every process holds the same `values`.

    Each value (JSON-able: the population, a data stream's state ...) is reduced to an 8-byte digest and the
    digests are all-gathered, so the check costs one small collective. The error names the values and the
    processes that differ from process 0; all processes raise it, so none is left waiting."""
    if not is_multiprocess() or not values:
        return
    from jax.experimental import multihost_utils

    names = sorted(values)
    local = np.stack([_digest(values[n]) for n in names])                     # [F, 8]
    everyone = np.asarray(multihost_utils.process_allgather(local))          # [P, F, 8]
    differs = (everyone != everyone[:1]).any(axis=-1)                         # [P, F]
    if differs.any():
        bad = [int(p) for p in np.nonzero(differs.any(axis=1))[0]]
        fields = [names[f] for f in np.nonzero(differs.any(axis=0))[0]]
        raise DivergenceError(
            f"processes diverged at {where}: process(es) {bad} of {jax.process_count()} hold a different "
            f"{', '.join(fields)} than process 0 (this process is {jax.process_index()}); every process must run "
            "the same code, config and data (check that all hosts see identical files)")


class OneReplyForAll:
    """A hosted reflection LM asked by process 0 only; every process adopts process 0's replies.

    N processes asking an endpoint would get N different answers (sampling) and pay N times. Replies keep
    their `finished` flag; a `ReflectionLMError` on process 0 is raised on every process (GEPA rejects that
    iteration's proposals everywhere), any other failure stops every process. Do not wrap a local reflection
    LM: it samples on the global mesh, a collective every process must enter itself.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # the wrapped client's other attributes (to_dict, model ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def preflight(self) -> None:
        """The wrapped client's start-up check, made by process 0 alone; its failure stops every process."""
        from fst_jax.gepa.reflection import ReflectionLMError

        if not hasattr(self.inner, "preflight"):
            return
        if not is_multiprocess():
            return self.inner.preflight()
        error = None
        if jax.process_index() == 0:
            try:
                self.inner.preflight()
            except ReflectionLMError as e:
                error = str(e)
        error = broadcast_json(error)
        if error is not None:
            raise ReflectionLMError(error)

    def complete(self, prompts: list[str]) -> list[str]:
        from fst_jax.gepa.reflection import Completion, ReflectionLMError

        if not is_multiprocess():
            return self.inner.complete(prompts)
        message = None
        if jax.process_index() == 0:
            try:
                replies = self.inner.complete(list(prompts))
                message = {"replies": [[str(r), bool(getattr(r, "finished", True))] for r in replies]}
            except ReflectionLMError as e:
                message = {"reflection_error": str(e)}
            except Exception as e:  # noqa: BLE001 - every process must learn that process 0 failed
                message = {"failed": f"{type(e).__name__}: {e}"}
        message = broadcast_json(message)
        if "reflection_error" in message:
            raise ReflectionLMError(message["reflection_error"])
        if "failed" in message:
            raise RuntimeError(f"the reflection LM failed on process 0: {message['failed']}")
        return [Completion(text, finished=finished) for text, finished in message["replies"]]


# ---- a dead peer ----------------------------------------------------------------------------------------

def _lost_processes(timeout_s: float = 5.0) -> list[int] | None:
    """Processes the coordination service no longer counts as alive (None when it cannot tell in time)."""
    from jax._src import distributed  # the runtime client; jax has no public accessor for liveness

    client = distributed.global_state.client
    if client is None:
        return None
    everyone = list(range(jax.process_count()))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        live = pool.submit(client.get_live_nodes, everyone).result(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - the coordinator itself may be the lost process
        return None
    finally:
        pool.shutdown(wait=False)
    return [p for p in everyone if p not in live]


@contextlib.contextmanager
def exit_when_a_peer_fails():
    """Around a multi-process run: a collective that fails (a peer died or its connection broke) ends this
    process at once with one line naming the lost process(es) and exit status 1, instead of a traceback and
    a wait on the shutdown barrier. A `DivergenceError` exits the same way. Single-process: no effect."""
    try:
        yield
    except (jax.errors.JaxRuntimeError, DivergenceError) as e:
        if not is_multiprocess():
            raise
        me, n = jax.process_index(), jax.process_count()
        if isinstance(e, DivergenceError):
            text = f"error: {e}"
        else:
            lost = _lost_processes()
            if not lost and n == 2:  # the service may not have noticed yet; with two, it is the other
                lost = [1 - me]
            who = f"process(es) {lost} of {n}" if lost else "another process (the coordinator did not say which)"
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            text = (f"error: process {me} lost contact with {who}: a collective failed ({first}). Restart every "
                    "process with the same command to resume from the last checkpoint")
        print(text, file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)  # the shutdown barrier would wait for the dead peer until shutdown_timeout
