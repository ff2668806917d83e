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
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config.sections import ClassifierTrain, ConfigError
from tasks.data.io import read_dataset, save_checkpoint, save_torch

log = logging.getLogger("stein")


class ClassifierTooWeak(RuntimeError):
    """The trained classifier misses the configured minimum accuracy."""


@task(name="train-feature-classifier", cache_policy=NO_CACHE)
def train_feature_classifier(
    cfg: ClassifierTrain, *, train_path: Path, test_path: Path, model_path: Path, stats_path: Path
) -> dict[str, float | str]:
    import torch

    from stein_core.features import ClassifierFeatures, accuracy
    from stein_core.metrics import StreamingMoments

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


def train_classifier(
    x,
    labels,
    *,
    shape: tuple[int, int, int],
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    n_classes: int | None = None,
    weight_decay: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, list[float]]]:
    """Train a :class:`~stein_core.features.LeNetClassifier` with Adam and cross-entropy, deterministically.

    Args:
        x: images ``[n, C, H, W]`` or ``[n, C*H*W]`` in [0, 1]; training runs on ``x``'s device.
        labels: integer classes ``[n]`` in ``[0, n_classes)``.
        shape: ``(C, H, W)``.
        n_classes: defaults to ``labels.max() + 1``.
        model_kwargs: extra :class:`LeNetClassifier` arguments (``channels``, ``hidden``).

    The initial weights come from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global RNG is
    left untouched) on the CPU; shuffling uses a CPU ``torch.Generator`` seeded with ``seed``. Same inputs and
    seed give identical weights (on the same device and thread settings).

    Returns:
        ``(model in eval mode, history)``, ``history = {"loss": [...], "train_accuracy": [...]}`` per epoch.
    """
    if x.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(f"x [n, ...] and labels [n] must agree, got {tuple(x.shape)} and {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    import torch
    from torch.nn import functional as F

    from stein_core.features import LeNetClassifier

    c, h, w = (int(s) for s in shape)
    labels = labels.to(device=x.device, dtype=torch.long)
    k = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNetClassifier(
            in_channels=c, image_size=(h, w) if h != w else h, n_classes=k, **(model_kwargs or {})
        )
    model.to(device=x.device)
    x = model._as_images(x.to(dtype=next(model.parameters()).dtype))  # [n, C, H, W]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    n = x.shape[0]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        total, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            logits = model.logits(x[idx])  # [b, k]
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            correct += int((logits.detach().argmax(dim=1) == labels[idx]).sum())
        history["loss"].append(total / n)
        history["train_accuracy"].append(correct / n)
    model.eval()
    return model, history
