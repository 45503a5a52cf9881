"""LoKr: Kronecker-product adaptation (Yeh et al., 2024, "Navigating Text-To-Image Customization:
From LyCORIS Fine-Tuning to Model Evaluation", arXiv:2309.14859; KronA, Edalati et al. 2022,
arXiv:2212.10650; PEFT's ``lokr``).

``out = a·b`` and ``in_channels = c·d`` are factored with LyCORIS' rule (``factorization``: the
pair of divisors closest to the square root, or one factor equal to ``decompose_factor``), and::

    ΔW = s · w1 ⊗ w2,     w1 ∈ R^{a×c},  w2 ∈ R^{b×(d·k)},  s = α / r

(``k`` = kernel size for convolutions, 1 otherwise; canonical ``in = c·d·k``). ``w2`` is itself
low-rank, ``w2 = w2_a w2_b`` (``b×r``, ``r×dk``), when ``r < max(b, d)/2``; with ``decompose_both``
``w1 = w1_a w1_b`` likewise when ``r < max(a, c)/2`` — PEFT's rule. Init (PEFT's default): ``w1``
(or ``w1_a``) = 0, the others ``U(±1/√fan_in)``, so ``ΔW = 0`` at init; ``init='lycoris'`` zeros
``w2`` (or ``w2_b``) instead.

Activation view (never forms the Kronecker product): with ``x`` reshaped to ``X ∈ R^{c×d}``,
``(w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ)`` — two small matmuls, ``N·c·b·(d + a)`` flops instead of
``N·a·b·c·d``. Linear layers run it in one autograd function that keeps only the layer input (the
``c×b`` intermediate is recomputed in backward); under autocast or with mixed dtypes the same two
products run as plain (autocast-aware) ops instead. Convolutions apply ``w2`` as a convolution with
``b`` output channels to each of the ``c`` input-channel groups and mix the groups with ``w1``;
embeddings look up ``w1[:, q // d] ⊗ w2[:, q % d]`` per token.

Reference: PEFT's ``lokr`` (the LyCORIS rules; the PEFT oracle test checks outputs and gradients).
Not offered: PEFT's ``rank_dropout`` / ``module_dropout`` and the Tucker core of
``use_effective_conv2d`` (import refuses adapters that use them).

Parameters per layer: ``|w1| + |w2|`` with ``|w1| = a·c`` or ``r(a + c)``, ``|w2| = b·dk`` or ``r(b + dk)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import autocast_on, kaiming_bound, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._structured_common import check_peft_shape, no_patterns, require_peft_kinds, require_plain_conv


@dataclass
class KronConfig(AdapterConfig):
    """rank: r of the low-rank factors (and s = α/r); alpha: α (default: r, so s = 1);
    decompose_both: factor w1 too; decompose_factor: -1 (near-square factors) or the wanted factor;
    init: 'default' (w1 = 0, PEFT) | 'lycoris' (w2 = 0)."""

    rank: int = 8
    alpha: float | None = None
    decompose_both: bool = False
    decompose_factor: int = -1
    init: str = "default"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(isinstance(self.decompose_factor, int) and (self.decompose_factor == -1 or self.decompose_factor > 0),
                    "decompose_factor", "use -1 (factors near the square root) or a positive factor.")
        self._check(self.init in ("default", "lycoris"), "init", "use 'default' (w1 = 0) or 'lycoris' (w2 = 0).")

    @property
    def scale(self) -> float:
        return (float(self.rank) if self.alpha is None else float(self.alpha)) / self.rank


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(p, q)`` with ``p·q = dimension`` and ``p ≤ q``: ``p = factor`` when it divides ``dimension``,
    otherwise the divisor pair nearest the square root with ``p ≤ factor`` (LyCORIS' rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    p, q = 1, dimension
    while p < q:
        nxt = p + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > p + q or nxt > factor:
            break
        p, q = nxt, dimension // nxt
    return (p, q) if p <= q else (q, p)


def layout(view: LayerView, config: KronConfig):
    """((a, b), (c, d), k, use_w1, use_w2): ``out = a·b``, input channels ``c·d``, kernel size ``k``."""
    if view.kind in ("conv1d", "conv2d"):
        c_in = view.base.in_channels // view.base.groups
        k = view.in_features // c_in
    else:
        c_in, k = view.in_features, 1
    a, b = factorization(view.out_features, config.decompose_factor)
    c, d = factorization(c_in, config.decompose_factor)
    r = config.rank
    use_w1 = not (config.decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    return (a, b), (c, d), k, use_w1, use_w2


# PEFT 0.21 builds a Conv1d's full (not low-rank) w2 as ``torch.kron(w1, w2)`` of a 2-D and a 3-D
# tensor — w1 broadcast as (1, a, c), giving (b, a·d, c·k) reshaped to the weight — which is not
# w1 ⊗ w2 over the channels (its Conv2d path unsqueezes w1 first and is). The layouts disagree there.
_CONV1D_FULL_W2 = (
    "module '{name}' is a Conv1d whose LoKr factor w2 is full (rank ≥ max(b, d)/2); PEFT 0.21 builds that "
    "case as torch.kron of a 2-D and a 3-D tensor, a different (scrambled) weight than w1 ⊗ w2, so the "
    "adapter cannot move between PEFT and rankwise. Use a smaller rank (low-rank w2) or rw.save()."
)


class _KronLinear(torch.autograd.Function):
    """``out = base + s · vec(w1 · X · w2ᵀ)`` for rows ``x = vec(X)``, ``X ∈ R^{c×d}``; saves ``x``.

    Every contraction is one 2-D matmul (``w1`` acts on a ``c × (N·b)`` transposed copy rather than as
    ``N`` tiny batched products, which measured 1.6x slower); the ``c × b`` intermediate is recomputed
    in backward instead of stored."""

    @staticmethod
    def forward(ctx, x2d, base2d, w1, w2, scale):
        ctx.scale = scale
        ctx.save_for_backward(x2d, w1, w2)
        n_rows, (a, c), (b, d) = x2d.shape[0], w1.shape, w2.shape
        zt = torch.mm(x2d.reshape(n_rows * c, d), w2.t()).view(n_rows, c, b).transpose(0, 1).reshape(c, -1)
        y = torch.mm(w1, zt).view(a, n_rows, b).transpose(0, 1)  # N × a × b (strided)
        return torch.add(base2d.view(n_rows, a, b), y, alpha=scale).view(n_rows, a * b)

    @staticmethod
    def backward(ctx, g):
        x2d, w1, w2 = ctx.saved_tensors
        n_rows, (a, c), (b, d) = x2d.shape[0], w1.shape, w2.shape
        x_rows = x2d.reshape(n_rows * c, d)
        gyt = g.reshape(n_rows, a, b).transpose(0, 1).reshape(a, -1).mul(ctx.scale)  # a × (N·b)
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            gz = torch.mm(w1.t(), gyt).view(c, n_rows, b).transpose(0, 1).reshape(n_rows * c, b)
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(gz, w2).view(x2d.shape)
            if ctx.needs_input_grad[3]:
                grad_w2 = torch.mm(gz.t(), x_rows)
        if ctx.needs_input_grad[2]:
            zt = torch.mm(x_rows, w2.t()).view(n_rows, c, b).transpose(0, 1).reshape(c, -1)  # recomputed
            grad_w1 = torch.mm(gyt, zt.t())
        return grad_x, (g if ctx.needs_input_grad[1] else None), grad_w1, grad_w2, None


@register("kron")
class Kron(Method):
    """Kronecker update ``s · w1 ⊗ w2`` (see module docstring)."""

    Config = KronConfig
    summary = "ΔW = s·w1 ⊗ w2, w2 (and w1) optionally low-rank; reshape-matmul, never the Kronecker product (LoKr)"
    default_lr = 1e-2  # measured on MiniLM (one-batch memorization): 3e-3 slow, 3e-2 unstable
    demo_options = {"rank": 8}

    def __init__(self, view: LayerView, config: KronConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank, self.scale = config.rank, config.scale
        (a, b), (c, d), k, use_w1, use_w2 = layout(view, config)
        self.shape = (a, b, c, d, k)
        r, dk = config.rank, d * k
        kw = view.factory_kwargs
        lycoris = config.init == "lycoris"
        if use_w1:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c, **kw))
            if lycoris:
                uniform_(self.lokr_w1, kaiming_bound(c), generator)
        else:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r, **kw))
            self.lokr_w1_b = nn.Parameter(torch.zeros(r, c, **kw))
            if lycoris:
                uniform_(self.lokr_w1_a, kaiming_bound(r), generator)
            uniform_(self.lokr_w1_b, kaiming_bound(c), generator)
        if use_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, dk, **kw))
            if not lycoris:
                uniform_(self.lokr_w2, kaiming_bound(dk), generator)
        else:
            self.lokr_w2_a = nn.Parameter(torch.zeros(b, r, **kw))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, dk, **kw))
            uniform_(self.lokr_w2_a, kaiming_bound(r), generator)
            if not lycoris:
                uniform_(self.lokr_w2_b, kaiming_bound(dk), generator)

    @classmethod
    def num_params(cls, view: LayerView, config: KronConfig) -> int:
        (a, b), (c, d), k, use_w1, use_w2 = layout(view, config)
        r = config.rank
        return (a * c if use_w1 else r * (a + c)) + (b * d * k if use_w2 else r * (b + d * k))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` as dense ``a×c`` and ``b×dk`` matrices (products of the low-rank pairs)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.factors()
        a, b, c, d, k = self.shape
        kind = self.view.kind
        if self.view.is_linear:
            x2d = x.reshape(-1, c * d)
            if x2d.dtype == w1.dtype == base_out.dtype and not autocast_on(x.device.type):
                return _KronLinear.apply(x2d, base_out.reshape(-1, a * b), w1, w2, self.scale).view(base_out.shape)
            # mixed dtypes or autocast: the same two products by plain ops, which autocast and promote
            y = torch.matmul(w1, torch.matmul(x2d.to(w2.dtype).view(-1, c, d), w2.t()))  # N × a × b
            return base_out + (y.reshape(base_out.shape) * self.scale).to(base_out.dtype)
        if kind == "embedding":
            q = x.reshape(-1)
            y = w1.t()[q // d].unsqueeze(2) * w2.t()[q % d].unsqueeze(1)  # N × a × b
            return base_out + (y.reshape(*x.shape, a * b) * self.scale).to(base_out.dtype)
        # convolution: w2 on each of the c groups of d input channels (b output channels), then w1 mixes groups
        n_img, spatial = x.shape[0], x.shape[2:]
        h = self.view.base._conv_forward(x.reshape(n_img * c, d, *spatial).to(w2.dtype),
                                         w2.reshape(b, d, *self.view.kernel), None)
        h = h.reshape(n_img, c, b, *h.shape[2:])
        y = torch.einsum("ac,ncb...->nab...", w1, h).reshape(n_img, a * b, *h.shape[3:])
        return base_out + (y * self.scale).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return self.view.to_param(torch.kron(w1, w2) * self.scale)

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "LOKR"
    _names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LOKR"

    @classmethod
    def to_peft_config(cls, config: KronConfig, views: list[LayerView]) -> dict:
        require_peft_kinds("kron", "LoKr", views, ("linear", "conv1d", "conv2d"))
        require_plain_conv("kron", "LoKr", views)
        for v in views:
            if v.kind == "conv1d" and layout(v, config)[4]:
                raise ConfigError(_CONV1D_FULL_W2.format(name=v.name))
        return {
            "peft_type": "LOKR",
            "r": config.rank,
            "alpha": float(config.rank if config.alpha is None else config.alpha),
            "decompose_both": config.decompose_both,
            "decompose_factor": config.decompose_factor,
            "init_weights": "lycoris" if config.init == "lycoris" else True,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "use_effective_conv2d": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        no_patterns(pcfg, ("rank_pattern", "alpha_pattern"), "kron")
        for key in ("rank_dropout", "module_dropout"):
            if pcfg.get(key):
                raise ConfigError(f"PEFT LoKr adapter uses {key}={pcfg[key]}; rankwise's kron has no such dropout. "
                                  f"Set {key}=0 to import it.")
        return {"rank": int(pcfg["r"]), "alpha": float(pcfg["alpha"]),
                "decompose_both": bool(pcfg.get("decompose_both")),
                "decompose_factor": int(pcfg.get("decompose_factor", -1)),
                "init": "lycoris" if pcfg.get("init_weights") == "lycoris" else "default"}

    def _peft_shape(self, name: str, t: torch.Tensor) -> tuple[int, ...]:
        """PEFT keeps a full ``w2`` of a convolution as ``b × d × kernel``."""
        if name == "lokr_w2" and self.view.kind in ("conv1d", "conv2d"):
            return (t.shape[0], self.shape[3], *self.view.kernel)
        return tuple(t.shape)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).reshape(self._peft_shape(n, getattr(self, n)))
                for n in self._names if hasattr(self, n)}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "lokr_t2" in tensors:
            raise ConfigError(f"module '{self.view.name}': the PEFT LoKr adapter uses use_effective_conv2d "
                              "(a Tucker core lokr_t2); rankwise's kron does not. Re-train it with "
                              "use_effective_conv2d=False.")
        if self.view.kind == "conv1d" and "lokr_w2" in tensors:
            raise ConfigError(_CONV1D_FULL_W2.format(name=self.view.name))
        expected = self.peft_tensors()
        for key in expected:
            if key not in tensors:
                raise ConfigError(f"module '{self.view.name}': the PEFT LoKr file has {sorted(tensors)}, but "
                                  f"rankwise's layout (rank {self.rank}) needs {sorted(expected)}. Use the same "
                                  "r / decompose_both / decompose_factor as when it was trained.")
            check_peft_shape(self.view, key, tensors[key], expected[key], f"rank {self.rank}")
        with torch.no_grad():
            for key in expected:
                param = getattr(self, key)
                param.copy_(tensors[key].reshape(param.shape))

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return (*cls._names, "lokr_t2")
