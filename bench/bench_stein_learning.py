"""Learning an unnormalised ICA model by minimising a Stein discrepancy: milliseconds per training step of each
family (``ksd``, ``maxsksd`` variant g, ``lsd``) against the dimension D, through the one training loop
(``tasks.stages.train.loop.fit``), side by side with a direct plain-torch implementation of the same objective and
updates written out below, and the ratio ours / direct (the goal: 1).

Setting: conf/ica-small.yaml's train sections (batch 100, Adam at lr 1e-3, constant schedule, the ICA model
s_V(x) = Vᵀψ(Vx) with Student-t(5) sources; maxsksd: directions_lr 0.1; lsd: λ 0.5, one critic step per model
step, critic MLP D→300→300→D with SiLU, exact trace up to D = 20), with log_every and checkpoint_every beyond the
run so that the loop neither logs nor checkpoints while timed. Data: 20,000 draws x = W z, W =
``stein_core.ica.random_mixing(D)``, float32, one thread by default.

Ours: ``fit`` is run for ``warmup`` steps (untimed: one-time costs), then timed for ``warmup + steps`` and for
``warmup`` steps; the difference over ``steps`` is the per-step time (module construction, the first steps and
the final snapshot cancel). Direct: the same steps in a plain loop (one generator, V a plain parameter, Adam),
``warmup`` steps untimed, then ``steps`` timed. The direct objectives use only
``stein_core.kernels.median_heuristic`` (the same bandwidths) and ``stein_core.ica.source_score`` (ψ) from the
project:

- KSD² U-statistic, RBF k = exp(-‖x−y‖²/(2b²)), b the batch's median heuristic:
  u_ij = k_ij [s_iᵀs_j + (s_i − s_j)ᵀ(x_i − x_j)/b² + D/b² − ‖x_i − x_j‖²/b⁴], mean over i ≠ j, from the
  [n, n] matrices s sᵀ, s xᵀ and x xᵀ. Cost O(n²D).
- maxSKSD-g (Gong et al. 2021): r_k = e_k, g_k learned (unit rows, init e_k), slice k the 1-D RBF on
  u = g_kᵀx at its own median bandwidth,
  h_k = k [s_k(x)s_k(y) + c δ (s_k(x) − s_k(y))/b² + c²(1/b² − δ²/b⁴)], δ = u_x − u_y, c = r_kᵀg_k,
  all slices at once as [D, n, n]; the loss is the sum of the slices' U-statistics; Adam descent on V, Adam
  ascent (maximize) on g at lr 0.1, then g's rows renormalised. Cost D slices of O(n²) (plus O(nD²) for the
  projections and a median per slice) and the direction update O(D²).
- LSD (Grathwohl et al. 2020): critic ascent on mean(s_Vᵀf + tr ∇f) − λ mean‖f‖² (score detached), tr ∇f
  by a loop of D ``autograd.grad`` calls with ``create_graph`` for D ≤ 20, Hutchinson (one vjp, Gaussian
  probe) above; then the model's descent on a fresh batch. The trace and the penalty do not depend on V, so
  the direct model step differentiates mean(s_Vᵀ f) with f evaluated without graph (the same V-gradient,
  checked below); ours evaluates the whole objective there (it reports it). Cost O(n·D·H + n·H²) per critic
  evaluation, times D backward passes for the exact trace (one for Hutchinson).

Before timing, the direct objectives are checked in float64 against ``stein_core`` (``ksd``, ``sksd``,
``lsd_objective``): values and gradients in V, g and the critic agree to 1e-10, or the script stops. Ours and
direct alternate within each repeat (load hits both alike); medians of ``--repeats`` are reported.

    nice -n 19 python bench/bench_stein_learning.py [--quick] [--dims 10,20,40,80,200] [--repeats 3] [--threads 1]
        [--steps N] [--warmup 10] [--check] [--json bench/out/stein_learning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

METHODS = ("ksd", "maxsksd", "lsd")
BATCH, LR, N_TRAIN = 100, 1e-3, 20_000
SOURCE, DOF = "student_t", 5.0
DIRECTIONS_LR, LAM, HIDDEN, EXACT_MAX_DIM = 0.1, 0.5, 300, 20


# ------------------------------------------------------------------------------------- direct implementations


def ica_score(x: Tensor, v: Tensor) -> Tensor:
    """``x [n, D]``, ``v [D, D]`` -> the ICA model's score Vᵀψ(Vx), rows ψ(x Vᵀ) V, ``[n, D]``."""
    from stein_core.ica import source_score

    return source_score(x @ v.T, SOURCE, DOF) @ v


def direct_ksd(x: Tensor, s: Tensor) -> Tensor:
    """KSD² U-statistic of ``x [n, D]`` with scores ``s [n, D]``, RBF at the median-heuristic bandwidth -> ``[]``."""
    from stein_core.kernels import median_heuristic

    n, d = x.shape
    b2 = median_heuristic(x) ** 2  # detached
    sq = (x * x).sum(-1)
    r2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)  # [n, n] ‖x_i − x_j‖²
    k = torch.exp(-r2 / (2.0 * b2))
    sx = s @ x.T  # [n, n] s_i·x_j
    a = sx.diagonal()
    cross = a[:, None] + a[None, :] - sx - sx.T  # (s_i − s_j)·(x_i − x_j)
    u = k * (s @ s.T + cross / b2 + d / b2 - r2 / (b2 * b2))
    return (u.sum() - u.diagonal().sum()) / (n * (n - 1))


def direct_sksd(x: Tensor, s: Tensor, g: Tensor) -> Tensor:
    """maxSKSD-g objective: r = I, kernel directions the rows of ``g [D, D]`` (normalised here, in the graph),
    each slice at its own median bandwidth; the sum over slices of the U-statistics -> ``[]``."""
    from stein_core.kernels import median_heuristic

    n = x.shape[0]
    gu = g / g.norm(dim=-1, keepdim=True)
    c = gu.diagonal()[:, None, None]  # [D, 1, 1] r_k·g_k with r_k = e_k
    u = (x @ gu.T).T  # [D, n] g_k·x_i
    b2 = (median_heuristic(u[..., None]) ** 2)[:, None, None]  # [D, 1, 1] per slice, detached
    sr = s.T  # [D, n] r_k·s(x_i) = s_k(x_i)
    delta = u[:, :, None] - u[:, None, :]  # [D, n, n]
    d2 = delta * delta
    h = torch.exp(-d2 / (2.0 * b2)) * (sr[:, :, None] * sr[:, None, :]
                                       + c * delta * (sr[:, :, None] - sr[:, None, :]) / b2
                                       + c * c * (1.0 / b2 - d2 / (b2 * b2)))
    return (h.sum() - h.diagonal(dim1=1, dim2=2).sum()) / (n * (n - 1))


def direct_lsd_critic_value(x: Tensor, s: Tensor, critic: Callable[[Tensor], Tensor], lam: float,
                            noise: Tensor | None) -> Tensor:
    """The critic's objective mean(sᵀf + tr ∇f) − λ mean‖f‖² at ``x [n, D]``, scores ``s [n, D]`` -> ``[]``;
    the trace exact (D backward passes) when ``noise`` is None, else Hutchinson's εᵀ(∇f)ε."""
    xg = x.detach().requires_grad_(True)
    f = critic(xg)  # [n, D]
    if noise is None:
        tr = sum(torch.autograd.grad(f[:, i].sum(), xg, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    else:
        (vjp,) = torch.autograd.grad(f, xg, grad_outputs=noise, create_graph=True)
        tr = (vjp * noise).sum(-1)
    return ((s * f).sum(-1) + tr).mean() - lam * (f * f).sum(-1).mean()


def direct_lsd_model_loss(x: Tensor, s: Tensor, critic: Callable[[Tensor], Tensor]) -> Tensor:
    """What the model descends: mean(s_Vᵀ f) at a fixed critic (the rest of the objective has no V in it)."""
    with torch.no_grad():
        f = critic(x)
    return (s * f).sum(-1).mean()


def direct_step_fn(method: str, data: Tensor, seed: int = 1) -> Callable[[], None]:
    """One training step of ``method`` on batches of ``data [N, D]``, as a closure over its own state."""
    torch.manual_seed(seed)
    n, d = data.shape
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: data[torch.randint(n, (BATCH,), generator=gen)]  # noqa: E731
    v = nn.Parameter(torch.eye(d))
    opt_v = torch.optim.Adam([v], lr=LR)

    if method == "ksd":
        def step() -> None:
            x = draw()
            loss = direct_ksd(x, ica_score(x, v))
            opt_v.zero_grad(set_to_none=True)
            loss.backward()
            opt_v.step()
        return step

    if method == "maxsksd":
        g = nn.Parameter(torch.eye(d))
        opt_g = torch.optim.Adam([g], lr=DIRECTIONS_LR, maximize=True)

        def step() -> None:
            x = draw()
            loss = direct_sksd(x, ica_score(x, v), g)
            opt_v.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_v.step()
            opt_g.step()
            with torch.no_grad():
                g.div_(g.norm(dim=-1, keepdim=True))
        return step

    critic = nn.Sequential(nn.Linear(d, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, d))
    opt_c = torch.optim.Adam(critic.parameters(), lr=LR)
    exact = d <= EXACT_MAX_DIM

    def step() -> None:
        x = draw()
        noise = None if exact else torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            s = ica_score(x, v)
        value = direct_lsd_critic_value(x, s, critic, LAM, noise)
        opt_c.zero_grad(set_to_none=True)
        (-value).backward()  # ascent in the critic
        opt_c.step()
        x = draw()
        loss = direct_lsd_model_loss(x, ica_score(x, v), critic)
        opt_v.zero_grad(set_to_none=True)
        loss.backward()
        opt_v.step()
    return step


# ----------------------------------------------------------------------------------------------------- check


def check(tol: float = 1e-10) -> dict[str, float]:
    """Largest absolute differences between the direct objectives and ``stein_core``'s, values and gradients, in
    float64 on a tiny problem; exits if one exceeds ``tol``."""
    from stein_core.critics import MLPCritic
    from stein_core.discrepancies import ksd, median_rbf, sksd
    from stein_core.ica import random_mixing, sample_ica
    from stein_core.lsd import lsd_objective

    gen = torch.Generator().manual_seed(0)
    n, d = 40, 6
    x = sample_ica(n, random_mixing(d, generator=gen), generator=gen)  # float64
    eye = torch.eye(d, dtype=torch.float64)
    v = (eye + 0.1 * torch.randn(d, d, generator=gen, dtype=torch.float64)).requires_grad_()
    g = (eye + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)).requires_grad_()
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    torch.manual_seed(0)
    critic = MLPCritic(d, out_dim=d, hidden=16, n_layers=2).double()
    noise = torch.randn(n, d, generator=gen, dtype=torch.float64)
    params = [v, g, *critic.parameters()]

    def value_and_grads(fn: Callable[[], Tensor]) -> list[Tensor]:
        out = fn()
        grads = torch.autograd.grad(out, params, allow_unused=True)
        return [out.detach().reshape(1)] + [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]

    pairs = {
        "ksd": (lambda: ksd(x, ica_score(x, v), median_rbf(x), statistic="u"),
                lambda: direct_ksd(x, ica_score(x, v))),
        "sksd": (lambda: sksd(x, ica_score(x, v), median_rbf, r=unit(eye), g=unit(g), statistic="u"),
                 lambda: direct_sksd(x, ica_score(x, v), g)),
        "lsd critic exact": (lambda: lsd_objective(x, ica_score(x, v).detach(), critic, LAM)[0],
                             lambda: direct_lsd_critic_value(x, ica_score(x, v).detach(), critic, LAM, None)),
        "lsd critic hutchinson": (lambda: lsd_objective(x, ica_score(x, v).detach(), critic, LAM, noise=noise)[0],
                                  lambda: direct_lsd_critic_value(x, ica_score(x, v).detach(), critic, LAM, noise)),
    }
    diffs = {}
    for name, (ours, direct) in pairs.items():
        a, b = value_and_grads(ours), value_and_grads(direct)
        diffs[name] = max(float((p - q).abs().max()) for p, q in zip(a, b))
    # the model step: the V-gradient of the whole objective equals that of mean(s_Vᵀ f) at a fixed critic
    (gv_ours,) = torch.autograd.grad(lsd_objective(x, ica_score(x, v), critic, LAM)[0], v)
    (gv_direct,) = torch.autograd.grad(direct_lsd_model_loss(x, ica_score(x, v), critic), v)
    diffs["lsd model gradient"] = float((gv_ours - gv_direct).abs().max())
    print("check (float64, n=40, D=6; max |ours - direct| over value and gradients): "
          + ", ".join(f"{k} {e:.1e}" for k, e in diffs.items()), flush=True)
    if bad := [k for k, e in diffs.items() if not e <= tol]:
        sys.exit(f"direct and stein_core disagree beyond {tol:g}: {', '.join(bad)}")
    return diffs


# ---------------------------------------------------------------------------------------------------- timing


def config(method: str, n_steps: int) -> dict:
    """conf/ica-small.yaml's train section of ``method``, for ``n_steps`` steps that neither log nor checkpoint."""
    cfg = {"family": method, "model": {"kind": "ica", "source": SOURCE, "dof": DOF}, "batch_size": BATCH, "lr": LR,
           "lr_schedule": "constant", "n_steps": n_steps, "log_every": 10**8, "checkpoint_every": 10**8,
           "heldout_every": 0, "heldout_n": 500}
    if method == "maxsksd":
        cfg |= {"variant": "g", "n_slices": None, "directions_lr": DIRECTIONS_LR}
    if method == "lsd":
        cfg |= {"lam": LAM, "critic_steps": 1, "critic_hidden": HIDDEN, "critic_layers": 2,
                "critic_optimizer": {"lr": LR, "beta1": 0.9, "beta2": 0.999, "lr_schedule": "constant"},
                "exact_trace_max_dim": EXACT_MAX_DIM}
    return cfg


def time_ours(method: str, data: Tensor, warmup: int, steps: int) -> float:
    """Seconds per step of ``fit``: (t(warmup + steps) − t(warmup)) / steps, after an untimed fit of ``warmup``
    steps (the first fit of a process pays one-time costs that the difference would not cancel)."""
    from tasks.families import FAMILIES
    from tasks.stages.train.loop import fit

    fam = FAMILIES[method]

    def run(n_steps: int) -> float:
        cfg = fam.config.model_validate(config(method, n_steps))
        t0 = time.perf_counter()
        fit(fam, cfg, data, (data.shape[1],), device="cpu")
        return time.perf_counter() - t0

    run(warmup)
    return (run(warmup + steps) - run(warmup)) / steps


def time_direct(method: str, data: Tensor, warmup: int, steps: int) -> float:
    """Seconds per step of the direct loop, after ``warmup`` untimed steps."""
    step = direct_step_fn(method, data)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def default_steps(d: int) -> int:
    return 200 if d <= 20 else 100 if d <= 80 else 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="10,20,40,80,200", help="comma-separated dimensions D")
    ap.add_argument("--quick", action="store_true", help="D = 10, 20 and 30 timed steps (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default: 200 up to D = 20, 100 up to 80, 40 above)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--check", action="store_true", help="only check the direct objectives against stein_core")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from stein_core.ica import random_mixing, sample_ica

    diffs = check()
    if args.check:
        return
    dims = [10, 20] if args.quick else [int(d) for d in args.dims.split(",")]
    warmup = 5 if args.quick else args.warmup
    methods = [m.strip() for m in args.methods.split(",")]
    if unknown := sorted(set(methods) - set(METHODS)):
        sys.exit(f"unknown methods {unknown}; choose from {METHODS}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); batch {BATCH}, median of {args.repeats} interleaved repeats", flush=True)
    rows = []
    for d in dims:
        gen = torch.Generator().manual_seed(d)
        data = sample_ica(N_TRAIN, random_mixing(d, generator=gen, dtype=torch.float32), generator=gen)
        steps = args.steps or (30 if args.quick else default_steps(d))
        for method in methods:
            ours, direct = [], []
            for _ in range(args.repeats):
                ours.append(time_ours(method, data, warmup, steps))
                direct.append(time_direct(method, data, warmup, steps))
            o, r = statistics.median(ours), statistics.median(direct)
            rows.append({"method": method, "D": d, "steps": steps, "warmup": warmup, "ours_ms": 1e3 * o,
                         "direct_ms": 1e3 * r, "ratio": o / r, "ours_runs_ms": [1e3 * t for t in ours],
                         "direct_runs_ms": [1e3 * t for t in direct]})
            print(f"{method:8s} D {d:4d}: ours {1e3 * o:.2f} ms/step, direct {1e3 * r:.2f} ms/step, ratio {o / r:.2f}",
                  flush=True)
    out = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
           "threads": args.threads, "batch_size": BATCH, "repeats": args.repeats, "check_max_abs_diff": diffs,
           "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
