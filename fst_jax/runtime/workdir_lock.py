"""One workdir, one run: a lock file that a second process on the same workdir respects.

Workdirs of multi-host runs live on shared file systems (NFS, gcsfuse) where OS locks (`flock`, `fcntl`)
are unreliable or absent, so the lock is a plain JSON file, `WORKDIR/run.lock`:

    {"host": ..., "pid": ..., "run_id": ..., "started_at": ..., "heartbeat_at": ..., "command": [...]}

- **Taken** by creating the file exclusively (`O_EXCL`), then read back: the run owns it only when the file
  holds its own `run_id` (a file system that does not honour `O_EXCL` still lets one writer win).
- **Kept alive** by a heartbeat thread that rewrites the file (atomically: a temporary file renamed over it)
  every `FST_JAX_LOCK_HEARTBEAT_S` seconds (default 15). A heartbeat that finds another run's id in the file
  (its own lock was taken over after a long stall) stops this run with SIGTERM and one line saying why.
- **Stale** — taken over instead of refused — when the holder cannot be alive: its heartbeat is older than
  `FST_JAX_LOCK_STALE_S` seconds (default 120: a lost node, a kill -9 on another host; the hosts' clocks must
  agree to well within this age), or it names this host and a process id that no longer exists (kill -9 on
  this host: taken over at once).
- **Released** (the file removed, only while it still holds this run's id) on every exit `launch/train.py`
  controls: the end of the run, an error, Ctrl-C or SIGTERM. A process killed outright leaves the file; the
  stale rule frees it.

`lock_for_run` is the run's entry point: in a multi-process run process 0 alone takes the lock and every
process learns its verdict (a collective), so a refused run exits everywhere instead of hanging.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "WorkdirBusyError", "WorkdirLock", "heartbeat_seconds", "lock_for_run", "read_lock",
           "release_all", "stale_reason", "stale_seconds"]

LOCK_NAME = "run.lock"
HEARTBEAT_ENV, STALE_ENV = "FST_JAX_LOCK_HEARTBEAT_S", "FST_JAX_LOCK_STALE_S"


class WorkdirBusyError(ValueError):
    """Another live run holds the workdir; the message is one line naming the holder and what to do."""


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"${name}={text!r} must be a number of seconds > 0")
    return value


def heartbeat_seconds() -> float:
    """Seconds between heartbeats: $FST_JAX_LOCK_HEARTBEAT_S, default 15."""
    return _env_seconds(HEARTBEAT_ENV, 15.0)


def stale_seconds() -> float:
    """Heartbeat age after which a lock is stale: $FST_JAX_LOCK_STALE_S, default 120."""
    return _env_seconds(STALE_ENV, 120.0)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_lock(path: str) -> dict[str, Any] | None:
    """The lock file's holder (None when there is no lock). A file that is not valid JSON (being written, or
    damaged) reads as a holder with only its modification time as heartbeat."""
    try:
        with open(path) as f:
            text = f.read()
        mtime = os.path.getmtime(path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if isinstance(holder, dict):
            return holder
    except ValueError:
        pass
    return {"host": "?", "pid": None, "run_id": None, "heartbeat_unix": mtime, "started_unix": mtime}


def _process_gone(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def stale_reason(holder: dict[str, Any], *, now: float | None = None, stale_s: float | None = None) -> str | None:
    """Why `holder`'s lock is stale (it may be taken over), or None when its run may be alive."""
    now = time.time() if now is None else now
    stale_s = stale_seconds() if stale_s is None else stale_s
    if holder.get("host") == socket.gethostname() and _process_gone(holder.get("pid")):
        return f"its process {holder.get('pid')} on this host is gone"
    age = now - float(holder.get("heartbeat_unix") or 0.0)
    if age > stale_s:
        return f"its last heartbeat was {age:.0f} s ago (stale after {stale_s:g} s)"
    return None


class WorkdirLock:
    """The lock on one workdir (see the module docstring). `acquire` raises `WorkdirBusyError` when a live run
    holds it; `release` is idempotent and safe from any exit path."""

    def __init__(self, workdir: str, *, command: Sequence[str] | None = None, heartbeat_s: float | None = None,
                 stale_s: float | None = None):
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.heartbeat_s = heartbeat_seconds() if heartbeat_s is None else heartbeat_s
        self.stale_s = stale_seconds() if stale_s is None else stale_s
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex,
                       "started_at": _iso(now), "started_unix": now, "heartbeat_at": _iso(now),
                       "heartbeat_unix": now, "command": list(sys.argv if command is None else command)}
        self._stop = threading.Event()
        self._io = threading.Lock()  # a heartbeat write never races the release
        self._thread: threading.Thread | None = None
        self.held = False

    # ---- taking it ----------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock or raise `WorkdirBusyError`; starts the heartbeat. Writes nothing when refused."""
        for _ in range(3):  # a lock that vanishes between our read and our create: look again
            holder = read_lock(self.path)
            if holder is not None:
                why = stale_reason(holder, stale_s=self.stale_s)
                if why is None:
                    raise WorkdirBusyError(self._busy_message(holder))
                log.warning("taking over the stale lock %s of host %s, pid %s (started %s): %s", self.path,
                            holder.get("host"), holder.get("pid"), holder.get("started_at", "?"), why)
                self._write()  # replaces it atomically
                time.sleep(0.2)  # two take-overs at once: the later rename wins, the read-back tells who
            else:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    json.dump(self.record, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
            mine = read_lock(self.path)
            if mine is not None and mine.get("run_id") == self.record["run_id"]:
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            if mine is not None:
                raise WorkdirBusyError(self._busy_message(mine))
        raise WorkdirBusyError(f"--workdir {self.workdir}: could not take its lock {self.path} (it keeps "
                               "changing: another run is starting there); choose another --workdir")

    def _busy_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat_unix") or 0.0)
        since = holder.get("started_at") or _iso(float(holder.get("started_unix") or 0.0))
        return (f"--workdir {self.workdir} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {since}, heartbeat {max(age, 0):.0f} s ago); wait for it to end or "
                f"stop it, or choose another --workdir (a lock whose heartbeat stops for {self.stale_s:g} s is "
                f"taken over: {self.path})")

    def _write(self) -> None:
        tmp = f"{self.path}.{self.record['host']}.{self.record['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ---- keeping it -----------------------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._io:
                if self._stop.is_set():
                    return
                try:
                    holder = read_lock(self.path)
                    if holder is None or holder.get("run_id") == self.record["run_id"]:
                        now = time.time()
                        self.record.update(heartbeat_at=_iso(now), heartbeat_unix=now)
                        self._write()
                        continue
                except OSError as e:  # a storage hiccup: the next beat tries again
                    log.warning("workdir lock heartbeat failed (%s); retrying in %g s", e, self.heartbeat_s)
                    continue
                self.held = False
                print(f"error: the lock on --workdir {self.workdir} was taken over by host {holder.get('host')}, "
                      f"pid {holder.get('pid')} (this run's heartbeat stalled for over {self.stale_s:g} s); "
                      "stopping this run so that only one writes there", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    # ---- giving it back -------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's."""
        self._stop.set()
        with self._io:
            if not self.held:
                return
            self.held = False
            try:
                holder = read_lock(self.path)
                if holder is not None and holder.get("run_id") == self.record["run_id"]:
                    os.remove(self.path)
            except OSError as e:
                log.warning("could not remove the workdir lock %s (%s); the next run will find it stale", self.path, e)


_HELD: list[WorkdirLock] = []


def release_all() -> None:
    """Release every lock this process holds (before `os._exit`, which skips atexit handlers)."""
    while _HELD:
        _HELD.pop().release()


atexit.register(release_all)


def lock_for_run(workdir: str, *, command: Sequence[str] | None = None) -> WorkdirLock | None:
    """Take `workdir`'s lock for this run: process 0 takes it, every process gets its verdict.

    Returns the lock on process 0 (None on the others); raises `WorkdirBusyError` on every process when the
    workdir is held by a live run (or the lock could not be written). Released by `release_all`, which runs
    at interpreter exit; call it yourself before `os._exit`. Every process must call this at the same point.
    """
    import jax

    from fst_jax.runtime import distributed

    lock, verdict = None, None
    if jax.process_index() == 0:  # any failure becomes the verdict: the other processes wait for it
        try:
            lock = WorkdirLock(workdir, command=command)
            lock.acquire()
            _HELD.append(lock)
        except ValueError as e:  # WorkdirBusyError, or a bad $FST_JAX_LOCK_* value
            lock, verdict = None, str(e)
        except OSError as e:
            lock, verdict = None, (f"--workdir {workdir}: could not write its lock {LOCK_NAME}: "
                                   f"{e.strerror or e} ({e.filename or workdir})")
    verdict = distributed.broadcast_json(verdict)
    if verdict is not None:
        raise WorkdirBusyError(verdict)
    return lock
