"""FourierFT: fine-tuning in the Fourier domain (Gao et al., 2024, arXiv:2405.03003, ICML 2024).

The update of ``W0 (out × in) = (m × n)`` is the real part of the inverse 2-D DFT of a sparse
spectrum ``F``, zero except ``K`` trainable coefficients ``c`` at fixed random entries
``(j_k, l_k)``::

    ΔW = α · Re(IDFT2(F)),   F[j_k, l_k] = c_k
    ΔW[p, q] = α/(m n) · Σ_k c_k cos(2π (p j_k / m + q l_k / n))

The entries are drawn once from ``random_loc_seed`` (``randperm(m·n)[:K]``, row ``j = i // n``,
column ``l = i % n``, as PEFT) and shared by all layers of the same shape, as in the paper;
they are not trained and not saved (rebuilt from the seed). ``c ~ N(0, 1)`` (``init='gaussian'``,
the paper's and PEFT's default; the adapter then changes the model from the start) or ``0``.
``K = min(n_frequency, m·n)`` per layer (clamped on small layers, where PEFT would refuse).

Activation view. For dense layers (linear, HF Conv1D, convolutions) the update is formed once per
forward with one ``m × n`` inverse FFT (``O(mn log mn)``, small against the ``N·m·n`` product of a
batch of ``N`` rows) and folded into the base weight, so the adapted layer is one product with
``W0 + ΔW`` (``computes_base``): 3 matmuls per training step where PEFT needs 5 (base forward and
input gradient, adapter forward, input gradient and weight gradient). The exact spectral path
``y = α/n · irfft_m(S(rfft_n(x)))`` (``S`` = the ``K`` gathered-and-scattered coefficients) costs two
FFTs and two ``N × K`` gathers per direction; measured on CPU at MiniLM's shapes (384×384, K=1000,
N=2048) it was slower than the one dense product, so dense layers do not use it. Embeddings do:
a token's column of ``ΔW`` needs only ``K`` phases ``exp(-2πi l_k q / n)`` and one length-``m``
inverse FFT, never the vocabulary-sized ``ΔW``.

Parameters per layer: ``K = min(n_frequency, m·n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import normal_
from ..core.registry import register
from ..errors import ConfigError
from ._structured_common import check_peft_shape, dense_forward, require_peft_kinds, wide_dtype


@dataclass
class FourierFTConfig(AdapterConfig):
    """n_frequency: K, trained spectral coefficients per layer (clamped to m·n); scaling: α;
    random_loc_seed: seed of the frequency entries (shared by all layers); init: 'gaussian' | 'zeros'."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init: str = "gaussian"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("n_frequency")
        self._check(isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling) and self.scaling != 0,
                    "scaling", "scaling must be a finite non-zero number (the paper uses 100-300).")
        self._check(isinstance(self.random_loc_seed, int) and not isinstance(self.random_loc_seed, bool)
                    and self.random_loc_seed >= 0, "random_loc_seed",
                    "random_loc_seed must be a non-negative integer (it fixes the frequency entries).")
        self._check(self.init in ("gaussian", "zeros"), "init", "use 'gaussian' (paper, PEFT) or 'zeros'.")


def entries(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``j`` and columns ``l`` of the ``k`` spectral entries of an ``m × n`` weight (PEFT's rule)."""
    idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[:k]
    return idx // n, idx % n


def half_spectrum_plan(src, a: int, dst, b: int):
    """How each entry maps the half spectrum (``rfft``) of a length-``a`` input to the half spectrum
    of a length-``b`` output, for ``out = irfft_b(H)`` with ``H[dh] += (wr·Re + i·wi·Im) c · Xh[sh]``.

    ``conj(X[s]) = conj(Xh[s])`` for ``s ≤ a/2`` and ``Xh[a-s]`` above; an output bin ``d > b/2`` is
    written conjugated at ``b-d``; interior bins carry half the weight (``irfft`` doubles them) and
    the DC/Nyquist bins keep only the real part."""
    sh = torch.where(src <= a // 2, src, a - src)
    dh = torch.where(dst <= b // 2, dst, b - dst)
    flip = (src <= a // 2) ^ (dst > b // 2)
    edge = (dst == 0) | ((b % 2 == 0) & (dst == b // 2))
    wr = torch.where(edge, 1.0, 0.5)
    wi = wr * torch.where(flip, -1.0, 1.0) * (~edge)
    return sh, dh, torch.stack([wr, wi], dim=-1)


@register("fourierft")
class FourierFT(Method):
    """Sparse spectral update ``α·Re(IDFT2(F))`` (see module docstring)."""

    Config = FourierFTConfig
    summary = "ΔW = α·Re(IDFT2(F)), F sparse: K trained coefficients at fixed random frequencies (Gao et al. 2024)"
    identity_at_init = False  # c ~ N(0, 1) as in the paper; init='zeros' starts at ΔW = 0
    default_lr = 2e-2  # measured on MiniLM (one-batch memorization): as fast as LoRA at 3e-3, stable
    demo_options = {"n_frequency": 1000, "scaling": 150.0}

    def __init__(self, view: LayerView, config: FourierFTConfig, generator=None, calibration=None):
        super().__init__(view, config)
        m, n = view.out_features, view.in_features
        self.n_frequency = k = min(config.n_frequency, m * n)
        self.scaling = float(config.scaling)
        self.spectrum = nn.Parameter(torch.zeros(k, **view.factory_kwargs))
        if config.init == "gaussian":
            normal_(self.spectrum, 1.0, generator)
        # entries drawn on the CPU from the seed (PEFT's rule: the same entries on every device), then moved
        rows, cols = (t.to(view.weight.device) for t in entries(m, n, k, config.random_loc_seed))
        self.register_buffer("indices", torch.stack([rows, cols]), persistent=False)
        self.computes_base = view.kind != "embedding"
        if view.kind == "embedding":
            sh, dh, w = half_spectrum_plan(cols, n, rows, m)
            self.register_buffer("_src", sh, persistent=False)
            self.register_buffer("_dst", dh, persistent=False)
            self.register_buffer("_w", w, persistent=False)

    @classmethod
    def num_params(cls, view: LayerView, config: FourierFTConfig) -> int:
        return min(config.n_frequency, view.out_features * view.in_features)

    def _delta2d(self) -> torch.Tensor:
        m, n = self.view.out_features, self.view.in_features
        c = self.spectrum
        dense = torch.zeros(m, n, dtype=wide_dtype(c), device=c.device)
        dense = dense.index_put((self.indices[0], self.indices[1]), c.to(dense.dtype))
        return (torch.fft.ifft2(dense).real * self.scaling).to(c.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        if self.view.kind == "embedding":
            return self._embedding(x, base_out)
        return dense_forward(self.view, x, base_out, self._delta2d())

    def _embedding(self, ids: torch.Tensor, base_out) -> torch.Tensor:
        """Columns ``q`` of ΔW from ``K`` phases per token and one inverse FFT over ``m``."""
        m, n = self.view.out_features, self.view.in_features
        c = self.spectrum
        dt = wide_dtype(c)
        q = ids.reshape(-1)
        # Xh[sh] of a one-hot input: exp(-2πi·sh·q/n); the product is reduced mod n in integers (exact)
        theta = ((self._src[:, None] * q[None, :]) % n).to(dt) * (2 * math.pi / n)  # K × N
        xg = torch.stack([torch.cos(theta), -torch.sin(theta)], dim=-1)  # K × N × 2
        coef = (self._w.to(dt) * c.to(dt)[:, None]).unsqueeze(1)  # K × 1 × 2
        h = torch.zeros(m // 2 + 1, q.numel(), 2, dtype=dt, device=c.device).index_add(0, self._dst, xg * coef)
        y = torch.fft.irfft(torch.view_as_complex(h), n=m, dim=0).t() * (self.scaling / n)  # N × m
        y = y.reshape(*ids.shape, m)
        if base_out is None:
            base_out = self.view.functional(ids, self.view.weight2d())
        return base_out + y.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self._delta2d())

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "FOURIERFT"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "FOURIERFT"

    @classmethod
    def to_peft_config(cls, config: FourierFTConfig, views: list[LayerView]) -> dict:
        require_peft_kinds("fourierft", "FourierFT", views, ("linear", "hf_conv1d"))
        clamped = {v.name: v.out_features * v.in_features for v in views
                   if v.out_features * v.in_features < config.n_frequency}
        return {
            "peft_type": "FOURIERFT",
            "n_frequency": config.n_frequency,
            "n_frequency_pattern": clamped,
            "scaling": float(config.scaling),
            "random_loc_seed": config.random_loc_seed,
            "fan_in_fan_out": any(v.kind == "hf_conv1d" for v in views),
            "init_weights": config.init == "zeros",
            "bias": "none",
        }

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError("PEFT FourierFT adapter trains biases (bias != 'none'); rankwise's fourierft "
                              "leaves biases frozen.")
        if pcfg.get("random_loc_seed") is None:
            raise ConfigError("PEFT FourierFT adapter has random_loc_seed=None, so its frequency entries cannot "
                              "be rebuilt; re-export it with an integer seed.")
        # n_frequency_pattern: per-module counts are checked against the clamped K when tensors load
        return {"n_frequency": int(pcfg["n_frequency"]), "scaling": float(pcfg["scaling"]),
                "random_loc_seed": int(pcfg["random_loc_seed"]),
                "init": "zeros" if pcfg.get("init_weights") else "gaussian"}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"fourierft_spectrum": self.spectrum}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["fourierft_spectrum"]
        check_peft_shape(self.view, "fourierft_spectrum", t, self.spectrum,
                         f"n_frequency {self.n_frequency}")
        with torch.no_grad():
            self.spectrum.copy_(t)

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("fourierft_spectrum",)
