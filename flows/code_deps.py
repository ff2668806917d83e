"""Each DVC stage's code deps: the project files its entry point really imports, found in the module graph.

A stage's code is its flow module (``flows/train.py``, ...), the module of its config models
(``tasks/config/pipelines.py``), the path catalog (``tasks/config/paths.py``) and the module of the family its
pipeline's config names (``tasks/families/<family>.py``: families are imported by name, ``tasks.families.FAMILIES``,
and every stage validates the train section with its family's model; ``flows.registry.Pipeline.stage_code``). From
these roots the graph follows every ``import`` statement of every project module it reaches, the ones inside
functions too (read with :mod:`ast`, nothing is imported): a module a stage may import while it runs is among its
deps, and a module it never reaches is not. So a new ``stein_core`` module or a new family makes no existing stage
stale, and an edit to ``stein_core/generators.py`` reruns the generator pipelines alone.

Wiring is left out, and the graph does not walk through it: the CLI, the pipeline registry, DVC generation and
status, the local servers and schedules (``flows/``), the Ray client, the cluster, runtime settings and servers
(``tasks/infra/``), MLflow logging (``tasks/tracking/``) and the CLI back-ends (``tasks/tools/``). They change how
a run is started, placed and reported, not what it computes. ``tests/stages/test_code_deps.py`` runs each stage's
entry point in a fresh interpreter and checks that every project file it loaded is a dep or wiring.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from pathlib import Path

#: The project's top-level packages (imports of anything else are third-party or the standard library).
PACKAGES = ("stein_core", "tasks", "flows")

#: Files and folders that wire a run rather than compute its outputs (relative to the project root).
WIRING = (
    "flows/__init__.py", "flows/cli/", "flows/registry.py", "flows/local.py", "flows/dvc_main.py", "flows/pipeline.py", "flows/schedule.py",
    "flows/dvcgen.py", "flows/status.py", "flows/code_deps.py",
    "tasks/infra/", "tasks/tracking/", "tasks/tools/",
)


def is_wiring(rel: str) -> bool:
    return any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in WIRING)


def module_file(root: Path, module: str) -> Path | None:
    """The file of a project module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``), or None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_of(root: Path, path: Path) -> str:
    """The package a file's relative imports start from (its folder, as a dotted name)."""
    return ".".join(path.relative_to(root).parent.parts)


@functools.lru_cache(maxsize=None)
def _imports(root: Path, path: Path, mtime_ns: int) -> tuple[str, ...]:
    """The project modules ``path`` imports anywhere in its body (``from p import name`` counts ``p.name`` when
    that is a module, else ``p``); ``mtime_ns`` keys the cache."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, ``level - 1`` packages up
                pkg = _package_of(root, path).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if module_file(root, sub):
                    found.append(sub)
                elif base == "stein_core" and alias.name in _stein_core_exports():  # lazy: that submodule
                    found.append(f"stein_core.{_stein_core_exports()[alias.name]}")
                else:
                    found.append(base)
    return tuple(m for m in found if m.split(".")[0] in PACKAGES)


@functools.cache
def _stein_core_exports() -> dict[str, str]:
    """``stein_core``'s lazily re-exported names -> their submodules (importing ``stein_core`` loads none)."""
    import stein_core

    return dict(stein_core._MODULE_OF)


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs each parent package's ``__init__``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(root: Path, modules: Iterable[str]) -> list[str]:
    """Every non-wiring project file (relative paths, sorted) that importing ``modules`` may load."""
    root = Path(root).resolve()
    seen: set[str] = set()
    files: set[str] = set()
    todo = [m for mod in modules for m in _with_parents(mod)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(root, module)
        if path is None:
            continue
        rel = path.relative_to(root).as_posix()
        if is_wiring(rel):
            continue
        files.add(rel)
        for imported in _imports(root, path, path.stat().st_mtime_ns):
            todo += _with_parents(imported)
    return sorted(files)


def loaded_project_files(root: Path) -> list[str]:
    """The project files (relative paths, sorted) of every module this process has imported."""
    import sys

    root = Path(root).resolve()
    found = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(root):
            rel = Path(path).resolve().relative_to(root).as_posix()
            if rel.split("/")[0] in PACKAGES:
                found.add(rel)
    return sorted(found)


def record_imports_at_exit(root: Path, stage: str, out: Path) -> None:
    """At this process's exit, append ``{"stage": ..., "files": [...]}`` (one JSON line) to ``out``."""
    import atexit
    import json

    def _write() -> None:
        with open(out, "a") as f:
            f.write(json.dumps({"stage": stage, "files": loaded_project_files(root)}) + "\n")

    atexit.register(_write)
