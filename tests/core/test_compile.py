"""Adapted models under ``torch.compile``, for every registered method (issue 18).

Oracle: the same model run eagerly. Two identical adapted models (same seed, same perturbed
adapter tensors) train side by side for three SGD steps, one through
``torch.compile(model, backend="aot_eager")`` and one eagerly; the compiled one must give the
eager one's outputs and the gradient of every trainable parameter at every step, and end with the
same parameters, buffers and Python-side adapter state (step counters, importance scores).

The settings are the ones where a compiled model could silently differ from the eager one:

- a training event (``rw.rank_step``: rank allocation, schedules) between steps, which may change
  Python-side state the compiled graph was traced with;
- an in-place change of the frozen base weights before the last step (what ``rw.merge`` and
  weight loading do): a method that caches quantities of ``W0`` (DoRA's ``‖W0‖²``) must see it.

``aot_eager`` runs Dynamo's capture and AOTAutograd's joint forward/backward graph without
Inductor's code generation, which keeps the file fast on CPU while exercising what breaks adapters
(tracing, graph breaks, functionalized buffer mutation, custom autograd functions). Graph breaks
are allowed (several methods compare data pointers for their caches, which Dynamo runs eagerly);
an error is not. Measured: the whole file runs in about 40 s on one thread.
"""

from __future__ import annotations

import pytest
import torch
from test_method import _calibration, _config, _perturb  # the registry-wide tests' own builders
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = RTOL = 1e-5  # float32; aot_eager runs the same aten ops, so in practice the match is exact
STEPS = 3
LR = 1e-4  # small: some methods scale their update by 100+ (RandLoRA, FourierFT), and the steps must stay finite
TOTAL_STEPS = 100  # the run length rank schedules are told: long enough for every default schedule


def _build(method: str, **kw):
    """A two-layer MLP with both linear layers adapted, warm-ups finished, adapter tensors perturbed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    rw.adapt(model, _config(method, model[0], targets=["0", "2"], **kw), seed=0, **_calibration(method, x))
    for layer in (model[0], model[2]):
        for ad in layer.adapters.values():
            ad.finish_warmup()  # a ramp-up (SingLoRA) would hide the update
    _perturb([p for p in model.parameters() if p.requires_grad], 1, std=0.1)
    return model.train(), x


def _side_state(model: nn.Module) -> dict:
    """Tensors and numbers an adapter keeps as plain attributes (scores, counters, sampled ranks)."""
    out = {}
    for lname in ("0", "2"):
        for aname, ad in model.get_submodule(lname).adapters.items():
            for k, v in vars(ad).items():
                if isinstance(v, (torch.Tensor, int, float)):
                    out[f"{lname}.{aname}.{k}"] = torch.as_tensor(v).detach().double()
    return out


def _close(got, want, what: str, atol: float = ATOL):
    torch.testing.assert_close(got, want, atol=atol, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _train_side_by_side(method: str, steps: int, total_steps: int, **kw) -> tuple[nn.Module, nn.Module]:
    """Train an eager and a compiled copy for ``steps`` SGD steps with ``rw.rank_step`` after each,
    scaling the frozen base weights in place before the last step; compare every step. Returns
    ``(eager, compiled's module)`` at the end."""
    torch._dynamo.reset()  # no graphs or recompile counts carried over from another method
    (eager, x), (model, _) = _build(method, **kw), _build(method, **kw)
    compiled = torch.compile(model, backend="aot_eager")
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=LR)
    opt_c = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(steps):
        if step == steps - 1:  # the frozen base changes in place: caches of W0 must follow
            with torch.no_grad():
                for pe, pc in zip(eager.parameters(), model.parameters()):
                    if not pe.requires_grad:
                        pe.mul_(1.25)
                        pc.mul_(1.25)
        want = eager(x)
        got = compiled(x)
        assert torch.isfinite(want).all(), f"{method}: eager output not finite at step {step}"
        _close(got, want, f"{method} output, step {step}")
        want.square().mean().backward()
        got.square().mean().backward()
        grads_e, grads_c = dict(eager.named_parameters()), dict(model.named_parameters())
        assert grads_e.keys() == grads_c.keys()
        trained = [n for n, p in grads_e.items() if p.requires_grad]
        assert trained, f"{method}: nothing to train at step {step}"
        for n in trained:
            ge, gc = grads_e[n].grad, grads_c[n].grad
            assert (ge is None) == (gc is None), f"{method} {n}: gradient present in one run only (step {step})"
            if ge is not None:
                _close(gc, ge, f"{method} grad {n}, step {step}")
        for opt, m in ((opt_e, eager), (opt_c, model)):
            opt.step()
            opt.zero_grad()
            rw.rank_step(m, step + 1, opt, total_steps=total_steps)
    sd_e, sd_c = eager.state_dict(), model.state_dict()
    assert sd_e.keys() == sd_c.keys()
    for k in sd_e:
        _close(sd_c[k], sd_e[k], f"{method} state {k}")
    side_e, side_c = _side_state(eager), _side_state(model)
    assert side_e.keys() == side_c.keys()
    for k in side_e:
        _close(side_c[k], side_e[k], f"{method} attribute {k}", atol=1e-12)  # scores can be ~1e-5 small
    for (n, pe), pc in zip(eager.named_parameters(), model.parameters()):
        assert pe.requires_grad == pc.requires_grad, f"{method} {n}: frozen in one run only"
    return eager, model


@pytest.mark.parametrize("method", rw.methods())
def test_compiled_training_equals_eager(method):
    """Every method, its default config: outputs, gradients and final state equal eager's."""
    _train_side_by_side(method, STEPS, TOTAL_STEPS)


def _structure(model: nn.Module) -> list:
    """What a training event changes: parameter shapes and trainability, buffer values, attributes."""
    params = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    buffers = [(n, b.detach().clone()) for n, b in model.named_buffers()]
    return [params, buffers, _side_state(model)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("method,kw", [
    ("adalora", dict(rank=4, target_rank=2, tinit=1, tfinal=1, delta_t=1)),  # prunes triplets
    ("increlora", dict(rank=1, target_rank=3, delta_t=1, grow_per_step=1)),  # grows ranks: new shapes
    ("aflora", dict(rank=2, tinit=1, tfinal=1, delta_t=1)),  # freezes matrices
    ("dylora", dict(rank=4)),  # samples a new training rank every step
])
def test_compiled_training_through_rank_events(method, kw):
    """Short schedules, so that ``rw.rank_step`` really changes ranks, shapes or trainability
    between compiled steps (the compiled model must recompile or guard, never reuse a stale graph)."""
    steps = 4
    before = _structure(_build(method, **kw)[0])
    eager, _ = _train_side_by_side(method, steps, steps, **kw)
    assert not _same(_structure(eager), before), f"{method}: no training event happened; the test is vacuous"
