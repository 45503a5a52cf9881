"""SMMF: square-matricized momentum factorization (Adam with rank-1 factored moments).

Park & Lee, "SMMF: Square-Matricized Momentum Factorization for Memory-Efficient Optimization",
AAAI 2025 (arXiv:2412.08894; official code github.com/eai-lab/SMMF).

Every tensor (of any number of dimensions, and vectors when ``vector_reshape``) is viewed as the
most nearly square matrix with its number of elements: ``(N / k) x k`` with ``k`` the largest
divisor of ``N`` that is ``<= √N``. Both Adam moments of that matrix are stored as a rank-1
non-negative factorization (a column vector ``r`` and a row vector ``c``), and the first
moment's signs separately (1 bit per element here; the paper's 1-bit format):

    decompress   M̂ = sign ⊙ (r_M c_Mᵀ),   V̂ = r_V c_Vᵀ
    β₁,t = β₁ γ^(t-1)  (γ = ``growth_rate``),   β₂,t = 1 - t^c  (c = ``decay_rate``)
    M = β₁,t M̂ + (1 - β₁,t) G,   V = β₂,t V̂ + (1 - β₂,t) G²
    W ← W - η M / (√V + ε)                        (no bias correction, as in the paper)
    compress     sign = [M > 0],   (r_M, c_M) = NNMF₁(|M|),   (r_V, c_V) = NNMF₁(V)

``NNMF₁(A)`` is the closed-form rank-1 factorization of Adafactor: ``r = A 1`` (row sums),
``c = Aᵀ 1`` (column sums), and the shorter of the two divided by its own sum, so that
``r cᵀ = (A 1)(1ᵀ A) / (1ᵀ A 1)``; it is exact when ``A`` has rank 1. Optimizer state of a
tensor with N elements viewed as n x m: ``2(n + m)`` floats plus ``N/8`` bytes of signs, against
Adam's ``2N`` floats. With ``beta=None`` there is no first moment (RMSProp-like, ``G/(√V+ε)``).
``weight_decay_mode``: ``"adamw"`` (decoupled, ``W ← (1 - ηλ) W``) or ``"adam"`` (``G + λW``).
With ``vector_reshape=False`` vectors keep dense moments and the same update rule.

The update uses the moments before compression (the compressed ones only carry to the next
step), as the official implementation does; ``tests/test_optim_more.py`` re-derives steps densely
in float64 and checks the closed form (rank-1 positive gradients make SMMF exactly the dense
update).
"""

from __future__ import annotations

import math

import torch

from ..core.distributed import whole_parameter
from ..errors import ConfigError

__all__ = ["SMMF", "square_shape"]

def square_shape(numel: int) -> tuple[int, int]:
    """The most nearly square ``(rows, cols)`` with ``rows * cols == numel`` and ``rows >= cols``."""
    k = math.isqrt(numel)
    while k > 1 and numel % k:
        k -= 1
    k = max(k, 1)
    return numel // k, k


# 8 bytes of 0/1 <-> 1 byte, with one 64-bit multiply per 8 elements (no per-bit loop): the product with
# 0x8040201008040201 gathers the low bit of every byte of a word into its top byte, and spreads a byte's
# bits back to the low bits of 8 bytes. Byte j holds elements 8j..8j+7 (element 8j+i in bit 7-i).
_MAGIC = 0x8040201008040201 - (1 << 64)   # as a signed int64
_LOW_BITS = 0x0101010101010101


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into ``ceil(N/8)`` uint8."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int64)
    return ((words * _MAGIC) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of ``packed`` as a uint8 tensor of 0/1 (inverse of :func:`pack_bits`)."""
    words = packed.to(torch.int64).mul_(_MAGIC).bitwise_right_shift_(7).bitwise_and_(_LOW_BITS)
    return words.view(torch.uint8)[:numel]


def nnmf_rank1(a: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> None:
    """Closed-form rank-1 factorization of a non-negative matrix, into ``row`` and ``col`` (in place)."""
    torch.sum(a, dim=1, out=row)
    torch.sum(a, dim=0, out=col)
    short = row if a.shape[0] < a.shape[1] else col
    total = short.sum()
    # a zero matrix stays (0, 0); otherwise normalize the shorter factor to sum 1
    short.div_(torch.where(total != 0, total, torch.ones_like(total)))


class SMMF(torch.optim.Optimizer):
    """Adam-style optimizer whose moments are rank-1 factorized square matricizations.

    ``lr`` 1e-3, ``beta`` 0.9 (``None``: no first moment), ``eps`` 1e-8, ``decay_rate`` -0.5
    (the authors recommend -0.5 for CNNs and -0.8 for Transformers), ``growth_rate`` 0.999,
    ``weight_decay`` 0 with ``weight_decay_mode`` "adamw" or "adam", ``vector_reshape`` True.
    """

    def __init__(self, params, lr: float = 1e-3, beta: float | None = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, decay_rate: float = -0.5, growth_rate: float = 0.999,
                 vector_reshape: bool = True, weight_decay_mode: str = "adamw"):
        if lr < 0:
            raise ConfigError(f"SMMF: lr={lr}; it must be >= 0.")
        if beta is not None and not 0.0 <= beta <= 1.0:
            raise ConfigError(f"SMMF: beta={beta}; use None (no first moment) or a value in [0, 1].")
        if eps < 0:
            raise ConfigError(f"SMMF: eps={eps}; it must be >= 0 (e.g. 1e-8).")
        if weight_decay < 0:
            raise ConfigError(f"SMMF: weight_decay={weight_decay}; it must be >= 0.")
        if not -1.0 <= decay_rate <= 0.0:
            raise ConfigError(f"SMMF: decay_rate={decay_rate}; it must be in [-1, 0] (β₂,t = 1 - t^decay_rate; "
                              "-0.5 for CNNs, -0.8 for Transformers).")
        if not 0.0 <= growth_rate <= 1.0:
            raise ConfigError(f"SMMF: growth_rate={growth_rate}; it must be in [0, 1] (β₁,t = β₁·growth^(t-1)).")
        if weight_decay_mode not in ("adamw", "adam"):
            raise ConfigError(f"SMMF: weight_decay_mode={weight_decay_mode!r}; use 'adamw' (decoupled) or 'adam' "
                              "(L2 added to the gradient).")
        defaults = dict(lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, decay_rate=decay_rate,
                        growth_rate=growth_rate, vector_reshape=vector_reshape, weight_decay_mode=weight_decay_mode)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, group, state) -> None:
        state["step"] = 0
        dense = p.dim() == 1 and not group["vector_reshape"]
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        if dense:
            if group["beta"] is not None:
                state["exp_avg"] = torch.zeros_like(p, dtype=dt)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt)
            return
        n, m = square_shape(p.numel())
        if group["beta"] is not None:
            state["m_row"] = p.new_zeros(n, dtype=dt)
            state["m_col"] = p.new_zeros(m, dtype=dt)
            state["m_sign"] = p.new_zeros((p.numel() + 7) // 8, dtype=torch.uint8)
        state["v_row"] = p.new_zeros(n, dtype=dt)
        state["v_col"] = p.new_zeros(m, dtype=dt)

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but state tensors keep their saved dtypes (torch
        casts every state tensor to its parameter's dtype, which would turn the packed signs into floats
        and the float32 factors of a bf16 parameter into bf16)."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in saved.get(pid, {}).items():
                if torch.is_tensor(v) and k in self.state[p]:
                    self.state[p][k] = v.to(device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, eps, lr, wd = group["beta"], group["eps"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError(f"SMMF: parameter of shape {tuple(p.shape)} has a sparse gradient; "
                                      "SMMF needs dense gradients.")
                state = self.state[p]
                with whole_parameter(p) as p:  # FSDP2 shard: the whole tensor (factored moments need it)
                    if not state:
                        self._init_state(p, group, state)
                    state["step"] += 1
                    t = state["step"]
                    dense = "v_row" not in state
                    work = torch.float64 if p.dtype == torch.float64 else torch.float32
                    grad = p.grad.to(work)
                    if wd != 0 and group["weight_decay_mode"] == "adam":
                        grad = grad.add(p.to(work), alpha=wd)
                    elif wd != 0:
                        p.mul_(1.0 - lr * wd)
                    beta2 = 1.0 - math.pow(t, group["decay_rate"])
                    if dense:
                        v = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                        if beta is not None:
                            beta1 = beta * group["growth_rate"] ** (t - 1)
                            num = state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
                        else:
                            num = grad
                        update = num / v.sqrt().add_(eps)
                    else:
                        shape = (state["v_row"].numel(), state["v_col"].numel())
                        g = grad.reshape(shape)
                        v = torch.outer(state["v_row"], state["v_col"])
                        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                        if beta is not None:
                            beta1 = beta * group["growth_rate"] ** (t - 1)
                            # M̂ = ±(r cᵀ): the stored bit is [M > 0]; ±1 = 2·bit − 1
                            sign = unpack_bits(state["m_sign"], g.numel()).view(shape).to(work).mul_(2).sub_(1)
                            m = torch.outer(state["m_row"], state["m_col"]).mul_(sign)
                            del sign
                            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                            state["m_sign"] = pack_bits(m > 0)
                            nnmf_rank1(m.abs(), state["m_row"], state["m_col"])
                            num = m
                        else:
                            num = g
                        nnmf_rank1(v, state["v_row"], state["v_col"])
                        update = (num / v.sqrt_().add_(eps)).view(p.shape)
                    p.add_(update.to(p.dtype), alpha=-lr)
        return loss
