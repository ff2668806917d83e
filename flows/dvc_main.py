"""DVC as ``stein`` runs it: ``python -m flows.dvc_main <dvc args>`` is ``dvc <dvc args>`` whose end, by SIGTERM or
SIGHUP, takes its process group with it.

``flows.local.dvc`` starts this in a process group of its own with a parent-death signal (SIGTERM), so a ``stein
run`` killed with SIGKILL still ends DVC. DVC's own default would be to die alone: the stage command it runs through
``$SHELL -c`` (``/bin/sh`` where SHELL is unset) would live on, because dash, unlike bash, does not exec a lone
command: the shell stays the stage's parent, and the stage's parent-death signal never fires. The orphaned stage
then trains to the end and writes its outputs with no DVC to record them. Here SIGTERM goes to the whole group
instead (the shell, the stage, and whatever they started in it); the stage's Ray dies with the stage.

The group's SIGTERM is one path; the stage also watches this process itself (``STEIN_DVC_PID``, read by
:func:`flows.local.end_with_dvc`), so a stage whose signal never came (a CI run once left a stage and its shell
training after DVC was gone) still ends within a second of DVC.
"""

from __future__ import annotations

import os
import signal
import sys


def _end_group(signum: int, _frame) -> None:
    signal.signal(signum, signal.SIG_DFL)
    if os.getpgrp() == os.getpid():  # the group is ours (flows.local.dvc starts a new session), not a terminal's
        os.killpg(os.getpid(), signum)  # this process included: the default action ends it with the group
    else:
        os.kill(os.getpid(), signum)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _end_group)
    from flows.local import DVC_PID_ENV

    os.environ[DVC_PID_ENV] = str(os.getpid())  # DVC hands its environment to the stage commands
    from dvc.cli import main as dvc

    return dvc(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
