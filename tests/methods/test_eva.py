"""EVA (methods/eva.py): the PCA of the layer inputs and the rank budget against a dense
transcription (torch.linalg.eigh), PEFT 0.21 as the oracle, and save/load/PEFT round trips."""

from __future__ import annotations

import copy

import _init_helpers as helpers
import pytest
import torch
from _init_helpers import TARGETS

import rankwise as rw
from rankwise.core.calibrate import Batches

_ids, _layers, _logits, _peft_layer, _perturb_b = (
    helpers.ids, helpers.layers, helpers.logits, helpers.peft_layer, helpers.perturb_b)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    """PEFT draws from the global RNG (kaiming init before a data-driven init)."""
    torch.manual_seed(0)


# ---- EVA ----------------------------------------------------------------------------------------------------
def _eva_batches(n=2):
    out = []
    for i in range(n):
        ids = _ids(10 + i, (2, 16))
        mask = torch.ones_like(ids)
        mask[1, -5:] = 0  # padding: EVA leaves these rows out
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_eva_defining_property(llama):
    base = llama()
    batches = _eva_batches()
    model = copy.deepcopy(base)
    rw.adapt(model, "eva", rank=2, alpha=4, rho=2.0, oversample=64, targets=TARGETS,
             calibration=Batches(batches, progress=False))
    # dense oracle: the masked input rows of every target, their PCA, and the budget split
    rows = {n: [] for n in _layers(model)}
    names = [n for n, _ in base.named_modules() if n.split(".")[-1] in TARGETS]
    hs = [base.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: rows.setdefault(n, []).append(a[0]))
          for n in names]
    with torch.no_grad():
        for b in batches:
            base(**b)
    for h in hs:
        h.remove()
    ratios, pcs = [], {}
    for i, n in enumerate(names):
        x = torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows[n], batches)]).double()
        xc = x - x.mean(0)
        ev, evec = torch.linalg.eigh(xc.T @ xc)
        ev, evec = ev.flip(0), evec.flip(1)
        pcs[n] = evec.T
        ratios += [(-(v / ev.sum()).item(), i, n) for v in ev[:4]]  # up to round(rho·r) = 4 per layer
    expected = dict.fromkeys(names, 0)
    for _, _, n in sorted(ratios)[: 2 * len(names)]:
        expected[n] += 1
    layers = _layers(model)
    assert {n: layers[n].adapters["default"].rank if n in layers else 0 for n in names} == expected
    assert len(set(expected.values())) > 1  # the budget really was redistributed here
    for n, layer in layers.items():
        ad = layer.adapters["default"]
        r = ad.rank
        assert ad.config.lora_alpha == 4 * r / 2 and ad.scale == 2.0  # α/r kept
        assert torch.count_nonzero(ad.lora_B) == 0
        proj = ad.lora_A.double().T @ ad.lora_A.double()
        torch.testing.assert_close(proj, pcs[n][:r].T @ pcs[n][:r], atol=1e-4, rtol=0)
    assert torch.equal(_logits(model, _ids()), _logits(base, _ids()))


def test_eva_matches_peft(llama):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    base = llama()
    batches = [{"input_ids": _ids(20, (2, 16))}]
    batches[0]["attention_mask"] = torch.ones_like(batches[0]["input_ids"])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.99999, use_label_mask=False))
    pm = get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    mine = copy.deepcopy(base)
    rw.adapt(mine, "eva", rank=2, alpha=4, rho=2.0, oversample=64, targets=TARGETS,
             calibration=Batches(batches, progress=False))
    layers = _layers(mine)
    pcfg = pm.peft_config["default"]
    ranks = {n: layers[n].adapters["default"].rank for n in layers}
    assert {n: r for n, r in ranks.items() if r != 2} == pcfg.rank_pattern
    assert {n: layers[n].adapters["default"].config.lora_alpha for n in layers if ranks[n] != 2} == pcfg.alpha_pattern
    for n, layer in layers.items():
        a_peft = _peft_layer(pm, n).lora_A["default"].weight
        a = layer.adapters["default"].lora_A
        # the same principal subspace (PEFT stops its iterations at cosine similarity τ)
        torch.testing.assert_close(a.T @ a, a_peft.T @ a_peft, atol=5e-3, rtol=0)


def test_eva_save_load_and_peft_roundtrip(llama, tmp_path):
    from peft import PeftModel

    base = llama()
    model = copy.deepcopy(base)
    rw.adapt(model, "eva", rank=2, alpha=4, targets=TARGETS, calibration=Batches(_eva_batches(), progress=False))
    _perturb_b(model)
    ids = _ids()
    out = _logits(model, ids)
    ranks = {n: ly.adapters["default"].rank for n, ly in _layers(model).items()}
    assert len(set(ranks.values())) > 1
    rw.save(model, tmp_path / "rw")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "rw")  # no calibration needed to load
    assert {n: ly.adapters["default"].rank for n, ly in _layers(fresh).items()} == ranks
    assert torch.equal(_logits(fresh, ids), out)
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, ids), out, atol=1e-5, rtol=1e-5)
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert rw.summary(back)[0]["method"] == "eva"
    assert {n: ly.adapters["default"].rank for n, ly in _layers(back).items()} == ranks
    torch.testing.assert_close(_logits(back, ids), out, atol=1e-6, rtol=1e-6)
    loaded.save_pretrained(tmp_path / "peft2")  # PEFT's own save of the same adapter
    again = rw.import_peft(copy.deepcopy(base), tmp_path / "peft2")
    torch.testing.assert_close(_logits(again, ids), out, atol=1e-5, rtol=1e-5)


def test_eva_drops_layers_without_rank_and_rejects_empty_data(llama):
    base = llama()
    model = copy.deepcopy(base)
    # a huge rho lets the budget concentrate: some layers end with rank 0 and are left out
    rw.adapt(model, "eva", rank=1, rho=8.0, targets=TARGETS, calibration=Batches(_eva_batches(), progress=False))
    state = rw.core.api.adapter_state(model)["default"]
    assert len(state["modules"]) == len(_layers(model)) < 4
    assert sum(ly.adapters["default"].rank for ly in _layers(model).values()) == 4
    padding_only = {"input_ids": _ids(0, (1, 4)), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(rw.errors.CalibrationError, match="q_proj.*no input rows"):
        rw.adapt(copy.deepcopy(base), "eva", rank=2, targets=["q_proj"], calibration=Batches([padding_only],
                                                                                            progress=False))
