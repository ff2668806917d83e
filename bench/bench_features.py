"""Feature-extraction throughput (images/s) per batch size: the pipeline's LeNet classifier on 8x8 digits and
the FID Inception-v3 (random weights: the same arithmetic as the real ones) on 32x32 images resized to 299.

    python bench/bench_features.py [--device cpu] [--stage-samples 10000]

With ``--stage-samples N`` it also times the digits evaluate task (classifier trained first, not timed) on N
samples (training digits plus pixel noise), i.e. the whole stage's compute at that size.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def throughput(extractor, images: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    extractor.batch_size = batch_size
    extractor(images[:batch_size])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stage-samples", type=int, default=0, help="also time the digits evaluate task on N samples")
    ap.add_argument("--stage-only", action="store_true", help="skip the extractor throughput table")
    args = ap.parse_args()
    if args.stage_only:
        time_stage(args.stage_samples or 10_000)
        return
    from stein_core.features import ClassifierFeatures, LeNetClassifier
    from stein_core.inception import InceptionV3FID

    gen = torch.Generator().manual_seed(0)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, device {args.device}")
    print("| extractor | input | batch size | images/s |")
    print("|---|---|---|---|")
    lenet = ClassifierFeatures(LeNetClassifier(in_channels=1, image_size=8).to(args.device))
    digits = torch.rand(4096, 1, 8, 8, generator=gen).to(args.device)
    for bs in (64, 256, 1024, 4096):
        print(f"| LeNet (84-d) | 1x8x8 | {bs} | {throughput(lenet, digits, bs):,.0f} |", flush=True)
    inception = InceptionV3FID.random(seed=0).to(args.device)
    cifar = torch.rand(32, 3, 32, 32, generator=gen).to(args.device)
    for bs in (1, 8, 32):
        print(f"| Inception-v3 FID (2048-d) | 3x32x32 -> 299 | {bs} | {throughput(inception, cifar, bs, repeats=1):,.1f} |", flush=True)


    if args.stage_samples:
        time_stage(args.stage_samples)


def time_stage(n: int) -> None:
    import tempfile
    from pathlib import Path

    import numpy as np

    from tasks.stages.classifier import train_feature_classifier
    from flows.registry import get_pipeline
    from tasks.config.sections import ClassifierTrain, ImagePrepare
    from tasks.stages.evaluate.task import evaluate_samples
    from tasks.stages.evaluate.inputs import EvalInputs
    from tasks.families import module_checkpoint
    from tasks.data.io import read_dataset, save_torch, write_dataset
    from tasks.stages.prepare import prepare_images
    from stein_core.nets import NoiseConditionalConvNet

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prepare_images.fn(ImagePrepare(source="digits"), d / "train.parquet", d / "test.parquet")
        train_feature_classifier.fn(ClassifierTrain(), train_path=d / "train.parquet", test_path=d / "test.parquet",
                                    model_path=d / "clf.pt", stats_path=d / "stats.pt")
        net = NoiseConditionalConvNet(in_channels=1, image_size=8, base_channels=16)
        save_torch(d / "m.pt", module_checkpoint("ncsn", {"score": net}, shape=[1, 8, 8], sigmas=[5.0, 0.01]))
        train = read_dataset(d / "train.parquet").x
        rng = np.random.default_rng(0)
        fake = np.clip(train[rng.integers(0, len(train), n)] + 0.05 * rng.normal(size=(n, 64)), 0, 1)
        write_dataset(d / "samples.parquet", fake, shape=(1, 8, 8))
        t0 = time.perf_counter()
        inputs = EvalInputs(test=d / "test.parquet", train=d / "train.parquet", model=d / "m.pt",
                            classifier=d / "clf.pt", reference_stats=d / "stats.pt")
        # the digits pipeline's metrics and plots, without the checkpoints
        cfg = get_pipeline("digits").load_config(Path(__file__).resolve().parents[1]).evaluate.model_copy(update={"checkpoints": None})
        evaluate_samples.fn(cfg, sample_paths={"samples": d / "samples.parquet"}, inputs=inputs,
                            metrics_path=d / "m.json", plots_dir=d / "plots")
        print(f"digits evaluate task on {n} samples (digits metrics and plots, n_eval {cfg.n_eval} for MMD/KSD, all "
              f"samples for FID/KID/IS/PR): "
              f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
