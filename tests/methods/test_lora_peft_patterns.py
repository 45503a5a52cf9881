"""rw.export_peft of a LoRA whose modules have different ranks / alphas writes PEFT's rank_pattern and
alpha_pattern: PEFT 0.21's PeftModel.from_pretrained (the oracle) loads it and gives the same outputs,
and rw.import_peft reads it back."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.api import adapted_layers
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(6, 9)
        self.up = nn.Linear(9, 7)
        self.inner = nn.Sequential()
        self.inner.up = nn.Linear(7, 7)  # "inner.up" also ends in "up": PEFT's pattern "up" would hit both

    def forward(self, x):
        return self.inner.up(self.up(self.v(self.q(x))))


def base():
    torch.manual_seed(0)
    return Net().eval()


def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def deltas(model, name):
    return {n: layer.delta_weight([name]).detach().clone() for n, layer in adapted_layers(model) if name in layer.adapters}


def test_combined_adapter_with_per_module_ranks_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = base()
    for name, seed in (("math", 1), ("code", 2)):
        rw.adapt(model, "lora", name=name, rank=5, alpha=10.0, targets=["q", "v", "up"], seed=seed)
        randomize(model, name, seed)
    rw.combine(model, ["math", "code"], [1.0, 1.0], "sum", method="cat")  # rank 10: up keeps 7, q and v 6
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    rw.export_peft(model, tmp_path / "peft", name="sum")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 7
    assert cfg["rank_pattern"] == {"q": 6, "v": 6} == cfg["alpha_pattern"]
    pm = PeftModel.from_pretrained(base(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=1e-5)
    assert {n: pm.base_model.model.get_submodule(n).lora_A["default"].weight.shape[0] for n in ("q", "v", "up")} \
        == {"q": 6, "v": 6, "up": 7}
    back = base()
    rw.import_peft(back, tmp_path / "peft", name="sum")
    for k, d in deltas(back, "sum").items():
        torch.testing.assert_close(d, deltas(model, "sum")[k], atol=1e-6, rtol=1e-6)


def test_ambiguous_module_names_get_anchored_keys_and_alpha_patterns(tmp_path):
    from peft import PeftModel

    model = base()
    rw.adapt(model, "lora", rank=4, alpha=8.0, targets=["q", "up"], seed=0,
             module_overrides={"up": {"rank": 2, "alpha": 3.0}, "q": {"alpha": 1.0}})
    randomize(model, "default", 5)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    rw.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"^up": 2}  # "up" would also select inner.up
    assert cfg["alpha_pattern"] == {"^up": 3.0, "q": 1.0}
    pm = PeftModel.from_pretrained(base(), tmp_path / "p")
    m = pm.base_model.model
    assert (m.up.lora_A["default"].weight.shape[0], m.inner.up.lora_A["default"].weight.shape[0]) == (2, 4)
    assert (m.up.scaling["default"], m.inner.up.scaling["default"], m.q.scaling["default"]) == (1.5, 2.0, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=1e-5)
    back = base()
    rw.import_peft(back, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, atol=1e-6, rtol=1e-6)


def test_a_per_module_dropout_has_no_peft_pattern_and_is_refused(tmp_path):
    model = base()
    rw.adapt(model, "lora", rank=2, targets=["q", "v"], module_overrides={"v": {"dropout": 0.1}})
    with pytest.raises(ConfigError, match="module 'v' has dropout=0.1"):
        rw.export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()
