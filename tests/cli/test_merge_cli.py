"""``rankwise merge config.yaml --out dir``: adapters (rankwise + PEFT inputs) and whole models."""

from __future__ import annotations

import pytest
import torch
import yaml

import rankwise as rw
from rankwise.cli.main import main


def _tiny_bert(folder, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    model = BertModel(cfg)
    model.save_pretrained(folder)
    return model


def _load_base(folder):
    from transformers import BertModel

    return BertModel.from_pretrained(folder)


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.core.api.adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g))


def _deltas(model, name):
    return {n: layer.delta_weight([name]).detach() for n, layer in rw.core.api.adapted_layers(model)
            if name in layer.adapters}


@pytest.fixture()
def inputs(tmp_path):
    base = tmp_path / "base"
    _tiny_bert(base)
    m1 = _load_base(base)
    rw.adapt(m1, "lora", rank=2, alpha=4, targets=["query", "value"], seed=1)
    _randomize(m1, "default", 1)
    rw.save(m1, tmp_path / "a1")                      # rankwise format, adapter named "default"
    m2 = _load_base(base)
    rw.adapt(m2, "lora", rank=3, alpha=3, targets=["query", "key"], seed=2)
    _randomize(m2, "default", 2)
    rw.export_peft(m2, tmp_path / "a2")               # PEFT format
    return tmp_path, _deltas(m1, "default"), _deltas(m2, "default")


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_adapters_writes_rankwise_and_peft_and_a_table(inputs, capsys):
    from peft import PeftModel

    tmp, d1, d2 = inputs
    cfg = _write(tmp / "merge.yaml", {
        "base_model": str(tmp / "base"), "method": "cat",
        "adapters": [{"path": str(tmp / "a1"), "weight": 0.7}, {"path": str(tmp / "a2"), "weight": -0.5}],
    })
    out = tmp / "out"
    assert main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "a1" in text and "a2" in text and "lora (cat)" in text and "saved to" in text
    assert (out / "report.md").read_text().startswith("# rankwise merge")

    # the combined adapter is 0.7 ΔW_1 − 0.5 ΔW_2 exactly (cat), on every module either input adapts
    fresh = _load_base(tmp / "base")
    rw.load(fresh, out / "adapter")
    got = _deltas(fresh, "merged")
    assert set(got) == set(d1) | set(d2)
    for k in got:
        want = 0.7 * d1.get(k, 0) - 0.5 * d2.get(k, 0)
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-5)
    # and the PEFT copy loads in PEFT with the same outputs
    ids = torch.randint(0, 40, (2, 6))
    fresh.eval()
    pm = PeftModel.from_pretrained(_load_base(tmp / "base"), out / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).last_hidden_state, fresh(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_merge_whole_models_by_task_vectors(tmp_path):
    from safetensors.torch import load_file

    base = _tiny_bert(tmp_path / "base")
    tuned = []
    for i in (1, 2):
        m = _load_base(tmp_path / "base")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"ft{i}")
        tuned.append({k: v.clone() for k, v in m.state_dict().items()})
    cfg = _write(tmp_path / "models.yaml", {
        "base_model": str(tmp_path / "base"), "models": [str(tmp_path / "ft1"), str(tmp_path / "ft2")],
        "method": "linear", "weights": [0.5, 0.25]})
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    sd = base.state_dict()
    for k, v in merged.items():  # θ_base + Σ w_t (θ_t − θ_base)
        if v.is_floating_point():
            want = sd[k] + 0.5 * (tuned[0][k] - sd[k]) + 0.25 * (tuned[1][k] - sd[k])
            torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-5)
    assert (tmp_path / "out" / "config.json").is_file()
    reloaded = _load_base(tmp_path / "out")  # a loadable model folder
    assert reloaded.config.hidden_size == 16


def test_errors_are_reported_before_anything_is_written(inputs, capsys):
    tmp, _, _ = inputs
    good = {"base_model": str(tmp / "base"), "method": "ties_svd", "density": 0.5,
            "adapters": [str(tmp / "a1"), str(tmp / "a2")], "weights": [1, 1]}
    # --out holding the user's files: refused before any work
    user = tmp / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert main(["merge", str(_write(tmp / "g.yaml", good)), "--out", str(user)]) == 2
    assert "notes.txt" in capsys.readouterr().err and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    for bad, match in [({**good, "method": "tie"}, "unknown combine method"),
                       ({**good, "weights": [1]}, "1 weights for 2 adapters"),
                       ({**good, "density": 2}, "density"),
                       ({k: v for k, v in good.items() if k != "base_model"}, "needs base_model")]:
        out = tmp / "out_bad"
        assert main(["merge", str(_write(tmp / "bad.yaml", bad)), "--out", str(out)]) == 2
        assert match in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())
    # an adapter trained on another base model (other hidden size): a shape error naming the module
    other = tmp / "other"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24)).save_pretrained(other)
    bad = {**good, "base_model": str(other)}
    assert main(["merge", str(_write(tmp / "other.yaml", bad)), "--out", str(tmp / "out_other")]) == 2
    assert "query" in capsys.readouterr().err
    assert not (tmp / "out_other").exists() or not any((tmp / "out_other").iterdir())
