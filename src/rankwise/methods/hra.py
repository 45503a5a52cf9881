"""HRA: Householder reflection adaptation (Yuan et al., 2024, arXiv:2405.17484, NeurIPS 2024,
"Bridging the Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation"; PEFT's ``hra``).

The frozen ``W0 (out × in)`` is multiplied on the input side by a chain of ``r`` trained
Householder reflections::

    W = W0 · H,   H = Π_{i=1..r} (I − 2 u_i u_iᵀ / ‖u_i‖²),   u_i ∈ R^in   (columns of U)

``H`` is orthogonal, so each output neuron's weight vector (a row of ``W0`` here; a column in the
paper's ``in × out`` layout) keeps its norm and all pairwise angles: ``W Wᵀ = W0 W0ᵀ``.
``apply_gs=True`` orthonormalizes ``U`` first (Gram–Schmidt, here a QR), then
``H = I − 2 Q Qᵀ``. The paper's orthogonality regularizer ``λ ‖I − ÛᵀÛ‖²_F`` (``Û``: unit columns)
is :meth:`Hra.regularization` with ``λ = reg``; add :func:`orthogonality_loss` of the model to
the training loss.

Activation view: the compact WY form of a product of reflections (Schreiber & Van Loan 1989;
Joffrain et al. 2006) gives ``H = I − U T Uᵀ`` with the ``r × r`` upper-triangular
``T = (½·diag(UᵀU) + striu(UᵀU))⁻¹``, so::

    ΔW = W0 (H − I) = −(W0 U) · (T Uᵀ)      — a rank-r update, applied like LoRA:
    y = W0 x + b − (W0 U)(T (Uᵀ x))

Per step that is one ``m·n·r`` product ``W0 U`` and two thin products with the batch, never the
``n × n`` matrix ``H`` nor ``W0 H`` (PEFT forms both: ``O(m n²)`` per step and a full extra matmul).

Init (PEFT's default ``symmetric``, even ``r``): the columns come in equal pairs, each pair's
reflections cancel, so ``H = I`` up to rounding (about 1e-7 relative: ``identity_at_init`` is not
claimed bit-exactly); ``random``: all columns ``U(±1/√r)``. Embeddings are not supported: the
reflections would act on the vocabulary axis (mixing different tokens' embeddings).

Precision: the ``r × r`` triangular solve (or QR) and ``W0 U`` run in float32 when the adapter is
half precision, and outside autocast (CPU has no half-precision solve or QR); the two thin factors
then return to the adapter's dtype, so a bfloat16 layer trains in bfloat16 like LoRA.

Reference: the authors' NLU code (DaShenZi721/HRA, ``nlu/adapterlib/layers.py``, ``HRALinear``) and
PEFT's ``hra`` — the same ``W0 · H`` and init; the PEFT oracle test checks outputs and gradients.
The authors' LLaMA code (``llama/peft/oft/layer.py``) differs and is not followed: it reflects the
output side, normalizes ``u/√(‖u‖² + 6e-5)`` and draws ``u`` with ``kaiming_uniform(a=1/eps)``.

Parameters per layer: ``r · in`` (``in = in_channels·k`` for convolutions).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import autocast_on, kaiming_bound, low_rank_apply, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._structured_common import check_peft_shape, require_peft_kinds, require_plain_conv, wide_dtype


@dataclass
class HraConfig(AdapterConfig):
    """rank: r, the number of reflections (≤ in); apply_gs: orthonormalize U (Gram–Schmidt);
    init: 'symmetric' (pairs of equal columns, H = I; needs even r) | 'random';
    reg: λ of the orthogonality regularizer returned by ``regularization()``."""

    rank: int = 8
    apply_gs: bool = False
    init: str = "symmetric"
    reg: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(self.init in ("symmetric", "random"), "init", "use 'symmetric' or 'random'.")
        self._check(self.init != "symmetric" or self.rank % 2 == 0, "rank",
                    "init='symmetric' pairs up equal reflections, so rank must be even; use an even rank or "
                    "init='random'.")
        self._check(self.reg >= 0, "reg", "reg (λ of the orthogonality regularizer) must be ≥ 0.")


@register("hra")
class Hra(Method):
    """``W0 · Π (I − 2 u uᵀ/‖u‖²)`` as a rank-r update in compact WY form (see module docstring)."""

    Config = HraConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d")
    summary = "W = W0·Π(I − 2uuᵀ/‖u‖²), r Householder reflections as a rank-r WY update (Yuan et al. 2024)"
    identity_at_init = False  # H = I only up to rounding (symmetric init), see the module docstring
    reads_base = True
    default_lr = 1e-2  # measured on MiniLM (one-batch memorization): 3e-3 slow
    demo_options = {"rank": 8}

    def __init__(self, view: LayerView, config: HraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        n = view.in_features
        if config.rank > n:
            raise ConfigError(
                f"hra rank={config.rank} is larger than module '{view.name}' allows: its weight is "
                f"{view.out_features}x{n}, and more than {n} reflections of R^{n} add nothing. Lower rank."
            )
        self.rank = r = config.rank
        if config.init == "symmetric":  # pairs of equal columns: each pair's reflections cancel
            half = uniform_(torch.empty(n, r // 2, **view.factory_kwargs), kaiming_bound(r // 2), generator)
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            u = uniform_(torch.empty(n, r, **view.factory_kwargs), kaiming_bound(r), generator)
        self.hra_u = nn.Parameter(u)

    @classmethod
    def num_params(cls, view: LayerView, config: HraConfig) -> int:
        return config.rank * view.in_features

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``ΔW = B A``: ``A = T Uᵀ`` and ``B = −W0 U`` (WY form), or ``A = 2 Qᵀ``, ``B = −W0 Q``
        (Gram–Schmidt). The ``r × r`` solve or QR and ``W0 U`` run in at least float32, outside
        autocast (CPU has no half-precision solve or QR); the factors return in the adapter's dtype."""
        u = self.hra_u
        device = u.device.type
        with torch.autocast(device, enabled=False) if autocast_on(device) else contextlib.nullcontext():
            u = u.to(wide_dtype(u))
            if self.config.apply_gs:
                u = torch.linalg.qr(u).Q
                a = 2 * u.t()
            else:
                g = u.t() @ u
                t_inv = torch.triu(g, 1) + torch.diag_embed(0.5 * torch.diagonal(g))
                a = torch.linalg.solve_triangular(t_inv, u.t(), upper=True)
            b = -(self.view.weight2d().to(u.dtype) @ u)
        return a.to(self.hra_u.dtype), b.to(self.hra_u.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        return low_rank_apply(self.view, x, base_out, a, b)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return self.view.to_param(b @ a)

    @classmethod
    def rank_regularization(cls, model: nn.Module, name: str) -> torch.Tensor | None:
        """Loss-term hook (``rw.rank_regularization``; ``rankwise.train`` adds it): the sum of the
        ``reg > 0`` regularizers of adapter ``name``, or None when ``reg = 0``."""
        from ..core.api import adapter_state

        if not adapter_state(model)[name]["config"].reg:
            return None
        return orthogonality_loss(model, name)

    def regularization(self) -> torch.Tensor:
        """``λ ‖I − ÛᵀÛ‖²_F`` with ``Û`` the unit columns of ``U`` (0 when ``reg = 0``)."""
        u = self.hra_u
        if not self.config.reg:
            return u.new_zeros(())
        un = u / u.norm(dim=0, keepdim=True)
        eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
        return self.config.reg * (un.t() @ un - eye).square().sum()

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "HRA"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "HRA"

    @classmethod
    def to_peft_config(cls, config: HraConfig, views: list[LayerView]) -> dict:
        require_peft_kinds("hra", "HRA", views, ("linear", "conv2d"))
        require_plain_conv("hra", "HRA", views, square=True, dilation=False)
        return {"peft_type": "HRA", "r": config.rank, "apply_GS": config.apply_gs,
                "init_weights": config.init == "symmetric", "bias": "none"}

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError("PEFT HRA adapter trains biases (bias != 'none'); rankwise's hra leaves biases frozen.")
        r = int(pcfg["r"])
        init = "symmetric" if pcfg.get("init_weights", True) and r % 2 == 0 else "random"
        return {"rank": r, "apply_gs": bool(pcfg.get("apply_GS")), "init": init}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"hra_u": self.hra_u}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["hra_u"]
        check_peft_shape(self.view, "hra_u", t, self.hra_u, f"rank {self.rank}")
        with torch.no_grad():
            self.hra_u.copy_(t)

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("hra_u",)


def orthogonality_loss(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """Sum of the HRA regularizers ``λ ‖I − ÛᵀÛ‖²_F`` of ``model``'s hra adapters (``name``: only that one)."""
    from ..core.adapted import AdaptedLayer

    terms = [ad.regularization() for m in model.modules() if isinstance(m, AdaptedLayer)
             for n, ad in m.adapters.items() if isinstance(ad, Hra) and (name is None or n == name)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
