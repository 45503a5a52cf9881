"""dora (Liu et al. 2024) and its helpers in ``_dora_common``: PEFT 0.21 as the oracle (same weights →
same outputs and gradients; PEFT file round trips, on every layer kind), the paper's formula
re-derived densely (norm detached), the closed-form row norm, and device/dtype placement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _dora_helpers import (
    ATOL,
    MODELS,
    adapter,
    check_export_then_import,
    check_import_then_export,
    check_same_weights_same_outputs_and_gradients,
    copy_peft_into_ours,
    loss,
    net,
    peft,
    peft_load,
    peft_model,
    randomize,
)
from torch import nn

import rankwise as rw
from rankwise.core.layers import LayerView
from rankwise.methods._dora_common import _DoraLinear, row_norm_sq
from rankwise.methods.bora import Bora, BoraConfig
from rankwise.methods.dora import Dora, DoraConfig

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ---- PEFT oracle -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
def test_peft_same_weights_same_outputs_and_gradients(model_name, request, token_batch):
    check_same_weights_same_outputs_and_gradients("dora", model_name, request, token_batch)


def test_export_then_import_peft(gpt2, tmp_path, token_batch):
    check_export_then_import("dora", gpt2, tmp_path, token_batch)


def test_import_peft_then_export(bert, tmp_path, token_batch):
    check_import_then_export("dora", bert, tmp_path, token_batch)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(5, 4, (3, 2), padding=1)
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.fc = nn.Linear(6, 5)

    def forward(self, x, ids):
        h = self.c1(x)
        h2 = self.c2(h[:, :, None, :].expand(-1, -1, 4, -1))
        return torch.cat([h.flatten(1), h2.flatten(1), self.fc(self.emb(ids)).flatten(1)], dim=1)


def test_dora_conv_embedding_round_trip(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 3, 11, generator=g), torch.randint(0, 10, (2, 4), generator=g)
    model = rw.adapt(copy.deepcopy(base), "dora", rank=2, alpha=3.0, targets=["c1", "c2", "emb", "fc"], seed=0)
    randomize([p for p in model.parameters() if p.requires_grad], seed=1)
    rw.export_peft(model, tmp_path / "p")
    pmodel = peft_load(base, tmp_path / "p")
    with torch.no_grad():
        ours = model(x, ids)
        assert (ours - pmodel(x, ids)).abs().max() <= ATOL
        back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
        assert (back(x, ids) - ours).abs().max() <= ATOL


def test_dora_dropout_matches_peft_in_training(bert, token_batch):
    """With dropout in training, PEFT's DoRA recomputes ``W0 · drop(x)`` for the magnitude term and
    draws one dropout mask of ``x``'s shape per layer; rankwise does the same (its low-rank term goes
    through ``core.ops.low_rank_apply``), so with one seed both give the same outputs and gradients."""
    base = bert(seed=0)
    targets = ["query", "value"]
    pmodel = peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.4, target_modules=targets,
                                              use_dora=True))
    model = rw.adapt(copy.deepcopy(base), "dora", rank=4, alpha=6.0, dropout=0.4, targets=targets, seed=0)
    matched = copy_peft_into_ours(model, pmodel, "dora", seed=1)
    model.train()
    pmodel.train()
    torch.manual_seed(11)
    lo = loss(model, token_batch)
    torch.manual_seed(11)
    lt = loss(pmodel, token_batch)
    torch.testing.assert_close(lo, lt, atol=1e-4, rtol=1e-6)
    torch.manual_seed(12)
    no_drop = loss(model.eval(), token_batch)
    assert not torch.allclose(lo, no_drop, atol=1e-3), "dropout should change the training output"
    lo.backward()
    lt.backward()
    for ours, theirs, label in matched:
        torch.testing.assert_close(ours.grad, theirs.grad.reshape(ours.shape), atol=ATOL, rtol=1e-4, msg=label)


# ---- the formula -------------------------------------------------------------------------------
def test_dora_row_norm_formula_is_dense_norm():
    """‖W0 + sBA‖ per row from W0Aᵀ and AAᵀ equals the norm of the dense matrix (float64)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 11, generator=g, dtype=torch.float64)
    a = torch.randn(3, 11, generator=g, dtype=torch.float64)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64)
    s = 0.7
    got = row_norm_sq(w0.square().sum(1), w0 @ a.t(), a @ a.t(), b, s).sqrt()
    torch.testing.assert_close(got, torch.linalg.norm(w0 + s * b @ a, dim=1), atol=1e-12, rtol=1e-12)


def _dense_dora(layer: nn.Linear, a, b, m, s, x):
    """DoRA by the paper's formula, densely, with the norm detached (the oracle)."""
    v = layer.weight + s * b @ a
    w = (m / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    return F.linear(x, w, layer.bias)


def test_dora_gradients_match_dense_formula():
    """The fused autograd node of the linear path gives the dense formula's gradients (float64)."""
    torch.manual_seed(0)
    layer = nn.Linear(9, 6).double()
    model = rw.adapt(net(layer), "dora", rank=3, alpha=5.0, targets=["0"], seed=0)
    ad = adapter(model, "0")
    randomize(ad.parameters(), seed=2, std=0.5)
    x = torch.randn(4, 5, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, dtype=torch.float64)
    params = [x, ad.lora_A, ad.lora_B, ad.magnitude]
    ours = torch.autograd.grad((model(x) * w).sum(), params)
    ref = torch.autograd.grad((_dense_dora(layer, ad.lora_A, ad.lora_B, ad.magnitude, ad.scale, x) * w).sum(), params)
    for o, r, name in zip(ours, ref, ("x", "A", "B", "m")):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10, msg=name)
    xs = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    bo = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.rand(6, dtype=torch.float64, requires_grad=True)
    args = (xs, bo, ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_(), g)
    assert torch.autograd.gradcheck(lambda *t: _DoraLinear.apply(*t, layer.bias.detach(), 0.8), args)


def test_dora_norm_follows_w0_changes():
    """‖W0‖² is cached; merging another adapter into W0 (in place) refreshes it."""
    torch.manual_seed(0)
    model = net(nn.Linear(8, 5))
    rw.adapt(model, "dora", rank=2, targets=["0"], name="d", seed=0)
    rw.adapt(model, "lora", rank=2, targets=["0"], name="l", seed=1)
    randomize([p for p in model.parameters() if p.requires_grad], seed=3)
    x = torch.randn(3, 8)
    rw.set_active(model, ["d", "l"])
    layer = model[0]
    with torch.no_grad():
        model(x)  # fills the cache with the pristine W0
        layer.merge(["l"])  # W0 ← W0 + ΔW_lora, in place
        rw.set_active(model, ["d", "l"])
        ad = layer.adapters["d"]
        ref = _dense_dora(layer.base, ad.lora_A, ad.lora_B, ad.magnitude, ad.scale, x)
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)


def test_dora_parameter_count_and_identity_at_init():
    model = rw.adapt(net(nn.Linear(10, 7)), "dora", rank=3, targets=["0"], seed=0)
    assert rw.parameter_count(model).trainable == 3 * (10 + 7) + 7  # r (in + out) + out
    x = torch.randn(2, 10)
    with torch.no_grad():
        assert torch.equal(model(x), model[0].base(x))


# ---- device and dtype (review finding: adapters were built on the CPU, W0 read on its device) --------
@pytest.mark.parametrize("cls,cfg", [(Dora, DoraConfig(rank=2)), (Bora, BoraConfig(rank=2))])
def test_adapter_tensors_are_created_on_the_weights_device(cls, cfg):
    """Built straight from a meta-device layer (no ``.to()`` afterwards), with a CPU generator: every
    tensor is on meta. The old code made A, B on the CPU and crashed adding them to the meta W0."""
    with torch.device("meta"):
        layer = nn.Linear(6, 5)
    ad = cls(LayerView(layer, "fc"), cfg, generator=torch.Generator().manual_seed(0))
    tensors = dict(ad.named_parameters()) | dict(ad.named_buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors.values()), {n: t.device for n, t in tensors.items()}
    # and through rw.adapt on a model built under torch.device("meta")
    with torch.device("meta"):
        model = rw.adapt(net(nn.Linear(6, 5)), cls.name, rank=2, targets=["0"], seed=0)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("method", ["dora", "bora"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adapter_tensors_take_the_weights_dtype(method, dtype):
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).to(dtype)
    model = rw.adapt(net(layer), method, rank=2, targets=["0"], seed=0)
    ad = adapter(model, "0")
    assert {p.dtype for p in ad.parameters()} == {dtype}
    randomize(ad.parameters(), seed=1, std=0.3)
    x = torch.randn(3, 6).to(dtype)
    out = model(x)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in ad.parameters())
    if dtype == torch.float64:  # the dense weight view agrees to float64 precision
        torch.testing.assert_close(out, F.linear(x, layer.weight + ad.delta_weight(), layer.bias),
                                   atol=1e-12, rtol=1e-12)
