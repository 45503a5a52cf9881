"""Pieces shared by the rank-allocation methods adalora, dylora, increlora and aflora.

* :func:`adapters_of` — every (adapter name, module name, adapter) of one method on a model;
* :class:`Sensitivity` — AdaLoRA's smoothed importance of every entry of a tensor (Zhang et al.
  2023, eq. 8-10): ``I = |θ ⊙ ∇θ|``, ``Ī ← β₁ Ī + (1-β₁) I``, ``Ū ← β₂ Ū + (1-β₂) |I - Ī|``, score
  ``Ī ⊙ Ū``;
* :func:`resize_` — cut or grow a parameter along one dimension *in place* (the Parameter object
  stays the same, so optimizers keep referring to it) and cut or zero-pad every optimizer state
  tensor of the parameter's old shape (Adam's ``exp_avg``, ``exp_avg_sq``) the same way; scalar
  state (Adam's ``step``) is kept;
* :func:`record_rank` — write a module's new rank into the adapter's per-module overrides (which
  ``rw.save`` stores and ``rw.load`` rebuilds) and into the adapter's config;
* :func:`cubic` — the cubic schedule of AdaLoRA's budget, 1 → 0 between ``tinit`` and
  ``total - tfinal``;
* :class:`Triplets` — the SVD-form update ``ΔW = s · B diag(E) A`` of AdaLoRA and IncreLoRA
  (parameters, both views, the parameter count and the per-entry importance of ``A, E, B``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.api import adapted_layers, adapter_state
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, normal_
from ..errors import AdapterNotFoundError, ConfigError


def adapters_of(model: nn.Module, method: str, name: str | None = None) -> list[tuple[str, str, nn.Module]]:
    """(adapter name, module name, adapter) for every ``method`` adapter (or adapter ``name``) of ``model``."""
    state = adapter_state(model)
    if name is not None and name not in state:
        raise AdapterNotFoundError(f"model has no adapter '{name}'; it has {sorted(state) or 'none'}.")
    if name is not None and state[name]["config"].method != method:
        raise ConfigError(f"adapter '{name}' is a {state[name]['config'].method} adapter, not {method}.")
    names = [n for n, e in state.items() if e["config"].method == method] if name is None else [name]
    out = []
    for lname, layer in adapted_layers(model):
        for n in names:
            if n in layer.adapters:
                out.append((n, lname, layer.adapters[n]))
    return out


class Sensitivity:
    """Smoothed sensitivity ``Ī`` and uncertainty ``Ū`` of one tensor's entries (AdaLoRA eq. 8-10)."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.ipt = self.unc = None

    @torch.no_grad()
    def update(self, p: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        grad = p.grad if grad is None else grad
        if grad is None:
            return
        ipt = (p * grad).abs()
        if self.ipt is None or self.ipt.shape != p.shape:
            self.ipt, self.unc = torch.zeros_like(p), torch.zeros_like(p)
        self.ipt = self.beta1 * self.ipt + (1 - self.beta1) * ipt
        self.unc = self.beta2 * self.unc + (1 - self.beta2) * (ipt - self.ipt).abs()

    def score(self, like: torch.Tensor) -> torch.Tensor:
        """``Ī ⊙ Ū`` (zeros before the first update)."""
        if self.ipt is None:
            return torch.zeros_like(like)
        return self.ipt * self.unc

    def resize(self, dim: int, keep: torch.Tensor | None = None, extra: int = 0) -> None:
        """Follow a parameter's resize: keep indices ``keep`` along ``dim`` and/or append ``extra`` zeros."""
        if self.ipt is None:
            return
        self.ipt, self.unc = (_cut_pad(t, dim, keep, extra) for t in (self.ipt, self.unc))


def _cut_pad(t: torch.Tensor, dim: int, keep: torch.Tensor | None, extra: int, fill: torch.Tensor | None = None):
    if keep is not None:
        t = t.index_select(dim, keep.to(t.device))
    if extra:
        shape = list(t.shape)
        shape[dim] = extra
        pad = torch.zeros(shape, dtype=t.dtype, device=t.device) if fill is None else fill.to(t)
        t = torch.cat([t, pad], dim=dim)
    return t.contiguous()


@torch.no_grad()
def resize_(p: nn.Parameter, dim: int, optimizers=(), keep: torch.Tensor | None = None,
            new: torch.Tensor | None = None) -> None:
    """Keep the slices ``keep`` of ``p`` along ``dim`` and/or append ``new`` (already shaped), in place.

    The optimizer state of ``p`` follows: every state tensor of ``p``'s old shape is cut the same
    way and padded with zeros for the appended slices (fresh first and second moments), so one
    Adam step after the resize is exactly the step of a parameter whose moments for the new
    slices start at zero (it shares the parameter's ``step`` count, hence its bias correction).
    ``p.grad`` is dropped (its shape no longer fits).
    """
    old = p.shape
    extra = 0 if new is None else new.shape[dim]
    data = _cut_pad(p.data, dim, keep, extra, new)
    p.grad = None
    # A graph still referenced from the last step (the loop's ``loss``) keeps p's gradient
    # accumulator alive, and autograd reuses it with the OLD shape ("invalid gradient … expected
    # shape compatible with …" on the next backward). ``.data =`` drops the accumulator only on a
    # dtype or device change, so pass through another dtype first.
    p.data = torch.empty(0, dtype=torch.float64 if data.dtype != torch.float64 else torch.float32, device=data.device)
    p.data = data
    for opt in optimizers:
        state = opt.state.get(p)
        if not state:
            continue
        for k, v in list(state.items()):
            if torch.is_tensor(v) and v.shape == old:
                state[k] = _cut_pad(v, dim, keep, extra)


def record_rank(model: nn.Module, adapter_name: str, module_name: str, adapter: nn.Module, **values) -> None:
    """Write ``values`` (e.g. ``layer_rank=5``) into the per-module overrides of ``adapter_name``
    (saved by ``rw.save``, rebuilt by ``rw.load``) and into the adapter's own config."""
    entry = adapter_state(model)[adapter_name]
    overrides = entry.setdefault("overrides", {})
    overrides[module_name] = {**(overrides.get(module_name) or {}), **values}
    adapter.config = adapter.config.replace(**values)


def cubic(step: int, tinit: int, tfinal: int, total: int) -> float:
    """1 up to ``tinit``, ``(1 - (step - tinit)/(total - tfinal - tinit))³`` in between, 0 from ``total - tfinal``."""
    if step <= tinit:
        return 1.0
    if step >= total - tfinal:
        return 0.0
    return (1 - (step - tinit) / (total - tfinal - tinit)) ** 3


def layer_rank_check(cfg) -> None:
    """Validate an optional ``layer_rank`` field (a module's current rank, written by rank allocation)."""
    if cfg.layer_rank is not None:
        cfg._check_int("layer_rank", low=0)


class Triplets(Method):
    """``ΔW = s · B diag(E) A``: ``A`` (r × in), ``E`` (r × 1), ``B`` (out × r), with ``r`` the
    config's ``layer_rank`` (a module's current rank, written by allocation) or else ``rank``.

    ``A, B ~ N(0, std²)`` and ``E = 0`` (the update starts at exactly zero). Activation view:
    ``base_out + s · (B ⊙ Eᵀ)(A x)``, LoRA's cost. ``s`` is :attr:`scale` (the config's by default).
    Parameters per layer: ``r (in + out + 1)``.
    """

    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d")
    default_lr = 3e-3

    def _init_triplets(self, std: float, generator=None) -> None:
        view, config = self.view, self.config
        r = config.rank if config.layer_rank is None else config.layer_rank
        self.lora_A = nn.Parameter(normal_(torch.empty(r, view.in_features, **view.factory_kwargs), std, generator))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **view.factory_kwargs))
        self.lora_B = nn.Parameter(normal_(torch.empty(view.out_features, r, **view.factory_kwargs), std, generator))

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.config.scale

    @classmethod
    def num_params(cls, view: LayerView, config) -> int:
        r = config.rank if config.layer_rank is None else config.layer_rank
        return r * (view.in_features + view.out_features + 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return base_out
        return low_rank_apply(self.view, x, base_out, self.lora_A, self.lora_B * self.lora_E.view(1, -1),
                              self.scale, self.config.dropout, self.training)

    def delta2d(self) -> torch.Tensor:
        """``ΔW`` in the canonical ``(out, in)`` layout."""
        return ((self.lora_B * self.lora_E.view(1, -1)) @ self.lora_A) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self.delta2d())

    @classmethod
    def rank_regularization(cls, model: nn.Module, name: str) -> torch.Tensor | None:
        """``w · mean over every A and B of ‖A Aᵀ - I‖_F, ‖Bᵀ B - I‖_F`` (``w = orth_reg_weight``)."""
        cfg = adapter_state(model)[name]["config"]
        found = adapters_of(model, cls.name, name)
        if cfg.orth_reg_weight == 0 or not any(ad.lora_A.requires_grad for _, _, ad in found):
            return None
        terms = []
        for _, _, ad in found:
            for cov in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):
                terms.append(torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro"))
        return cfg.orth_reg_weight * (torch.stack(terms).sum() / len(terms))
