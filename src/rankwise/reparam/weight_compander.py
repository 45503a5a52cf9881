"""Weight compander (WC): every weight passed through a bounded, odd, zero-expanding function.

Reference: R. Cakaj, J. Mehnert, B. Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", IJCNN 2023 (arXiv:2306.16993). No code is public, and the body of the paper could not
be read from here: the function below is **derived from the properties the abstract states**, not
transcribed from the paper, and may differ from the authors' formula. The abstract asks that the
reparameterization

1. is applied to each weight (elementwise): ``W = f(V)``, ``V`` the trained tensor;
2. *restricts the magnitude* of the weights: ``|f(v)| ≤ α`` for every ``v``;
3. *forces them away from zero*: near zero the map expands, ``|f(v)| > |v|`` for small ``v``, and a
   weight near zero still gets a large gradient (the paper's "reactivation of dead weights");
4. has hyperparameters that may be fixed or learned.

A *compander* (compressor + expander, as the μ-law of telephony) is an odd, increasing map with a
slope above 1 at zero and falling to 0 for large inputs. The smooth bounded one with both
hyperparameters as interpretable numbers is

    f(v) = α · tanh(γ v / α),        α > 0 (the bound),  γ > 0 (the gain at zero).

Properties, each checked in ``tests/reparam/test_weight_compander.py``:

* odd: ``f(−v) = −f(v)``; increasing: ``f'(v) = γ · sech²(γ v / α) > 0``; bounded: ``|f(v)| < α``;
* ``f'(0) = γ``: with ``γ > 1`` it expands near zero — ``|f(v)| > |v|`` for ``0 < |v| < v*``, where
  ``v*`` solves ``α tanh(γ v*/α) = v*`` — and compresses beyond ``v*`` (a compander);
* gradient: ``∂L/∂v = f'(v) · ∂L/∂w``, so a weight near zero gets ``γ``× the gradient it would get
  unreparameterized (pushed away from zero faster), while one near the bound gets almost none (it cannot
  grow past ``α``);
* invertible on ``|w| < α``: ``f⁻¹(w) = (α/γ) · artanh(w/α)`` (``right_inverse``), so putting WC on a
  trained or initialized layer leaves its weight — and the model — unchanged (to float rounding).

Choices (rankwise's, stated because the paper's could not be checked): the bound is set per layer
relative to the weight it reparameterizes, ``α = bound · max|W0|`` (``bound = 2`` by default, so WC starts
in its nearly linear range for the largest weights and saturates only after they double), or an
absolute ``alpha``; ``γ = gain`` (default 2). With ``learn=True``, ``log α`` and ``log γ`` are trained per
layer (positive by construction). The function is computed in float32 for low-precision weights (the
``artanh`` of the inverse near ``|w| → α`` would lose every digit in bfloat16) and returned in the
weight's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


def compand(v: torch.Tensor, alpha, gain) -> torch.Tensor:
    """``α · tanh(γ v / α)`` (tensors or floats for ``α``, ``γ``)."""
    return alpha * torch.tanh(gain * v / alpha)


def expand(w: torch.Tensor, alpha, gain) -> torch.Tensor:
    """The inverse on ``|w| < α``: ``(α/γ) · artanh(w/α)``."""
    return (alpha / gain) * torch.atanh(w / alpha)


@dataclass
class WeightCompanderConfig:
    """bound: α = bound · max|W0| per layer (used when alpha is None); alpha: an absolute bound for every
    layer; gain: γ = f'(0); learn: train log α and log γ per layer."""

    bound: float = 2.0
    alpha: float | None = None
    gain: float = 2.0
    learn: bool = False

    def __post_init__(self):
        def positive(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise ConfigError(f"WeightCompanderConfig.{name}={v!r}: use a positive finite number.")

        positive("bound", self.bound)
        if self.bound <= 1:
            raise ConfigError(f"WeightCompanderConfig.bound={self.bound!r}: the bound α = bound·max|W0| must exceed "
                              "the largest weight, or the layer's weights could not be represented; use bound > 1 "
                              "(e.g. 2).")
        if self.alpha is not None:
            positive("alpha", self.alpha)
        positive("gain", self.gain)
        if not isinstance(self.learn, bool):
            raise ConfigError(f"WeightCompanderConfig.learn={self.learn!r}: use True or False.")

    def alpha_for(self, weight: torch.Tensor) -> float:
        """The bound α for one layer's weight (``alpha`` or ``bound · max|W0|``)."""
        if self.alpha is not None:
            return float(self.alpha)
        top = float(weight.detach().abs().max()) if weight.numel() and weight.device.type != "meta" else 1.0
        return self.bound * top if top > 0 else self.bound


class WeightCompander(nn.Module):
    """The parametrization ``W = α tanh(γ V / α)`` of one weight (``torch.nn.utils.parametrize``).

    ``log_alpha`` and ``log_gain`` are parameters (``learn=True``) or persistent buffers: either way they
    are in the state dict, under ``<module>.parametrizations.weight.0.log_alpha`` / ``.log_gain``.
    """

    def __init__(self, alpha: float, gain: float, learn: bool = False, device=None):
        super().__init__()
        kw = {"dtype": torch.float32, "device": device}
        la, lg = torch.tensor(math.log(alpha), **kw), torch.tensor(math.log(gain), **kw)
        if learn:
            self.log_alpha, self.log_gain = nn.Parameter(la), nn.Parameter(lg)
        else:
            self.register_buffer("log_alpha", la)
            self.register_buffer("log_gain", lg)
        self.learn = learn

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @property
    def gain(self) -> torch.Tensor:
        return self.log_gain.exp()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return compand(v.float(), self.alpha, self.gain).to(v.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """``V = f⁻¹(W)``; refuses a weight at or beyond the bound (it has no preimage)."""
        a = float(self.log_alpha.detach().exp())
        top = float(w.detach().abs().max()) if w.numel() and w.device.type != "meta" else 0.0
        if top >= a:
            raise ConfigError(
                f"weight_compander: a weight of magnitude {top:.4g} is at or beyond the bound α = {a:.4g}, so "
                "W = α·tanh(γV/α) cannot represent it. Raise bound (α = bound·max|W0|) or alpha.")
        return expand(w.detach().float(), a, float(self.log_gain.detach().exp())).to(w.dtype)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}, gain={float(self.gain.detach()):.4g}, learn={self.learn}"


def build(weight: torch.Tensor, config: WeightCompanderConfig) -> WeightCompander:
    """The parametrization for ``weight`` under ``config`` (α from the weight when ``alpha`` is None)."""
    return WeightCompander(config.alpha_for(weight), config.gain, config.learn, device=weight.device)
