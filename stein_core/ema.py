"""Exponential moving average (EMA) of a model's weights.

Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control Optim. 1992
(iterate averaging); the exponential form is what score models sample with: Song & Ermon, "Improved Techniques
for Training Score-Based Generative Models" (NCSNv2), NeurIPS 2020, Technique 5 (EMA with decay 0.999 removes
the colour shifts and unstable sample quality of the raw weights), kept by Song et al. 2021 (score SDE, 0.9999).

After each optimiser step ``update(model)`` sets, for every parameter ``p``,

    shadow <- decay * shadow + (1 - decay) * p,

so after ``k`` updates from ``shadow_0`` with weights ``p_1..p_k``:
``shadow_k = decay^k shadow_0 + (1 - decay) sum_j decay^(k - j) p_j``.
Buffers (e.g. BatchNorm running statistics, which are averages already) are copied, not averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class EMA:
    """Shadow copy of a model's state that tracks an exponential moving average of its parameters.

    The shadow lives on the device and in the dtype of the model it was built from and is keyed like the
    unwrapped model's ``state_dict()``, so ``ema.shadow`` loads straight into a fresh model (e.g. to save
    EMA weights in a checkpoint) and a DDP-wrapped model and its ``.module`` are interchangeable.

    Usage::

        ema = EMA(model, decay=0.999)
        for batch in data:
            loss(model, batch).backward(); opt.step(); ema.update(model)
        with ema.average_parameters(model):   # evaluate or sample with EMA weights
            samples = sample(model)
        # the model's own weights are back here

    Args:
        model: the model (possibly wrapped) whose weights are averaged; the shadow starts as a copy.
        decay: ``0 <= decay < 1``; about ``1 / (1 - decay)`` recent steps carry most of the weight.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        module = unwrap_model(model)
        self._param_names = {name for name, _ in module.named_parameters()}
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def _state(self, model: nn.Module) -> dict[str, Tensor]:
        state = unwrap_model(model).state_dict(keep_vars=True)
        if state.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise ValueError(f"model does not match the EMA shadow: missing {sorted(missing)}, extra {sorted(extra)}")
        return state

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step with the model's current weights (call after ``optimizer.step()``)."""
        shadows, values = [], []
        for name, value in self._state(model).items():
            shadow = self.shadow[name]
            if name in self._param_names and shadow.is_floating_point():
                shadows.append(shadow)
                values.append(value.detach().to(shadow.dtype))
            else:
                shadow.copy_(value.detach())
        if shadows:
            # lerp keeps a constant weight exactly constant (a + w (a - a) == a), unlike d*a + (1-d)*a; one foreach
            # call for all of them (a few fused kernels on a GPU; per tensor, the same lerp_, on the CPU)
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the shadow (in place; keeps device and dtype)."""
        for name, value in self._state(model).items():
            value.data.copy_(self.shadow[name])

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the EMA weights; on exit (also on error) its own weights return."""
        backup = {k: v.detach().clone() for k, v in self._state(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in self._state(model).items():
                    value.data.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, floats, ints) that ``torch.load(..., weights_only=True)`` accepts."""
        shadow = {k: v.detach().clone() for k, v in self.shadow.items()}  # a snapshot: later updates leave it alone
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the model it was built for")
        with torch.no_grad():
            for name, value in shadow.items():
                self.shadow[name].copy_(value)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
