"""The NCSN-only training loop the project had before the model families (commit 8ba88d8), kept verbatim but for
its imports as the baseline of ``bench/bench_training_loop.py``: the generic loop (``tasks.stages.train.loop.fit``) must
cost no measurable time over it. Not used by the pipeline."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

def build_score_net(cfg, shape: tuple[int, ...]):
    """The score network a train section describes, for examples of ``shape`` -> (net, class name)."""
    from stein_core.nets import NoiseConditionalConvNet, NoiseConditionalMLP

    if hasattr(cfg, "base_channels"):
        if len(shape) != 3:
            raise ValueError(f"a convolutional score network needs (C, H, W) images, the data have shape {shape}")
        c, h, w = shape
        net = NoiseConditionalConvNet(
            in_channels=c, image_size=(h, w), base_channels=cfg.base_channels, channel_mults=tuple(cfg.channel_mults),
            num_res_blocks=cfg.num_res_blocks, embed_dim=cfg.embed_dim,
        )
    else:
        dim = 1
        for s in shape:
            dim *= s
        net = NoiseConditionalMLP(dim=dim, hidden=cfg.hidden, n_layers=cfg.n_layers, embed_dim=cfg.embed_dim)
    return net, type(net).__name__

STATE_FILE = "state.pt"


def fit_ncsn(
    cfg,
    dataset,
    *,
    device,
    rank: int = 0,
    world: int = 1,
    wrap: Callable = lambda net: net,
    resume: dict | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
    on_checkpoint: Callable[[dict, bool], None] | None = None,
) -> dict:
    """The NCSN training loop, independent of how it is distributed -> the final state.

    ``wrap`` turns the network into what is trained (``ray.train.torch.prepare_model`` for DDP, identity for a
    bare loop); ``resume`` is a state from an earlier checkpoint; ``on_log(step, mean_loss, samples_per_s)`` is
    called every ``log_every`` steps and ``on_checkpoint(state, final)`` every ``checkpoint_every`` steps and
    at the end (on every rank: with DDP each rank must report). The state holds what rebuilds and resumes the
    run: weights (and their EMA), optimiser and schedule, step, loss history, model class and arguments, the
    example shape, the noise ladder and the time spent in the loop.
    """
    import torch

    from stein_core.ema import EMA
    from stein_core.score_matching import geometric_sigmas, get_dsm_loss_fn

    data = torch.from_numpy(dataset.x).to(device)  # [n, d]; images flattened, shape in the metadata
    n = data.shape[0]
    sigmas = geometric_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.n_sigmas, device=device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    net, model_class = build_score_net(cfg, dataset.shape)
    model_args = dict(net.model_args)
    model = wrap(net)
    ema_decay = getattr(cfg, "ema_decay", 0.0)
    ema = EMA(net, decay=ema_decay) if ema_decay > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.n_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    loss_fn = get_dsm_loss_fn(sigmas)

    start, history = 0, []
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        start, history = resume["step"], [tuple(h) for h in resume["history"]]
    # Each rank draws its own minibatches; the generator state is a pure function of (seed, rank, step).
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + rank * 7919 + start)
    per_rank_batch = max(1, cfg.batch_size // world)

    def snapshot(done: int) -> dict:
        return {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": done,
            "history": [list(h) for h in history],
            "model_args": model_args,
            "model_class": model_class,
            "shape": list(dataset.shape),
            **({"ema": ema.state_dict()} if ema is not None else {}),
            "sigmas": sigmas.cpu().tolist(),
            "loop_seconds": time.perf_counter() - loop_start,
        }

    running, count, t0 = 0.0, 0, time.perf_counter()
    loop_start = time.perf_counter()
    state = snapshot(start)
    for step in range(start, cfg.n_steps):
        idx = torch.randint(n, (per_rank_batch,), generator=gen, device=device)
        loss = loss_fn(model, data[idx], generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(net)
        running += loss.item()
        count += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.n_steps:
            mean_loss = running / count
            history.append((done, mean_loss))
            if on_log is not None:
                on_log(done, mean_loss, count * per_rank_batch * world / (time.perf_counter() - t0))
            running, count, t0 = 0.0, 0, time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == cfg.n_steps:
            state = snapshot(done)
            if on_checkpoint is not None:
                on_checkpoint(state, done == cfg.n_steps)
    return state
