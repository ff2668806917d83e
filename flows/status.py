"""``stein status``: what ``stein run PIPELINE`` (``dvc repro <pipeline>-evaluate``) would do, and why, without
running anything.

``dvc status`` lists the stages whose own recorded inputs differ from the workspace. ``dvc repro`` does more: it
walks the stages upstream first, reruns a stage when its command, params, code, input data or outputs changed
*or when a stage it reads from reran*, and, before running one, looks in its *run cache* (``.dvc/cache/runs``):
when DVC has run the stage before with exactly these inputs, it checks the outputs of that run out of its cache
instead of running the command. This module predicts that walk stage by stage, with DVC's own objects and hash
functions (``dvc.repo.Repo``, the stages of ``dvc.yaml`` with their ``dvc.lock`` entries, ``Output.status``):

- **why**: the changed params by key (old value from dvc.lock, new from the params file), the changed code files
  (a stage's code deps are the files it imports: ``flows.code_deps``), the changed data deps, missing or changed
  outputs, a changed command, and the upstream stages whose rerun changes this stage's inputs;
- **what DVC will do**: ``run`` the command; ``restore`` the outputs of an earlier run with the same inputs from
  the run cache (the key is DVC's own: the stage's lock entry with the *current* hashes of its deps, computed as
  ``dvc.stage.cache`` does, then the newest entry under that key whose outputs are in the cache); or
  ``checkout`` the outputs recorded in dvc.lock when only the outputs are missing or changed and the cache holds
  them. A stage downstream of a restored one gets the restored outputs' hashes, so a whole chain of restores is
  predicted; downstream of a stage that runs, the new outputs are unknown, and the stage is reported as rerunning
  "because <upstream> reruns" (DVC skips it after all if the rerun writes the same bytes).

Nothing is written: the stages are DVC objects in memory; deps are hashed as ``dvc status`` hashes them (DVC's
hash cache makes an unchanged file cheap). No repository lock is taken, so ``stein status`` also answers while a
``stein run`` is going (its answer then describes the moment it looked).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

from flows.registry import PIPELINES, Pipeline, get_pipeline
from tasks.config.sections import ConfigError
from tasks.tracking.log import flatten

#: What DVC does with a stage: nothing, run its command, restore an earlier run's outputs from the run cache, or
#: check the outputs recorded in dvc.lock out of the cache.
UP_TO_DATE, RUN, RESTORE, CHECKOUT = "up to date", "run", "restore", "checkout"


@dataclass
class ParamChange:
    file: str
    key: str  # dotted: sample.eps
    old: Any = None
    new: Any = None
    change: str = "modified"  # modified | new | deleted


@dataclass
class PathChange:
    path: str
    change: str  # modified | new | deleted | not in cache


@dataclass
class StageStatus:
    stage: str
    pipeline: str
    action: str = UP_TO_DATE
    never_run: bool = False  # no dvc.lock entry
    command: dict[str, str] | None = None  # {"old", "new"}
    params: list[ParamChange] = field(default_factory=list)
    code: list[PathChange] = field(default_factory=list)
    data: list[PathChange] = field(default_factory=list)
    outs: list[PathChange] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)  # stages whose rerun changes this stage's inputs
    note: str | None = None

    @property
    def stale(self) -> bool:
        return self.action != UP_TO_DATE


@dataclass
class PipelineStatus:
    pipeline: str
    final_stage: str
    stages: list[StageStatus]

    @property
    def up_to_date(self) -> bool:
        return not any(s.stale for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        stale = [s for s in self.stages if s.stale]
        return {
            "pipeline": self.pipeline, "target": self.final_stage, "up_to_date": self.up_to_date,
            "would_run": [s.stage for s in stale if s.action == RUN],
            "would_restore": [s.stage for s in stale if s.action in (RESTORE, CHECKOUT)],
            "stages": [asdict(s) for s in stale],
        }


# ------------------------------------------------------------------------------------------------ the walk


class _Project:
    """One DVC repository opened for reading, and the prediction of every stage asked about so far (a stage
    shared by several pipelines, gmm2d-train say, is looked at once)."""

    def __init__(self, root: Path):
        from dvc.dvcfile import ProjectFile
        from dvc.repo import Repo

        self.root = root
        self.repo = Repo(str(root))
        self.dvcfile = ProjectFile(self.repo, str(root / "dvc.yaml"))
        self.raw: dict[str, dict] = self.dvcfile.contents.get("stages", {})
        self.lock: dict[str, dict] = self.dvcfile.lockfile_contents.get("stages", {})
        self.producer: dict[str, str] = {}  # output path -> the stage writing it
        for name, block in self.raw.items():
            for kind in ("outs", "metrics", "plots"):
                for entry in block.get(kind, []):
                    self.producer[_entry_path(entry)] = name
        self.code = _code_paths(self.raw)
        self.done: dict[str, StageStatus] = {}
        self.hashes: dict[str, tuple[Any, Any]] = {}  # dep path -> (meta, object): code deps are shared by stages
        self.param_files: dict[str, Any] = {}
        self.predicted: dict[str, tuple[Any, Any] | None] = {}  # out path -> (hash_info, meta) after it; None: unknown

    def ancestors(self, target: str) -> list[str]:
        """``target`` and every stage it depends on through the paths of dvc.yaml, upstream first (as ``dvc
        repro target`` visits them)."""
        graph: dict[str, set[str]] = {}
        todo = [target]
        while todo:
            name = todo.pop()
            if name in graph:
                continue
            if name not in self.raw:
                raise ConfigError("dvc.yaml", name, "no such stage: run `stein dvc-yaml` to write the stages of every "
                                  "registered pipeline")
            deps = {self._upstream_of(d) for d in self.raw[name].get("deps", [])} - {name, None}
            graph[name] = deps
            todo.extend(deps)
        return list(TopologicalSorter(graph).static_order())

    def status(self, name: str, pipeline: str) -> StageStatus:
        if name not in self.done:
            self.done[name] = self._predict(name, pipeline)
        return self.done[name]

    def _predict(self, name: str, pipeline: str) -> StageStatus:
        from dvc.dependency.param import ParamsDependency
        from dvc_data.hashfile.hash_info import HashInfo

        stage = self.dvcfile.stages[name]
        st = StageStatus(stage=name, pipeline=pipeline, never_run=name not in self.lock)
        if stage.cmd_changed:
            st.command = {"old": self.lock.get(name, {}).get("cmd", ""), "new": stage.cmd}
        inputs_known = True  # False once an input is the output of a stage that runs (its new hash is unknown)
        inputs_changed = bool(st.command)
        for dep in stage.deps:
            path = dep.def_path
            if isinstance(dep, ParamsDependency):
                old = dep.hash_info.value if dep.hash_info else {}
                new = self._read_params(dep)
                st.params += [ParamChange(path, *c) for c in _diff_params(old or {}, new)]
                inputs_changed |= old != new
                dep.hash_info = HashInfo(dep.PARAM_PARAMS, new)
                continue
            up = self._upstream_of(path)
            if up is not None and up in self.done and self.done[up].stale:
                if self.done[up].action == RUN or self.predicted.get(path) is None:
                    st.upstream.append(up)  # its new outputs are known only once it has run
                    inputs_known = False
                    continue
                hash_info, meta = self.predicted[path]
                if hash_info != dep.hash_info:
                    st.upstream.append(up)
                    inputs_changed = True
                dep.hash_info, dep.meta = hash_info, meta
                continue
            if not dep.exists:
                (st.code if path in self.code else st.data).append(PathChange(path, "deleted"))
                inputs_known, inputs_changed = False, True
                continue
            if path not in self.hashes:
                self.hashes[path] = _hash(dep)
            meta, obj = self.hashes[path]
            if obj.hash_info != dep.hash_info:
                change = "modified" if dep.hash_info else "new"
                if path in self.code:
                    st.code.append(PathChange(path, change))
                else:
                    st.data.append(PathChange(path, change))
                inputs_changed = True
            dep.hash_info, dep.meta = obj.hash_info, meta
        for out in stage.outs:
            for path, change in out.status().items():
                st.outs.append(PathChange(path, change))
        if st.never_run:  # everything is "new": the reason is that it never ran
            st.params, st.code, st.data, st.outs = [], [], [], []
        st.upstream = sorted(set(st.upstream), key=st.upstream.index)
        stale = st.never_run or inputs_changed or bool(st.upstream) or bool(st.outs)
        if not stale:
            return st
        st.action, produced = self._decide(stage, st, inputs_known, inputs_changed)
        for out in stage.outs:
            self.predicted[out.def_path] = produced.get(out.def_path) if produced else None
        return st

    def _read_params(self, dep) -> dict[str, Any]:
        """``dep.read_params()`` with each params file parsed once (DVC's parser, DVC's key lookup)."""
        import dpath

        from dvc.utils.serialize import load_path

        if not dep.exists:
            return {}
        if dep.fs_path not in self.param_files:
            self.param_files[dep.fs_path] = load_path(dep.fs_path, dep.repo.fs)
        config = self.param_files[dep.fs_path]
        if not dep.params:
            return dict(config)
        values = {}
        for key in dep.params:
            try:
                values[key] = dpath.get(config, key, separator=".")
            except KeyError:
                continue
        return values

    def _upstream_of(self, path: str) -> str | None:
        """The stage whose output ``path`` is, or lies inside or around (a directory output and a file in it)."""
        if path in self.producer:
            return self.producer[path]
        for out, name in self.producer.items():
            if path.startswith(out.rstrip("/") + "/") or out.startswith(path.rstrip("/") + "/"):
                return name
        return None

    def _decide(self, stage, st: StageStatus, inputs_known: bool, inputs_changed: bool):
        """What ``dvc repro`` does with a stale stage, following ``dvc.stage.run.run_stage`` and
        ``StageCache.restore``: (action, {out path: (hash_info, meta)} of what it leaves, or None when unknown)."""
        from dvc.stage.cache import _get_cache_hash
        from dvc.stage.serialize import to_single_stage_lockfile

        cache = self.repo.stage_cache
        if not inputs_known or not (stage.cmd and stage.deps and stage.outs) or stage.always_changed:
            return RUN, None
        if not inputs_changed and not st.never_run and all(out.hash_info for out in stage.outs):
            # only the outputs differ: DVC checks dvc.lock's outputs out of the cache, if it has them all
            entry = to_single_stage_lockfile(stage)
            if _outs_cached(cache, stage, entry):
                st.note = "outputs checked out of DVC's cache as dvc.lock records them: nothing computes"
                return CHECKOUT, _entry_outs(entry)
            st.note = "outputs are not in DVC's cache: the command runs"
            return RUN, None
        if not _can_hash(stage):
            return RUN, None
        lock = to_single_stage_lockfile(stage)
        entry = _newest_run(cache, _get_cache_hash(lock, key=True))
        if entry is not None and _outs_cached(cache, stage, entry):
            st.note = ("restored from the run cache: DVC ran this stage with these inputs before and checks that "
                       "run's outputs out of its cache instead of running it")
            return RESTORE, _entry_outs(entry)
        return RUN, None


def _entry_path(entry: Any) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def _code_paths(stages: dict[str, dict]) -> set[str]:
    """The deps of dvc.yaml that are code: the project's modules (``flows.code_deps``) rather than data."""
    from flows.code_deps import PACKAGES

    return {d for block in stages.values() for d in block.get("deps", []) if d.split("/")[0] in PACKAGES}


def _hash(dep):
    """(meta, object) of a dependency as it is in the workspace, hashed the way ``dvc status`` hashes it (a dry
    run: nothing is written to the cache; DVC's hash cache spares rehashing unchanged files)."""
    odb = dep.cache if dep.use_cache else dep.local_cache
    _, meta, obj = dep._build(odb, dep.fs_path, dep.fs, dep.hash_name, ignore=dep.dvcignore, dry_run=True,
                              no_progress_bar=True)
    return meta, obj


def _can_hash(stage) -> bool:
    """``dvc.stage.cache._can_hash`` without rehashing the deps (their hashes are set by now): local paths, no
    persistent outputs."""
    if stage.is_callback or stage.always_changed:
        return False
    return (all(d.protocol == "local" and d.def_path and d.hash_info for d in stage.deps)
            and all(o.protocol == "local" and o.def_path and not o.persist and o.is_in_repo for o in stage.outs))


def _newest_run(cache, key: str) -> dict | None:
    """The newest run-cache entry under ``key`` (``StageCache._load``'s choice), or None."""
    folder = cache._get_cache_dir(key)
    if not os.path.isdir(folder):
        return None
    entries = sorted(os.listdir(folder), key=lambda f: os.path.getmtime(os.path.join(folder, f)), reverse=True)
    return cache._load_cache(key, entries[0]) if entries else None


def _outs_cached(cache, stage, entry: dict) -> bool:
    """Whether every output of a run-cache (or dvc.lock) entry is in DVC's cache (``StageCache.restore``'s test)."""
    try:
        return cache._create_stage(entry, wdir=stage.wdir).outs_cached()
    except Exception:  # noqa: BLE001 - an entry DVC could not restore either
        return False


def _entry_outs(entry: dict) -> dict[str, tuple[Any, Any]]:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta

    outs = {}
    for out in entry.get("outs", []):
        value = out.get("md5")
        outs[out["path"]] = (HashInfo("md5", value) if value else HashInfo(),
                             Meta(isdir=bool(value and value.endswith(".dir")), size=out.get("size"),
                                  nfiles=out.get("nfiles")))
    return outs


# ------------------------------------------------------------------------------------------------ params


def _diff_params(old: dict, new: dict) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, old, new, change) for every leaf that differs between dvc.lock's values and the file's."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        if key not in b:
            out.append((key, a[key], None, "deleted"))
        elif key not in a:
            out.append((key, None, b[key], "new"))
        elif a[key] != b[key]:
            out.append((key, a[key], b[key], "modified"))
    return out


# ------------------------------------------------------------------------------------------------ entry points


def pipeline_status(pipelines: list[str] | None, root: Path) -> list[PipelineStatus]:
    """The prediction for each of ``pipelines`` (default: every registered pipeline). An unknown pipeline, or one
    whose stages are not in dvc.yaml, raises :class:`ConfigError`."""
    specs: list[Pipeline] = [get_pipeline(p) for p in pipelines] if pipelines else list(PIPELINES.values())
    project = _Project(root)
    owner = {spec.dvc_stage(st.name): spec.name for spec in PIPELINES.values() for st in spec.stages}
    result = []
    try:
        for spec in specs:
            order = project.ancestors(spec.final_stage)
            stages = [project.status(name, owner.get(name, spec.name)) for name in order]
            result.append(PipelineStatus(spec.name, spec.final_stage, stages))
    finally:
        project.repo.close()  # its hash-cache database, before `stein run` starts `dvc repro` beside it
    return result


def _value(v: Any) -> str:
    return "(none)" if v is None else repr(v) if isinstance(v, str) else str(v)


def format_status(statuses: list[PipelineStatus]) -> str:
    lines: list[str] = []
    for ps in statuses:
        stale = [s for s in ps.stages if s.stale]
        if not stale:
            lines.append(f"{ps.pipeline}: up to date (`stein run {ps.pipeline}` would run nothing)")
            continue
        runs = [s.stage for s in stale if s.action == RUN]
        restored = [s.stage for s in stale if s.action != RUN]
        what = []
        if runs:
            what.append(f"run {', '.join(runs)}")
        if restored:
            what.append(f"restore {', '.join(restored)} from DVC's cache")
        lines.append(f"{ps.pipeline}: `stein run {ps.pipeline}` would {' and '.join(what)}")
        for s in stale:
            where = "" if s.pipeline == ps.pipeline else f" (pipeline {s.pipeline})"
            action = {RUN: "runs", RESTORE: "restored from the run cache",
                      CHECKOUT: "outputs checked out of the cache"}[s.action]
            lines.append(f"  {s.stage}{where}: {action}")
            if s.never_run:
                lines.append("    never run (no entry in dvc.lock)")
            if s.command:
                lines.append(f"    command   {s.command['old']!r} -> {s.command['new']!r}")
            for p in s.params:
                detail = {"new": f"new: {_value(p.new)}", "deleted": f"deleted (was {_value(p.old)})"}.get(
                    p.change, f"{_value(p.old)} -> {_value(p.new)}")
                lines.append(f"    param     {p.key}: {detail}   ({p.file})")
            lines += [f"    code      {c.path} ({c.change})" for c in s.code]
            lines += [f"    data      {c.path} ({c.change})" for c in s.data]
            lines += [f"    output    {c.path} ({c.change})" for c in s.outs]
            for up in s.upstream:
                verb = "reruns" if _action_of(statuses, up) == RUN else "restores other outputs"
                lines.append(f"    because   {up} {verb}")
            if s.note:
                lines.append(f"    ({s.note})")
    return "\n".join(lines)


def _action_of(statuses: list[PipelineStatus], stage: str) -> str:
    for ps in statuses:
        for s in ps.stages:
            if s.stage == stage:
                return s.action
    return RUN
