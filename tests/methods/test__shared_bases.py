"""``_shared_bases``: seeded bases regenerated bit for bit after save/load (vera, randlora), created on
the base weight's device from a CPU generator, and the one PEFT codec of vera and randlora
(``SharedBasesMethod``), whose bases check accepts PEFT's larger bases and refuses smaller ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _dora_helpers import adapter, logits, net, randomize
from safetensors.torch import load_file
from torch import nn

import rankwise as rw
from rankwise.core.api import adapter_state
from rankwise.core.layers import LayerView
from rankwise.errors import ShapeMismatchError
from rankwise.methods._shared_bases import SharedBasesMethod
from rankwise.methods.nola import Nola, NolaConfig
from rankwise.methods.randlora import Randlora, RandloraConfig
from rankwise.methods.vera import Vera, VeraConfig

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

NAMES = {"vera": ("vera_A", "vera_B"), "randlora": ("randlora_A", "randlora_B")}


@pytest.mark.parametrize("save_projection", [False, True])
@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_save_load_regenerates_bases(method, save_projection, bert, tmp_path, token_batch):
    base = bert(seed=0)
    model = rw.adapt(copy.deepcopy(base), method, rank=4, targets=["query", "output.dense"], seed=7,
                     save_projection=save_projection)
    randomize([p for p in model.parameters() if p.requires_grad], seed=2, std=0.05)
    rw.save(model, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    stored = {k for k in keys if "(shared)" in k}
    assert stored == {f"default/(shared)/{n}" for n in ("key", *(NAMES[method] if save_projection else ()))}
    torch.manual_seed(123)  # the fresh adapter draws another seed from the global RNG; load replaces it
    fresh = rw.load(copy.deepcopy(base), tmp_path / "a")
    new, old = adapter_state(fresh)["default"]["shared"], adapter_state(model)["default"]["shared"]
    for n in NAMES[method]:
        assert torch.equal(getattr(new, n), getattr(old, n)), n
    assert torch.equal(logits(fresh, token_batch), logits(model, token_batch))


@pytest.mark.parametrize("cls,cfg", [(Vera, VeraConfig(rank=3, projection_seed=4)),
                                     (Randlora, RandloraConfig(rank=2, projection_seed=4)),
                                     (Nola, NolaConfig(rank=2, num_basis_A=3, num_basis_B=2))])
def test_bases_on_the_weights_device(cls, cfg):
    """Built straight from a meta-device layer with a CPU generator: the key, the bases and the
    trained tensors are all on meta (shapes only, no CPU draws), with the CPU build's shapes."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        meta = cls(LayerView(nn.Linear(6, 5), "fc"), cfg, generator=g)
    cpu = cls(LayerView(nn.Linear(6, 5), "fc"), cfg, generator=torch.Generator().manual_seed(0))
    ours = dict(meta.named_parameters()) | dict(meta.named_buffers())
    ref = dict(cpu.named_parameters()) | dict(cpu.named_buffers())
    assert ours.keys() == ref.keys()
    for n, t in ours.items():
        assert t.device.type == "meta" and t.shape == ref[n].shape and t.dtype == ref[n].dtype, n


def test_vera_and_randlora_share_one_peft_codec():
    """Review finding D1: the PEFT config/codec of the seeded-bases methods was written twice; now
    both inherit it (each adds only its own config entries)."""
    for name in ("shared", "peft_accepts", "to_peft_config", "from_peft_config", "peft_shared",
                 "load_peft_shared", "peft_shared_keys"):
        assert name in SharedBasesMethod.__dict__ and name not in Vera.__dict__ and name not in Randlora.__dict__


@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_assigned_bases_may_be_larger_never_smaller(method):
    """PEFT sizes the shared bases for the largest targeted layer: larger bases than this model's are
    sliced (the output is the dense formula with the leading block), smaller ones are refused."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    model = rw.adapt(net(layer), method, rank=2, targets=["0"], seed=0)
    ad = adapter(model, "0")
    randomize([p for p in ad.parameters()], seed=1, std=0.3)
    bases = ad.bases
    cur = {n: getattr(bases, n) for n in NAMES[method]}
    g = torch.Generator().manual_seed(3)
    bigger = {n: torch.randn([s + (0 if i in bases.exact[n] else 2) for i, s in enumerate(t.shape)], generator=g)
              for n, t in cur.items()}
    bases.assign(bigger, "the model")
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        if method == "vera":
            a, b = bigger["vera_A"][:, :6].double(), bigger["vera_B"][:5].double()
            delta = (b * ad.vera_lambda_b[:, None]) @ (a * ad.vera_lambda_d[:, None])
        else:  # 5 = small side (out), 6 = big side (in): ΔW = s·(B̂ Â)ᵀ
            a = bigger["randlora_A"][:, 0, :5].double()
            b = bigger["randlora_B"][:6, :ad.n, :].double()
            a_hat = (ad.randlora_lambda[:, :, None] * a[:, None, :] * ad.randlora_gamma[None]).reshape(-1, 5)
            delta = ad.scale * (b.reshape(6, -1) @ a_hat).t()
        torch.testing.assert_close(model(x), F.linear(x, layer.weight + delta, layer.bias), atol=1e-6, rtol=1e-6)
    smaller = {n: t[tuple(slice(0, max(1, s - 1)) for s in t.shape)] for n, t in cur.items()}
    with pytest.raises(ShapeMismatchError, match="PEFT tensor"):
        bases.assign(smaller, "the model")


def _mlp_vera(seed: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    rw.adapt(model, "vera", rank=4, targets=["0", "2"], seed=seed, projection_seed=seed)
    randomize([p for p in model.parameters() if p.requires_grad], seed=1, std=0.1)
    return model


def test_compiled_bases_never_stale(monkeypatch):
    """Issue 18: under ``torch.compile`` the bases' freshness check is traced (no graph break), a
    ``load_state_dict`` of another key regenerates them (oracle: an adapter built with that seed,
    run eagerly), and a key written in place by hand raises instead of using the old bases, until an
    eager ``refresh()``."""
    torch._dynamo.reset()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    model, other = _mlp_vera(5), _mlp_vera(9)  # the same trained vectors, different bases
    assert not torch.allclose(model(x), other(x))
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), _mlp_vera(5)(x), rtol=0, atol=0)
    model.load_state_dict(other.state_dict())  # new key (seed 9): regenerated by the post-hook
    torch.testing.assert_close(compiled(x), other(x), rtol=0, atol=0)
    bases = model[0].adapters["default"].bases
    with torch.no_grad():
        bases.key[0] = 5  # by hand: the bases are seed 9's
    with pytest.raises(RuntimeError, match="changed in place"):
        compiled(x)
    bases.refresh()  # eager: regenerates from seed 5
    torch.testing.assert_close(compiled(x), _mlp_vera(5)(x), rtol=0, atol=0)
