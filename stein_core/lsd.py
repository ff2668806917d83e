"""The learned Stein discrepancy (Grathwohl, Wang, Jacobsen, Duvenaud & Zemel, "Learning the Stein Discrepancy for
Training and Evaluating Energy-Based Models without Sampling", ICML 2020).

For data x ~ q and a model p known through its score s_p = ∇log p, a critic f: ℝᵈ → ℝᵈ gives the Stein term

    T_p f(x) = s_p(x)ᵀ f(x) + tr ∇f(x),        E_q[T_p f] = E_q[(s_p − s_q)ᵀ f]   (Stein's identity under q),

and the learned Stein discrepancy is the L2-regularised supremum over a critic class,

    LSD(q, p) = sup_f  E_q[T_p f(x)] − λ E_q‖f(x)‖²,

whose pointwise optimum is f* = (s_p − s_q) / (2λ), with value E_q‖s_p − s_q‖² / (4λ): the Fisher divergence over
4λ. Training alternates critic ascent on :func:`lsd_objective` with descent of the model's parameters on the
same value at the current critic (the model enters through s_p only).

tr ∇f is exact (:func:`divergence` with ``noise=None``: one backward pass per dimension) or Hutchinson's unbiased
estimate εᵀ(∇f)ε with E[εεᵀ] = I (one backward pass), which the paper uses in high dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["divergence", "lsd_objective"]


def divergence(fn: Callable[[Tensor], Tensor], x: Tensor, *, noise: Tensor | None = None,
               create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """``(f(x) [n, d], div f(x) [n])`` for a row-wise map ``fn: [n, d] -> [n, d]``.

    ``noise=None``: the exact trace Σ_i ∂f_i/∂x_i from the d rows of the Jacobian, one batched backward pass. ``noise [n, d]`` (Gaussian or
    Rademacher, E[εεᵀ] = I): Hutchinson's estimate εᵀ (∂f/∂x) ε from one vector-Jacobian product. ``create_graph``
    keeps the graph, so the result can be differentiated in ``fn``'s parameters (and in x). ``x`` is not modified:
    a detached copy is differentiated."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        f = fn(xg)
        if f.shape != xg.shape:
            raise ValueError(f"fn must map [n, d] to [n, d], got {tuple(xg.shape)} -> {tuple(f.shape)}")
        if noise is not None:
            (vjp,) = torch.autograd.grad(f, xg, grad_outputs=noise, create_graph=create_graph)
            return f, (vjp * noise).sum(-1)
        # the d vector-Jacobian products e_iᵀ ∂f/∂x as one batched pass (vmap over the basis vectors)
        basis = torch.eye(xg.shape[-1], dtype=f.dtype, device=f.device)[:, None, :].expand(-1, *f.shape)
        (jac,) = torch.autograd.grad(f, xg, grad_outputs=basis, create_graph=create_graph, is_grads_batched=True)
        div = torch.diagonal(jac, dim1=0, dim2=-1).sum(-1)  # jac [d, n, d]: Σ_i ∂f_i/∂x_i per row
    return f, div


def lsd_objective(x: Tensor, score_x: Tensor, critic: Callable[[Tensor], Tensor], lam: float, *,
                  noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(value [], stein [])``: the critic's objective mean(T_p f) − λ mean‖f‖² on the rows ``x [n, d]`` with the
    model's score ``score_x [n, d]`` at them, and the Stein term mean(T_p f) alone.

    The critic maximises ``value``; the model minimises it (only ``score_x`` depends on the model: its gradient is
    that of mean(s_pᵀ f)). A mean of per-example terms: under data parallelism each rank computes it on its slice
    and the gradients are averaged. ``noise``: Hutchinson's probe for the trace (None: exact)."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    f, div = divergence(critic, x, noise=noise)
    stein = ((score_x * f).sum(-1) + div).mean()
    return stein - lam * (f * f).sum(-1).mean(), stein
