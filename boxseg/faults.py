"""Failpoints: named places where the fault-injection suite (tests/faults) makes the process
SIGKILL itself, so that a kill lands exactly inside a stage, between rounds or in the middle
of a file write instead of wherever a timer happens to fall.

Off unless the environment sets `BOXSEG_FAILPOINT=NAME` or `NAME@N` (kill at the N-th time
NAME is reached in this process; default the first). Names in use:

    step:<stage>        after an optimizer step of a training stage (e.g. step:segnet1_r1)
    round:<r>           at the start of alternating round r >= 2
    write:<file name>   an atomic write whose temporary file is on disk but not yet renamed
    propose.batch       after the model ran on a batch of boxseg-propose, before its writes
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "BOXSEG_FAILPOINT"
_hits: Counter[str] = Counter()
_kill_parent: int | None = None


def kill_parent_too(pid: int | None = None) -> None:
    """In a helper process of a command (boxseg-propose's writer processes): a failpoint
    here kills the command too (`pid`, default this process's parent), as a kill of the
    command would end its helpers."""
    global _kill_parent
    _kill_parent = os.getppid() if pid is None else pid


def failpoint(name: str) -> None:
    """SIGKILL this process if `BOXSEG_FAILPOINT` names this point and its hit count is reached."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        if _kill_parent is not None:
            os.kill(_kill_parent, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
