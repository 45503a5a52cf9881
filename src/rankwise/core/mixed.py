"""Many adapters in one batch: each row of a batch names its adapter, or ``None`` for the base model.

::

    with rw.mixed_batch(model, ["a", "b", None, "a"]):
        out = model(**inputs)                        # row i runs adapter_names[i]
        ids = model.generate(**inputs, num_beams=4)  # generate() too: greedy, sampling, beam search

Inside the block every :class:`~rankwise.core.adapted.AdaptedLayer` of ``model`` hands its forward
to :meth:`MixedBatch.layer_forward`, which ignores the layers' ``active`` lists and computes::

    out = base(x)                                         # once, for every row
    for each group of low-rank adapters of equal rank r:  # LoRA, EVA, PiSSA & co, NoLA, LoRA-SB, LoRA-XS
        rows = rows whose adapter is in the group;  j(row) = the row's adapter within the group
        out[rows] += ((x[rows] A_jᵀ) (s_j B_j)ᵀ)        # two torch.bmm over per-row gathered factors
    for every other adapter a (DoRA and the W0-reading methods, structured and shared-basis methods):
        out[rows_a] = a.forward(x[rows_a], out[rows_a])  # the method's own activation view, its rows only

The low-rank groups follow Punica's BGMV (Chen et al. 2023, arXiv:2310.18547) and S-LoRA
(Sheng et al. 2023, arXiv:2311.03285): each row gathers its own ``A`` (``r × in``) and ``B``
(``out × r``) and one batched matmul serves all adapters of the group. Deviations: no custom kernel
(``torch.bmm`` on the gathered factors, which costs one copy of ``r·(in+out)`` numbers per row), and
no padding to the largest rank: adapters of different ranks form separate groups, each its own pair
of ``bmm``. A group with one adapter is a plain matmul on its rows (no gather). ``s`` is folded into
the stacked ``B``. No merged copy of any weight is made.

Which adapters take the batched path: the factors are read with ``adapter.mixed_factors()`` where a
method defines it (returns ``(A, B, s)`` with ``ΔW = s·B A`` in the canonical ``(out, in)`` layout and an
activation view exactly ``base_out + s·B(A x)``), else from :data:`LOW_RANK_FORWARDS` — methods whose
``forward`` is *that exact function* (a subclass that overrides ``forward`` falls back to its own
path); only on linear kinds (``nn.Linear``, HF ``Conv1D``) and not while dropout is live (training with
``dropout > 0``). Every other method runs its own ``forward`` on its rows: exact for any method whose
output row depends only on that row's input and base output, which every registered method's does
(``tests/core/test_mixed.py`` checks each against per-adapter runs).

Rows and ``generate()``: a module that sees ``k·n`` rows for ``n`` names maps row ``i`` to name
``i // k``, which is how Hugging Face's ``generate`` expands a batch for ``num_beams`` and
``num_return_sequences`` (``repeat_interleave``); beam reordering stays inside a prompt's ``k`` rows.
A batch size that is no multiple of ``n`` is an error naming the module. ``modules_to_save`` heads
(:class:`~rankwise.core.adapted.TrainedCopies`) run each adapter's copy on its rows, the original on
the rest.

Under ``torch.no_grad()`` the stacked factors and row indices are built once per block (per layer and
batch size) and reused by every forward in it (``generate``'s steps); with gradients on they are rebuilt
each forward, so gradients reach every adapter. Merged adapters are refused (their ΔW is in ``W0`` for
every row): ``rw.unmerge(model)`` first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import AdapterNotFoundError, ConfigError, ShapeMismatchError, close_names
from .adapted import AdaptedLayer, TrainedCopies


# ---- which methods are batched low-rank updates -------------------------------------------------
def _low_rank_forwards() -> dict[Callable, Callable]:
    """``{Method.forward function: adapter -> (A, B, s)}`` for methods whose activation view is exactly
    ``low_rank_apply(view, x, base_out, A, B, s, dropout, training)``."""
    from ..methods._init_common import ResidualLowRank
    from ..methods.lora import Lora
    from ..methods.lora_sb import LoraSb
    from ..methods.lora_xs import LoraXS
    from ..methods.nola import Nola

    return {
        Lora.forward: lambda m: (m.lora_A, m.lora_B, m.scale),
        ResidualLowRank.forward: lambda m: (*m.factors(), m.scale),
        Nola.forward: lambda m: (*m.factors(), m.scale),
        LoraSb.forward: lambda m: (m.lora_A, m.lora_B @ m.lora_R, m.scale),
        LoraXS.forward: lambda m: (m.svt, m.u @ m.lora_R, m.scale),
    }


LOW_RANK_FORWARDS: dict[Callable, Callable] = {}

#: Methods that cannot run in a mixed batch, with the reason (none of the registered ones so far).
UNMIXABLE: dict[str, str] = {}


def low_rank_factors(adapter: nn.Module) -> Callable | None:
    """The function giving ``(A, B, s)`` of ``adapter`` for the batched path, or ``None`` (own path)."""
    own = getattr(adapter, "mixed_factors", None)
    if callable(own):
        return lambda m: m.mixed_factors()
    if not LOW_RANK_FORWARDS:
        LOW_RANK_FORWARDS.update(_low_rank_forwards())
    return LOW_RANK_FORWARDS.get(type(adapter).forward)


def _dropping(adapter: nn.Module) -> bool:
    return adapter.training and float(getattr(getattr(adapter, "config", None), "dropout", 0.0) or 0.0) > 0


# ---- one layer's plan ------------------------------------------------------------------------------
class _LowRankGroup:
    """Adapters of one rank on one layer: rows, each row's index into the stacks, and the stacks."""

    def __init__(self, adapters: list[nn.Module], fns: list[Callable], rows: torch.Tensor | None,
                 slot: torch.Tensor | None):
        self.adapters, self.fns, self.rows, self.slot = adapters, fns, rows, slot
        self._stacks = None

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` stacked ``(G, r, in)`` and ``s·B`` stacked ``(G, out, r)`` (cached without grad)."""
        if self._stacks is not None and not torch.is_grad_enabled():
            return self._stacks
        a_list, b_list = [], []
        for ad, fn in zip(self.adapters, self.fns):
            a, b, s = fn(ad)
            a_list.append(a)
            b_list.append(b * s if s != 1.0 else b)
        st = (torch.stack(a_list), torch.stack(b_list))
        if not torch.is_grad_enabled():
            self._stacks = st
        return st

    def apply(self, x: torch.Tensor, out: torch.Tensor, inplace: bool) -> torch.Tensor:
        a, b = self.stacks()
        xs = x if self.rows is None else x.index_select(0, self.rows)
        n, n_in, n_out = xs.shape[0], a.shape[2], b.shape[1]
        x3 = xs.reshape(n, -1, n_in)
        if x3.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x3 = x3.to(a.dtype)
        if (a.shape[0] == 1 and self.rows is None and inplace and out.is_contiguous()
                and x3.dtype == b.dtype == out.dtype):  # one adapter on every row: add into out in place
            out.view(-1, n_out).addmm_(torch.mm(x3.reshape(-1, n_in), a[0].t()), b[0].t())
            return out
        if a.shape[0] == 1:  # one adapter: a plain low-rank product on its rows
            d = torch.matmul(torch.matmul(x3, a[0].t()), b[0].t())
        else:
            d = torch.bmm(torch.bmm(x3, a[self.slot].transpose(1, 2)), b[self.slot].transpose(1, 2))
        d = d.reshape(*xs.shape[:-1], n_out).to(out.dtype)
        if self.rows is None:
            return out.add_(d) if inplace else out + d
        return out.index_add_(0, self.rows, d) if inplace else out.index_add(0, self.rows, d)


class _LayerPlan:
    def __init__(self, groups: list[_LowRankGroup], own: list[tuple[nn.Module, torch.Tensor]]):
        self.groups, self.own = groups, own


# ---- the context --------------------------------------------------------------------------------------
class MixedBatch:
    """The state of one ``with mixed_batch(model, names):`` block (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter_names: Sequence[str | None]):
        from .api import adapted_layers, adapter_state, trained_copies

        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ConfigError(f"mixed_batch takes one adapter name (or None) per row as a list; got "
                              f"{type(adapter_names).__name__} {adapter_names!r}. Pass e.g. ['a', None, 'b'].")
        names = list(adapter_names)
        if not names:
            raise ConfigError("mixed_batch got an empty list of adapter names; pass one name (or None) per row.")
        state = adapter_state(model)
        for n in names:
            if n is not None and not isinstance(n, str):
                raise ConfigError(f"mixed_batch: adapter names are strings or None; got {type(n).__name__} {n!r}.")
            if n is not None and n not in state:
                raise AdapterNotFoundError(f"mixed_batch: model has no adapter '{n}'; it has "
                                           f"{sorted(state) or 'none'}." + close_names(n, state))
        self.layers = [layer for _, layer in adapted_layers(model)]
        self.heads = [tc for _, tc in trained_copies(model)]
        merged = [(name, layer.merged) for name, layer in adapted_layers(model) if layer.merged]
        if merged:
            raise ConfigError(f"mixed_batch: module '{merged[0][0]}' has adapter(s) {merged[0][1]} merged into its "
                              "base weight, which would act on every row. Call rw.unmerge(model) first.")
        busy = [m for m in (*self.layers, *self.heads) if m._mixed is not None]
        if busy:
            raise ConfigError("mixed_batch: this model is already inside a mixed_batch block (blocks do not nest, "
                              "and one model serves one mixed batch at a time).")
        self.names = names
        self.adapters = [n for n in dict.fromkeys(names) if n is not None]
        for n in self.adapters:
            method = state[n]["config"].method
            if method in UNMIXABLE:
                raise ConfigError(f"mixed_batch: adapter '{n}' uses method '{method}', which cannot share a batch "
                                  f"with other adapters: {UNMIXABLE[method]}. Run it alone (rw.set_active).")
        index = {n: i for i, n in enumerate(self.adapters)}
        self._slot = torch.tensor([index[n] if n is not None else -1 for n in names], dtype=torch.long)
        self._rows: dict = {}
        self._plans: dict = {}

    # ---- rows ----------------------------------------------------------------------------------------
    def rows(self, batch: int, device: torch.device, where: str) -> dict[str | None, torch.Tensor]:
        """``{adapter or None: row indices}`` for a module that sees ``batch`` rows."""
        key = (batch, device)
        found = self._rows.get(key)
        if found is not None:
            return found
        n = len(self.names)
        if batch % n:
            raise ShapeMismatchError(
                f"module '{where}': mixed_batch was given {n} adapter names but the module sees a batch of {batch} "
                f"rows, which is no multiple of {n}. Pass one adapter name per row of the batch (generate()'s beams "
                "and num_return_sequences multiply the rows; that is handled).")
        slot = self._slot.repeat_interleave(batch // n).to(device)
        found = {a: (slot == i).nonzero().squeeze(1) for i, a in enumerate(self.adapters)}
        found[None] = (slot < 0).nonzero().squeeze(1)
        self._rows[key] = found
        return found

    def _plan(self, layer: AdaptedLayer, batch: int, device: torch.device) -> _LayerPlan:
        key = (id(layer), batch, device)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        rows = self.rows(batch, device, layer.view.name)
        by_rank: dict = {}
        own = []
        for name in self.adapters:
            if name not in layer.adapters or rows[name].numel() == 0:
                continue
            ad = layer.adapters[name]
            fn = low_rank_factors(ad) if layer.view.is_linear and not _dropping(ad) else None
            if fn is None:
                own.append((ad, rows[name]))
                continue
            a, b, _ = fn(ad)
            by_rank.setdefault((a.shape[0], a.dtype, b.dtype), []).append((name, ad, fn))
        groups = []
        for members in by_rank.values():
            counts = [rows[name].numel() for name, _, _ in members]
            if sum(counts) == batch:  # the group holds every row: no gather of x, slots in row order
                slot = torch.empty(batch, dtype=torch.long, device=device)
                for j, (name, _, _) in enumerate(members):
                    slot[rows[name]] = j
                grp_rows = None
            else:
                grp_rows = torch.cat([rows[name] for name, _, _ in members])
                slot = torch.repeat_interleave(torch.arange(len(members), device=device),
                                               torch.tensor(counts, device=device))
            groups.append(_LowRankGroup([ad for _, ad, _ in members], [fn for _, _, fn in members], grp_rows,
                                        slot if len(members) > 1 else None))
        plan = _LayerPlan(groups, own)
        self._plans[key] = plan
        return plan

    # ---- forwards (called by AdaptedLayer / TrainedCopies while the block is open) --------------------
    def layer_forward(self, layer: AdaptedLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = layer.base(x, *args, **kwargs)
        if x.dim() == 0:
            raise ShapeMismatchError(f"module '{layer.view.name}': mixed_batch needs inputs with a batch dimension.")
        plan = self._plan(layer, x.shape[0], x.device)
        if not plan.groups and not plan.own:
            return out
        inplace = not torch.is_grad_enabled()
        for group in plan.groups:
            out = group.apply(x, out, inplace)
        for ad, rows in plan.own:
            y = ad(x.index_select(0, rows), out.index_select(0, rows))
            out = out.index_copy_(0, rows, y.to(out.dtype)) if inplace else out.index_copy(0, rows, y.to(out.dtype))
        return out

    def copies_forward(self, head: TrainedCopies, *args, **kwargs):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or any(isinstance(a, torch.Tensor) for a in args[1:]):
            raise ShapeMismatchError(
                f"mixed_batch: a modules_to_save copy ({type(head.original).__name__}) is called with "
                f"{len(args)} positional argument(s); mixed batches route one batched tensor input per call.")
        rows = self.rows(x.shape[0], x.device, type(head.original).__name__)
        parts = [(head.copies[a], rows[a]) for a in self.adapters if a in head.copies and rows[a].numel()]
        if not parts:
            return head.original(*args, **kwargs)
        done = torch.cat([r for _, r in parts])
        if done.numel() < x.shape[0]:
            rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            rest[done] = False
            parts.append((head.original, rest.nonzero().squeeze(1)))
        if len(parts) == 1:
            return parts[0][0](*args, **kwargs)
        result = None
        for module, r in parts:
            y = module(x.index_select(0, r), *args[1:], **kwargs)
            if result is None:
                result = y.new_empty((x.shape[0], *y.shape[1:]))
            result = result.index_copy(0, r, y)
        return result

    # ---- enter / leave ------------------------------------------------------------------------------
    def _attach(self) -> None:
        for m in (*self.layers, *self.heads):
            m._mixed = self

    def _detach(self) -> None:
        for m in (*self.layers, *self.heads):
            m._mixed = None


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]):
    """Run ``model`` with adapter ``adapter_names[i]`` on row ``i`` of the batch (``None``: the base model).

    Validates everything first (names exist, nothing merged, not nested); the layers' ``active`` lists
    and trainable flags are not touched, so the model is as before when the block ends (also after an
    exception). See the module docstring for how rows are computed and mapped under ``generate()``.
    """
    ctx = MixedBatch(model, adapter_names)
    ctx._attach()
    try:
        yield ctx
    finally:
        ctx._detach()
