"""Router observability for mixtures of low-rank experts (method ``"mole"``): per layer, how evenly the
router spreads the tokens and how sure it is.

    table = rw.analysis.routing.routing_table(model, batches)   # runs the batches, then reads the counters
    print(table)                                                # one row per (module, mixture adapter)

Every ``"mole"`` layer counts, on each forward, the tokens it routed, the sum of its router
probabilities ``p(x)`` and of the 0/1 choices (``methods/mole.py``). Per layer, over the ``N`` tokens:

* ``entropy`` — the mean routing entropy ``(1/N) Σ_x H(p(x))``, ``H(p) = −Σ_e p_e log p_e`` (nats);
  ``norm_entropy = entropy / log E`` (1: uniform routing, 0: every token sure of one expert);
* ``load`` — each expert's share of the routing assignments, ``f_e = n_e / Σ_j n_j`` (top-k: ``n_e`` =
  tokens that chose ``e``; ``"token"``: tokens whose arg-max is ``e``; ``"layer"``: the gate ``g_e``);
* ``imbalance = E · max_e f_e`` — 1 when every expert gets the same share, ``E`` when one gets all
  (the quantity the Switch load-balance loss pushes down).

A layer's ``entropy`` and ``load`` describe different things: a router can be unsure for every token
(high entropy) yet send all of them to one expert (high imbalance), or be sure for every token and
balanced.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.api import adapted_layers
from ..utils.table import format_table

__all__ = ["RoutingTable", "routing_table"]


class RoutingTable(list):
    """Rows (dicts), one per (module, mixture adapter); prints as a table, ``markdown()`` for reports."""

    columns = ("module", "adapter", "router", "experts", "tokens", "entropy", "norm_entropy", "imbalance", "load")

    def _rows(self):
        return [[r[c] if c != "load" else " ".join(f"{v:.2f}" for v in r[c]) for c in self.columns] for r in self]

    def __str__(self) -> str:
        return format_table(self._rows(), self.columns)

    def markdown(self) -> str:
        return format_table(self._rows(), self.columns, markdown=True)


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def mixture_modules(model: nn.Module, name: str | None = None):
    """``(module name, adapter name, Mole adapter)`` of every mixture layer (of adapter ``name`` only)."""
    from ..methods.mole import Mole

    for mname, layer in adapted_layers(model):
        for aname, ad in layer.adapters.items():
            if isinstance(ad, Mole) and (name is None or aname == name):
                yield mname, aname, ad


def routing_table(model: nn.Module, batches=None, name: str | None = None, progress: bool = False) -> RoutingTable:
    """Routing entropy and expert load of every mixture layer (see the module docstring).

    With ``batches`` (model inputs: tensors, dicts of keyword arguments or tuples), the counters are
    reset and the batches run through the model in eval mode without gradients (the model's mode is
    restored); without, the counters since the last reset are read (training forwards count too).
    ``name`` restricts the table to one mixture adapter. A model without mixtures gives an empty table.
    """
    from tqdm.auto import tqdm

    mods = list(mixture_modules(model, name))
    if batches is not None and mods:
        for _, _, ad in mods:
            ad.reset_routing_stats()
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in tqdm(batches, disable=not progress, desc="routing"):
                    _run(model, batch)
        finally:
            model.train(was)
    table = RoutingTable()
    for mname, aname, ad in mods:
        st = ad.routing_stats()
        active = int(ad.expert_mask.sum())
        load = st["load"] if ad.router != "layer" else st["weight"]
        load = load / load.sum().clamp_min(1e-30)
        table.append({
            "module": mname, "adapter": aname, "router": ad.router, "experts": ad.n_experts,
            "tokens": int(st["tokens"]), "entropy": float(st["entropy"]),
            "norm_entropy": float(st["entropy"]) / math.log(active) if active > 1 else 0.0,
            "imbalance": float(active * load.max()) if st["tokens"] else float("nan"),
            "load": [float(v) for v in load],
        })
    return table
