"""rankwise.utils.memory, and the activation memory LoRA training keeps (exact, deterministic).

* ``saved_activation_bytes`` counts what autograd saves, each storage once, weights excluded;
  ``PeakRSS`` sees an allocation made and freed inside its block.
* LoRA training saves no more activation bytes than full fine-tuning (MLP, BERT-tiny).
* With dropout, rankwise's LoRA keeps a 1-byte mask per input element — fewer bytes than
  plain-autograd dropout + linear (the PEFT way, which keeps the dropped copy) — and gives the
  same output and gradients as that plain path with the same mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.core import ops
from rankwise.utils.memory import PeakRSS, release_free_memory, rss_bytes, saved_activation_bytes


def saved(model: nn.Module, fn) -> int:
    with saved_activation_bytes(model) as s:
        out = fn()
    del out
    return s.bytes


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


MLP_TARGETS = ["0", "2", "4"]


# ---- the measuring tools ----------------------------------------------------------------------
def test_saved_bytes_exclude_weights():
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    # trainable weight: addmm saves x and the weight; only x is an activation
    assert saved(lin, lambda: lin(x)) == x.numel() * 4
    # frozen weight: only the weight is needed (for grad x), so nothing is an activation
    lin.requires_grad_(False)
    assert saved(lin, lambda: lin(x)) == 0
    # without the model, the weight counts as saved
    with saved_activation_bytes() as s:
        y = lin(x)
    del y
    assert s.bytes == lin.weight.numel() * 4


def test_saved_bytes_count_each_storage_once_and_survive_freed_graphs():
    a, b = nn.Linear(16, 8), nn.Linear(16, 4)
    model = nn.ModuleList([a, b])
    x = torch.randn(5, 16)
    # x is saved by both layers (for their weight gradients) and by the view inside F.linear
    assert saved(model, lambda: a(x).sum() + b(x).sum()) == x.numel() * 4
    # a graph freed inside the block must not hand its storage's address to the next one
    x = torch.randn(64, 64, requires_grad=True)
    with saved_activation_bytes() as s:
        for _ in range(3):
            out = torch.sigmoid(x * 2.0)  # sigmoid saves its own 64×64 output
            del out
    assert s.bytes == 3 * x.numel() * 4
    assert s.count == 3


def test_peak_rss_sees_a_freed_allocation():
    n = 16 * 2**20 // 4 * 4  # 64 MiB of float32
    release_free_memory()  # free heap pages left resident by earlier tests would absorb the allocation
    with PeakRSS() as m:
        t = torch.ones(n)
        del t
    assert m.peak_bytes >= 48 * 2**20, m.peak_bytes
    assert m.peak_total_bytes >= m.peak_bytes
    assert rss_bytes() > 0


# ---- LoRA ≤ full fine-tuning ------------------------------------------------------------------
def test_lora_saves_no_more_than_full_finetuning_mlp():
    x = torch.randn(4, 7, 32)
    full = mlp().train()
    full_bytes = saved(full, lambda: full(x).square().mean())
    for rank in (2, 8):  # rank 8 = in/4 for the first layer: h = x Aᵀ would be sizeable if it were kept
        lora = rw.adapt(mlp(), "lora", rank=rank, alpha=16, targets=MLP_TARGETS, seed=0).train()
        lora_bytes = saved(lora, lambda m=lora: m(x).square().mean())
        assert 0 < lora_bytes <= full_bytes, (rank, lora_bytes, full_bytes)


def test_lora_saves_no_more_than_full_finetuning_bert(bert, token_batch):
    full = bert(0).train()
    full_bytes = saved(full, lambda: full(**token_batch).logits.sum())
    lora = rw.adapt(bert(0), "lora", rank=8, alpha=16, targets="all-linear", seed=0).train()
    lora_bytes = saved(lora, lambda: lora(**token_batch).logits.sum())
    assert 0 < lora_bytes <= full_bytes, (lora_bytes, full_bytes)


# ---- dropout: a mask, not a copy --------------------------------------------------------------
class PlainLora(nn.Module):
    """LoRA the way plain autograd does it (PEFT): ``base(x) + s·B(A(dropout(x)))``."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, p: float):
        super().__init__()
        self.base, self.scale, self.p = base, scale, p
        self.lora_A = nn.Parameter(a.detach().clone())
        self.lora_B = nn.Parameter(b.detach().clone())

    def forward(self, x, mask=None):
        if mask is None:
            xd = F.dropout(x, self.p, training=self.training)
        else:
            xd = x * mask / (1 - self.p)
        return self.base(x) + F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scale


def _adapted_mlp(dropout: float) -> nn.Module:
    return rw.adapt(mlp(), "lora", rank=4, alpha=8, targets=MLP_TARGETS, dropout=dropout, seed=0).train()


def test_lora_dropout_saves_one_byte_per_input_element():
    x = torch.randn(4, 7, 32)
    no_drop, drop = _adapted_mlp(0.0), _adapted_mlp(0.1)
    b0 = saved(no_drop, lambda: no_drop(x).sum())
    b1 = saved(drop, lambda: drop(x).sum())
    inputs = 4 * 7 * (32 + 64 + 64)  # elements entering the three adapted layers
    assert b1 - b0 == inputs  # one bool mask per adapted layer input, nothing else


def test_lora_dropout_saves_less_than_plain_autograd_dropout():
    torch.manual_seed(0)
    base = nn.Linear(48, 40).requires_grad_(False)
    model = rw.adapt(nn.Sequential(base), "lora", rank=4, alpha=8, targets=["0"], dropout=0.1, seed=0).train()
    ad = model[0].adapters["default"]
    plain = PlainLora(base, ad.lora_A, ad.lora_B, ad.scale, 0.1).train()
    x = torch.randn(6, 9, 48, requires_grad=True)  # an activation: gradients flow through it
    ours = saved(model, lambda: model(x).sum())
    theirs = saved(plain, lambda: plain(x).sum())
    # rankwise: x itself (needed for A's gradient) and a 1-byte mask
    assert ours == x.numel() * 4 + x.numel()
    # plain autograd: the dropout noise (float on CPU) for x's gradient, the dropped copy of x
    # for A's gradient, and h = A drop(x) for B's gradient
    assert theirs == x.numel() * 4 * 2 + 6 * 9 * 4 * 4
    assert ours < theirs


def test_lora_dropout_saves_less_than_peft_bert(bert, token_batch):
    peft = pytest.importorskip("peft")
    ours_model = rw.adapt(bert(0), "lora", rank=8, alpha=16, targets="all-linear", dropout=0.1, seed=0).train()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1)
    peft_model = peft.get_peft_model(bert(0), cfg).train()
    ours = saved(ours_model, lambda: ours_model(**token_batch).logits.sum())
    theirs = saved(peft_model, lambda: peft_model(**token_batch).logits.sum())
    assert ours < theirs, (ours, theirs)


# ---- dropout: same numbers as the plain path --------------------------------------------------
@pytest.mark.parametrize("x_grad", [True, False])
def test_lora_dropout_matches_plain_path_with_same_mask(monkeypatch, x_grad):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    model = rw.adapt(nn.Sequential(base), "lora", rank=3, alpha=5, targets=["0"], dropout=0.3, seed=0).train()
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_()
    plain = PlainLora(base, ad.lora_A, ad.lora_B, ad.scale, 0.3).train()

    masks = []

    def recording_mask(x, keep):
        m = torch.rand(x.shape, dtype=torch.float64, device=x.device) < keep
        masks.append(m)
        return m

    monkeypatch.setattr(ops, "keep_mask", recording_mask)
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    w = torch.randn(4, 5, 10, dtype=torch.float64)
    out = model(x)
    (mask,) = masks
    assert not mask.all() and mask.any()
    ref = plain(x, mask)
    torch.testing.assert_close(out, ref)

    ours_in = [ad.lora_A, ad.lora_B] + ([x] if x_grad else [])
    ref_in = [plain.lora_A, plain.lora_B] + ([x] if x_grad else [])
    for g, r in zip(torch.autograd.grad((out * w).sum(), ours_in), torch.autograd.grad((ref * w).sum(), ref_in)):
        torch.testing.assert_close(g, r)


def test_fused_lora_function_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    base_out = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(3, 4, 6, generator=g) < 0.7
    for m, keep in ((None, 1.0), (mask, 0.7)):
        assert torch.autograd.gradcheck(
            lambda *t, m=m, keep=keep: ops.LowRankLinear.apply(*t, 1.5, m, keep), (x, base_out, a, b)
        )


@pytest.mark.parametrize("bernoulli", [True, False])
def test_keep_mask_draws_bernoulli_keep(monkeypatch, bernoulli):
    monkeypatch.setattr(ops, "cpu_bernoulli_is_fast", lambda: bernoulli)
    x = torch.empty(200, 500)
    torch.manual_seed(0)
    m = ops.keep_mask(x, 0.9)
    assert m.dtype == torch.bool and m.shape == x.shape
    assert abs(m.float().mean().item() - 0.9) < 0.005
    torch.manual_seed(0)
    assert torch.equal(m, ops.keep_mask(x, 0.9))  # reproducible from the global seed
