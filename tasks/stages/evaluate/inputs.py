"""What an evaluation reads and writes, decided by its config alone: the input files it needs (each a DVC dep of
the stage), the plot files it writes, the metric groups, and the check that the inputs can support the listed
metrics, before any compute."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config.paths import CHECKPOINT_CURVE
from tasks.config.sections import ConfigError, Evaluate

#: Metrics computed on features of an extractor.
FEATURE_METRICS = frozenset({"fid", "kid", "inception_score", "precision_recall"})
#: Metrics that need the true distribution (the mixture a toy pipeline's prepare stage recorded).
TARGET_METRICS = frozenset({"ksd_target", "ksd_smoothed", "mode_weight", "log_likelihood", "mode_coverage",
                            "model_log_likelihood"})


#: The key a metric's curve is drawn by (the y of ``plots/<pipeline>/checkpoints.csv`` in dvc.yaml).
HEADLINE_KEY = {
    "ksd_target": "ksd", "ksd_model": "ksd_model", "mmd": "mmd", "mode_weight": "weight_error",
    "log_likelihood": "log_likelihood", "fid": "fid", "kid": "kid", "inception_score": "inception_score",
    "precision_recall": "precision", "mode_coverage": "modes_covered", "kale": "kale",
    "ksd_smoothed": "ksd_smoothed",
}


@dataclass(frozen=True)
class EvalInputs:
    """The files an evaluation reads besides its samples (None where a pipeline has no such file)."""

    test: Path
    train: Path | None = None
    model: Path | None = None
    classifier: Path | None = None
    reference_stats: Path | None = None
    checkpoints: Path | None = None

    @classmethod
    def from_paths(cls, paths) -> EvalInputs:
        """The inputs at a pipeline's artifact paths (``flows.registry.Paths``: same attribute names)."""
        return cls(**{f: getattr(paths, f) for f in cls.__dataclass_fields__})


def required_inputs(cfg: Evaluate) -> set[str]:
    """Which :class:`EvalInputs` fields ``cfg`` reads: the flow hashes them into the MLflow run and a test checks
    that dvc.yaml lists each as a dependency of the stage."""
    need = {"test"}
    if cfg.reference == "train" or "nearest" in cfg.plots:
        need.add("train")
    listed = set(cfg.metrics) | set(cfg.checkpoints.metrics if cfg.checkpoints else ())
    if listed & {"ksd_model", "model_log_likelihood"} or "score_field" in cfg.plots or "energy" in cfg.plots:
        need.add("model")
    if cfg.features == "classifier" and listed & FEATURE_METRICS:
        need.add("classifier")
        if cfg.reference == "train":
            need.add("reference_stats")
    if cfg.checkpoints is not None:
        need.add("checkpoints")
    return need


def plot_files(cfg: Evaluate) -> list[str]:
    """The files the stage writes under ``plots/<pipeline>/``."""
    files = [f"{p}.png" for p in cfg.plots]
    if cfg.checkpoints is not None:
        files += [CHECKPOINT_CURVE, CHECKPOINT_CURVE.replace(".csv", ".png")]
    return files


def check_evaluation(cfg: Evaluate, inputs: EvalInputs, *, metrics: list[str], shape, dim: int, has_target: bool,
                     model_path: Path | None, config_path: str | Path) -> None:
    """Fail before any compute if a listed metric or plot cannot be computed from these inputs: ``shape`` is the
    test data's example shape, ``dim`` its flattened size, ``has_target`` whether it records its true
    distribution."""

    def bad(key: str, message: str) -> ConfigError:
        return ConfigError(config_path, key, message)

    if not has_target:
        for m in [m for m in metrics if m in TARGET_METRICS]:
            raise bad("evaluate.metrics", f"{m} needs the true distribution, and {inputs.test} records none "
                      "(only the toy mixtures' prepare stage writes one)")
        if "score_field" in cfg.plots:
            raise bad("evaluate.plots", f"score_field draws the true score beside the learned one; {inputs.test} records no true distribution")
    if "score_field" in cfg.plots and dim != 2:
        raise bad("evaluate.plots", f"score_field needs 2-D data, {inputs.test} has dimension {dim}")
    if "model_log_likelihood" in metrics and dim != 2:
        raise bad("evaluate.metrics", f"model_log_likelihood normalises the energy on a grid in the plane, {inputs.test} "
                  f"has dimension {dim}")
    if "energy" in cfg.plots and dim != 2:
        raise bad("evaluate.plots", f"energy draws contours in the plane, {inputs.test} has dimension {dim}")
    if "nearest" in cfg.plots and len(shape) != 3:
        raise bad("evaluate.plots", f"nearest shows images, {inputs.test} holds vectors of shape {shape}")
    if "inception_score" in metrics and cfg.features == "raw":
        raise bad("evaluate.metrics", "inception_score needs class logits: set evaluate.features to classifier or inception")
    if cfg.features != "raw" and set(metrics) & FEATURE_METRICS and len(shape) != 3:
        raise bad("evaluate.features", f"{cfg.features} features need images, {inputs.test} holds vectors of shape {shape}: use raw")
    for name in sorted(required_inputs(cfg) & {"train", "model", "classifier"}):
        path = model_path if name == "model" else getattr(inputs, name)
        if path is None or not Path(path).is_file():
            raise bad("evaluate", f"needs the {name} file {path} (written by an earlier stage: run the pipeline)")
