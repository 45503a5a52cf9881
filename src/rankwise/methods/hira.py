"""HiRA: Hadamard high-rank adaptation (Huang et al., 2025, ICLR 2025, "HiRA: Parameter-Efficient
Hadamard High-Rank Adaptation for Large Language Models"; PEFT's ``hira``).

The update is the frozen weight modulated entrywise by a low-rank matrix::

    ΔW = W0 ⊙ (B A),    A ∈ R^{r×in},  B ∈ R^{out×r}     (W = W0 ⊙ (1 + B A))

``rank(W0 ⊙ BA) ≤ rank(W0)·r``, so the update is high-rank while training ``r(in + out)`` numbers.
Init as PEFT: ``A ~ U(±1/√in)`` (``init='kaiming'``) or ``N(0, 1/r²)`` (``'gaussian'``), ``B = 0``
(embeddings: ``A = 0``, ``B ~ N(0, 1)``), so ``ΔW = 0`` at init.

Activation view: ``(W0 ⊙ BA) x = Σ_k b_k ⊙ (W0 (a_k ⊙ x))`` would cost ``r`` products with ``W0``;
forming ``W0 ⊙ BA`` costs ``m·n·r`` once per forward, less than one batch product. So dense layers
form ``W0 + W0 ⊙ BA`` and run one product with it (``computes_base``): 3 matmul-sized products per
training step where PEFT runs 5 (base forward and input gradient plus its own forward, input
gradient and weight gradient). With dropout (training), the adapter's input differs from the
base's, and the layer is ``op(x, W0) + op(drop(x), W0 ⊙ BA)`` as in PEFT. Embeddings never form the
vocabulary-sized matrix: a token ``q`` gets ``W0[:, q] ⊙ (B A[:, q])``.

Parameters per layer: ``r · (in + out)`` (``in = in_channels·k`` for convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, normal_, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._structured_common import check_peft_shape, dense_forward, no_patterns, require_plain_conv


@dataclass
class HiraConfig(AdapterConfig):
    """rank: r of the modulation B A; dropout: on the adapter's input; init: 'kaiming' | 'gaussian'."""

    rank: int = 8
    dropout: float = 0.0
    init: str = "kaiming"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")
        self._check(self.init in ("kaiming", "gaussian"), "init", "use 'kaiming' or 'gaussian'.")


@register("hira")
class Hira(Method):
    """Hadamard update ``W0 ⊙ (B A)`` (see module docstring)."""

    Config = HiraConfig
    summary = "ΔW = W0 ⊙ (BA): low-rank BA modulates W0 entrywise, a high-rank update (Huang et al. 2025)"
    reads_base = True
    computes_base = True
    default_lr = 1e-2  # measured on MiniLM (one-batch memorization): 3e-3 slow
    demo_options = {"rank": 8}

    def __init__(self, view: LayerView, config: HiraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "hira")
        self.rank = r = config.rank
        self.hira_A = nn.Parameter(torch.zeros(r, view.in_features, **view.factory_kwargs))
        self.hira_B = nn.Parameter(torch.zeros(view.out_features, r, **view.factory_kwargs))
        if view.kind == "embedding":
            normal_(self.hira_B, 1.0, generator)
        elif config.init == "gaussian":
            normal_(self.hira_A, 1.0 / r, generator)
        else:
            uniform_(self.hira_A, kaiming_bound(view.in_features), generator)

    @classmethod
    def num_params(cls, view: LayerView, config: HiraConfig) -> int:
        return config.rank * (view.in_features + view.out_features)

    def _delta2d(self) -> torch.Tensor:
        return self.view.weight2d().to(self.hira_A.dtype) * (self.hira_B @ self.hira_A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        view, a, b = self.view, self.hira_A, self.hira_B
        if view.kind == "embedding":
            e0 = view.functional(x, view.weight2d())  # W0[:, q]: a lookup, no bias
            mod = F.embedding(x, a.t()) @ b.t()  # (B A)[:, q]
            return (e0 if base_out is None else base_out) + (e0.to(mod.dtype) * mod).to(e0.dtype)
        if x.is_floating_point() and x.dtype != a.dtype:
            x = x.to(a.dtype)
        x_adapter = None
        if self.config.dropout and self.training:
            x_adapter = F.dropout(x, self.config.dropout, training=True)
        if base_out is None and x_adapter is None:
            w0 = view.weight2d()
            return view.functional(x, torch.addcmul(w0, w0, b @ a))  # W0 ⊙ (1 + BA) in one pass
        return dense_forward(view, x, base_out, self._delta2d(), x_adapter)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self._delta2d())

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "HIRA"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "HIRA"

    @classmethod
    def to_peft_config(cls, config: HiraConfig, views: list[LayerView]) -> dict:
        require_plain_conv("hira", "HiRA", views)
        return {"peft_type": "HIRA", "r": config.rank, "hira_dropout": config.dropout,
                "fan_in_fan_out": any(v.kind == "hf_conv1d" for v in views),
                "init_weights": True if config.init == "kaiming" else "gaussian", "rank_pattern": {}}

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        no_patterns(pcfg, ("rank_pattern",), "hira")
        init = pcfg.get("init_weights", True)
        if isinstance(init, str) and init.lower() == "gaussian":
            init = "gaussian"
        elif init in (True, False):
            init = "kaiming"
        else:
            raise ConfigError(f"PEFT HiRA adapter has init_weights={init!r}; rankwise's hira knows True and 'gaussian'.")
        return {"rank": int(pcfg["r"]), "dropout": float(pcfg.get("hira_dropout") or 0.0), "init": init}

    def _peft_names(self) -> tuple[str, str]:
        return ("hira_embedding_A", "hira_embedding_B") if self.view.kind == "embedding" else ("hira_A", "hira_B")

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, v = self.hira_A, self.hira_B, self.view
        na, nb = self._peft_names()
        if v.kind in ("conv1d", "conv2d"):
            k = v.weight.shape[2:]
            return {na: a.reshape(a.shape[0], -1, *k), nb: b.reshape(*b.shape, *([1] * len(k)))}
        return {na: a, nb: b}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = self.peft_tensors()
        for key, exp in expected.items():
            if key not in tensors:
                raise ConfigError(f"module '{self.view.name}' ({self.view.kind}): the PEFT HiRA file has "
                                  f"{sorted(tensors)}, expected {sorted(expected)}.")
            check_peft_shape(self.view, key, tensors[key], exp, f"rank {self.rank}")
        with torch.no_grad():
            for key, param in zip(self._peft_names(), (self.hira_A, self.hira_B)):
                param.copy_(tensors[key].reshape(param.shape))

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")

