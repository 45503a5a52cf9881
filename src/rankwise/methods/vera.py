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

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import autocast_on
from ..core.registry import register
from ..errors import ConfigError, ShapeMismatchError
from ._shared_bases import SeededBases, draw_seed, largest_dims
from ._structured_common import require_peft_kinds


@dataclass
class VeraConfig(AdapterConfig):
    """rank: r (rows of the shared A; larger than LoRA ranks: VeRA trains only r + out per layer);
    d_initial: init of d; dropout: on the adapter's input; projection_seed: seed of the shared
    projections (None: drawn from the adapter's generator); save_projection: store the projections
    in saved files instead of regenerating them from the seed."""

    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int | None = None
    save_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")
        self._check(math.isfinite(self.d_initial), "d_initial", "d_initial must be a finite number (PEFT: 0.1).")
        self._check(self.projection_seed is None or (isinstance(self.projection_seed, int)
                                                     and 0 <= self.projection_seed < 2**63),
                    "projection_seed", "use None (drawn from the generator) or an integer in [0, 2**63).")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init: uniform on ±√3·√2/√fan_in with fan_in = shape[1] (same arithmetic, same draws)."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraBases(SeededBases):
    """The projections ``Ā (r × max_in)`` and ``B̄ (max_out × r)`` shared by all layers of an adapter;
    ``key = (seed, max_out, max_in)``."""

    def __init__(self, key, rank: int, persistent: bool = False):
        self.rank = rank
        super().__init__(key, persistent)

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
class Vera(Method):
    """``ΔW = Λ_b B Λ_d A`` with frozen shared random ``A, B`` (see module docstring)."""

    Config = VeraConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "ΔW = Λ_b B Λ_d A, frozen random A,B shared by all layers, trains d (r) and b (out) (Kopiczko et al. 2024)"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 1e-2
    demo_options = {"rank": 256}

    @classmethod
    def shared(cls, views: list[LayerView], config: VeraConfig, generator=None) -> VeraBases:
        seed = draw_seed(generator) if config.projection_seed is None else config.projection_seed
        n_out, n_in = largest_dims(views)
        return VeraBases([seed, n_out, n_in], config.rank, persistent=config.save_projection)

    def __init__(self, view: LayerView, config: VeraConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config)
        if shared is None:  # built outside rw.adapt: bases of its own
            shared = self.shared([view], config, generator)
        self.view, self.config, self.rank = view, config, config.rank
        self.bases = shared  # one module for all layers (registered here, saved once by rw.save)
        w = view.weight
        kw = {"dtype": w.dtype if w.is_floating_point() else torch.float32}
        self.vera_lambda_d = nn.Parameter(torch.full((config.rank,), float(config.d_initial), **kw))
        self.vera_lambda_b = nn.Parameter(torch.zeros(view.out_features, **kw))
        self.drop = config.dropout

    @classmethod
    def num_params(cls, view: LayerView, config: VeraConfig) -> int:
        return config.rank + view.out_features

    def loaded(self) -> None:
        self.bases.refresh()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices ``A (r × in)`` and ``B (out × r)`` of the shared projections."""
        self.bases.refresh()
        v, d = self.view, self.vera_lambda_d
        return self.bases.vera_A[:, : v.in_features].to(d.dtype), self.bases.vera_B[: v.out_features].to(d.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        d, lb = self.vera_lambda_d, self.vera_lambda_b
        if x.is_floating_point() and x.dtype != a.dtype:
            x = x.to(a.dtype)
        if self.drop > 0 and self.training and x.is_floating_point():
            x = F.dropout(x, self.drop, training=True)
        if (self.view.kind in ("linear", "hf_conv1d") and base_out.dtype == a.dtype
                and not autocast_on(x.device.type)):
            return _VeraLinear.apply(x, base_out, a, b, d, lb, self.rank >= KEEP_Z_RANK)
        bb = b * lb[:, None]  # Λ_b B: out × r
        h = self.view.apply_in(x, a)
        h = h * (d.view(-1, *([1] * (h.dim() - 2))) if self.view.channel_dim == 1 else d)
        return base_out + self.view.apply_out(h, bb).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.view.to_param((b * self.vera_lambda_b[:, None]) @ (a * self.vera_lambda_d[:, None]))

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "VERA"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "VERA"

    @classmethod
    def to_peft_config(cls, config: VeraConfig, views: list[LayerView]) -> dict:
        require_peft_kinds("vera", "VeRA", views, ("linear", "hf_conv1d"))
        return {
            "peft_type": "VERA",
            "r": config.rank,
            "projection_prng_key": config.projection_seed,  # the drawn seed comes from peft_shared
            "save_projection": True,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
            "fan_in_fan_out": any(v.kind == "hf_conv1d" for v in views),
            "bias": "none",
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError("PEFT VeRA adapter trains biases (bias != 'none'); rankwise's vera leaves biases frozen.")
        return {"rank": int(pcfg["r"]), "d_initial": float(pcfg.get("d_initial", 0.1)),
                "dropout": float(pcfg.get("vera_dropout") or 0.0),
                "projection_seed": int(pcfg.get("projection_prng_key", 0)),
                # the file's projections are kept as state (PEFT saves them by default)
                "save_projection": bool(pcfg.get("save_projection", True))}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, param in (("vera_lambda_b", self.vera_lambda_b), ("vera_lambda_d", self.vera_lambda_d)):
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ShapeMismatchError(
                    f"module '{self.view.name}': PEFT tensor {key} has shape {tuple(tensors[key].shape)}, rankwise "
                    f"expects {tuple(param.shape)} (rank {self.rank}, weight {self.view.out_features}x"
                    f"{self.view.in_features}). Load it onto the model it was trained on."
                )
        with torch.no_grad():
            self.vera_lambda_b.copy_(tensors["vera_lambda_b"])
            self.vera_lambda_d.copy_(tensors["vera_lambda_d"])

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("vera_lambda_b", "vera_lambda_d")

    # the projections are stored once per model in PEFT files, as base_model.vera_A / vera_B
    @classmethod
    def peft_shared_keys(cls) -> tuple[str, ...]:
        return ("base_model.vera_A", "base_model.vera_B")

    @classmethod
    def peft_shared(cls, shared: VeraBases) -> tuple[dict[str, torch.Tensor], dict]:
        """(model-level PEFT tensors, adapter_config entries) of the shared projections."""
        shared.refresh()
        return ({"base_model.vera_A": shared.vera_A, "base_model.vera_B": shared.vera_B},
                {"projection_prng_key": int(shared.key[0])})

    @classmethod
    def load_peft_shared(cls, shared: VeraBases, tensors: dict[str, torch.Tensor]) -> None:
        a, b = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
        r, n_out, n_in = shared.rank, int(shared.key[1]), int(shared.key[2])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or a.shape[1] < n_in or b.shape[0] < n_out:
            raise ShapeMismatchError(
                f"PEFT VeRA projections have shapes vera_A {tuple(a.shape)}, vera_B {tuple(b.shape)}; the adapted "
                f"layers need at least ({r}, {n_in}) and ({n_out}, {r}). Load the adapter onto the model it was "
                "trained on."
            )
        with torch.no_grad():
            shared.key[1], shared.key[2] = b.shape[0], a.shape[1]
            shared.vera_A = a.to(shared.vera_A.dtype).clone()
            shared.vera_B = b.to(shared.vera_B.dtype).clone()
        shared._stamp = shared._key_stamp()
