"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024,
arXiv:2310.11454).

One pair of frozen random matrices is shared by every adapted layer; each layer trains only two
scaling vectors::

    ΔW = Λ_b B Λ_d A,      A ∈ R^{r×in},  B ∈ R^{out×r}  frozen, shared;
                           d ∈ R^r, b ∈ R^out trainable,  Λ = diag

Layers of different shapes slice one pair ``Ā (r × max_in)``, ``B̄ (max_out × r)`` sized for the
largest adapted layer: ``A = Ā[:, :in]``, ``B = B̄[:out, :]`` (the paper's and PEFT's sharing).
The pair is generated exactly as PEFT 0.21 does — a CPU ``torch.Generator`` seeded with
``projection_seed``, Kaiming-uniform ``Ā`` then ``B̄`` (bound ``√6/√fan_in``) — so the same seed and
the same targets give PEFT's projections bit for bit. ``projection_seed=None`` draws the seed from
the adapter's generator (PEFT's default key is 0). Init (PEFT/paper): ``d = d_initial`` (0.1),
``b = 0``, so ``ΔW = 0`` and the adapted model equals the base exactly.

Activation view: ``y = W0 x + bias + b ⊙ (B (d ⊙ (A drop(x))))`` — the shared bases are applied
once per layer as two thin products, on linear layers in one autograd node that keeps only
``h = A x`` and, for ``r ≥ 32``, the ``out``-sized ``B (d ⊙ h)`` that ``b``'s gradient needs (PEFT
keeps it at every rank; below 32 one thin product in backward is cheaper than keeping it).

Parameters per layer: ``r + out``. Storage: only the trainable vectors and, once per adapter, the
key ``(seed, max_out, max_in)``; ``save_projection=True`` stores the projections too (as PEFT does
by default; adapters imported from PEFT keep the projections of the file).

Layer kinds: every kind (``in`` = ``in_channels·k`` for convolutions, the vocabulary size for
embeddings, whose roles of ``A``/``B`` stay as above); PEFT's VeRA covers linear and ``Conv1D``
layers only, so ``export_peft`` refuses the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LayerView
from ..core.ops import autocast_on, low_rank_apply
from ..core.registry import register
from ._shared_bases import SeededBases, SharedBasesConfig, SharedBasesMethod


@dataclass
class VeraConfig(SharedBasesConfig):
    """rank: r (rows of the shared A; larger than LoRA ranks: VeRA trains only r + out per layer);
    d_initial: init of d; dropout, projection_seed, save_projection: see ``SharedBasesConfig``."""

    rank: int = 256
    d_initial: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        self._check(math.isfinite(self.d_initial), "d_initial", "d_initial must be a finite number (PEFT: 0.1).")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init: uniform on ±√3·√2/√fan_in with fan_in = shape[1] (same arithmetic, same draws)."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraBases(SeededBases):
    """The projections ``Ā (r × max_in)`` and ``B̄ (max_out × r)`` shared by all layers of an adapter;
    ``key = (seed, max_out, max_in)``."""

    names = ("vera_A", "vera_B")
    exact = {"vera_A": (0,), "vera_B": (1,)}

    def __init__(self, key, config: VeraConfig, persistent: bool = False, device=None):
        self.rank = config.rank
        super().__init__(key, persistent, device)

    def generate(self, key):
        seed, n_out, n_in = key
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = _kaiming_uniform((self.rank, n_in), g)
        b = _kaiming_uniform((n_out, self.rank), g)
        return {"vera_A": a, "vera_B": b}


KEEP_Z_RANK = 32  # from this rank on, _VeraLinear keeps z = (d ⊙ h) Bᵀ for b's gradient (see there)


class _VeraLinear(torch.autograd.Function):
    """VeRA's branch of a linear layer as one autograd node (``A``, ``B`` frozen)::

        out = base_out + b ⊙ z,    z = (d ⊙ h) Bᵀ,    h = x Aᵀ

    Saves ``h`` (N × r), not ``x``: no gradient needs ``x`` when ``A`` is frozen. ``b``'s gradient is
    ``Σ_tokens G ⊙ z``: with ``keep_z`` (large ``r``) ``z`` (N × out) is kept, as PEFT does, so it
    costs no product; otherwise nothing out-sized is kept and it is ``rowsum(B ⊙ (Gᵀ (d ⊙ h)))``,
    one ``N·r·out`` product — cheaper than keeping ``z`` while ``r`` is small. Backward::

        ∂h = ((G ⊙ b) B) ⊙ d,   ∂d = Σ_tokens ((G ⊙ b) B) ⊙ h,   ∂x = ∂h A,   ∂base_out = G
    """

    @staticmethod
    def forward(ctx, x, base_out, a, b, d, lb, keep_z):
        n_in, n_out = a.shape[1], b.shape[0]
        x2, bo = x.reshape(-1, n_in), base_out.reshape(-1, n_out)
        h = torch.mm(x2, a.t())
        bd = b * d  # B Λ_d (out × r): d folded into the small factor, no N × r temporary
        if keep_z:
            z = torch.mm(h, bd.t())
            out = torch.addcmul(bo, z, lb)
        else:
            z = None
            out = torch.addmm(bo, h, (bd * lb[:, None]).t())
        ctx.x_shape = x.shape
        ctx.save_for_backward(a, b, d, lb, h, z)  # not x: with A frozen, no gradient needs it
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        a, b, d, lb, h, z = ctx.saved_tensors
        need_x, need_base, _, _, need_d, need_lb = ctx.needs_input_grad[:6]
        g2 = grad.reshape(-1, b.shape[0])
        grad_x = grad_d = grad_lb = None
        if need_lb:
            if z is not None:
                grad_lb = torch.linalg.vecdot(g2, z, dim=0)
            else:
                grad_lb = (b * d * torch.mm(h.t(), g2).t()).sum(1)
        if need_x or need_d:
            gh_t = torch.mm((b * lb[:, None]).t(), g2.t())  # (∂L/∂(d ⊙ h))ᵀ: r × N
            if need_d:
                grad_d = torch.linalg.vecdot(gh_t, h.t(), dim=1)
            if need_x:
                grad_x = torch.mm(gh_t.t(), a * d[:, None]).view(ctx.x_shape)
        return grad_x, (grad if need_base else None), None, None, grad_d, grad_lb, None


@register("vera")
class Vera(SharedBasesMethod):
    """``ΔW = Λ_b B Λ_d A`` with frozen shared random ``A, B`` (see module docstring)."""

    Config = VeraConfig
    Bases = VeraBases
    summary = "ΔW = Λ_b B Λ_d A, frozen random A,B shared by all layers, trains d (r) and b (out) (Kopiczko et al. 2024)"
    default_lr = 1e-2
    demo_options = {"rank": 256}

    def __init__(self, view: LayerView, config: VeraConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config, generator, shared)
        kw = view.factory_kwargs
        self.vera_lambda_d = nn.Parameter(torch.full((config.rank,), float(config.d_initial), **kw))
        self.vera_lambda_b = nn.Parameter(torch.zeros(view.out_features, **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: VeraConfig) -> int:
        return config.rank + view.out_features

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices ``A (r × in)`` and ``B (out × r)`` of the shared projections."""
        self.bases.refresh()
        v, d = self.view, self.vera_lambda_d
        return self.bases.vera_A[:, : v.in_features].to(d.dtype), self.bases.vera_B[: v.out_features].to(d.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        d, lb, p = self.vera_lambda_d, self.vera_lambda_b, self.config.dropout
        if self.view.is_linear and x.dtype == a.dtype == base_out.dtype and not autocast_on(x.device.type):
            if p > 0 and self.training:
                x = F.dropout(x, p, training=True)
            return _VeraLinear.apply(x, base_out, a, b, d, lb, self.rank >= KEEP_Z_RANK)
        channel_first = self.view.channel_dim == 1
        return low_rank_apply(self.view, x, base_out, a, b * lb[:, None], 1.0, p, self.training,
                              mid=lambda h: h * (d.view(-1, *([1] * (h.dim() - 2))) if channel_first else d))

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.view.to_param((b * self.vera_lambda_b[:, None]) @ (a * self.vera_lambda_d[:, None]))

    # ---- PEFT format (the codec is SharedBasesMethod's; PEFT stores vera_A/B once per model) ----
    peft_type = "VERA"
    peft_name = "VeRA"
    trained = ("vera_lambda_b", "vera_lambda_d")

    @classmethod
    def peft_options(cls, config: VeraConfig) -> dict:
        return {"d_initial": config.d_initial}

    @classmethod
    def from_peft_options(cls, pcfg: dict) -> dict:
        return {"d_initial": float(pcfg.get("d_initial", 0.1))}
