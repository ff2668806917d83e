"""The named pipelines, their config files and the artifact paths of each stage.

Adding a pipeline: a YAML file ``conf/<pipeline>.yaml`` (a dataset, a model family and their settings) and one
line in ``PIPELINES`` below; then ``stein dvc-yaml`` writes its stages into ``dvc.yaml`` (a test checks that
dvc.yaml is what the registry generates). Each DVC stage ``<pipeline>-<stage>`` runs
``python -m flows.cli stage <stage> --pipeline <pipeline>``.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.config.sections import EVERY_KEY, ConfigError, load_config
from tasks.config.paths import Paths
from tasks.infra.runtime import RuntimeSettings, check_batch_split, configure_threads, load_settings, project_root


#: Validated configs by (file, content, pipeline): configs are frozen, so one parse serves every caller in a process.
_CONFIGS: dict[tuple, BaseModel] = {}


@dataclass(frozen=True)
class Stage:
    """One stage: ``stein stage NAME`` and the DVC stage ``<pipeline>-NAME`` run ``flow`` (``module:function``),
    which reads the config section ``section`` and, for sampling stages, writes ``samples/<pipeline>/<output>``."""

    name: str
    flow: str
    section: str
    output: str = "samples"

    def load_flow(self):
        module, _, func = self.flow.partition(":")
        return getattr(importlib.import_module(module), func)


def generative_stages(*, classifier: bool = False, base: bool = False) -> tuple[Stage, ...]:
    """prepare -> [classifier] -> train -> sample [-> sample-base] -> evaluate. ``base``: a second sample stage
    (section ``sample_base``, ``samples/<pipeline>/base.parquet``), a GEBM's base generator beside the model."""
    return (
        Stage("prepare", "flows.prepare:prepare_flow", "prepare"),
        *((Stage("classifier", "flows.classifier:classifier_flow", "classifier"),) if classifier else ()),
        Stage("train", "flows.train:train_flow", "train"),
        Stage("sample", "flows.sample:sample_flow", "sample"),
        *((Stage("sample-base", "flows.sample:sample_flow", "sample_base", "base"),) if base else ()),
        Stage("evaluate", "flows.evaluate:evaluate_flow", "evaluate"),
    )


def sweep_stages(methods: tuple[str, ...]) -> tuple[Stage, ...]:
    """prepare -> train-<method> for each method -> evaluate (a :class:`~tasks.config.sweep.SweepConfig` pipeline):
    one train stage per method, so that a change to one method's section reruns that method's cells alone."""
    return (
        Stage("prepare", "flows.sweep.prepare:prepare_flow", "prepare"),
        *(Stage(f"train-{m}", "flows.sweep.train:train_flow", f"methods.{m}") for m in methods),
        Stage("evaluate", "flows.sweep.evaluate:evaluate_flow", "evaluate"),
    )


def section_of(cfg: BaseModel, dotted: str) -> Any:
    """The config section a stage reads: ``train``, or a nested one such as ``methods.ksd`` (None: absent)."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


#: The root config models of the pipelines (``Pipeline.config``).
GENERATIVE = "tasks.config.pipelines:GenerativeConfig"
RESAMPLE = "tasks.config.pipelines:ResampleConfig"
SWEEP = "tasks.config.sweep:SweepConfig"


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    #: ``module:class`` of the root config model, imported when first asked for (:attr:`config_model`): a stage
    #: process imports its own pipeline's config module only, so each stage's code deps are what it loads
    config: str = GENERATIVE
    stages: tuple[Stage, ...] = field(default_factory=generative_stages)
    upstream: str | None = None

    @property
    def config_model(self) -> type[BaseModel]:
        module, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(module), cls)

    @property
    def is_sweep(self) -> bool:
        return self.config == SWEEP

    @property
    def config_file(self) -> str:
        return f"conf/{self.name}.yaml"

    @property
    def final_stage(self) -> str:
        """The DVC stage whose reproduction reproduces the whole pipeline (and its upstream)."""
        return self.dvc_stage(self.stages[-1].name)

    def dvc_stage(self, stage: str) -> str:
        return f"{self.name}-{stage}"

    def stage(self, name: str) -> Stage:
        for st in self.stages:
            if st.name == name:
                return st
        known = ", ".join(st.name for st in self.stages)
        raise ConfigError("command line", "stage", f"pipeline {self.name!r} has no stage {name!r}; its stages: {known}")

    def load_config(self, root: Path, path: str | Path | None = None) -> BaseModel:
        """The validated config; a section a stage of this pipeline reads must be present. Parsed once per process
        while the file's content is unchanged (a stage, ``stein run`` and ``stein status`` each ask for it several
        times)."""
        path = Path(path) if path else root / self.config_file
        try:
            key = (str(path.resolve()), path.read_bytes(), self.name)
        except OSError:
            key = None  # load_config names the missing file
        if key is not None and key in _CONFIGS:
            return _CONFIGS[key]
        cfg = load_config(path, self.config_model)
        for stage in self.stages:
            if section_of(cfg, stage.section) is None:
                raise ConfigError(path, stage.section, f"missing: the {stage.name} stage reads this section")
        if key is not None:
            _CONFIGS[key] = cfg
        return cfg

    def validate_all(self, root: Path, path: str | Path | None = None) -> BaseModel:
        """Validate this pipeline's config (read from ``path``, default ``conf/<pipeline>.yaml``) and those of its
        upstream pipelines (``dvc repro`` of this pipeline reruns their stages too): a bad config anywhere fails
        before DVC removes any stage's outputs. Returns this pipeline's config."""
        settings = load_settings()
        configs = []
        spec: Pipeline | None = self
        while spec is not None:
            configs.append(cfg := spec.load_config(root, path if spec is self else None))
            if getattr(cfg, "train", None) is not None:
                check_batch_split(cfg.train, settings, spec.config_file)
            for train in getattr(cfg, "methods", {}).values():
                check_batch_split(train, settings, spec.config_file)
            spec = PIPELINES[spec.upstream] if spec.upstream else None
        return configs[0]

    def paths(self, root: Path) -> Paths:
        return Paths(root, self.name, self.upstream)

    def family(self, root: Path, stage: str | None = None) -> str | None:
        """The model family this pipeline trains, or samples and evaluates (its upstream's, for a resampling
        pipeline); for a sweep, the family of ``stage``'s method (None for its other stages)."""
        spec: Pipeline = self
        while spec.upstream:
            spec = PIPELINES[spec.upstream]
        cfg = spec.load_config(root)
        if spec.is_sweep:
            section = section_of(cfg, spec.stage(stage).section) if stage else None
            return getattr(section, "family", None)
        return cfg.train.family

    def stage_code(self, root: Path, stage: str, family: str | None = None) -> list[str]:
        """The code deps of ``stage`` (``flows.code_deps``): the project files its flow, its config models, the path
        catalog and the pipeline's model family import (every stage validates the whole config, the train section
        by its family's model, and reads and writes where the catalog says; the train, sample and evaluate stages
        build or load the family's modules). Every stage of a sweep validates every method's section by its
        family's model, so each depends on every method's family."""
        from flows.code_deps import import_closure

        if self.is_sweep:
            families = sorted({m.family for m in self.load_config(root).methods.values()})
        else:
            families = [family or self.family(root, stage)]
        roots = [self.stage(stage).flow.partition(":")[0], self.config_model.__module__, Paths.__module__,
                 *(f"tasks.families.{f}" for f in families if f)]
        return import_closure(root, roots)


_IMAGES = generative_stages(classifier=True)

PIPELINES: dict[str, Pipeline] = {
    p.name: p
    for p in (
        Pipeline("gmm2d", "2-D Gaussian mixture (weights 0.8/0.2): NCSN score network by DSM on Ray Train, annealed "
                 "Langevin, KSD/MMD/mode-weight evaluation"),
        Pipeline(
            "gmm2d-blindness",
            "mixing-proportion blindness (Wenliang & Kanagawa): gmm2d's score network sampled by annealed vs "
            "single-noise-level Langevin; only the annealed chain recovers the 0.8 weight",
            RESAMPLE,
            stages=(
                Stage("sample-annealed", "flows.sample:sample_flow", "sample_annealed", "annealed"),
                Stage("sample-langevin", "flows.sample:sample_flow", "sample_langevin", "langevin"),
                Stage("evaluate", "flows.evaluate:evaluate_flow", "evaluate"),
            ),
            upstream="gmm2d",
        ),
        Pipeline("digits", "scikit-learn's 8x8 handwritten digits (1,797 real images, no download): conv NCSN by DSM "
                 "with EMA, annealed Langevin; FID/KID/IS/precision-recall on a classifier trained in the pipeline",
                 stages=_IMAGES),
        Pipeline("ring8-agd", "ring of 8 Gaussians: implicit MLP generator by approximate KL descent (Stein gradient "
                 "estimator, Li 2017); MMD/KSD/log-likelihood/mode coverage"),
        Pipeline("ring8-mmd", "ring of 8 Gaussians: implicit MLP generator by direct MMD² minimisation (the baseline "
                 "of Li 2017), same kernel and budget as ring8-agd"),
        Pipeline("digits-agd", "8x8 digits: DCGAN-style generator by approximate KL descent (Stein gradient "
                 "estimator, Li 2017); FID/KID/precision-recall/MMD", stages=_IMAGES),
        Pipeline("digits-mmd", "8x8 digits: DCGAN-style generator by direct MMD² minimisation, same kernel and "
                 "budget as digits-agd", stages=_IMAGES),
        Pipeline("ring8-gebm", "ring of 8 Gaussians: generalised energy-based model (Arbel et al. 2021): MLP base "
                 "and energy trained on the KALE bound, latent Langevin; the base's samples evaluated beside",
                 stages=generative_stages(base=True)),
        Pipeline("ring8-mmdgan", "ring of 8 Gaussians: MMD-GAN (Bińkowski et al. 2018), the agd/mmd generator "
                 "against an MLP critic with a witness gradient penalty"),
        Pipeline("digits-gebm", "8x8 digits: generalised energy-based model, DCGAN-style base and conv energy, "
                 "latent Langevin; FID of the GEBM and of its base", stages=generative_stages(classifier=True, base=True)),
        Pipeline("digits-mmdgan", "8x8 digits: MMD-GAN, the digits-agd generator against a conv critic",
                 stages=_IMAGES),
        Pipeline("ring8-ebm", "ring of 8 Gaussians: energy-based model by maximum likelihood with MCMC negatives "
                 "(train.negatives: pcd, cd or short_run), MCMC samples; the learned density on a grid against the truth"),
        Pipeline("ring8-nce", "ring of 8 Gaussians: energy-based model by noise-contrastive estimation (Gutmann & "
                 "Hyvärinen 2010) against a fitted Gaussian, its log-normaliser learned; MCMC samples"),
        Pipeline("ring8-fce", "ring of 8 Gaussians: energy-based model by flow contrastive estimation (Gao et al. "
                 "2020), a normalising flow (zuko) as the trained noise; MCMC samples"),
        Pipeline("digits-ebm", "8x8 digits: conv energy-based model by short-run MCMC maximum likelihood (Nijkamp et "
                 "al. 2019); FID/MMD of the chains' final states", stages=_IMAGES),
        Pipeline("digits-latent-ebm", "8x8 digits: latent-space energy-based prior (Pang et al. 2020) under a "
                 "DCGAN-style generator, short-run Langevin for prior and posterior; FID/MMD", stages=_IMAGES),
        Pipeline("ica-small", "ICA (Student-t sources, D = 10, 20; one seed) learned by minimising KSD, maxSKSD and "
                 "the learned Stein discrepancy; held-out log-likelihood against the true W (under 30 min on 2 cores)",
                 SWEEP, stages=sweep_stages(("ksd", "maxsksd", "lsd"))),
        Pipeline("ica", "the ICA table of Stein-discrepancy learning (D = 10 ... 200, three seeds, the literature's "
                 "15,000 steps): for a GPU or a cluster", SWEEP, stages=sweep_stages(("ksd", "maxsksd", "lsd"))),
    )
}


@dataclass(frozen=True)
class StageContext:
    """What every stage flow starts from: the pipeline, the stage, its validated config, paths, the runtime."""

    spec: Pipeline
    stage: Stage
    root: Path
    cfg: BaseModel
    paths: Paths
    settings: RuntimeSettings

    @property
    def section(self) -> BaseModel:
        """The config section this stage reads (what dvc.yaml lists as its params)."""
        return section_of(self.cfg, self.stage.section)

    @property
    def device(self) -> str:
        return "cuda" if self.settings.resolved_use_gpu() else "cpu"


def load_stage(pipeline: str, config: str | Path | None, stage: str) -> StageContext:
    """Resolve the pipeline and stage, validate the config, read the runtime settings and cap the threads."""
    spec = get_pipeline(pipeline)
    st = spec.stage(stage)
    root = project_root()
    cfg = spec.load_config(root, config)
    settings = load_settings()
    configure_threads(settings.resolved_threads())
    return StageContext(spec, st, root, cfg, spec.paths(root), settings)


def run_stage(
    pipeline: str,
    config: str | Path | None,
    stage: str,
    *,
    compute: Callable[[StageContext, Any], dict],
    outputs: Callable[[StageContext], dict],
    inputs: Callable[[StageContext], dict] = lambda ctx: {},
    artifacts: Callable[[StageContext], list[tuple[Path, str | None]]] = lambda ctx: [],
) -> dict:
    """What every stage flow does around its task: resolve the stage, open its MLflow run (tagged with the MD5 of
    ``inputs`` and ``outputs``), call ``compute(ctx, run)``, log its numeric results and the wall time of the
    computation as ``compute_seconds`` (a ``compute_seconds`` in the results wins: train counts the workers'
    loop), log ``artifacts`` as (file, artifact folder) pairs, and return the results with the run id.

    The stage that reads the train section registers the model it wrote (registered model ``<pipeline>``: see
    :func:`tasks.tracking.log.register_model`; the stage flow logs the file under ``model/``). Under ``dvc exp run``
    the stage's run is a child of its DVC experiment's pipeline run (:func:`tasks.tracking.log.experiment_group_run`),
    which the pipeline's last stage fills like ``stein run`` does."""
    from tasks.tracking.log import (
        experiment_group_run, fill_pipeline_run, register_model, setup_mlflow, stage_run,
    )

    ctx = load_stage(pipeline, config, stage)
    client = setup_mlflow(ctx.root).MlflowClient()
    group = experiment_group_run(client, pipeline, config=ctx.cfg.model_dump(context=EVERY_KEY), root=ctx.root)
    try:
        with stage_run(
            pipeline, stage, params=ctx.section.model_dump(context=EVERY_KEY), inputs=inputs(ctx), outputs=outputs(ctx),
            parent_run_id=group,
        ) as run:
            import mlflow

            t0 = time.perf_counter()
            info = compute(ctx, run)
            numeric = {k: float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            mlflow.log_metrics({"compute_seconds": time.perf_counter() - t0} | numeric)
            for path, folder in artifacts(ctx):
                mlflow.log_artifact(str(path), artifact_path=folder)
            if ctx.stage.section == "train":
                register_model(client, run.info.run_id, pipeline, ctx.paths.model)
        if group and ctx.spec.final_stage == ctx.spec.dvc_stage(stage):
            started = client.get_run(group).info.start_time
            fill_pipeline_run(client, group, metrics_file=ctx.paths.metrics, plots_dir=ctx.paths.plots,
                              model_name=ctx.paths.source, model_file=ctx.paths.model,
                              seconds=time.time() - started / 1000)
    except BaseException:
        if group:
            with contextlib.suppress(Exception):  # the stage's error is what matters
                client.set_terminated(group, "FAILED")
        raise
    if group:
        client.set_terminated(group, "FINISHED")
    return info | {"mlflow_run_id": run.info.run_id}


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ConfigError("command line", "pipeline", f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}") from None
