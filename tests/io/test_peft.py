"""PEFT 0.21 as the oracle for LoRA: the same weights give the same logits and gradients,
and adapters round-trip through PEFT's file format in both directions."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import rankwise as rw
from rankwise.core.api import saved_module

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.skipif("lora" not in rw.methods(), reason="lora is not registered"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]

ATOL = 1e-5

# (model builder fixture name, target suffixes, modules_to_save)
MODELS = {
    "bert": ("bert", ["query", "value", "dense"], ["classifier"]),
    "gpt2": ("gpt2", ["c_attn", "c_proj", "c_fc"], None),
    "gpt2-emb": ("gpt2", ["wte", "c_attn"], None),
    "bert-emb": ("bert", ["word_embeddings", "key"], ["classifier"]),
    "llama-emb": ("llama", ["embed_tokens", "q_proj", "down_proj"], None),
}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _rw_lora_params(model):
    """{module name: (lora_A, lora_B)} of rankwise's default adapter."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, rw.core.adapted.AdaptedLayer):
            ad = m.adapters["default"]
            out[name] = (ad.lora_A, ad.lora_B)
    return out


def _peft_lora_params(pmodel):
    """{module name (base-model relative): (A, B)} as rankwise-shaped (r×in, out×r) views."""
    out = {}
    for name, m in pmodel.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out[name] = (m.lora_A["default"].weight, m.lora_B["default"].weight)
        elif hasattr(m, "lora_embedding_A") and "default" in m.lora_embedding_A:
            out[name] = (m.lora_embedding_A["default"], m.lora_embedding_B["default"])
    return out


def _randomize_peft(pmodel, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pmodel.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---- rankwise → PEFT --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("rslora", [False, True])
def test_export_to_peft_same_logits(case, rslora, request, tmp_path, token_batch, perturb):
    fixture, targets, save = MODELS[case]
    base = request.getfixturevalue(fixture)(seed=0)
    model = copy.deepcopy(base)
    rw.adapt(model, "lora", rank=4, alpha=6.0, rslora=rslora, targets=targets,
             modules_to_save=save or [], seed=0)
    perturb([p for p in model.parameters() if p.requires_grad], seed=3)
    ours = _logits(model, token_batch)
    assert not torch.allclose(ours, _logits(base, token_batch), atol=1e-3), "adapter should change the output"

    rw.export_peft(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    theirs = _logits(pmodel, token_batch)
    assert (ours - theirs).abs().max() <= ATOL
    # and the adapter modules PEFT built are exactly the ones rankwise adapted
    assert set(_peft_lora_params(pmodel)) == set(_rw_lora_params(model))


# ---- PEFT → rankwise --------------------------------------------------------------------------------
def _peft_model(base, targets, save, rslora, r=4, alpha=8):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                          modules_to_save=save, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("rslora", [False, True])
def test_import_from_peft_same_logits(case, rslora, request, tmp_path, token_batch):
    fixture, targets, save = MODELS[case]
    base = request.getfixturevalue(fixture)(seed=0)
    pmodel = _peft_model(base, targets, save, rslora)
    _randomize_peft(pmodel, seed=5)
    theirs = _logits(pmodel, token_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(tmp_path / "peft")

    model = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    ours = _logits(model, token_batch)
    assert (ours - theirs).abs().max() <= ATOL
    assert set(_rw_lora_params(model)) == set(_peft_lora_params(pmodel))
    cfg = rw.core.api.adapter_state(model)["default"]["config"]
    assert (cfg.rank, cfg.alpha, cfg.rslora) == (4, 8.0, rslora)
    # trainable: the adapters plus the saved head, nothing else
    expected = sum(a.numel() + b.numel() for a, b in _rw_lora_params(model).values())
    if save:
        expected += sum(p.numel() for p in saved_module(model, save[0], "default").parameters())
        # the head PEFT trained is rankwise's copy; the original stays the base model's
        torch.testing.assert_close(saved_module(model, save[0], "default").state_dict(),
                                   pmodel.base_model.model.get_submodule(save[0]).modules_to_save["default"].state_dict(),
                                   atol=0, rtol=0)
        for k, v in model.get_submodule(save[0]).original.state_dict().items():
            assert torch.equal(v, base.get_submodule(save[0]).state_dict()[k]), k
    assert rw.parameter_count(model).trainable == expected

    # round trip back out: rankwise → PEFT gives PEFT's logits again
    rw.export_peft(model, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    assert (_logits(p2, token_batch) - theirs).abs().max() <= ATOL


def test_peft_with_two_heads(bert, tmp_path, token_batch, perturb):
    """Two adapters each with a classifier copy: each exports with its own head and gives PEFT's
    logits; a PEFT adapter with a head imports beside them as a third copy."""
    base = bert(seed=0)
    model = copy.deepcopy(base)
    for i, name in enumerate(("a", "b")):
        rw.adapt(model, "lora", rank=4, alpha=6.0, targets=["query", "value"], modules_to_save=["classifier"],
                 name=name, seed=i)
        perturb([p for n, p in model.named_parameters() if f".{name}." in n], seed=10 + i)
    outs = {}
    for name in ("a", "b"):
        rw.set_active(model, name)
        outs[name] = _logits(model, token_batch)
        rw.export_peft(model, tmp_path / name, name=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        assert (_logits(pmodel, token_batch) - outs[name]).abs().max() <= ATOL, name
    assert not torch.allclose(outs["a"], outs["b"], atol=1e-3)

    pmodel = _peft_model(base, ["query", "value"], ["classifier"], rslora=False)
    _randomize_peft(pmodel, seed=7)
    theirs = _logits(pmodel, token_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(tmp_path / "peft")
    rw.import_peft(model, tmp_path / "peft", name="p")
    assert list(model.classifier.copies) == ["a", "b", "p"]
    assert (_logits(model, token_batch) - theirs).abs().max() <= ATOL
    for name in ("a", "b"):
        rw.set_active(model, name)
        assert torch.equal(_logits(model, token_batch), outs[name]), name
    rw.set_active(model, None)
    assert torch.equal(_logits(model, token_batch), _logits(base, token_batch))


# ---- same weights → same gradients ---------------------------------------------------------------
@pytest.mark.parametrize("case", ["bert", "gpt2", "gpt2-emb", "llama-emb"])
def test_same_weights_same_gradients(case, request, token_batch):
    fixture, targets, save = MODELS[case]
    base = request.getfixturevalue(fixture)(seed=0)
    pmodel = _peft_model(base, targets, save, rslora=False, r=4, alpha=6)
    _randomize_peft(pmodel, seed=9)

    model = copy.deepcopy(base)
    rw.adapt(model, "lora", rank=4, alpha=6.0, targets=targets, modules_to_save=save or [], seed=0)
    ours, theirs = _rw_lora_params(model), _peft_lora_params(pmodel)
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for name, (a, b) in ours.items():
            a.copy_(theirs[name][0])
            b.copy_(theirs[name][1])
        if save:
            wrapped = pmodel.base_model.model.get_submodule(save[0]).modules_to_save["default"]
            saved_module(model, save[0], "default").load_state_dict(wrapped.state_dict())

    def loss_of(m):
        logits = m(**token_batch).logits
        target = torch.arange(logits.numel(), dtype=logits.dtype).reshape(logits.shape).sin()
        return (logits * target).sum()

    model.train()
    pmodel.train()
    lo, lt = loss_of(model), loss_of(pmodel)
    torch.testing.assert_close(lo, lt, atol=ATOL, rtol=1e-6)
    lo.backward()
    lt.backward()
    for name in ours:
        for mine, ref, which in zip(ours[name], theirs[name], "AB"):
            assert mine.grad is not None and ref.grad is not None, f"{name}.lora_{which}"
            assert mine.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, ref.grad, atol=ATOL, rtol=1e-4, msg=f"{name}.lora_{which}")
    if save:  # the trained head: our copy and PEFT's get the same gradients; the originals none
        ours_head = dict(saved_module(model, save[0], "default").named_parameters())
        theirs_head = dict(wrapped.named_parameters())
        assert ours_head.keys() == theirs_head.keys()
        for k, p in ours_head.items():
            assert p.grad is not None and p.grad.abs().max() > 0, k
            torch.testing.assert_close(p.grad, theirs_head[k].grad, atol=ATOL, rtol=1e-4, msg=f"{save[0]}.{k}")
        assert all(p.grad is None for p in model.get_submodule(save[0]).original.parameters())


# ---- conv and embedding layers outside transformers --------------------------------------------
class ConvNet(torch.nn.Module):
    """nn.Conv1d, nn.Conv2d (non-square kernel, stride, padding), nn.Embedding (padding_idx) and nn.Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 5, 3, padding=1, stride=2)
        self.c2 = torch.nn.Conv2d(5, 4, (3, 2), padding=1)
        self.emb = torch.nn.Embedding(10, 6, padding_idx=0)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x, ids):
        h = self.c1(x)
        h2 = self.c2(h[:, :, None, :].expand(-1, -1, 4, -1))
        return torch.cat([h.flatten(1), h2.flatten(1), self.fc(self.emb(ids)).flatten(1)], dim=1)


CONV_TARGETS = ["c1", "c2", "emb", "fc"]


def _conv_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 11, generator=g), torch.randint(0, 10, (2, 4), generator=g)


def test_conv_embedding_export_to_peft(tmp_path, perturb):
    torch.manual_seed(0)
    base, (x, ids) = ConvNet(), _conv_inputs()
    model = rw.adapt(copy.deepcopy(base), "lora", rank=2, alpha=3.0, targets=CONV_TARGETS, seed=0)
    perturb([p for p in model.parameters() if p.requires_grad], seed=1)
    rw.export_peft(model, tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    with torch.no_grad():
        ours, theirs = model(x, ids), pmodel(x, ids)
        assert not torch.allclose(ours, base(x, ids), atol=1e-3)
    assert (ours - theirs).abs().max() <= ATOL


def test_conv_embedding_import_from_peft(tmp_path):
    torch.manual_seed(0)
    base, (x, ids) = ConvNet(), _conv_inputs()
    pmodel = _peft_model(base, CONV_TARGETS, None, rslora=False, r=2, alpha=3)
    _randomize_peft(pmodel, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(tmp_path / "p")
    model = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        assert (model(x, ids) - pmodel(x, ids)).abs().max() <= ATOL


def test_export_refuses_conv_peft_cannot_represent(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, dilation=2, padding=1))
    rw.adapt(model, "lora", rank=2, targets=["0"])
    with pytest.raises(rw.errors.RankwiseError, match="dilation"):
        rw.export_peft(model, tmp_path / "p")
