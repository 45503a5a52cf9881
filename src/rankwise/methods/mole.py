r"""MoLE: one mixture-of-low-rank-experts layer (routers of MoLE, X-LoRA, MixLoRA, HydraLoRA, SMoRA, MoLA).

``E`` low-rank experts ``ΔW_e = s · B_e A_e`` (``A_e ∈ R^{r×in}``, ``B_e ∈ R^{out×r}``, ``s = α/r``) on one
frozen layer, mixed by routing weights ``g(x) ∈ Δ^{E-1}``::

    y = W0 x + b + s · Σ_e g_e(x) · B_e A_e x

Stored as one LoRA of rank ``E·r`` (``experts_A = [A_1; …; A_E] ∈ R^{Er×in}``, ``experts_B = [B_1 … B_E] ∈
R^{out×Er}``) whose ``Er`` channels are gated per token: ``h = A x``, ``y = W0 x + b + s · B (c(x) ⊙ h)``
with ``c = g ⊗ 1_r`` — two thin matmuls, so the forward costs what a LoRA with the same parameters
costs plus the router's ``E × in`` product. Routers (``router=``):

* ``"layer"`` (default) — MoLE's per-layer learnable gates (Wu et al. 2024, "Mixture of LoRA Experts",
  arXiv:2404.13628): ``g = softmax(w / τ)`` with ``w ∈ R^E`` learned per layer, the same for every
  token. The update does not depend on the input, so it has a weight view
  ``ΔW = s · Σ_e g_e B_e A_e``, merges and collapses to a plain LoRA (``rankwise.compose.collapse``).
  *Deviation:* MoLE's gate reads the experts' normalized outputs per token; the layer-wise gate keeps
  MoLE's hierarchical (per-layer) control with a mergeable update; per-token gates are ``"token"``.
* ``"token"`` — per-token dense routing from the layer's input, ``g(x) = softmax(W_r x / τ)``
  (``W_r ∈ R^{E×in}``): X-LoRA's per-token, per-layer expert scalings (Buehler & Buehler 2024), computed
  in the one forward pass from each layer's own input instead of a second pass over the whole model.
* ``"topk"`` — MixLoRA's sparse routing (Li et al. 2024, arXiv:2404.15159; Mixtral's router): the
  ``k`` largest of ``softmax(W_r x / τ)`` renormalized to sum to 1, the others 0.
  *Deviation:* every expert's channels are computed and the unselected ones are zeroed (the same output
  as a sparse dispatch; at the small ``E`` of LoRA experts one dense ``Er``-wide product is faster on
  CPU and GPU than gathering tokens per expert).

Options covering the other mixtures:

* ``shared_a=True`` — HydraLoRA (Tian et al. 2024, arXiv:2404.19245): one ``A ∈ R^{r×in}`` shared by all
  experts, ``E`` heads ``B_e``; ``y = W0 x + b + s · Σ_e g_e B_e (A x)`` (``experts_A`` is ``r × in``).
* ``rank=1, experts=R, router="topk"`` — SMoRA (Zhao et al. 2025, "Each Rank Could be an Expert",
  arXiv:2501.15103): each rank of a rank-``R`` LoRA is an expert and a token activates ``k`` of them.
  *Deviation:* balanced with the load-balance loss below, not SMoRA's loss-free bias update.
* ``expert_schedule=[2, 4, 6, 8]`` — MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts",
  arXiv:2402.08562): the targeted modules are grouped by depth (the first integer in the module name,
  ``…layer.3.…`` → 3) into ``len(schedule)`` contiguous groups of near-equal size, and group ``i`` gets
  ``schedule[i]`` experts (a per-module override, saved with the adapter). ``module_overrides=
  {"…": {"experts": n}}`` sets any other count per module.

Masking (MoLE's inference mode): ``expert_mask`` (a bool buffer) switches experts off; the routing
weights of the others are renormalized — for the softmax routers that is the softmax over the unmasked
logits, ``g'_e = g_e / Σ_{j kept} g_j`` (``rankwise.compose.mask_experts``).

Load balance (``balance=α > 0``, added to the loss by the ``rank_regularization`` hook that
``rankwise.train`` calls): per layer over the ``N`` tokens of the last forward,

* ``"topk"`` / ``"token"`` — the Switch Transformer / MixLoRA loss (Fedus et al. 2021, eq. 4):
  ``L = E · Σ_e f_e P_e`` with ``P_e = (1/N) Σ_x p_e(x)`` the mean router probability and
  ``f_e = (1/(N k)) Σ_x 1[e ∈ topk(x)]`` the fraction of the ``N k`` assignments given to ``e`` (``k = 1``,
  the arg-max, for ``"token"``); ``L = 1`` when balanced. (Mixtral / MixLoRA's code counts ``f`` per
  token, giving ``k`` times this value.)
* ``"layer"`` — MoLE's gating-balance loss ``L = −Σ_e log g_e`` (minimal at uniform gates).

The hook returns ``α`` times the mean of ``L`` over the layers.

Observability: every forward adds to per-layer routing statistics (tokens, mean router probabilities,
selections, entropy) that ``rankwise.analysis.routing`` turns into a table.

Parameters per layer: ``E·r·(in + out)`` (``r·in + E·r·out`` with ``shared_a``), plus ``E·in`` for the
``"token"``/``"topk"`` routers or ``E`` for ``"layer"``; with ``train_experts=False`` (MoLE over trained
LoRAs, ``rankwise.compose.mixture``) the experts are frozen buffers and only the router trains.
Init: each expert as LoRA (``A`` uniform ``±1/√in``, ``B = 0``: the layer starts as the base), layer
gates ``w = 0`` (uniform), router rows uniform ``±1/√in`` (PyTorch's Linear default, as MixLoRA's gate).
Layer kinds: ``nn.Linear`` and Hugging Face ``Conv1D``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, low_rank_apply, uniform_
from ..core.registry import register
from ..errors import ConfigError

ROUTERS = ("layer", "token", "topk")


@dataclass
class MoleConfig(RankAlphaConfig):
    """rank: r of each expert; alpha: α (s = α/r); experts: E; router: 'layer' | 'token' | 'topk';
    top_k: k of 'topk'; temperature: τ of the softmax; shared_a: one A for all experts (HydraLoRA);
    balance: α of the load-balance loss (0: none; MixLoRA uses 0.01); expert_schedule: MoLA's expert
    counts by depth group; train_experts: False freezes the experts (MoLE over trained LoRAs);
    expert_names: names of the experts (set by ``rankwise.compose.mixture``)."""

    experts: int = 4
    router: str = "layer"
    top_k: int = 2
    temperature: float = 1.0
    shared_a: bool = False
    balance: float = 0.0
    expert_schedule: list[int] | None = None
    train_experts: bool = True
    expert_names: list[str] | None = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self._check_int("experts")
        self._check(self.router in ROUTERS, "router", f"use one of {ROUTERS}.")
        self._check_int("top_k")
        if self.router == "topk":
            self._check(self.top_k <= self.experts, "top_k",
                        f"top_k={self.top_k} is more than the {self.experts} experts; use top_k ≤ experts.")
        self._check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
                    and 0 < self.temperature < math.inf, "temperature", "use a positive, finite number.")
        self._check(isinstance(self.balance, (int, float)) and not isinstance(self.balance, bool)
                    and 0 <= self.balance < math.inf, "balance", "use a number ≥ 0 (0 turns the loss off).")
        self._check(isinstance(self.shared_a, bool), "shared_a", "use True or False.")
        self._check(isinstance(self.train_experts, bool), "train_experts", "use True or False.")
        if self.expert_schedule is not None:
            if isinstance(self.expert_schedule, tuple):
                self.expert_schedule = list(self.expert_schedule)
            ok = (isinstance(self.expert_schedule, list) and self.expert_schedule
                  and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.expert_schedule))
            self._check(bool(ok), "expert_schedule", "give a non-empty list of expert counts ≥ 1, e.g. [2, 4, 6, 8].")
            if self.router == "topk":
                self._check(min(self.expert_schedule) >= self.top_k, "expert_schedule",
                            f"every group needs at least top_k={self.top_k} experts.")
        if self.expert_names is not None:
            if isinstance(self.expert_names, tuple):
                self.expert_names = list(self.expert_names)
            self._check(isinstance(self.expert_names, list) and len(self.expert_names) == self.experts
                        and all(isinstance(n, str) for n in self.expert_names), "expert_names",
                        f"give one name per expert ({self.experts}).")


def depth_of(name: str) -> int:
    """The first integer component of a module name (``encoder.layer.3.attention.q`` → 3); 0 if none."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else 0


def schedule_groups(names: list[str], schedule: list[int]) -> dict[str, int]:
    """MoLA: expert count per module — distinct depths split in ``len(schedule)`` contiguous groups."""
    depths = sorted({depth_of(n) for n in names})
    g = len(schedule)
    group = {d: min(g - 1, i * g // len(depths)) for i, d in enumerate(depths)}
    return {n: schedule[group[depth_of(n)]] for n in names}


@register("mole")
class Mole(Method):
    """A mixture of ``E`` low-rank experts with a router (see the module docstring)."""

    Config = MoleConfig
    summary = ("mixture of LoRA experts: per-layer gates (MoLE), per-token or top-k routing (X-LoRA, MixLoRA), "
               "shared A (HydraLoRA), rank experts (SMoRA), experts per layer (MoLA)")
    kinds = ("linear", "hf_conv1d")
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: MoleConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        if config.router == "topk" and config.top_k > config.experts:
            raise ConfigError(f"module '{view.name}': mole top_k={config.top_k} is more than its {config.experts} "
                              "experts; lower top_k or give the module more experts.")
        self.rank, self.scale, self.n_experts = config.rank, config.scale, config.experts
        self.router, self.temperature = config.router, float(config.temperature)
        e, r, n_in, n_out = config.experts, config.rank, view.in_features, view.out_features
        kw = view.factory_kwargs
        a = torch.empty(r if config.shared_a else e * r, n_in, **kw)
        uniform_(a, kaiming_bound(n_in), generator)
        b = torch.zeros(n_out, e * r, **kw)
        if config.train_experts:
            self.experts_A, self.experts_B = nn.Parameter(a), nn.Parameter(b)
        else:
            self.register_buffer("experts_A", a)
            self.register_buffer("experts_B", b)
        if config.router == "layer":
            self.gate_logits = nn.Parameter(torch.zeros(e, **kw))
        else:
            self.router_weight = nn.Parameter(uniform_(torch.empty(e, n_in, **kw), kaiming_bound(n_in), generator))
        self.register_buffer("expert_mask", torch.ones(e, dtype=torch.bool, device=kw["device"]))
        self._aux = None
        self.track_routing = True
        self.reset_routing_stats()

    @classmethod
    def num_params(cls, view: LayerView, config: MoleConfig) -> int:
        e, r = config.experts, config.rank
        experts = (r * view.in_features if config.shared_a else e * r * view.in_features) + e * r * view.out_features
        router = e if config.router == "layer" else e * view.in_features
        return router + (experts if config.train_experts else 0)

    @classmethod
    def plan(cls, views, config: MoleConfig, calibration, generator=None) -> dict:
        """MoLA: per-module expert counts from ``expert_schedule`` (none without one)."""
        if not config.expert_schedule:
            return {}
        counts = schedule_groups(list(views), config.expert_schedule)
        return {n: {"experts": k} for n, k in counts.items() if k != config.experts}

    # ---- routing -------------------------------------------------------------------------------
    @property
    def n_active(self) -> int:
        """Unmasked experts; cached on the mask's version counter (no device sync per forward)."""
        try:
            version = self.expert_mask._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter
            return int(self.expert_mask.sum())
        if getattr(self, "_active_cache", (None,))[0] != (version, self.expert_mask.data_ptr()):
            self._active_cache = ((version, self.expert_mask.data_ptr()), int(self.expert_mask.sum()))
        return self._active_cache[1]

    @property
    def top_k(self) -> int:
        """``k`` in effect: the config's for ``"topk"`` (at most the unmasked experts), else all."""
        return min(self.config.top_k, self.n_active) if self.router == "topk" else self.n_active

    def gates(self) -> torch.Tensor:
        """``"layer"`` router: ``g = softmax(w/τ)`` over the unmasked experts (masked ones 0)."""
        logits = self.gate_logits.to(torch.promote_types(self.gate_logits.dtype, torch.float32)) / self.temperature
        return torch.softmax(logits.masked_fill(~self.expert_mask, -math.inf), dim=-1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token ``(weights, probs, selected)``, each ``(…, E)``: the mixing weights ``g(x)``, the
        router's softmax probabilities and the 0/1 mask of the experts that count as chosen."""
        if self.router == "layer":
            g = self.gates()
            g = g.expand(*x.shape[:-1], g.shape[0])
            return g, g, g
        w = self.router_weight
        logits = F.linear(x.to(w.dtype), w)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature
        probs = torch.softmax(logits.masked_fill(~self.expert_mask, -math.inf), dim=-1)
        k = self.top_k
        if self.router == "token":
            top1 = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
            return probs, probs, top1
        if k >= self.n_active:  # k = every expert: the dense routing, exactly
            return probs, probs, (probs > 0).to(probs.dtype)
        vals, idx = probs.topk(k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
        return weights, probs, torch.zeros_like(probs).scatter(-1, idx, 1.0)

    def constant_weights(self) -> torch.Tensor | None:
        """The routing weights ``g ∈ R^E`` if they do not depend on the input (``"layer"``, or a router
        whose weight is exactly zero and which keeps every unmasked expert), else ``None``."""
        if self.router == "layer":
            return self.gates()
        if bool((self.router_weight == 0).all()) and self.top_k >= self.n_active:
            m = self.expert_mask.float()
            return m / m.sum()
        return None

    # ---- the two views -------------------------------------------------------------------------
    def _channels(self, g: torch.Tensor) -> torch.Tensor:
        """Per-expert weights → per-channel weights of ``experts_B`` (``g ⊗ 1_r``)."""
        return g.repeat_interleave(self.rank, dim=-1)

    def _folded(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B')`` with ``ΔW = s · B' A`` for constant weights ``g``."""
        a, b = self.experts_A, self.experts_B
        if self.config.shared_a:
            bg = b.view(b.shape[0], self.n_experts, self.rank) * g.to(b.dtype)[None, :, None]
            return a, bg.sum(1)
        return a, b * self._channels(g).to(b.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.router == "layer":  # one weight vector for every token: a LoRA with the gates folded into B
            g = self.gates()
            self._observe_layer(g, x.numel() // max(1, x.shape[-1]))
            a, b = self._folded(g)
            return low_rank_apply(self.view, x, base_out, a, b, self.scale, self.config.dropout, self.training)
        weights, probs, selected = self.route(x)
        self._observe(probs, selected, weights)
        shared = self.config.shared_a

        def mid(h):
            w = weights.to(h.dtype)
            if shared:
                return (w.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (…, E·r): head e gets g_e · A x
            return h * self._channels(w)

        return low_rank_apply(self.view, x, base_out, self.experts_A, self.experts_B, self.scale,
                              self.config.dropout, self.training, mid=mid)

    def delta_weight(self) -> torch.Tensor:
        g = self.constant_weights()
        if g is None:
            raise ConfigError(
                f"module '{self.view.name}': this mole adapter routes per token (router='{self.router}'), so its "
                "update depends on the input and has no single ΔW: it cannot be merged, exported or combined. "
                "Keep it unmerged, or use router='layer' for a mergeable mixture.")
        a, b = self._folded(g)
        return self.view.to_param((b @ a) * self.scale)

    # ---- load balance and observability --------------------------------------------------------
    def _observe(self, probs: torch.Tensor, selected: torch.Tensor | None, weights: torch.Tensor | None) -> None:
        """Keep the load-balance term of this forward (training with ``balance > 0``) and add to the
        routing statistics. ``selected`` / ``weights`` default to ``probs`` (the ``"layer"`` router)."""
        e = probs.shape[-1]
        if self.training and torch.is_grad_enabled() and self.config.balance > 0:
            f = selected.reshape(-1, e).mean(0)
            self._aux = self.n_active * ((f / f.sum()) * probs.reshape(-1, e).mean(0)).sum()
        if not self.track_routing:
            return
        with torch.no_grad():
            p = probs.detach().reshape(-1, e).float()
            sel = p if selected is None else selected.detach().reshape(-1, e).float()
            w = p if weights is None else weights.detach().reshape(-1, e).float()
            st = self._stats
            st["tokens"] += p.shape[0]
            for key, t in (("prob", p), ("selected", sel), ("weight", w)):
                st[key] = st[key].to(p.device) + t.sum(0)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            st["entropy"] = st["entropy"].to(p.device) + ent.sum()

    def _observe_layer(self, g: torch.Tensor, tokens: int) -> None:
        """The ``"layer"`` router: MoLE's balance term ``−Σ_kept log g_e``; statistics of ``tokens``
        tokens that all get ``g`` (without forming a per-token copy)."""
        if self.training and torch.is_grad_enabled() and self.config.balance > 0:
            self._aux = -torch.log(g[self.expert_mask]).sum()
        if not self.track_routing:
            return
        with torch.no_grad():
            p = g.detach().float()
            st = self._stats
            st["tokens"] += tokens
            for key in ("prob", "selected", "weight"):
                st[key] = st[key].to(p.device) + tokens * p
            st["entropy"] = st["entropy"].to(p.device) - tokens * (p * torch.log(p.clamp_min(1e-30))).sum()

    def reset_routing_stats(self) -> None:
        """Start the routing statistics afresh (``rankwise.analysis.routing`` reads them)."""
        e = self.config.experts
        self._stats = {"tokens": 0, "prob": torch.zeros(e), "selected": torch.zeros(e), "weight": torch.zeros(e),
                       "entropy": torch.zeros(())}

    def routing_stats(self) -> dict:
        """Tokens seen, and per expert the mean router probability, the fraction of routing
        assignments (load) and the mean mixing weight; the mean per-token entropy of the router."""
        st, n = self._stats, max(1, self._stats["tokens"])
        sel = st["selected"].cpu()
        return {"tokens": st["tokens"], "prob": (st["prob"] / n).cpu(),
                "load": sel / sel.sum().clamp_min(1e-30), "weight": (st["weight"] / n).cpu(),
                "entropy": float(st["entropy"]) / n}

    @classmethod
    def rank_regularization(cls, model: nn.Module, name: str) -> torch.Tensor | None:
        """Loss-term hook (``rw.rank_regularization``; ``rankwise.train`` adds it): ``balance`` times the
        mean over layers of the load-balance loss of the last forward (see the module docstring)."""
        from ..core.api import adapted_layers

        terms, coef = [], 0.0
        for _, layer in adapted_layers(model):
            ad = layer.adapters[name] if name in layer.adapters else None
            if ad is None or ad._aux is None or name not in layer.active:
                continue
            terms.append(ad._aux)
            coef = ad.config.balance
            ad._aux = None
        if not terms:
            return None
        return coef * torch.stack([t.float() for t in terms]).mean()
