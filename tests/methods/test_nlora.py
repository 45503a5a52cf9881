"""NLoRA (methods/nlora.py): the Nyström / CUR approximation against a dense transcription, the
reference code's factors (core="submatrix"), IntTune, and the rank-2r LoRA export loading in PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from _init_helpers import check_export_loads_in_peft, residual
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("kw", [{}, {"landmarks": "gaussian"}], ids=["first", "gaussian"])
def test_nlora_export_loads_in_peft(kw, llama, tmp_path):
    check_export_loads_in_peft("nlora", kw, llama(), tmp_path)


def test_nlora_is_the_nystrom_approximation():
    g = torch.Generator().manual_seed(5)
    full = nn.Linear(8, 10)
    low = nn.Linear(8, 10)
    with torch.no_grad():
        low.weight.copy_(torch.randn(10, 3, generator=g) @ torch.randn(3, 8, generator=g))  # rank 3
    for core in ("pinv", "submatrix"):
        for lin in (full, low):
            net = nn.Sequential(copy.deepcopy(lin))
            rw.adapt(net, "nlora", rank=3, alpha=6.0, core=core, targets=["0"])
            ad = net[0].adapters["default"]
            w = lin.weight.detach().double()
            a0, bn0 = ad.frozen()
            mid = torch.linalg.pinv(w[:3, :3]) if core == "pinv" else w[:3, :3]
            torch.testing.assert_close((ad.scale * bn0 @ a0).double(), w[:, :3] @ mid @ w[:3, :], atol=1e-5, rtol=1e-4)
            if core == "pinv" and lin is low:  # Nyström is exact for a rank-r weight: nothing is left frozen
                torch.testing.assert_close(residual(net[0]).double(), torch.zeros_like(w), atol=1e-5, rtol=0)
    # gaussian sketches: exact for the rank-3 weight too, and seeded
    nets = [nn.Sequential(copy.deepcopy(low)) for _ in range(3)]
    for net, seed in zip(nets, (0, 0, 1)):
        rw.adapt(net, "nlora", rank=3, landmarks="gaussian", targets=["0"], seed=seed)
    torch.testing.assert_close(residual(nets[0][0]), torch.zeros(10, 8), atol=1e-5, rtol=0)
    sds = [n[0].adapters["default"].state_dict() for n in nets]
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    assert not torch.equal(sds[0]["init_A"], sds[2]["init_A"])


def test_nlora_submatrix_has_the_reference_factors_not_its_model():
    """Oracle: the reference ``nlora_init`` (TracyGuo2001/NLoRA, its PEFT fork's lora/layer.py)
    transcribed — lora_A = W[:r, :], lora_B = W[:, :r], lora_N = W[:r, :r], base weight unchanged,
    forward ``W0 x + s·B N A x``. At s = 1 rankwise's core="submatrix" has exactly these factors,
    but subtracts s·B₀N₀A₀ (the base model at init), as its docstring states."""
    torch.manual_seed(7)
    lin = nn.Linear(8, 10, bias=False)
    w, r = lin.weight.detach().clone(), 3
    ref_a, ref_b, ref_n = w[:r, :], w[:, :r], w[:r, :r]
    net = nn.Sequential(copy.deepcopy(lin))
    rw.adapt(net, "nlora", rank=r, core="submatrix", targets=["0"])  # alpha = rank: s = 1
    ad = net[0].adapters["default"]
    assert ad.scale == 1.0
    for mine, ref in ((ad.lora_A, ref_a), (ad.lora_B, ref_b), (ad.lora_N, ref_n)):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)
    x = torch.randn(4, 8)
    ref_out = x @ w.T + ((x @ ref_a.T) @ ref_n.T) @ ref_b.T  # the reference model at init
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, lin(x).detach(), atol=1e-6, rtol=0)  # rankwise: the base model
    assert (out - ref_out).abs().max() > 0.1  # … which is not the reference's model


def test_nlora_inttune_trains_the_core_only():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(8, 10), nn.Linear(10, 4))
    rw.adapt(net, "nlora", rank=2, inttune=True, targets=["0", "1"])
    assert rw.parameter_count(net).trainable == 2 * 2 * 2
    net(torch.randn(3, 8)).square().sum().backward()
    for layer in net.modules():
        if hasattr(layer, "adapters"):
            ad = layer.adapters["default"]
            assert ad.lora_N.grad is not None and ad.lora_A.grad is None and ad.lora_B.grad is None
