"""Staggered subspace refresh (``stagger_refresh``): parameter ``i`` of ``n`` in a group refreshes its
projector at the steps ``t`` with ``(t − ⌊i·T/n⌋) mod T = 0``, after its first basis at step 0.

Oracle: the formula transcribed here, and a recorded refresh log (the projector's ``_refresh`` is
wrapped to note each step). Without the option the schedule is galore-torch's (every matrix at
``0, T, 2T, …``); the reference-package tests (tests/optim/test_reference_packages.py) check that
trajectory itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.optim import projectors


def _model(n: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(12, 12) for _ in range(n)])


def _refresh_log(optimizer_cls, n: int, gap: int, steps: int, **group) -> dict[int, list[int]]:
    """{parameter index: steps at which its basis was (re)computed}."""
    model = _model(n)
    mats = [m.weight for m in model]
    opt = optimizer_cls([{"params": [m.bias for m in model]},
                         {"params": mats, "rank": 2, "update_proj_gap": gap, **group}], lr=1e-3)
    log: dict[int, list[int]] = {i: [] for i in range(n)}
    index = {id(p): i for i, p in enumerate(mats)}
    originals = {}
    for cls in (projectors.SVDProjector, projectors.RandomizedSVDProjector):
        originals[cls] = cls._refresh

        def wrapped(self, grad, step, _orig=originals[cls]):
            log[self._owner].append(step)
            return _orig(self, grad, step)

        cls._refresh = wrapped
    try:
        orig_projector = opt.projector

        def projector(p, g, state):
            proj = orig_projector(p, g, state)
            proj._owner = index.get(id(p), -1)
            return proj

        opt.projector = projector
        x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
        for _ in range(steps):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        for cls, f in originals.items():
            cls._refresh = f
    return log, opt, mats


@pytest.mark.parametrize("n,gap", [(5, 4), (3, 6), (4, 4), (7, 3)])
def test_refresh_steps_follow_the_formula(n, gap):
    steps = 3 * gap + 2
    log, opt, mats = _refresh_log(rw.optim.GaLoreAdamW, n, gap, steps, stagger_refresh=True)
    for i in range(n):
        offset = i * gap // n
        want = sorted({0} | {t for t in range(steps) if (t - offset) % gap == 0})
        assert log[i] == want, (i, offset)
        assert opt.state[mats[i]]["proj_offset"] == offset
    per_step = [sum(t in log[i] for i in range(n)) for t in range(1, steps)]
    assert max(per_step) <= math.ceil(n / gap)  # after the first basis: at most ⌈n/T⌉ SVDs on one step
    assert sum(per_step) == sum(len(v) - 1 for v in log.values())


@pytest.mark.parametrize("option", [{}, {"stagger_refresh": False}, {"stagger_refresh": "auto"}])
def test_off_or_on_the_cpu_every_matrix_refreshes_on_the_same_steps(option):
    """False, and the default ("auto") on the CPU: galore-torch's schedule, every matrix on 0, T, 2T, …."""
    n, gap, steps = 4, 3, 8
    log, opt, mats = _refresh_log(rw.optim.GaLoreAdamW, n, gap, steps, **option)
    for i in range(n):
        assert log[i] == [t for t in range(steps) if t % gap == 0]
        assert opt.state[mats[i]]["proj_offset"] == 0
        assert opt.state[mats[i]]["proj_randomized"] is False  # auto projector: the exact SVD on the CPU


def test_randomized_projector_and_other_optimizers_stagger_too():
    log, _, _ = _refresh_log(rw.optim.Fira, 3, 3, 7, stagger_refresh=True, projector="randomized_svd")
    assert log == {0: [0, 3, 6], 1: [0, 1, 4], 2: [0, 2, 5]}


def test_offset_survives_a_state_dict_round_trip():
    """The offsets are state: a resumed optimizer refreshes on the same steps as the first one."""
    n, gap = 3, 4
    model = _model(n)
    opt = rw.optim.GaLoreAdamW([{"params": [m.weight for m in model], "rank": 2, "update_proj_gap": gap,
                                 "stagger_refresh": True}], lr=1e-3)
    x = torch.randn(4, 12)
    model(x).square().mean().backward()
    opt.step()
    sd = opt.state_dict()
    assert [sd["state"][i]["proj_offset"] for i in range(n)] == [0, 1, 2]
    again = rw.optim.GaLoreAdamW([{"params": [m.weight for m in model], "rank": 2, "update_proj_gap": gap,
                                   "stagger_refresh": True}], lr=1e-3)
    again.load_state_dict(sd)
    assert [again.state[m.weight]["proj_offset"] for m in model] == [0, 1, 2]


def test_stagger_option_is_checked():
    with pytest.raises(ConfigError, match="stagger_refresh=1"):
        rw.optim.GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, 3))], "rank": 1, "stagger_refresh": 1}])


# ---- the "auto" defaults on an accelerator (the device test is patched: CI has no GPU) -------------------
@pytest.fixture
def accelerator(monkeypatch):
    monkeypatch.setattr("rankwise.optim._common.on_accelerator", lambda t: True)


def test_on_an_accelerator_the_defaults_are_randomized_svd_and_staggered(accelerator):
    n, gap, steps = 4, 4, 9
    log, opt, mats = _refresh_log(rw.optim.GaLoreAdamW, n, gap, steps)
    for i in range(n):
        offset = i * gap // n
        assert log[i] == sorted({0} | {t for t in range(steps) if (t - offset) % gap == 0}), i
        state = opt.state[mats[i]]
        assert state["proj_offset"] == offset and state["proj_randomized"] is True
        assert isinstance(opt.projector(mats[i], opt.param_groups[1], state), projectors.RandomizedSVDProjector)
        assert "proj_seed" in state  # seeded per parameter: the same basis on every rank


def test_the_resolved_defaults_survive_a_move_to_the_cpu(monkeypatch):
    """A run started on an accelerator and resumed on the CPU keeps its randomized projector and offsets."""
    monkeypatch.setattr("rankwise.optim._common.on_accelerator", lambda t: True)
    model = _model(3)
    groups = [{"params": [m.weight for m in model], "rank": 2, "update_proj_gap": 3}]
    opt = rw.optim.GaLoreAdamW(groups, lr=1e-3)
    model(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    sd = opt.state_dict()
    monkeypatch.undo()
    again = rw.optim.GaLoreAdamW([{"params": [m.weight for m in model], "rank": 2, "update_proj_gap": 3}], lr=1e-3)
    again.load_state_dict(sd)
    for p in (m.weight for m in model):
        st = again.state[p]
        assert isinstance(again.projector(p, again.param_groups[0], st), projectors.RandomizedSVDProjector)
    assert [again.state[m.weight]["proj_offset"] for m in model] == [0, 1, 2]
    fresh = rw.optim.GaLoreAdamW([{"params": [model[0].weight], "rank": 2}], lr=1e-3)  # a new run on the CPU
    model(torch.randn(4, 12)).square().mean().backward()
    fresh.step()
    assert fresh.state[model[0].weight]["proj_randomized"] is False


def test_auto_on_an_accelerator_keeps_the_cheap_and_the_quantized_kinds(accelerator):
    """APOLLO's random projection (a cheap refresh) is not staggered; Q-GaLore's "auto" is its quantized SVD."""
    log_model = _model(3)
    apollo = rw.optim.APOLLO([{"params": [m.weight for m in log_model], "rank": 2, "update_proj_gap": 3}], lr=1e-3)
    other = _model(2)
    qg = rw.optim.QGaLoreAdamW([{"params": [m.weight for m in other], "rank": 2, "update_proj_gap": 3}], lr=1e-3)
    x = torch.randn(4, 12)
    for model, opt in ((log_model, apollo), (other, qg)):
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert [apollo.state[m.weight]["proj_offset"] for m in log_model] == [0, 0, 0]
    from rankwise.optim.qgalore import QuantizedSVDProjector

    for m in other:
        assert isinstance(qg.projector(m.weight, qg.param_groups[0], qg.state[m.weight]), QuantizedSVDProjector)


def test_layerwise_staggers_across_its_optimizers(accelerator):
    """rw.optim.layerwise gives each matrix its own optimizer; the offsets still spread over all of them."""
    model = _model(4)
    handle = rw.optim.layerwise(model, lambda g: rw.optim.GaLoreAdamW(g, lr=1e-3),
                                params=[{"params": [m.weight for m in model], "rank": 2, "update_proj_gap": 4},
                                        {"params": [m.bias for m in model]}])
    model(torch.randn(4, 12)).square().mean().backward()
    offsets = [handle.optimizers[f"{i}.weight"].state[model[i].weight]["proj_offset"] for i in range(4)]
    handle.remove()
    assert offsets == [0, 1, 2, 3]
