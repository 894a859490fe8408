"""Run a launch/ script with a fault injected at the checkpoint write layer (tests only).

    python tests/fault_injection.py enospc:4 launch/train.py --config ...       # disk full saving step 4
    python tests/fault_injection.py stall:4:/tmp/marker launch/train.py ...     # step 4's write hangs

Orbax writes a step into `checkpoints/<step>.orbax-checkpoint-tmp*` and renames it on commit; its JSON items
and step metadata go through `etils.epath`'s `open`. The first file opened for writing inside the tmp
directory of the given step either fails with ENOSPC ("No space left on device", what a full disk gives) or
creates `marker` and blocks (so a test can SIGKILL the process in the middle of that asynchronous write).
Everything else — the script, its flags, other steps — runs unchanged.
"""

from __future__ import annotations

import errno
import os
import re
import runpy
import sys
import time


def install(spec: str):
    """Inject the fault `spec` ("enospc:STEP" or "stall:STEP:MARKER") in this process; returns the undo."""
    from etils.epath import gpath

    kind, step, *rest = spec.split(":", 2)
    in_step = re.compile(rf"(^|/)checkpoints/{int(step)}\.orbax-checkpoint-tmp[^/]*/")
    original_open = gpath._GPath.open

    def open_with_fault(self, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and in_step.search(os.fspath(self)):
            if kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
            if kind == "stall":
                with open(rest[0], "w") as f:
                    f.write(os.fspath(self))
                time.sleep(3600)
        return original_open(self, mode, *args, **kwargs)

    gpath._GPath.open = open_with_fault
    return lambda: setattr(gpath._GPath, "open", original_open)


def main() -> None:
    spec, script, *args = sys.argv[1:]
    install(spec)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
