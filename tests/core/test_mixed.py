"""``rw.mixed_batch``: each row of a batch runs its own adapter (or the base model).

Oracle everywhere: the same model run one row at a time with ``rw.set_active(model, name)`` (``None``:
every adapter off) — the ordinary single-adapter path, which the registry-wide tests tie to the dense
weight view. The mixed batch must equal it row by row, for every registered method, DoRA, base rows,
``modules_to_save`` heads, gradients and ``generate()`` (greedy, sampling, beam search).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import mixed
from rankwise.core.adapted import AdaptedLayer
from rankwise.errors import AdapterNotFoundError, ConfigError, ShapeMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 2e-5


class Net(nn.Module):
    """Two linear layers (8 → 12 → 6): every method adapts both, so rows pass two mixed layers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _config(method: str, rank: int, **kw):
    cls = rw.get_method(method)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if "rank" in fields:
        kw["rank"] = rank
    return cls.Config(targets=["fc1", "fc2"], **kw)


def _adapt(model, method, name, rank, seed, x):
    cal = ({"calibration": [x, x], "loss_fn": lambda m, b: m(b).square().mean()}
           if rw.get_method(method).calibration_needs else {})
    rw.adapt(model, _config(method, rank), name=name, seed=seed, **cal)


def _finish(model, perturb, seed=7):
    model.eval()
    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            for ad in m.adapters.values():
                ad.finish_warmup()
    params = [p for m in model.modules() if isinstance(m, AdaptedLayer) for p in m.adapters.parameters()]
    perturb(params, seed, std=0.3)


def _per_row(model, x, names):
    """The oracle: row i alone, with only adapter names[i] active (None: none)."""
    rows = []
    with torch.no_grad():
        for i, n in enumerate(names):
            rw.set_active(model, n)
            rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


NAMES = ["a", None, "b", "c", "a", "c", None, "b"]


@pytest.mark.parametrize("method", rw.methods())
def test_every_method_mixed_equals_per_adapter_runs(method, perturb):
    """Three adapters of one method (ranks 2, 2, 4 where the method has a rank) and base rows."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(len(NAMES), 3, 8)
    for name, rank, seed in (("a", 2, 1), ("b", 2, 2), ("c", 4, 3)):
        _adapt(model, method, name, rank, seed, x)
    _finish(model, perturb)
    if method in mixed.UNMIXABLE:  # pragma: no cover - none is, today
        with pytest.raises(ConfigError, match=method):
            with rw.mixed_batch(model, NAMES):
                pass
        return
    expected = _per_row(model, x, NAMES)
    rw.set_active(model, None)
    with torch.no_grad(), rw.mixed_batch(model, NAMES):
        got = model(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    # rows differ between adapters (the test would pass trivially otherwise)
    assert (expected[0] - expected[2]).abs().max() > 1e-3 and (expected[0] - expected[1]).abs().max() > 1e-3


def test_low_rank_adapters_grouped_by_rank_without_padding(perturb):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(len(NAMES), 3, 8)
    for name, rank, seed in (("a", 2, 1), ("b", 2, 2), ("c", 3, 3)):
        _adapt(model, "lora", name, rank, seed, x)
    rw.adapt(model, rw.get_method("dora").Config(rank=2, targets=["fc1", "fc2"]), name="d", seed=4)
    _finish(model, perturb)
    names = [*NAMES, "d"]
    x = torch.randn(len(names), 3, 8)
    with torch.no_grad(), rw.mixed_batch(model, names) as ctx:
        got = model(x)
        plan = ctx._plan(model.fc1, len(names), x.device)
    stacks = sorted(tuple(g.stacks()[0].shape) for g in plan.groups)
    assert stacks == [(1, 3, 8), (2, 2, 8)]  # {a, b} share one rank-2 bmm; c alone at its own rank 3
    assert [type(ad).__name__ for ad, _ in plan.own] == ["Dora"]  # DoRA runs its own forward on its rows
    torch.testing.assert_close(got, _per_row(model, x, names), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "hira"])
@pytest.mark.parametrize("kind", ["conv2d", "embedding", "hf_conv1d"])
def test_other_layer_kinds(method, kind, perturb):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if kind == "conv2d":
        layer, x = nn.Conv2d(3, 5, 3, padding=1), torch.randn(4, 3, 6, 6)
    elif kind == "embedding":
        layer, x = nn.Embedding(20, 6), torch.randint(0, 20, (4, 5))
    else:
        layer, x = Conv1D(7, 5), torch.randn(4, 3, 5)
        nn.init.normal_(layer.weight, 0, 0.3)
    if kind not in rw.get_method(method).kinds:
        pytest.skip(f"{method} does not adapt {kind}")
    model = nn.Sequential(layer)
    for name, rank, seed in (("a", 2, 1), ("b", 2, 2)):
        rw.adapt(model, method, name=name, rank=rank, targets=["0"], seed=seed)
    _finish(model, perturb)
    names = ["b", None, "a", "b"]
    expected = _per_row(model, x, names)
    with torch.no_grad(), rw.mixed_batch(model, names):
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=1e-5)


def test_modules_to_save_heads_and_gradients(bert, perturb):
    """A BERT classifier whose adapters each train their own head; gradients equal the per-row sums."""
    model = bert()
    for name, method, seed in (("a", "lora", 1), ("b", "dora", 2), ("c", "lora", 3)):
        rw.adapt(model, method, name=name, rank=4, targets=["query", "value"], modules_to_save=["classifier"],
                 seed=seed)
    perturb([p for n in ("a", "b", "c") for p in rw.core.api.adapter_parameters(model, n)], 5)
    names = ["c", "a", None, "b", "a"]
    ids = torch.randint(1, 100, (len(names), 6), generator=torch.Generator().manual_seed(0))
    expected = torch.cat([_logits(model, ids[i:i + 1], n) for i, n in enumerate(names)])
    rw.set_active(model, ["a", "b", "c"])  # unfreeze all three for the gradient check
    params = [p for n in ("a", "b", "c") for p in rw.core.api.adapter_parameters(model, n)]
    for p in params:
        p.requires_grad_(True)
    with rw.mixed_batch(model, names):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got.detach(), expected, atol=ATOL, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    ref = [torch.zeros_like(p) for p in params]
    for i, n in enumerate(names):
        if n is None:
            continue
        rw.set_active(model, n)
        for p in params:
            p.requires_grad_(True)
        out = model(input_ids=ids[i:i + 1]).logits
        for k, g in enumerate(torch.autograd.grad(out.square().sum(), params, allow_unused=True)):
            if g is not None:
                ref[k] += g
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(r), r, atol=1e-4, rtol=1e-4)
    assert sum(float(r.abs().sum()) for r in ref) > 0


def _logits(model, ids, name):
    with torch.no_grad():
        rw.set_active(model, name)
        return model(input_ids=ids).logits


# ---- generate() ----------------------------------------------------------------------------------
def _lm(llama, perturb):
    model = llama(0)
    model.config.eos_token_id = None  # random weights: let every row run to max_new_tokens
    model.generation_config.eos_token_id = None
    for name, method, rank, seed in (("a", "lora", 4, 1), ("b", "lora", 4, 2), ("c", "lora", 2, 3),
                                     ("d", "dora", 4, 4)):
        rw.adapt(model, method, name=name, rank=rank, targets="all-linear", seed=seed)
    perturb([p for m in model.modules() if isinstance(m, AdaptedLayer) for p in m.adapters.parameters()], 9,
            std=0.3)
    return model


GEN_NAMES = ["a", "d", None, "c", "b"]


def _prompts():
    return torch.randint(1, 100, (len(GEN_NAMES), 5), generator=torch.Generator().manual_seed(3))


def _generate_rows(model, ids, names, **kw):
    outs = []
    for i, n in enumerate(names):
        rw.set_active(model, n)
        outs.append(model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw))
    return torch.cat(outs)


def test_generate_greedy_and_beam_search(llama, perturb):
    model = _lm(llama, perturb)
    ids = _prompts()
    for kw in ({"do_sample": False}, {"num_beams": 3, "do_sample": False},
               {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}):
        kw = {"max_new_tokens": 6, "pad_token_id": 0, **kw}
        expected = _generate_rows(model, ids, GEN_NAMES, **kw)
        rw.set_active(model, None)
        with rw.mixed_batch(model, GEN_NAMES):
            got = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        assert torch.equal(got, expected), kw
    # the adapters change the continuation (else equality would be trivial)
    assert len({tuple(r.tolist()) for r in expected}) == len(expected)


def test_generate_sampling(llama, perturb):
    model = _lm(llama, perturb)
    ids = _prompts()
    kw = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": True}
    # top_k=1 sampling is greedy: row by row it must equal the per-adapter greedy runs
    expected = _generate_rows(model, ids, GEN_NAMES, max_new_tokens=6, pad_token_id=0, do_sample=False)
    with rw.mixed_batch(model, GEN_NAMES):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), top_k=1, **kw)
    assert torch.equal(got, expected)
    # real sampling with num_return_sequences: a mixed batch whose rows all name "b" draws exactly what the
    # plain single-adapter batch draws from the same seed
    rw.set_active(model, "b")
    torch.manual_seed(11)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=2, **kw)
    rw.set_active(model, None)
    torch.manual_seed(11)
    with rw.mixed_batch(model, ["b"] * len(ids)):
        same = model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=2, **kw)
    assert torch.equal(plain, same)


# ---- errors and state ---------------------------------------------------------------------------
def _lora_net(perturb):
    torch.manual_seed(0)
    model = Net()
    for name, seed in (("a", 1), ("b", 2)):
        rw.adapt(model, "lora", name=name, rank=2, targets=["fc1", "fc2"], seed=seed)
    _finish(model, perturb)
    rw.set_active(model, "b")
    return model


def test_errors_leave_the_model_unchanged(perturb):
    model = _lora_net(perturb)
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(AdapterNotFoundError, match="'zz'.*has \\['a', 'b'\\]"):
        with rw.mixed_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(ConfigError, match="list"):
        with rw.mixed_batch(model, "a"):
            pass
    with pytest.raises(ShapeMismatchError, match="module 'fc1'.*3 adapter names.*batch of 4"):
        with torch.no_grad(), rw.mixed_batch(model, ["a", "b", None]):
            model(x)
    with pytest.raises(ConfigError, match="already inside"):
        with rw.mixed_batch(model, ["a"]), rw.mixed_batch(model, ["b"]):
            pass
    rw.merge(model)
    with pytest.raises(ConfigError, match="merged.*rw.unmerge"):
        with rw.mixed_batch(model, ["a"]):
            pass
    rw.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # the "b"-active model, as before
    assert all(m._mixed is None for m in model.modules() if isinstance(m, AdaptedLayer))
    assert model.fc1.active == ["b"]


def test_bfloat16(perturb):
    model = _lora_net(perturb)
    rw.adapt(model, "dora", name="d", rank=2, targets=["fc1", "fc2"], seed=5)
    _finish(model, perturb)
    model.to(torch.bfloat16)
    names = ["a", "d", None, "b"]
    x = torch.randn(4, 3, 8, dtype=torch.bfloat16)
    expected = _per_row(model, x, names)
    with torch.no_grad(), rw.mixed_batch(model, names):
        got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
