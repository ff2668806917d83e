"""Generator-critic models: the networks a critic or an energy is made of, and their objectives.

* KALE and generalised energy-based models (Arbel, Zhou & Gretton, "Generalized Energy Based Models", ICLR 2021;
  "KALE: When Energy-Based Learning Meets Adversarial Training", arXiv 2003.05033). A GEBM is a base distribution
  G (the law of x = B(z), z ~ eta = N(0, I)) reweighted by an energy: dQ/dG = exp(-E - A), with A the
  log-partition log E_G[exp(-E)]. For any energy E and scalar A, by Fenchel duality of the KL divergence
  (Nguyen, Wainwright & Jordan 2010),

      KL(P || G) >= F(E, A) = -E_P[E(x)] - A - E_G[exp(-E(x) - A)] + 1,

  with equality at E + A = -log(dP/dG). KALE(P || G) is the supremum of F over an energy class and A: a lower
  bound on KL(P || G), zero when P = G, and equal to KL(P || G) when -log(dP/dG) lies in the class. Maximising
  F over A alone gives A = log E_G[exp(-E)] (:func:`optimal_log_partition`). :func:`kale_energy_loss` is -F (the
  energy step minimises it); :func:`kale_base_loss` is F as a function of the base at a fixed (E, A) (the base
  step descends KALE in the base's parameters, by the envelope theorem its gradient at the optimal energy);
  :func:`latent_log_prob` is the GEBM's posterior on the latent space, which a Langevin chain samples.
* MMD-GAN (Li, Chang, Cheng, Yang & Póczos, "MMD GAN", NeurIPS 2017; Bińkowski, Sutherland, Arbel & Gretton,
  "Demystifying MMD GANs", ICLR 2018): the unbiased MMD² between the critic's features of the data and of the
  generator under a fixed kernel (:func:`rq_mixture_kernel`: rational-quadratic kernels plus a linear term), with
  a gradient penalty on the witness function at interpolates (:func:`mmd_witness`, :func:`gradient_penalty`).

Networks: :class:`MLPCritic` and :class:`ConvCritic` map ``x [n, d]`` (images flattened) to ``[n, out_dim]``
(``out_dim = 1``: an energy; more: critic features); :class:`Scalar` is one learnable number (the log-partition A)
as a module, so that it is saved, restored, optimised and checked like any network. Every network acts row by row
(no batch statistics): a batch split over data-parallel workers gives the rows one worker gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .kernels import sq_dists

__all__ = [
    "ConvCritic",
    "MLPCritic",
    "Scalar",
    "gradient_penalty",
    "interpolates",
    "kale_base_loss",
    "kale_divergence",
    "kale_energy_loss",
    "latent_log_prob",
    "mmd2_u",
    "mmd_witness",
    "optimal_log_partition",
    "rq_mixture_kernel",
]

KernelMatrixFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- networks


class MLPCritic(nn.Module):
    """``x [n, dim]`` -> ``[n, out_dim]``: ``n_layers`` hidden layers of width ``hidden`` with SiLU activations
    (smooth, so that a gradient penalty and a Langevin chain see a continuous gradient) and a linear output."""

    def __init__(self, dim: int, out_dim: int = 1, hidden: int = 128, n_layers: int = 3) -> None:
        super().__init__()
        if min(dim, out_dim, hidden, n_layers) < 1:
            raise ValueError("dim, out_dim, hidden and n_layers must be >= 1")
        self.model_args = {"dim": int(dim), "out_dim": int(out_dim), "hidden": int(hidden), "n_layers": int(n_layers)}
        layers: list[nn.Module] = []
        width = dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[n, dim]`` -> ``[n, out_dim]``."""
        return self.net(x)


class ConvCritic(nn.Module):
    """A DCGAN-style critic for ``(C, H, W)`` images, flattened ``x [n, C*H*W]`` -> ``[n, out_dim]``.

    Radford, Metz & Chintala (ICLR 2016) without batch normalisation (a gradient penalty is per example, and
    BatchNorm would couple the rows of a batch, Gulrajani et al. 2017): a 3x3 convolution to ``base_channels``,
    then stride-2 4x4 convolutions doubling the channels while the map is at least 4 wide, LeakyReLU(0.2) after
    each, and a linear layer on the flattened map."""

    def __init__(self, shape: Sequence[int], out_dim: int = 1, base_channels: int = 32) -> None:
        super().__init__()
        shape_t = tuple(int(s) for s in shape)
        if len(shape_t) != 3 or min(shape_t) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive entries, got {shape!r}")
        if min(out_dim, base_channels) < 1:
            raise ValueError("out_dim and base_channels must be >= 1")
        c, h, w = shape_t
        self.model_args = {"shape": list(shape_t), "out_dim": int(out_dim), "base_channels": int(base_channels)}
        self.image_shape = shape_t
        layers: list[nn.Module] = [nn.Conv2d(c, base_channels, 3, padding=1), nn.LeakyReLU(0.2)]
        ch = base_channels
        while min(h, w) >= 8:  # each stride-2 stage halves the map; stop at 4 wide
            layers += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch, h, w = 2 * ch, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(ch * h * w, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[n, C*H*W]`` (or ``[n, C, H, W]``) -> ``[n, out_dim]``."""
        x = x.reshape(x.shape[0], *self.image_shape)
        return self.out(self.features(x).flatten(1))


class Scalar(nn.Module):
    """One learnable number, ``forward() -> []``: a log-partition as a module (saved, restored, optimised with
    its own learning rate and covered by a non-finite check like any network)."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.model_args = {"value": float(value)}
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self) -> Tensor:
        return self.value


# ---------------------------------------------------------------------------------------------- KALE


def optimal_log_partition(e_gen: Tensor) -> Tensor:
    """``A = log mean_i exp(-E(x_i))`` over base samples ``e_gen [m]``: the A that maximises the KALE bound at a
    fixed energy (the log-partition of exp(-E) under G), computed stably (logsumexp)."""
    return torch.logsumexp(-e_gen, dim=0) - math.log(e_gen.shape[0])


def kale_energy_loss(e_data: Tensor, e_gen: Tensor, log_partition: Tensor) -> Tensor:
    """``-F(E, A) = mean E(x_data) + A + mean exp(-E(x_gen) - A) - 1`` (``e_data [n]``, ``e_gen [m]``, ``A []``):
    the energy step's loss, minimised in E and A. Its negative is the KALE estimate on these batches; it is a
    mean of per-example terms (a data-parallel split averages it exactly)."""
    return e_data.mean() + log_partition + torch.exp(-e_gen - log_partition).mean() - 1.0


def kale_base_loss(e_gen: Tensor, log_partition: Tensor, e_data_mean: Tensor) -> Tensor:
    """``F(E, A)`` as a function of the base samples only: ``-mean E(x_data) - A - mean exp(-E(x_gen) - A) + 1``
    with the data term and A held fixed (detached). Its value is the KALE estimate at the current energy; its
    gradient in the base's parameters (through ``e_gen = E(B_theta(z))``) is
    ``E_eta[exp(-E(B(z)) - A) grad_x E(B(z)) dB/dtheta]``, which at the optimal (E, A) is the gradient of
    KL(P || G_theta) (Arbel et al. 2021: the base descends KALE, not a GAN heuristic)."""
    a = log_partition.detach()
    return -e_data_mean.detach() - a - torch.exp(-e_gen - a).mean() + 1.0


def kale_divergence(
    p: Tensor,
    q: Tensor,
    *,
    hidden: int = 64,
    n_layers: int = 2,
    steps: int = 300,
    lr: float = 1e-2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """KALE(P || Q) between two sample sets ``p [n, d]`` (plays the data) and ``q [m, d]`` (plays the model),
    held out: each set is split in halves (seeded), an energy (:class:`MLPCritic`, ``hidden`` x ``n_layers``)
    and A are fitted by ``steps`` full-batch Adam steps on :func:`kale_energy_loss` of the first halves, and the
    bound ``F(E, A)`` is returned on the second halves. A lower bound on KL(P || Q) up to the noise of the held-out
    halves (it can dip below 0 when P = Q); float64 throughout.

    The fit starts from weights drawn with ``generator``, so the result is a pure function of the inputs and the
    generator's state (the caller's global RNG is neither used nor changed)."""
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"p and q must be [n, d] and [m, d], got {tuple(p.shape)} and {tuple(q.shape)}")
    if min(len(p), len(q)) < 4:
        raise ValueError("each set needs at least 4 points (two halves of two)")
    p, q = p.detach().double(), q.detach().double()
    dev = p.device
    gen_dev = generator.device if generator is not None else dev
    p = p[torch.randperm(len(p), generator=generator, device=gen_dev).to(dev)]
    q = q[torch.randperm(len(q), generator=generator, device=gen_dev).to(dev)]
    p_fit, p_test = p[: len(p) // 2], p[len(p) // 2:]
    q_fit, q_test = q[: len(q) // 2], q[len(q) // 2:]
    scale = torch.cat([p_fit, q_fit]).std(0).clamp_min(1e-12)  # standardise: one learning rate for any data scale
    shift = torch.cat([p_fit, q_fit]).mean(0)
    energy = MLPCritic(p.shape[1], 1, hidden, n_layers).to(device=dev, dtype=torch.float64)
    with torch.no_grad():
        for prm in energy.parameters():  # the default init, drawn from the caller's generator
            bound = 1.0 / math.sqrt(prm.shape[-1]) if prm.ndim == 2 else 0.1
            prm.copy_((torch.rand(prm.shape, generator=generator, device=gen_dev, dtype=torch.float64) * 2 - 1).to(dev) * bound)
    e = lambda x: energy((x - shift) / scale).squeeze(-1)  # noqa: E731
    a = nn.Parameter(torch.zeros((), dtype=torch.float64, device=dev))
    opt = torch.optim.Adam([*energy.parameters(), a], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        kale_energy_loss(e(p_fit), e(q_fit), a).backward()
        opt.step()
    with torch.no_grad():
        return -kale_energy_loss(e(p_test), e(q_test), a)


def latent_log_prob(generator_fn: Callable[[Tensor], Tensor], energy_fn: Callable[[Tensor], Tensor],
                    beta: float) -> Callable[[Tensor], Tensor]:
    """The GEBM's unnormalised log-posterior on the latent space, ``z [n, k] -> [n]``:
    ``log pi(z) = -|z|^2 / 2 - beta E(B(z))`` (eta = N(0, I); beta = 1 is the trained model, beta = 0 the base,
    larger beta a colder energy). x = B(z) for z ~ pi is a GEBM sample (Arbel et al. 2021, sampling in the latent
    space); the score is its autograd gradient (:func:`stein_core.distributions.score_from_log_prob`)."""

    def log_prob(z: Tensor) -> Tensor:
        return -0.5 * (z * z).sum(-1) - beta * energy_fn(generator_fn(z)).reshape(z.shape[0])

    return log_prob


# ---------------------------------------------------------------------------------------------- MMD-GAN


def rq_mixture_kernel(alphas: Sequence[float] = (0.2, 0.5, 1.0, 2.0, 5.0), linear: bool = True) -> KernelMatrixFn:
    """``k(a, b) = sum_alpha (1 + |a - b|^2 / (2 alpha))^(-alpha) [+ <a, b>]`` as ``(a [n, k], b [m, k]) -> [n, m]``:
    the mixture of rational-quadratic kernels with a linear term of Bińkowski et al. (ICLR 2018), used on critic
    features."""
    alphas = tuple(float(a) for a in alphas)
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas must be positive, got {alphas}")

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        r2 = sq_dists(a, b)  # [n, m]
        k = sum(torch.pow(1.0 + r2 / (2.0 * al), -al) for al in alphas)
        return k + a @ b.transpose(-2, -1) if linear else k

    return kernel


def mmd2_u(fx: Tensor, fy: Tensor, kernel: KernelMatrixFn) -> Tensor:
    """Unbiased MMD² between feature sets ``fx [n, k]`` and ``fy [m, k]`` (Gretton et al. 2012, eq. 3): the
    off-diagonal means of k(fx, fx) and k(fy, fy) minus twice the mean of k(fx, fy)."""
    n, m = fx.shape[0], fy.shape[0]
    kxx, kyy, kxy = kernel(fx, fx), kernel(fy, fy), kernel(fx, fy)
    off = lambda k, s: (k.sum() - k.diagonal().sum()) / (s * (s - 1))  # noqa: E731
    return off(kxx, n) + off(kyy, m) - 2.0 * kxy.mean()


def mmd_witness(features: Callable[[Tensor], Tensor], x: Tensor, f_data: Tensor, f_gen: Tensor,
                kernel: KernelMatrixFn) -> Tensor:
    """The MMD witness at ``x [n, d]``: ``w(x) = mean_j k(phi(x), f_data_j) - mean_j k(phi(x), f_gen_j)`` -> ``[n]``
    (``phi = features``; the gradient penalty of Bińkowski et al. holds its gradient norm near 1)."""
    fx = features(x)
    return kernel(fx, f_data).mean(1) - kernel(fx, f_gen).mean(1)


def interpolates(x: Tensor, y: Tensor, eps: Tensor) -> Tensor:
    """``eps_i x_i + (1 - eps_i) y_i`` row by row (``x, y [n, ...]``, ``eps [n]``, drawn by the caller from
    U[0, 1]): the points where a gradient penalty is taken (Gulrajani et al., "Improved Training of Wasserstein
    GANs", NeurIPS 2017)."""
    e = eps.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return e * x + (1.0 - e) * y


def gradient_penalty(fn: Callable[[Tensor], Tensor], x: Tensor, *, target: float | None = 1.0) -> Tensor:
    """Mean over the rows of ``x [n, d]`` of ``(|grad fn(x_i)| - target)^2``, or of ``|grad fn(x_i)|^2`` with
    ``target=None``; ``fn`` maps ``[n, d] -> [n]`` row by row. The graph is kept (``create_graph``), so the penalty
    is differentiable in ``fn``'s parameters (double backward)."""
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xr).sum(), xr, create_graph=True)
    sq = (g * g).flatten(1).sum(1)  # [n]
    if target is None:
        return sq.mean()
    return ((sq + 1e-12).sqrt() - target).pow(2).mean()
