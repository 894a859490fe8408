"""Storage failures as one line: a workdir that cannot be written, a full disk, and the console noise that
orbax and tensorstore make around a failed write or a damaged checkpoint.

    check_writable_dir(workdir, "--workdir")      # before anything heavy: a file, under a file, read-only...
    sys.stderr = QuietTeardownStderr(sys.stderr)  # in a command-line entry point

`fst_jax.runtime.checkpoint.Checkpointer` uses the rest: it drops orbax's own error logs (it raises the same error to
us, and we report it once), hides what orbax threads print while a failed save is torn down or a damaged step
is read, and recognises a full disk anywhere in an exception's chain.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import socket
import threading
from pathlib import Path

__all__ = ["CheckpointError", "QuietTeardownStderr", "check_writable_dir", "is_disk_full", "quiet_orbax_errors", "root_cause",
           "stderr_swallowed"]


class CheckpointError(RuntimeError):
    """The one error type for checkpoints: no usable checkpoint, one that cannot be used for this run (the
    run's own orbax checkpoints, `runtime.checkpoint`), or model weights on disk that do not match what their
    config.json describes (HF safetensors, `models.hf`)."""


def check_writable_dir(path: str | os.PathLike, what: str = "the workdir") -> Path:
    """Create `path` if needed and prove it writable by writing a file there; a `ValueError` otherwise, in
    one line naming the path and why (it is a file, it lies under a file, it is read-only, the disk is
    full...). Run before anything heavy, so a bad --workdir costs seconds, not a model load."""
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a directory; choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path} lies under {parent}, which is a file; choose another path")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"  # several hosts may share it
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        reason = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
                  errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
        raise ValueError(f"{what} {path} is not writable: {reason} ({e.filename or path}); "
                         "choose a writable directory") from None
    return path


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs a failed save or restore with a traceback from each of its threads and then raises it to
    the caller; `Checkpointer` reports it once, in one line, so these records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


def quiet_orbax_errors() -> None:
    for name in ("absl", "orbax"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
            logger.addFilter(_DropOrbaxErrors())


@contextlib.contextmanager
def stderr_swallowed():
    """Hide what orbax/tensorstore threads print to stderr while a failed save is torn down or a damaged
    step is read (dozens of 'Event loop is closed' and coroutine tracebacks around one real error)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


class QuietTeardownStderr(io.TextIOBase):
    """A stderr that drops the tracebacks ending in "RuntimeError: Event loop is closed": when a background
    save fails (a full disk), orbax closes its event loop while tensorstore still completes the other writes,
    and each completion prints such a traceback from a C++ callback — dozens, before `Checkpointer` reports
    the real error in one line, from several threads at once (their lines interleave). Everything else passes
    through unchanged: outside a traceback at once, a line that arrives inside one as soon as it ends.

        sys.stderr = QuietTeardownStderr(sys.stderr)     # in a command-line entry point
    """

    _HEADER = "Traceback (most recent call last):"
    _CLOSED = "RuntimeError: Event loop is closed"
    _EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")

    def __init__(self, target):
        self.target, self._lock = target, threading.RLock()
        self._block: list[str] | None = None  # the lines of the traceback(s) in progress
        self._open, self._partial = 0, ""     # tracebacks begun and not yet ended; an unfinished line

    def write(self, text: str) -> int:
        with self._lock:
            if self._block is None:
                start = text.find(self._HEADER)
                if start < 0:
                    self.target.write(text)
                    return len(text)
                self.target.write(text[:start])
                self._block, self._open, rest = [], 0, text[start:]
            else:
                rest = text
            *lines, self._partial = (self._partial + rest).split("\n")
            for line in lines:
                self._line(line)
            return len(text)

    def _line(self, line: str) -> None:
        if self._block is None:
            if line.startswith(self._HEADER):
                self._block, self._open = [line], 1
            else:
                self.target.write(line + "\n")
            return
        if line.startswith(self._HEADER):
            self._open += 1
        elif line.startswith(self._CLOSED):
            self._open -= 1
        elif line and not line[0].isspace():
            if not self._EXCEPTION.match(line):  # a message of its own between the threads' lines
                self.target.write(line + "\n")
                return
            self._open = 0  # a real exception: its traceback (and what it interleaved with) goes out whole
            self.target.write("\n".join(self._block + [line]) + "\n")
            self._block = None
            return
        self._block.append(line)
        if self._open <= 0:  # every traceback begun has ended in a closed event loop: dropped
            self._block = None

    @property
    def encoding(self):
        return self.target.encoding

    @property
    def errors(self):
        return self.target.errors

    def flush(self):
        self.target.flush()

    def fileno(self):
        return self.target.fileno()

    def isatty(self):
        return self.target.isatty()

    def __getattr__(self, name):
        return getattr(self.target, name)


def is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def root_cause(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e
