"""Where every artifact of a pipeline lives: the one catalog of paths (data, models, checkpoints, samples,
metrics, plots and the curve files), used by the stages, the DVC generator and the tracking code alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The curve files a pipeline writes into ``plots/<pipeline>/`` (CSV, one row per step or checkpoint).
TRAIN_CURVE = "train_loss.csv"
HELDOUT_CURVE = "heldout.csv"
CHECKPOINT_CURVE = "checkpoints.csv"


@dataclass(frozen=True)
class Paths:
    """Artifact paths of a pipeline. ``upstream`` names the pipeline whose data and model it reuses."""

    root: Path
    name: str
    upstream: str | None = None

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def source(self) -> str:
        return self.upstream or self.name

    @property
    def train(self) -> Path:
        return self._p("data", self.source, "train.parquet")

    @property
    def test(self) -> Path:
        return self._p("data", self.source, "test.parquet")

    @property
    def model(self) -> Path:
        return self._p("models", self.source, "model.pt")

    @property
    def checkpoints(self) -> Path:
        """Every checkpoint of the train stage, ``step_NNNNNNN.pt`` (the evaluate stage follows metrics along them)."""
        return self._p("models", self.source, "checkpoints")

    @property
    def classifier(self) -> Path:
        return self._p("models", self.source, "classifier.pt")

    @property
    def reference_stats(self) -> Path:
        return self._p("models", self.source, "reference_stats.pt")

    def samples_of(self, output: str = "samples") -> Path:
        return self._p("samples", self.name, f"{output}.parquet")

    @property
    def samples(self) -> Path:
        return self.samples_of()

    @property
    def metrics(self) -> Path:
        return self._p("metrics", f"{self.name}.json")

    @property
    def plots(self) -> Path:
        return self._p("plots", self.name)

    @property
    def train_curve(self) -> Path:
        """The train stage's step metrics (a DVC plot; the same rows go to MLflow)."""
        return self.plots / TRAIN_CURVE

    @property
    def heldout_curve(self) -> Path:
        """The train stage's held-out MMD² along training (when ``train.heldout_every`` is set)."""
        return self.plots / HELDOUT_CURVE

    @property
    def checkpoint_curve(self) -> Path:
        """The evaluate stage's metrics along the training checkpoints (when ``evaluate.checkpoints`` is set)."""
        return self.plots / CHECKPOINT_CURVE
