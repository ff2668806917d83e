"""``stein status`` and ``stein exp``: what a run would redo, and DVC experiments kept inside one pipeline.

Only click at module level: ``stein --help`` stays fast. ``stein status`` is :mod:`flows.status`; ``stein exp``
wraps ``dvc exp run -S conf/<pipeline>.yaml:KEY=VALUE <pipeline>-<last stage>`` (the pipeline's final stage as the
target, so that DVC reproduces this pipeline and those it reuses, never the others in dvc.yaml) and ``dvc exp
show`` restricted to the pipeline's params and metrics.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import click

from flows.cli.common import _fail, _setup
from tasks.config.sections import ConfigError


@click.command()
@click.argument("pipeline", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: for each pipeline, the stages that "
              "would run or be restored, each with its reasons.")
def status(pipeline: str | None, as_json: bool) -> None:
    """What `stein run PIPELINE` would rerun, and why, without running anything (default: every pipeline).

    \b
    For each stage DVC would not skip:
      param    a changed parameter, old value (dvc.lock) -> new value (conf/<pipeline>.yaml)
      code     a changed code file (inside stein_core/, tasks/families/: the file itself)
      data     a changed input file
      output   a missing or changed output
      because  an upstream stage reruns, so this stage's inputs change
    and what DVC does with it: `runs`, or `restored from the run cache` (DVC ran the stage with exactly these
    inputs before and checks those outputs out instead of running it), or `outputs checked out of the cache`.
    Exit code 0 whether or not something would run (as `dvc status`); 2 for an unknown pipeline.
    """
    t0 = time.perf_counter()
    root = _setup()
    from flows.status import format_status, pipeline_status

    try:
        result = pipeline_status([pipeline] if pipeline else None, root)
    except ConfigError as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - DVC cannot read the project (a broken dvc.yaml or dvc.lock, ...)
        from dvc.exceptions import DvcException

        if not isinstance(exc, DvcException):
            raise
        click.echo(f"error: DVC cannot read the project: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"pipelines": [ps.as_dict() for ps in result],
                               "seconds": round(time.perf_counter() - t0, 3)}, default=str))
        return
    click.echo(format_status(result))


# ------------------------------------------------------------------------------------------------ stein exp


def _override_key(override: str) -> str:
    """The dotted key of a Hydra override (``sample.eps=1e-3``, ``+train.x=1``, ``~evaluate.grid``)."""
    return override.partition("=")[0].lstrip("+~")


def check_overrides(spec, root: Path, overrides: list[str]) -> None:
    """Apply ``overrides`` to a copy of ``conf/<pipeline>.yaml`` exactly as ``dvc exp run -S`` will (DVC's own
    ``apply_overrides``: Hydra's grammar, a key that is not in the file is an error unless given as ``+KEY=VALUE``)
    and validate the result with the pipeline's config model, and the configs of the pipelines it reuses as they
    are. Raises :class:`ConfigError` naming ``conf/<pipeline>.yaml`` and the key. The real file is not touched."""
    import shutil
    import tempfile

    real = root / spec.config_file
    for override in overrides:
        if ("=" not in override and not override.startswith("~")) or ":" in _override_key(override):
            raise ConfigError(real, None, f"-S {override!r}: expected KEY=VALUE (a dotted key of {spec.config_file}, "
                              "e.g. sample.eps=1e-3; the file is the pipeline's own)")
    with tempfile.TemporaryDirectory(prefix="stein-exp-") as tmp:
        copy = Path(tmp) / real.name
        shutil.copyfile(real, copy)
        if overrides:
            from dvc.exceptions import DvcException
            from dvc.utils.hydra import apply_overrides

            for override in overrides:  # one at a time: the error names the key that failed
                try:
                    apply_overrides(copy, [override])
                except DvcException as exc:
                    cause = exc.__cause__
                    why = " ".join(str(cause).split()) if cause else str(exc)
                    if why.startswith("Could not override"):  # Hydra: the key is not in the file
                        why = (f"not a key of {spec.config_file} (a key the config allows but the file lacks is "
                               f"added with -S +KEY=VALUE)")
                    raise ConfigError(real, _override_key(override), f"-S {override!r}: {why}") from None
        try:  # the copy and, as they are, the configs of the pipelines it reuses (dvc exp run reruns them too)
            spec.validate_all(root, copy)
        except ConfigError as exc:
            if Path(exc.path) != copy:  # an upstream config, or the batch split (named after the real file)
                raise
            raise ConfigError(real, exc.key, f"{exc.message} (with -S {' -S '.join(overrides)})") from None


def _experiment_name(root: Path) -> str:
    """A free name for a new experiment of the current commit, as DVC picks one."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import get_random_exp_name

    with Repo(str(root)) as repo:
        return get_random_exp_name(repo.scm, repo.scm.get_rev())


def _show_args(spec, root: Path, markdown: bool) -> list[str]:
    """``dvc exp show`` arguments that keep the columns of this pipeline only: its params file and metrics file
    (DVC names a column ``KEY``, or ``FILE:KEY`` when several files have that key), with ``--only-changed``."""
    from tasks.tracking.log import flatten
    from tasks.config.sections import load_yaml

    params_file, metrics_file = spec.config_file, spec.paths(root).metrics.relative_to(root).as_posix()
    keys = list(flatten(load_yaml(root / params_file)))
    metrics: list[str] = []
    with_metrics = root / metrics_file
    if with_metrics.is_file():
        try:
            metrics = list(json.loads(with_metrics.read_text()))
        except (OSError, ValueError):
            metrics = []
    names = ["Experiment", "Created", "State", "Executor"]
    names += [n for k in keys for n in (k, f"{params_file}:{k}")]
    names += [n for m in metrics for n in (m, f"{metrics_file}:{m}")]
    keep = "|".join(re.escape(n) for n in names)
    drop = f"^(?!(?:{keep})$)(?!{re.escape(metrics_file)}:)"  # every other column: other files, deps
    args = ["exp", "show", "--no-pager", "--only-changed", "--drop", drop]
    return args + (["--md"] if markdown else [])


def _restore(path: Path, content: bytes) -> bool:
    """Put ``content`` back into ``path`` if it differs (atomically); True if it did."""
    if path.read_bytes() == content:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    return True


@click.command("exp")
@click.argument("pipeline")
@click.option("-S", "--set-param", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a parameter of conf/PIPELINE.yaml for this experiment (repeatable): sample.eps=1e-3, "
                   "train.net.hidden=64 (Hydra's syntax, as `dvc exp run -S`; +KEY=VALUE adds a key the file lacks).")
@click.option("-n", "--name", help="The experiment's name (default: a random one, as DVC picks).")
@click.option("--queue", is_flag=True, help="Queue the experiment instead of running it (run the queue with "
              "`dvc queue start`; see README, 'Queued experiments').")
@click.option("--show", is_flag=True, help="Print the experiments of the current commit, with this pipeline's "
              "params and metrics only, the columns that differ (`dvc exp show`).")
@click.option("--md", "markdown", is_flag=True, help="With --show: a Markdown table.")
def exp(pipeline: str, overrides: tuple[str, ...], name: str | None, queue: bool, show: bool, markdown: bool) -> None:
    """Run PIPELINE as a DVC experiment with changed parameters, or show its experiments (--show).

    \b
      stein exp gmm2d -S sample.eps=1e-3 --name eps-small
      stein exp gmm2d --show

    The first runs `dvc exp run -S conf/gmm2d.yaml:sample.eps=1e-3 -n eps-small gmm2d-evaluate`: DVC reproduces this
    pipeline only (its last stage as the target; the stages the change leaves alone are skipped or restored from
    its cache), records params, metrics and outputs as experiment eps-small of the current commit, and leaves
    them in the workspace. A key the config lacks, or a value it refuses, exits 2 before DVC starts, and the
    config file stays as it was. A failed experiment puts conf/PIPELINE.yaml back as well. The stages log to
    the project's MLflow store, under one pipeline run named after the experiment.
    """
    root = _setup()
    from flows.registry import get_pipeline

    try:
        spec = get_pipeline(pipeline)
        if show and (overrides or name or queue):
            raise ConfigError("command line", "--show", "--show lists experiments; it takes no -S, --name or --queue")
        if markdown and not show:
            raise ConfigError("command line", "--md", "--md formats the table of --show")
        if not show:
            check_overrides(spec, root, list(overrides))
    except ConfigError as exc:
        _fail(exc)
    from flows.local import dvc

    if show:
        from flows.local import tool_env

        # DVC's table is as wide as the terminal; into a pipe or a file, wide enough not to cut the cells to "…"
        wide = {} if sys.stdout.isatty() or "COLUMNS" in os.environ else {"COLUMNS": "250"}
        proc = dvc(*_show_args(spec, root, markdown), root=root, env=tool_env(wide))
        sys.exit(proc.returncode)
    from flows.local import ProjectBusy, exit_on_termination, project_lock

    name = name or _experiment_name(root)
    args = ["exp", "run", *(a for o in overrides for a in ("-S", f"{spec.config_file}:{o}")), "-n", name]
    args += ["--queue"] if queue else []
    args.append(spec.final_stage)
    exit_on_termination()
    if queue:
        _run_dvc(spec, root, name, args, queue=True)
        return
    try:
        with project_lock(root, holder=f"`stein exp {pipeline}`"):  # raises ProjectBusy on entry only
            _run_dvc(spec, root, name, args, queue=False)
    except ProjectBusy as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _run_dvc(spec, root: Path, name: str, args: list[str], *, queue: bool) -> None:
    """``dvc exp run`` in the environment the stages need: this venv's bin first on PATH, telemetry off, the
    project's MLflow store by an absolute URI (a queued run works in a temporary copy), a Prefect server for the
    stages (unless PREFECT_API_URL names one; not for --queue: the queue's workers run later)."""
    import contextlib
    import tempfile

    from flows.local import STAGE_ERROR_ENV, dvc, prefect_server, read_stage_error, tool_env
    from tasks.tracking.log import tracking_uri

    config = root / spec.config_file
    before = config.read_bytes()
    click.echo(f"$ dvc {' '.join(args)}")
    with contextlib.ExitStack() as stack:
        if not queue:
            stack.enter_context(prefect_server())
        error_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stein-exp-"))) / "stage-error.json"
        env = tool_env({"MLFLOW_TRACKING_URI": tracking_uri(root)} | ({} if queue else {STAGE_ERROR_ENV: str(error_file)}))
        t0 = time.perf_counter()
        proc = dvc(*args, root=root, env=env)
        seconds = time.perf_counter() - t0
        failed = read_stage_error(error_file) if proc.returncode != 0 else None
    if proc.returncode != 0:
        restored = not queue and _restore(config, before)
        errors = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
        cause = str(failed) if failed else errors[-1] if errors else f"`dvc exp run` exited with {proc.returncode}"
        kept = f"; {spec.config_file} is back as it was" if restored else ""
        click.echo(f"error: experiment {name!r} of {spec.name!r} failed: {cause}{kept}", err=True)
        sys.exit(failed.exit_code if failed else 1)
    if queue:
        click.echo(f"Queued experiment {name!r} of {spec.name!r}. Run the queue (README, 'Queued experiments'):\n"
                   f"  export MLFLOW_TRACKING_URI={tracking_uri(root)}\n"
                   "  export PREFECT_API_URL=...   # a running `prefect server start` (else a server per stage)\n"
                   "  .venv/bin/dvc queue start -j 2; .venv/bin/dvc queue status\n"
                   f"then `stein exp {spec.name} --show`, and `dvc exp apply {name}` to bring it into the workspace.")
        return
    click.echo(f"Experiment {name!r} of {spec.name!r} done in {seconds:.0f} s; its results are in the workspace.")
    hints = [(f"stein exp {spec.name} --show", "compare it with the baseline and the other experiments"),
             (f"dvc exp apply {name}", "bring it back into the workspace later (`dvc exp branch NAME BRANCH`: keep "
                                       "it as a git branch)"),
             (f"stein runs {spec.name}", f"its MLflow pipeline run, '{spec.name} {name}'")]
    width = max(len(cmd) for cmd, _ in hints)
    for cmd, what in hints:
        click.echo(f"  {cmd:<{width}}   {what}")
