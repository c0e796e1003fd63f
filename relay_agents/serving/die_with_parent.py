"""Run a command that the kernel stops (SIGTERM) as soon as the process that started it dies.

    python -m relay_agents.serving.die_with_parent PARENT_PID COMMAND [ARGS...]
    python .../relay_agents/serving/die_with_parent.py PARENT_PID COMMAND [ARGS...]  (no package import)

Signal handlers and ``atexit`` stop a vLLM server when its parent exits normally or is
interrupted, but not when the parent is killed (SIGKILL, an OOM kill, a CI timeout): the
server, about 3 GB, would be orphaned. Linux's ``PR_SET_PDEATHSIG`` survives ``exec``, so this
sets it and then becomes the command (same pid, same process group).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed
            sys.exit(f"die_with_parent: parent {parent} is gone")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
