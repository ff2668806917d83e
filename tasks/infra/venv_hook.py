"""The venv hook: every program started from the venv's Python behaves as if the venv were activated.

DVC runs a stage's command (``python -m flows.cli stage ...``, from dvc.yaml) through the shell, which finds
``python`` on PATH; DVC's queue workers start ``dvc`` the same way. Without ``source .venv/bin/activate``, PATH
has no ``.venv/bin``: ``.venv/bin/dvc exp run`` then ran the stages with the system Python (``No module named
'prefect'``). ``python -m tasks.infra.venv_hook`` (run by ``make install``) writes one ``.pth`` file into the venv's
site-packages. Python executes a ``.pth`` line that starts with ``import`` at start-up, before any program of the
venv runs (dvc, stein, prefect, mlflow, python itself), so this one line

- puts the venv's ``bin`` first on PATH when it is not on PATH already (what activating does; an activated venv,
  or a PATH that already names the venv's bin anywhere, is left as it is), and
- sets the telemetry switches of the tools to "off" unless the user set them (``setdefault``).

Its processes inherit both, so the commands DVC starts are the venv's. The line imports only ``os`` and ``sys``
(already loaded at that point) and costs microseconds. Stdlib only: ``tasks.infra.runtime`` imports
:data:`TELEMETRY_OFF` from here, so the switches are written in this one place.
"""

from __future__ import annotations

import os
import sys

#: The telemetry switch of each tool, "off". Applied with ``setdefault`` (a user's value wins), by the hook in every
#: process of the venv and by ``tasks.infra.runtime.apply_offline_env`` in every ``stein`` command.
TELEMETRY_OFF: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

#: The file's name in site-packages (``.pth`` files run in alphabetical order; the name says whose it is).
PTH_NAME = "stein_venv_hook.pth"


def pth_line(env: dict[str, str] = TELEMETRY_OFF) -> str:
    """The one line of the ``.pth`` file. ``sys.prefix`` is the venv's root in any program started from it; the
    default PATH (``os.defpath``) is kept after the bin directory when PATH is unset."""
    return (
        "import os, sys; "
        "_b = os.path.join(sys.prefix, 'Scripts' if os.name == 'nt' else 'bin'); "
        "_p = os.environ.get('PATH', os.defpath); "
        "_b in _p.split(os.pathsep) or os.environ.__setitem__('PATH', _b + os.pathsep + _p if _p else _b); "
        f"[os.environ.setdefault(_k, _v) for _k, _v in {env!r}.items()]\n"
    )


def install(site_packages: str | None = None) -> str:
    """Write the hook into ``site_packages`` (default: this interpreter's, ``sysconfig``'s purelib) atomically and
    return its path. Rewriting it with the same line is a no-op for every program."""
    import sysconfig

    folder = site_packages or sysconfig.get_paths()["purelib"]
    path = os.path.join(folder, PTH_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(pth_line())
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    if sys.prefix == sys.base_prefix:
        sys.exit("tasks.infra.venv_hook: not a virtual environment's Python (run it as .venv/bin/python -m tasks.infra.venv_hook)")
    print(f"venv hook: {install()} (the venv's bin first on PATH, telemetry off, for every program of the venv)")
