"""The named pipelines, their config files and the artifact paths of each stage.

Adding a pipeline: a config model in ``tasks.config``, a YAML file in ``conf/``, its stages in ``dvc.yaml``
(named ``<pipeline>-<stage>``) and an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from tasks.config import ConfigError, GMM2dConfig, load_config
from tasks.runtime import RuntimeSettings, configure_threads, project_root


@dataclass(frozen=True)
class Paths:
    root: Path
    name: str

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def train(self) -> Path:
        return self._p("data", self.name, "train.parquet")

    @property
    def test(self) -> Path:
        return self._p("data", self.name, "test.parquet")

    @property
    def model(self) -> Path:
        return self._p("models", self.name, "score_net.pt")

    @property
    def samples(self) -> Path:
        return self._p("samples", self.name, "samples.parquet")

    @property
    def metrics(self) -> Path:
        return self._p("metrics", f"{self.name}.json")

    @property
    def plots(self) -> Path:
        return self._p("plots", self.name)


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    config_model: type[BaseModel]
    stages: tuple[str, ...] = ("prepare", "train", "sample", "evaluate")

    @property
    def config_file(self) -> str:
        return f"conf/{self.name}.yaml"

    def dvc_stage(self, stage: str) -> str:
        return f"{self.name}-{stage}"

    def load_config(self, root: Path, path: str | Path | None = None) -> BaseModel:
        return load_config(Path(path) if path else root / self.config_file, self.config_model)

    def paths(self, root: Path) -> Paths:
        return Paths(root, self.name)


PIPELINES: dict[str, Pipeline] = {
    p.name: p
    for p in (
        Pipeline(
            "gmm2d",
            "2-D Gaussian mixture (weights 0.8/0.2): NCSN score network by DSM on Ray Train, annealed Langevin, "
            "KSD/MMD/mode-weight evaluation",
            GMM2dConfig,
        ),
    )
}


@dataclass(frozen=True)
class StageContext:
    """What every stage flow starts from: the pipeline, its validated config, its paths, the runtime."""

    spec: Pipeline
    root: Path
    cfg: BaseModel
    paths: Paths
    settings: RuntimeSettings

    @property
    def device(self) -> str:
        return "cuda" if self.settings.resolved_use_gpu() else "cpu"


def load_stage(pipeline: str, config: str | Path | None = None) -> StageContext:
    """Resolve the pipeline, validate its config, read the runtime settings and cap the thread count."""
    spec = get_pipeline(pipeline)
    root = project_root()
    cfg = spec.load_config(root, config)
    settings = RuntimeSettings()
    configure_threads(settings.resolved_threads())
    return StageContext(spec, root, cfg, spec.paths(root), settings)


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ConfigError("dvc.yaml", None, f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}") from None
