"""Classifier stage: the offline feature extractor of the image pipelines, trained inside the pipeline.

A LeNet (``stein_core.features``) trained deterministically on the real training split; its penultimate layer
gives FID/KID/precision-recall features and its logits the Inception score. The stage fails (nothing written)
when the held-out accuracy is below ``min_accuracy``: features from a classifier that cannot tell the classes
apart would make every feature-space metric meaningless. It also caches the held-out split's feature
statistics (streaming float64 moments) with the classifier's fingerprint, the reference every FID uses.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import ClassifierTrain, ConfigError
from tasks.io import read_dataset, save_checkpoint, save_torch

log = logging.getLogger("stein")


class ClassifierTooWeak(RuntimeError):
    """The trained classifier misses the configured minimum accuracy."""


@task(name="train-feature-classifier", cache_policy=NO_CACHE)
def train_feature_classifier(
    cfg: ClassifierTrain, *, train_path: Path, test_path: Path, model_path: Path, stats_path: Path
) -> dict[str, float | str]:
    import torch

    from stein_core import ClassifierFeatures, StreamingMoments, accuracy, train_classifier

    train, test = read_dataset(train_path), read_dataset(test_path)
    for path, ds in ((train_path, train), (test_path, test)):
        if ds.label is None:
            raise ConfigError(path, "label", "the classifier needs labelled images (a label column)")
        if len(ds.shape) != 3:
            raise ConfigError(path, "shape", f"expected images (C, H, W), the metadata says {ds.shape}")
    model, history = train_classifier(
        torch.from_numpy(train.x), torch.from_numpy(train.label), shape=train.shape, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
    )
    acc = accuracy(model, torch.from_numpy(test.x), torch.from_numpy(test.label))
    log.info("feature classifier: held-out accuracy %.4f (minimum %.2f)", acc, cfg.min_accuracy)
    if acc < cfg.min_accuracy:
        raise ClassifierTooWeak(
            f"the feature classifier reached {acc:.4f} held-out accuracy, below classifier.min_accuracy="
            f"{cfg.min_accuracy}: train longer (classifier.epochs) or check the data"
        )
    extractor = ClassifierFeatures(model)
    fingerprint = extractor.fingerprint()
    moments = StreamingMoments(extractor.dim)
    x_test = torch.from_numpy(test.x).reshape(len(test), *test.shape)
    for batch in torch.split(x_test, 256):
        moments.update(extractor(batch))
    save_checkpoint(
        model_path, state_dict=model.state_dict(), model_args=model.model_args, test_accuracy=acc,
        fingerprint=fingerprint, history=history,
    )
    save_torch(stats_path, {"moments": moments.state_dict(), "fingerprint": fingerprint, "split": "test"})
    return {"test_accuracy": acc, "fingerprint": fingerprint, "final_train_loss": history["loss"][-1]}
