"""Evaluate stage (Prefect task): the metrics and plots ``evaluate`` lists in a pipeline's config, for every
pipeline; the computation lives in :mod:`tasks.stages.evaluate.metrics`, the figures in :mod:`tasks.stages.evaluate.plots`.

With ``evaluate.checkpoints`` set, every checkpoint the train stage kept is sampled and evaluated as well, one
Ray task per checkpoint (locally: as many at once as there are cores; on a cluster: across its nodes), giving
metric-vs-step curves: a CSV for ``dvc plots``, a figure, and the rows for MLflow metric histories.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config.paths import CHECKPOINT_CURVE
from tasks.config.sections import ConfigError, Evaluate
from tasks.stages.evaluate.inputs import EvalInputs
from tasks.stages.evaluate.metrics import EvalData, evaluate_checkpoint, evaluate_sets, reference_metrics
from tasks.data.io import read_dataset, write_json, write_rows
from tasks.infra.runtime import RuntimeSettings

log = logging.getLogger("stein")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_samples(
    cfg: Evaluate,
    *,
    sample_paths: dict[str, Path],
    inputs: EvalInputs,
    metrics_path: Path,
    plots_dir: Path,
    config_path: str | Path = "evaluate config",
    sampler=None,
    settings: RuntimeSettings | None = None,
    device: str = "cpu",
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Evaluate the sample sets, write the metrics JSON and the plots -> (metrics, checkpoint rows).

    Inputs are validated before any compute (a metric the data cannot support, a missing file): a
    :class:`ConfigError` names the config key or the file, and nothing is written."""
    data = EvalData(cfg, inputs, config_path=config_path, device=device)
    samples = {name: read_dataset(path) for name, path in sample_paths.items()}
    checkpoints: list[Path] = []
    if cfg.checkpoints is not None:
        if sampler is None:
            raise ConfigError(config_path, "evaluate.checkpoints.sampler", "no sample section to sample checkpoints with")
        checkpoints = sorted(Path(inputs.checkpoints).glob("step_*.pt")) if inputs.checkpoints else []
        if not checkpoints:
            raise ConfigError(inputs.checkpoints or config_path, "evaluate.checkpoints",
                              "no training checkpoints (step_*.pt) to evaluate: rerun the train stage")
        data.check(cfg.checkpoints.metrics)

    metrics = evaluate_sets(data, {k: ds.x for k, ds in samples.items()}, sources=sample_paths)
    rows: list[dict[str, float]] = []
    if checkpoints:
        rows = _evaluate_checkpoints(cfg, checkpoints, inputs=inputs, sampler=sampler, settings=settings or RuntimeSettings(), device=device)
        # the reference line of the curves: the reference set at the checkpoints' sample size
        n = min(cfg.checkpoints.n_samples, len(data.reference))
        ck_ref = reference_metrics(data, min(cfg.n_eval, n), n, cfg.checkpoints.metrics)
        write_rows(Path(plots_dir) / CHECKPOINT_CURVE, rows)
        from tasks.stages.evaluate.plots import plot_checkpoints

        plot_checkpoints(rows, reference=ck_ref, path=Path(plots_dir) / "checkpoints.png",
                         title=f"{len(rows)} checkpoints, {cfg.checkpoints.n_samples} samples each")
        metrics["n_checkpoints"] = float(len(rows))
    _plots(cfg, data, samples, metrics, Path(plots_dir))
    write_json(metrics_path, metrics)
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics, rows


def _evaluate_checkpoints(cfg: Evaluate, checkpoints: list[Path], *, inputs: EvalInputs, sampler,
                          settings: RuntimeSettings, device: str) -> list[dict[str, float]]:
    """One Ray task per checkpoint (one CPU each; a quarter of a GPU each when training on GPUs)."""
    import ray

    from tasks.infra.ray_client import init_ray, ray_map
    from tasks.infra.runtime import project_root

    started = init_ray(settings, project_root(), threads=1)
    use_gpu = device != "cpu"
    try:
        rows = [None] * len(checkpoints)
        for i, row in ray_map(
            evaluate_checkpoint, checkpoints, num_cpus=1, num_gpus=0.25 if use_gpu else 0,
            desc="evaluate checkpoints", cfg=cfg.model_dump(), sampler=sampler.model_dump(),
            inputs=inputs, device="cuda" if use_gpu else "cpu",
        ):
            rows[i] = row
            shown = {k: v for k, v in row.items() if not k.endswith("_p_value")}
            print(f"[evaluate] checkpoint step {int(row['step'])}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "step"), flush=True)
    finally:
        if started:
            ray.shutdown()
    return sorted(rows, key=lambda r: r["step"])


def _plots(cfg: Evaluate, data: EvalData, samples: dict, metrics: dict[str, float], plots_dir: Path) -> None:
    from tasks.stages.evaluate import plots

    test_x = data.test.x
    if "samples" in cfg.plots:
        if len(data.shape) == 3:
            plots.plot_image_grids({**{f"samples: {k}": ds.x for k, ds in samples.items()}, "held-out images": test_x},
                                   shape=data.shape, grid=cfg.grid, path=plots_dir / "samples.png")
        else:
            def label(name):
                key = "weight" if len(samples) == 1 else f"weight_{name}"
                return f"{name} (weight {metrics[key]:.3f})" if key in metrics else name

            if data.mixture is None:
                title = f"first two of {data.dim} coordinates"
            elif len(set(data.mixture_weights)) == 1:
                title = f"true density: {data.mixture.n_components} equally weighted modes (contours)"
            else:
                title = f"heavy mode: true weight {data.true_weight:.2f}"
            plots.plot_sample_sets({"held-out data": test_x, **{label(k): ds.x for k, ds in samples.items()}},
                                   mixture=data.mixture if data.dim == 2 else None, path=plots_dir / "samples.png", title=title)
    if "energy" in cfg.plots:
        chain = {"latent_langevin": "latent Langevin", "mcmc": "MCMC"}.get(
            str(samples["samples"].metadata.get("source")) if "samples" in samples else "", "samples")
        plots.plot_energy({**{(f"model ({chain})" if k == "samples" else k): ds.x for k, ds in samples.items()},
                           "held-out data": test_x},
                          model_path=data.model_path, path=plots_dir / "energy.png")
    first = next(iter(samples.values()))
    if "score_field" in cfg.plots:
        plots.plot_score_field(data=test_x, samples=first.x, mixture=data.mixture, model_path=data.model_path,
                               path=plots_dir / "score_field.png")
    if "nearest" in cfg.plots:
        plots.plot_nearest_neighbours(first.x, data.train.x, shape=data.shape, path=plots_dir / "nearest.png")

