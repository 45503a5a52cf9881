"""EigenLoRA: train only coefficients over principal components recycled from other adapters
(Kaushik, Vaidya, Chaudhari & Yuille 2025, "EigenLoRAx: Recycling Adapters to Find Principal Subspaces for
Resource-Efficient Adaptation and Inference", arXiv:2502.04700; code: github.com/toshi2k2/EigenLoRA).

Each adapted layer holds two frozen sets of orthonormal *principal components* — ``C_A ∈ R^{K_A×in}``
(rows) spanning the space LoRA ``A`` rows live in, ``C_B ∈ R^{out×K_B}`` (columns) for ``B`` columns — and
the adapter trains only the *loadings* (coefficients) ``L_A ∈ R^{r×K_A}`` and ``L_B ∈ R^{K_B×r}``::

    A = L_A C_A            (r × in)      B = C_B L_B            (out × r)
    ΔW = s · B A = s · C_B (L_B L_A) C_A,        s = α / r  (default α = r: s = 1, as the reference)

Activation view: LoRA's, ``y = W0 x + b + s · B (A x)`` with ``A`` and ``B`` formed from the loadings
(``r·K·(in + out)`` flops, nothing ``out × in``). Trainable parameters per layer: ``r · (K_A + K_B)``,
independent of the layer's size.

Where the components come from:

* ``rankwise.combine.eigenlora`` (``rw.combine(model, adapters, method="eigenlora", num_components=K)``)
  extracts them from trained adapters, as the paper: per layer, the top-``K`` principal components of the
  stacked (mean-centred) ``A`` rows and ``B`` columns of all the adapters, completed by random orthonormal
  *pseudo-PCs* when the adapters span fewer than ``K`` directions (the paper's EigenLoRAx augmentation).
* A plain ``rw.adapt(model, "eigenlora", ...)`` has no adapters to recycle: its components are ``K``
  random orthonormal directions drawn from the adapter's generator — the paper's pseudo-PCs alone
  (its low-resource case with no recycled PCs). Used that way it is a random-subspace method.

The components are persistent buffers of every layer's adapter (saved with it, loaded back bit for
bit; frozen: never in ``parameters()``). ``K`` is capped per layer at the dimension it spans
(``K_A = min(K, in)``, ``K_B = min(K, out)``): more directions than the space has do not exist.

Deviations from the reference code (its ``EigenLoRA_A`` / ``EigenLoRA_B``):

* init — the reference draws both loadings from ``U(−0.5, 0.5)``, so its adapted model differs from the
  base at step 0. Here ``L_B = 0`` and ``L_A ~ U(−1/√K_A, 1/√K_A)``, so ``ΔW = 0`` at init (LoRA's
  convention) and the rows of ``A`` have LoRA's scale (``L_A C_A`` with orthonormal ``C_A`` keeps the row
  norms of ``L_A``).
* a LoRA scale ``s = α/r`` is kept (default 1, which is the reference's unscaled product).
* pseudo-PCs are Gaussian vectors orthonormalized by QR against the PCs (the reference: uniform vectors,
  Gram–Schmidt one by one) — the same span distribution's purpose, a cheaper, stabler orthonormalization.

Layer kinds: all (the activation view is LoRA's ``core.ops.low_rank_apply``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, low_rank_apply, uniform_
from ..core.registry import register


@dataclass
class EigenLoraConfig(RankAlphaConfig):
    """rank: r (rows of A / columns of B); num_components: K, principal components per side (capped per
    layer at in / out); alpha: s = α/r (default α = r, s = 1); dropout: on the adapter's input."""

    num_components: int = 32

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_components")


def component_counts(view: LayerView, config: EigenLoraConfig) -> tuple[int, int]:
    """``(K_A, K_B)`` of one layer: ``K`` capped at the input and the output dimension."""
    return min(config.num_components, view.in_features), min(config.num_components, view.out_features)


def random_orthonormal(n: int, k: int, generator=None, device=None, exclude: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``k`` orthonormal columns ``(n × k)`` in ``dtype`` on ``device`` (the generator's device if given), drawn
    Gaussian and orthonormalized by QR; orthogonal to the orthonormal columns of ``exclude`` (``n × p``,
    ``p + k ≤ n``) when given — the paper's pseudo-PCs. Projected twice against ``exclude`` for accuracy."""
    dev = generator.device if generator is not None else device
    g = torch.randn(n, k, generator=generator, device=dev, dtype=dtype)
    if exclude is not None and exclude.shape[1]:
        e = exclude.to(device=dev, dtype=dtype)
        for _ in range(2):
            g = g - e @ (e.t() @ g)
    q, r = torch.linalg.qr(g, mode="reduced")
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype)  # a unique sign: diag(R) > 0


@register("eigenlora")
class EigenLora(Method):
    """LoRA factors as trained loadings over frozen principal components (see the module docstring)."""

    Config = EigenLoraConfig
    summary = ("A = L_A C_A, B = C_B L_B over frozen principal components of recycled adapters; trains only the "
               "loadings (Kaushik et al. 2025, EigenLoRAx)")
    default_lr = 1e-2
    demo_options = {"rank": 8, "num_components": 16}

    def __init__(self, view: LayerView, config: EigenLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale = config.rank, config.scale
        ka, kb = component_counts(view, config)
        kw = view.factory_kwargs
        comp_a = torch.empty(ka, view.in_features, **kw)
        comp_b = torch.empty(view.out_features, kb, **kw)
        if comp_a.device.type != "meta":
            with torch.no_grad():
                comp_a.copy_(random_orthonormal(view.in_features, ka, generator, comp_a.device).t())
                comp_b.copy_(random_orthonormal(view.out_features, kb, generator, comp_b.device))
        self.register_buffer("components_A", comp_a)
        self.register_buffer("components_B", comp_b)
        self.loadings_A = nn.Parameter(uniform_(torch.empty(config.rank, ka, **kw), kaiming_bound(ka), generator))
        self.loadings_B = nn.Parameter(torch.zeros(kb, config.rank, **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: EigenLoraConfig) -> int:
        ka, kb = component_counts(view, config)
        return config.rank * (ka + kb)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = L_A C_A`` (r × in) and ``B = C_B L_B`` (out × r)."""
        return self.loadings_A @ self.components_A, self.components_B @ self.loadings_B

    def mixed_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.factors()
        return a, b, self.scale

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return low_rank_apply(self.view, x, base_out, a, b, self.scale, self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.view.to_param((b @ a) * self.scale)

    @torch.no_grad()
    def set_components(self, comp_a: torch.Tensor, comp_b: torch.Tensor) -> None:
        """Install components ``C_A (K_A × in)`` and ``C_B (out × K_B)`` (shapes as built, orthonormal)."""
        for buf, t in ((self.components_A, comp_a), (self.components_B, comp_b)):
            if tuple(t.shape) != tuple(buf.shape):
                from ..errors import ShapeMismatchError

                raise ShapeMismatchError(
                    f"module '{self.view.name}': eigenlora components of shape {tuple(t.shape)} do not fit "
                    f"{tuple(buf.shape)} (num_components={self.config.num_components}, weight "
                    f"{self.view.out_features}x{self.view.in_features}).")
        self.components_A.copy_(comp_a)
        self.components_B.copy_(comp_b)
