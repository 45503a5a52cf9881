"""Layers whose adapter routes per input (``mole`` with ``router="token"`` / ``"topk"``) have no ΔW: the weight
analysis leaves them out with a note instead of failing. Oracle for the layers kept: the dense ``s · B A``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.analysis import analyze, weight_pairs
from rankwise.errors import TargetError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def build(router: str):
    torch.manual_seed(0)
    model = Net()
    rw.adapt(model, "mole", name="mix", rank=2, experts=3, router=router, targets=["fc1"], seed=1)
    rw.adapt(model, "lora", name="l", rank=2, targets=["fc2"], seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in rw.core.api.adapted_layers(model):
            for ad in layer.adapters.values():
                for p in ad.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
    rw.set_active(model, ["mix", "l"])
    return model


def lora_delta(model):
    ad = dict(rw.core.api.adapted_layers(model))["fc2"].adapters["l"]
    return (ad.lora_B @ ad.lora_A * ad.scale).detach()


@pytest.mark.parametrize("router", ["token", "topk"])
def test_input_routed_layers_are_skipped_with_a_note(router):
    model = build(router)
    pairs = weight_pairs(model)
    assert list(pairs) == ["fc2"] and list(pairs.skipped) == ["fc1"]
    assert "routes per token" in pairs.skipped["fc1"] and f"router='{router}'" in pairs.skipped["fc1"]
    torch.testing.assert_close(pairs["fc2"][1], lora_delta(model), atol=1e-6, rtol=1e-6)
    res = analyze(model, name="mixed", k=3)
    assert [row["layer"] for row in res.layers] == ["fc2"]
    assert res.settings["skipped"] == pairs.skipped
    # two-model mode (base vs. the adapted model) skips it the same way
    torch.manual_seed(0)
    two = weight_pairs(Net(), model)  # the same base weights (same seed)
    assert list(two.skipped) == ["fc1"] and list(two) == ["fc2"]
    torch.testing.assert_close(two["fc2"][1], lora_delta(model), atol=1e-6, rtol=1e-6)


def test_a_layer_routed_mixture_has_a_weight_view_and_is_kept():
    model = build("layer")
    pairs = weight_pairs(model)
    assert list(pairs) == ["fc1", "fc2"] and pairs.skipped == {}
    mix = dict(rw.core.api.adapted_layers(model))["fc1"].adapters["mix"]
    torch.testing.assert_close(pairs["fc1"][1], mix.delta_weight().detach(), atol=0, rtol=0)


def test_nothing_left_is_a_clear_error():
    model = build("token")
    with pytest.raises(TargetError, match="every selected layer was skipped.*routes per token"):
        weight_pairs(model, layers="fc1")
