"""The ``stein`` command line.

Heavy modules (torch, Prefect, Ray, MLflow) are imported inside the commands, after the environment is set
up, so ``stein --help`` and a no-op ``stein run`` stay fast and Prefect sees the project's settings.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from tasks.config.sections import ConfigError

from flows.cli.common import EXIT_USAGE, KID_SUBSET_SIZE, KID_SUBSETS, N_BOOTSTRAP, SEED, _fail, _setup


#: A file each ``stein stage`` process appends the project files it loaded to (tests check them against the
#: stage's DVC code deps, ``flows.code_deps``).
RECORD_IMPORTS_ENV = "STEIN_RECORD_IMPORTS"


def _validate(pipeline: str, root: Path, config: str | None = None, *, upstream: bool = False):
    from flows.registry import get_pipeline

    spec = get_pipeline(pipeline)
    if upstream:
        return spec, spec.validate_all(root)
    return spec, spec.load_config(root, config)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Stein's method and score matching: a reproducible pipeline (Prefect, Ray Train, DVC, MLflow).

    \b
    Quick start:
      stein run                 reproduce the default pipeline (gmm2d); a rerun with nothing changed is a no-op
      stein run --list          list the pipelines
      stein stage sample        run one stage directly (outside DVC's skip-if-unchanged)
      stein status              what `stein run` would rerun, and why (changed params, code, data)
      stein exp gmm2d -S sample.eps=1e-3
                                a DVC experiment of one pipeline with a changed parameter
      stein runs                the recent pipeline runs: what differs between them, headline metrics
      stein compare ring8-agd ring8-mmd
                                headline metrics and learning curves of pipelines (or runs) side by side
      stein ui                  browse and compare runs in the MLflow UI on 127.0.0.1

    Parameters live in conf/<pipeline>.yaml (tracked by DVC); runtime settings (Ray workers, GPUs, threads)
    come from STEIN_* environment variables or runtime.env.
    """


@main.command()
@click.argument("pipeline", default="gmm2d")
@click.option("--list", "list_", is_flag=True, help="List the pipelines with one line each and exit.")
@click.option("--force", is_flag=True, help="Rerun every stage even if DVC finds nothing changed.")
@click.option("--push", is_flag=True,
              help="After a successful run, or when nothing was stale, upload the outputs of the pipeline's stages "
                   "(and of the pipelines it reuses) to the DVC remote with `dvc push`, so that another clone gets "
                   "them with `dvc pull`.")
@click.option("--remote", metavar="NAME",
              help="The DVC remote --push writes to (default: the project's default remote, `dvc remote default`).")
@click.option("--name", "run_name", metavar="NAME",
              help="Name of the MLflow pipeline run (default: '<pipeline> <short git commit> <date time>').")
def run(pipeline: str, list_: bool, force: bool, push: bool, remote: str | None, run_name: str | None) -> None:
    """Reproduce PIPELINE through DVC (default: gmm2d), only the stages whose inputs changed.

    Starts a local Prefect server for the stages (unless PREFECT_API_URL is set), groups the stages' MLflow runs
    under one pipeline run (named after the commit and time, or --name; the config as params, the headline
    metrics, plots and registered model version on it), and prints where the results are. With --push the outputs then go to a DVC remote
    (an S3 bucket shared by a team, say); a push that fails exits 1 with DVC's error, after the results are kept.
    """
    from flows.registry import PIPELINES

    if list_:
        width = max(map(len, PIPELINES))
        for name, spec in PIPELINES.items():
            stages = " -> ".join(st.name for st in spec.stages)
            upstream = f" (after {spec.upstream})" if spec.upstream else ""
            click.echo(f"{name:<{width}}  {spec.description}\n{'':<{width}}  stages: {stages}{upstream}")
        return
    if run_name is not None and not run_name.strip():
        _fail(ValueError("--name must not be empty"))
    if remote is not None and not push:
        _fail(ValueError(f"--remote {remote} needs --push (it names the DVC remote that --push uploads to)"))
    root = _setup()
    try:
        spec, _ = _validate(pipeline, root, upstream=True)
    except ConfigError as exc:
        _fail(exc)
    target = _push_target(root, remote) if push else None  # a missing remote fails here, before any compute
    from flows.local import ProjectBusy, exit_on_termination, project_lock

    exit_on_termination()
    try:
        with project_lock(root):  # raises ProjectBusy on entry only
            _reproduce(spec, pipeline, root, force, push=target, run_name=run_name)
    except ProjectBusy as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _push_target(root: Path, remote: str | None) -> tuple[str, str]:
    """The (name, URL) of the DVC remote ``stein run --push`` writes to: ``remote`` if given, else DVC's default.
    A name DVC does not know, or no default, is bad input (exit 2), found before the pipeline runs."""
    from flows.local import dvc_remotes

    try:
        remotes, default = dvc_remotes(root)
    except RuntimeError as exc:
        _fail(RuntimeError(f"--push: cannot read DVC's config: {exc}"))
    known = ", ".join(sorted(remotes)) or "none"
    if remote is None:
        if default is None:
            _fail(ValueError(f"--push: the project has no default DVC remote (configured: {known}): add one with "
                             "`dvc remote add -d NAME URL`, or name one with --remote NAME"))
        remote = default
    if remote not in remotes:
        what = "--remote" if remote != default else "the default DVC remote (core.remote)"
        _fail(ValueError(f"--push: {what} {remote!r} is not a configured DVC remote (configured: {known}); see "
                         "`dvc remote list`"))
    return remote, remotes[remote]


def _reproduce(spec, pipeline: str, root: Path, force: bool, push: tuple[str, str] | None = None,
               run_name: str | None = None) -> None:
    """The body of ``stein run`` under the project lock: what is stale, the Prefect server, the pipeline flow, and
    with ``push`` (a remote's name and URL) the upload of the outputs afterwards."""
    from flows.local import prefect_server

    plan = _plan(pipeline, root)
    if plan is not None and plan.up_to_date and not force:
        click.echo(f"Pipeline {pipeline!r} is up to date: nothing to reproduce.")
        if push:
            _push(spec, pipeline, root, *push)
        _print_results(spec, root)
        return
    if plan is not None and not force:  # what DVC will do: run a stage, or restore its outputs from its run cache
        from flows.status import RUN

        runs = [st.stage for st in plan.stages if st.action == RUN]
        restores = [st.stage for st in plan.stages if st.stale and st.action != RUN]
        click.echo("To run: " + (", ".join(runs) or "no stage") +
                   (f"; to restore from DVC's cache: {', '.join(restores)}" if restores else "") +
                   f"  (`stein status {pipeline}` says why)")
    with prefect_server():
        from flows.pipeline import reproduce_flow

        from prefect.logging.handlers import APILogWorker

        from flows.local import StageFailed

        try:
            result = reproduce_flow(pipeline=pipeline, force=force, run_name=run_name)
        except ConfigError as exc:
            _fail(exc)
        except StageFailed as exc:  # the failing stage's own error, as its last line
            click.echo(f"error: pipeline {pipeline!r} failed in {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed: exit 1
            click.echo(f"error: pipeline {pipeline!r} failed: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
        finally:
            APILogWorker.drain_all(timeout=5)  # ship the flow's last log lines while the server is still up
    ran = result["stages_run"]
    click.echo(f"Ran: {', '.join(ran) or 'no stage (outputs restored from DVC cache)'}")
    cached = " (cached: no stage ran, no new result)" if not ran else ""
    model = f", model {result['model_version']}" if result["model_version"] else ""
    click.echo(f"MLflow pipeline run {result['run_name']!r} ({result['run_id'][:8]}{model}){cached}")
    click.echo("Metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()))
    if push:
        _push(spec, pipeline, root, *push)
    _print_results(spec, root)


def _plan(pipeline: str, root: Path):
    """What ``dvc repro`` will do for ``pipeline`` (:func:`flows.status.pipeline_status`); None when it cannot tell
    (DVC's files unreadable, say): ``dvc repro`` then reports the problem itself."""
    from flows.status import pipeline_status

    try:
        (plan,) = pipeline_status([pipeline], root)
    except Exception as exc:  # noqa: BLE001 - a prediction only; the run goes on and DVC reports what is wrong
        logging.getLogger("stein").debug("no prediction for %s: %s", pipeline, exc)
        return None
    return plan


def _push(spec, pipeline: str, root: Path, remote: str, url: str) -> None:
    """``dvc push --with-deps`` of the pipeline's last stage: the cached outputs of every stage it depends on,
    upstream pipelines included (metrics files are ``cache: false``: they travel with git). DVC uploads only the
    objects the remote lacks. A failure exits 1 naming the remote and DVC's own error line."""
    import time

    from flows.local import dvc

    click.echo(f"Pushing the outputs of {pipeline!r} to DVC remote {remote!r} ({url})")
    t0 = time.perf_counter()
    proc = dvc("push", "--with-deps", "--remote", remote, spec.final_stage, root=root)
    if proc.returncode != 0:
        errors = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
        cause = errors[-1] if errors else f"`dvc push` exited with {proc.returncode}"
        click.echo(f"error: pipeline {pipeline!r} is reproduced, but pushing its outputs to DVC remote {remote!r} "
                   f"({url}) failed: {cause}", err=True)
        sys.exit(1)
    click.echo(f"Pushed to {remote!r} in {time.perf_counter() - t0:.1f} s: another clone gets them with "
               f"`dvc pull --with-deps {spec.final_stage}` (after `git pull` of dvc.lock and metrics/)")


def _print_results(spec, root: Path) -> None:
    paths = spec.paths(root)
    rel = lambda p: p.relative_to(root)  # noqa: E731
    click.echo("Results:")
    click.echo(f"  metrics   {rel(paths.metrics)}   (dvc metrics show)")
    click.echo(f"  plots     {rel(paths.plots)}/   (dvc plots show)")
    from tasks.config.sweep import SweepPaths

    if spec.is_sweep:
        sp = SweepPaths(paths)
        click.echo(f"  table     {rel(sp.table.with_suffix('.md'))}   (and .csv, .png)")
        click.echo(f"  models    {rel(sp.models('<method>').parent)}/<method>/<cell>/model.pt   (cells d<D>-s<seed>)")
    else:
        click.echo(f"  samples   {rel(paths.samples.parent)}/")
        click.echo(f"  model     {rel(paths.model)}" + (f"   (from pipeline {spec.upstream})" if spec.upstream else ""))
    from tasks.tracking.log import tracking_uri

    uri = tracking_uri(root)
    if uri.startswith("sqlite:"):
        click.echo(f"  runs      MLflow store .stein/mlflow.db: `stein runs {spec.name}` lists them, `stein ui` shows them")
    else:
        click.echo(f"  runs      MLflow at {uri}")


@main.command("dvc-yaml")
@click.option("--check", is_flag=True, help="Exit 1 if dvc.yaml differs from what the registry generates; write nothing.")
def dvc_yaml(check: bool) -> None:
    """Write dvc.yaml from the pipeline registry (flows/registry.py) and conf/*.yaml.

    Adding a pipeline is one YAML file in conf/ and one line in flows/registry.py; this command then writes its
    DVC stages. dvc.yaml is generated, never edited by hand.
    """
    root = _setup()
    from flows.dvcgen import render
    from tasks.data.io import atomic_path

    try:
        text = render(root)
    except ConfigError as exc:
        _fail(exc)
    path = root / "dvc.yaml"
    current = path.read_text() if path.is_file() else ""
    if check:
        if current != text:
            click.echo("dvc.yaml is not what the registry generates: run `stein dvc-yaml`", err=True)
            sys.exit(1)
        click.echo("dvc.yaml is current")
        return
    if current == text:
        click.echo("dvc.yaml is current; nothing written")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    click.echo(f"wrote {path.relative_to(root)} ({len(text.splitlines())} lines)")


@main.command()
@click.argument("stage")
@click.option("--pipeline", "-p", default="gmm2d", show_default=True, help="Pipeline whose stage to run.")
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="Config file (default conf/<pipeline>.yaml).")
def stage(stage: str, pipeline: str, config: str | None) -> None:
    """Run one STAGE of a pipeline as a Prefect flow (this is what each dvc.yaml stage calls).

    gmm2d's stages are prepare, train, sample and evaluate; `stein run --list` shows every pipeline. The stage
    runs unconditionally; to rerun it only when its inputs changed use `dvc repro <pipeline>-<stage>`.
    """
    root = _setup()
    from flows.local import die_with_parent, end_with_dvc, record_stage_error

    die_with_parent()  # started by DVC: when DVC dies (stein run stopped or killed), this stage dies with it
    end_with_dvc()  # ... also when a shell stands between them and outlives DVC
    name = f"{pipeline}-{stage}"
    if os.environ.get(RECORD_IMPORTS_ENV):
        from flows.code_deps import record_imports_at_exit

        record_imports_at_exit(root, name, Path(os.environ[RECORD_IMPORTS_ENV]))
    try:
        spec, _ = _validate(pipeline, root, config)
        flow = spec.stage(stage).load_flow()
        flow(pipeline=pipeline, config=config, stage=stage)
    except ConfigError as exc:
        record_stage_error(name, exc, EXIT_USAGE)
        _fail(exc)
    except Exception as exc:
        record_stage_error(name, exc, 1)
        raise


class _Numbers(click.ParamType):
    """A comma-separated list of numbers within bounds (``--sigmas 5,10``, ``--weights 0.5,0.5``)."""

    name = "numbers"

    def __init__(self, low: float, high: float, *, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            out = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 5,10)", param, ctx)
        bound = f"{'>' if self.low_open else '>='} {self.low:g} and <= {self.high:g}"
        for v in out:
            if not (v > self.low if self.low_open else v >= self.low) or not v <= self.high:  # NaN fails both
                self.fail(f"{v:g} in {value!r}: every value must be {bound}", param, ctx)
        return out


@main.command()
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Parquet file with a column x of fixed-size float lists.")
@click.option("--target", default="std_normal", show_default=True, metavar="NAME",
              help="The model tested: std_normal or std_laplace (in the data's dimension), or a pipeline whose "
                   "prepare section draws a Gaussian mixture (gmm2d: weights 0.8/0.2 at ±(5, 5); ring8-agd, ...): "
                   "that mixture.")
@click.option("--weights", type=_Numbers(0.0, 1.0, low_open=True), default=None, metavar="W1,W2,...",
              help="Replace the mixture target's weights (one per component, summing to 1), e.g. --target gmm2d "
                   "--weights 0.5,0.5.")
@click.option("--test", "test_name", type=click.Choice(["ksd", "sksd", "ksd_smoothed"]), default="ksd", show_default=True,
              help="KSD (wild bootstrap), maxSKSD (directions fitted on half the data), or the noise-smoothed KSD "
                   "over the noise levels of --sigmas (data and target convolved with the same N(0, σ² I); sees "
                   "the mixing proportions of far-apart modes that KSD is blind to).")
@click.option("--sigmas", type=_Numbers(0.0, 1e6), default=None, metavar="S1,S2,...",
              help="Noise levels of --test ksd_smoothed (required there), e.g. 5,10 for modes 14 apart; 0 is the plain KSD.")
@click.option("--kernel", type=click.Choice(["imq", "rbf"]), default="imq", show_default=True,
              help="IMQ (c=1, beta=-1/2) or RBF with the median-heuristic bandwidth; with ksd_smoothed, c or the "
                   "bandwidth widened to sqrt(l^2 + σ^2) at each level.")
@click.option("--n-bootstrap", type=N_BOOTSTRAP, default=500, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--max-samples", type=click.IntRange(4, 10_000_000), default=None, help="Test a random subset of this size (the test is O(n^2)).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def gof(data, target, weights, test_name, sigmas, kernel, n_bootstrap, alpha, seed, max_samples, as_json) -> None:
    """Goodness-of-fit test of the samples in DATA against a named target density.

    H0: the rows are i.i.d. draws from the target. Prints the statistic (KSD^2 U-statistic, maxSKSD, or for
    ksd_smoothed the sum over the noise levels of each level's KSD^2 in units of its bootstrap standard
    deviation) and its p-value, which counts the observed statistic among the bootstrap draws and so is never 0.

    \b
    Example (mixing-proportion blindness): samples with the right modes but weights 0.5/0.5
      stein gof --data S.parquet --target gmm2d --test ksd                    # blind: no rejection
      stein gof --data S.parquet --target gmm2d --test ksd_smoothed --sigmas 7,14   # rejects
    """
    import json

    root = _setup()
    from tasks.tools.gof import goodness_of_fit

    try:
        out = goodness_of_fit(data, target=target, test=test_name, kernel=kernel, n_bootstrap=n_bootstrap,
                              alpha=alpha, seed=seed, max_samples=max_samples, weights=weights, sigmas=sigmas,
                              root=root)
    except ConfigError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(out))
        return
    verdict = "reject" if out["reject"] else "do not reject"
    of = f" of {out['n_used']} rows, the other half chose the slices" if out["n"] != out["n_used"] else ""
    weighted = f" (weights {'/'.join(f'{w:g}' for w in out['weights'])})" if "weights" in out else ""
    click.echo(f"{out['test'].upper()} goodness-of-fit test of {data} (n={out['n']}{of}, d={out['d']}) against "
               f"{target}{weighted}, {kernel} kernel")
    click.echo(f"  statistic {out['statistic']:.6g}   p-value {out['p_value']:.4f}   ({verdict} H0 at alpha={alpha})")
    if "sigmas" in out:
        click.echo("  KSD^2 per noise level: " + ", ".join(f"σ={s:g}: {v:.4g}" for s, v in zip(out["sigmas"], out["ksd_per_sigma"])))


@main.group("eval")
def eval_group() -> None:
    """Feature-space distances between two sample sets (Parquet files with a column x)."""


_FEATURES_HELP = (
    "raw (the vectors themselves), classifier:PATH (a LeNet classifier checkpoint's penultimate layer) or "
    "inception:PATH (FID Inception-v3 weights pt_inception-2015-12-05-6726825d.pth from a local file; plain "
    "`inception` reads the path from $STEIN_INCEPTION_WEIGHTS)"
)


def _eval_options(f):
    for opt in reversed((
        click.option("--real", required=True, type=click.Path(dir_okay=False), help="Reference samples (Parquet)."),
        click.option("--fake", required=True, type=click.Path(dir_okay=False), help="Model samples (Parquet)."),
        click.option("--features", default="raw", show_default=True, help=_FEATURES_HELP),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    )):
        f = opt(f)
    return f


def _report(out: dict, as_json: bool, headline: str) -> None:
    import json

    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(headline)
        click.echo(f"  n_real {out['n_real']}  n_fake {out['n_fake']}  dim {out['dim']}  features {out['features']} ({out['fingerprint'][:12]})")


@eval_group.command("fid")
@_eval_options
def eval_fid(real: str, fake: str, features: str, as_json: bool) -> None:
    """Fréchet distance between the feature distributions of REAL and FAKE (covariances divide by N-1)."""
    _setup()
    from tasks.stages.evaluate.features import fid

    try:
        out = fid(real, fake, features=features)
    except ConfigError as exc:
        _fail(exc)
    _report(out, as_json, f"FID {out['fid']:.6g}  ({out['method']} form)")


@eval_group.command("kid")
@_eval_options
@click.option("--subsets", type=KID_SUBSETS, default=100, show_default=True)
@click.option("--subset-size", type=KID_SUBSET_SIZE, default=1000, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
def eval_kid(real: str, fake: str, features: str, as_json: bool, subsets: int, subset_size: int, seed: int) -> None:
    """Kernel inception distance: unbiased MMD² with the cubic polynomial kernel over seeded subsets (mean ± std)."""
    _setup()
    from tasks.stages.evaluate.features import kid

    try:
        out = kid(real, fake, features=features, n_subsets=subsets, subset_size=subset_size, seed=seed)
    except ConfigError as exc:
        _fail(exc)
    _report(out, as_json, f"KID {out['kid']:.6g} ± {out['kid_std']:.2g}  ({out['n_subsets']} subsets of {out['subset_size']})")


@main.group()
def bench() -> None:
    """Micro-benchmarks of stein_core (the pipeline benchmark is bench/bench_pipeline.py)."""


@bench.command("ksd")
@click.option("--n", "n", type=click.IntRange(2, 32_768), default=4096, show_default=True,
              help="Number of samples (each [n, n] float32 matrix of the statistic is 4 n^2 bytes: 4.3 GB at the most).")
@click.option("--d", "d", type=click.IntRange(1, 65_536), default=64, show_default=True, help="Dimension.")
@click.option("--repeats", type=click.IntRange(1, 1000), default=5, show_default=True, help="Timed repetitions (median reported).")
@click.option("--naive/--no-naive", default=None, help="Time the naive [n, n, d] reference (default: when affordable).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_ksd(n: int, d: int, repeats: int, naive: bool | None, device: str, as_json: bool) -> None:
    """Time the KSD U-statistic (IMQ kernel, standard-normal score) on random [N, D] data.

    Reports the median seconds, the same-run floor (one [n, d] x [d, n] matrix product plus one element-wise
    pass over [n, n]) and, where it fits, the naive reference that materialises [n, n, d].
    """
    import json

    _setup()
    from tasks.tools.bench import NAIVE_BUDGET, time_ksd

    if n * d > 2**28:  # the [n, d] data alone: 1 GiB of float32
        _fail(ValueError(f"--n {n} with --d {d}: the data alone would be {n * d * 4 / 2**30:.1f} GiB; at most 1 GiB (n * d <= 2^28)"))
    if naive and n * n * d > 4 * NAIVE_BUDGET:
        _fail(ValueError(f"--naive with --n {n} --d {d}: the naive reference materialises [n, n, d], "
                         f"{n * n * d * 4 / 2**30:.0f} GiB of float32; at most n^2 d = {4 * NAIVE_BUDGET:,}"))
    out = time_ksd(n, d, repeats=repeats, naive=naive, device=device)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"KSD U-statistic, n={n}, d={d}, {out['dtype']} on {device} ({out['threads']} threads)")
    click.echo(f"  seconds        {out['seconds']:.4f}  (median of {repeats})")
    click.echo(f"  floor          {out['floor_seconds']:.4f}  (ratio {out['ratio_to_floor']:.2f})")
    if "naive_seconds" in out:
        click.echo(f"  naive [n,n,d]  {out['naive_seconds']:.4f}  ({out['speedup_vs_naive']:.1f}x slower)")


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port on 127.0.0.1.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server worker processes (MLflow's own default, 4, doubles the start-up time on a small machine).")
def ui(port: int, workers: int) -> None:
    """Open the MLflow UI on 127.0.0.1 to compare runs side by side.

    \b
    Each pipeline is an experiment; its table lists the pipeline runs (named '<pipeline> <commit> <time>', or
    --name) with their stage runs folded under them. The links printed at start open each pipeline's table with
    its headline metrics and differing params as columns. To compare: tick runs, then Compare. `stein runs`
    prints the same table in the terminal.
    """
    root = _setup()
    from flows.cli.server import check_port_free
    from tasks.infra.server import ServerSetupError
    from tasks.tracking.log import artifact_root, tracking_uri

    try:
        check_port_free(port)
    except ServerSetupError as exc:
        _fail(exc)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--backend-store-uri", tracking_uri(root), "--default-artifact-root", artifact_root(root),
    ]
    # GenAI job runners (an extra process importing all of MLflow) do nothing for this project: off unless asked
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    base = f"http://127.0.0.1:{port}"
    click.echo(f"MLflow UI on {base}  (Ctrl-C to stop; it takes a few seconds to start)")
    _print_run_tables(root, base)
    import subprocess

    from flows.local import exit_on_termination, private_child, stop_process_group

    # A child, not an exec: in a session of its own (a Ctrl-C reaches us, and we stop its whole group) and with a
    # parent-death signal, so that a `stein ui` killed with SIGKILL leaves no uvicorn serving on with no parent.
    exit_on_termination()
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=private_child)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_process_group(proc)
    if code:
        click.echo(f"error: mlflow ui exited with code {code}", err=True)
    sys.exit(code)


def _print_run_tables(root: Path, base: str) -> None:
    """One link per pipeline that has runs: its run table, in the classic view, with the project's columns."""
    import sqlite3

    from flows.registry import PIPELINES
    from tasks.tracking.runs import experiments_sqlite, sqlite_store
    from tasks.tracking.log import run_table_url, tracking_uri

    db = sqlite_store(tracking_uri(root))
    try:
        experiments = experiments_sqlite(db) if db is not None and db.is_file() else {}
    except sqlite3.Error:
        experiments = {}
    mine = [p for p in PIPELINES if p in experiments]
    if mine:
        click.echo("Run tables (headline metrics and differing params as columns):")
        width = max(map(len, mine))
        for p in mine:
            click.echo(f"  {p:<{width}}  {run_table_url(base, experiments[p])}")


# Command groups kept in their own modules (each imports only click at module level: `stein --help` stays fast).
# One line per module: main.add_command(<command>).
from flows.cli.schedule import schedule as _schedule, worker as _worker  # noqa: E402

main.add_command(_schedule)
main.add_command(_worker)
from flows.cli.server import server as _server  # noqa: E402

main.add_command(_server)
from flows.cli.cluster import cluster as _cluster  # noqa: E402

main.add_command(_cluster)
from flows.cli.runs import compare as _compare, runs as _runs  # noqa: E402

main.add_command(_runs)
main.add_command(_compare)
from flows.cli.exp import exp as _exp, status as _status  # noqa: E402

main.add_command(_status)
main.add_command(_exp)

