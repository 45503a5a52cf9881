"""PEFT habits: ``rw.disabled``, ``rw.parameter_count`` / ``print_trainable_parameters``,
``rw.trainable_parameters`` (the tensors), only active adapters trainable, ``rw.load(trainable=False)``.

Oracle: PEFT on the same base model with the same adapter tensors — ``get_peft_model``,
``disable_adapter()``, ``get_nb_trainable_parameters`` / ``print_trainable_parameters``,
``add_adapter`` + ``set_adapter`` and ``PeftModel.from_pretrained(is_trainable=...)``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.core.api import adapter_parameters

TARGETS = ["query", "value"]


def _peft(base, names=("default",)):
    import peft

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, modules_to_save=["classifier"])
    pmodel = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for n in names[1:]:
        pmodel.add_adapter(n, cfg)
    return pmodel


def _ours(base, names=("default",)):
    model = copy.deepcopy(base)
    for n in names:
        rw.adapt(model, "lora", rank=2, alpha=4, targets=TARGETS, modules_to_save=["classifier"], name=n, seed=0)
    return model


def _flags(model, peft_style=False) -> dict[str, bool]:
    """{(module, adapter, tensor kind): requires_grad} in a layout both libraries share."""
    out = {}
    for n, p in model.named_parameters():
        n = n.removeprefix("base_model.model.")
        for ours, theirs in ((".adapters.", ".lora_"), (".copies.", ".modules_to_save.")):
            if peft_style and theirs in n:
                mod, rest = n.split(theirs, 1)
                kind, adapter = (rest.split(".")[0], rest.split(".")[1]) if theirs == ".lora_" else \
                    (rest.split(".")[1], rest.split(".")[0])
                out[(mod, adapter, kind)] = p.requires_grad
            elif not peft_style and ours in n:
                mod, rest = n.split(ours, 1)
                adapter, kind = rest.split(".", 1)
                out[(mod, adapter, kind.removeprefix("lora_"))] = p.requires_grad
    return out


def test_disabled_is_peft_disable_adapter_and_restores(bert, token_batch, perturb):
    base = bert()
    model, pmodel = _ours(base), _peft(base)
    perturb(adapter_parameters(model, "default"), seed=2)
    with torch.no_grad():
        for (mod, _, kind), t in zip(_flags(model), adapter_parameters(model, "default")):
            peft_name = f"base_model.model.{mod}." + (f"lora_{kind}.default.weight" if kind in ("A", "B")
                                                      else f"modules_to_save.default.{kind}")
            pmodel.get_parameter(peft_name).copy_(t)
    model.eval(), pmodel.eval()
    with torch.no_grad():
        on = model(**token_batch).logits
        torch.testing.assert_close(on, pmodel(**token_batch).logits, atol=1e-6, rtol=0)
        with rw.disabled(model), pmodel.disable_adapter():
            off = model(**token_batch).logits
            torch.testing.assert_close(off, pmodel(**token_batch).logits, atol=1e-6, rtol=0)
            torch.testing.assert_close(off, base(**token_batch).logits, atol=1e-6, rtol=0)
        assert torch.equal(model(**token_batch).logits, on)
        rw.merge(model)
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(RuntimeError, match="boom"), rw.disabled(model):
            assert not torch.allclose(model(**token_batch).logits, on, atol=1e-3)
            raise RuntimeError("boom")
        assert model.bert.encoder.layer[0].attention.self.query.merged == ["default"]  # merged again
        torch.testing.assert_close(model(**token_batch).logits, on, atol=1e-5, rtol=0)
        assert [p.requires_grad for p in model.parameters()] == flags


def test_parameter_count_is_peft_print_trainable_parameters(bert, capsys):
    base = bert()
    model, pmodel = _ours(base), _peft(base)
    count = rw.parameter_count(model)
    assert (count.trainable, count.total) == pmodel.get_nb_trainable_parameters()
    assert count.percent == pytest.approx(100 * count.trainable / count.total)
    pmodel.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    rw.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == theirs == str(count)


def test_trainable_parameters_are_the_tensors(bert, token_batch):
    model = _ours(bert())
    params = rw.trainable_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) == len({id(p) for p in params})  # each once
    assert sum(p.numel() for p in params) == rw.parameter_count(model).trainable
    opt = torch.optim.SGD(rw.trainable_parameters(model), lr=0.1)
    before = [p.detach().clone() for p in params]
    model.train()
    model(**token_batch, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(params, before) if p.grad is not None and p.grad.any())


def test_only_active_adapters_train_as_after_peft_set_adapter(bert):
    base = bert()
    model, pmodel = _ours(base, ("a", "b")), _peft(base, ("a", "b"))
    for name in ("b", "a", "b"):
        rw.set_active(model, name)
        pmodel.set_adapter(name)
        ours, theirs = _flags(model), _flags(pmodel, peft_style=True)
        assert ours == theirs, name
        assert any(ours.values()) and not any(v for (_, a, _), v in ours.items() if a != name)
    assert rw.parameter_count(model)[:2] == pmodel.get_nb_trainable_parameters()


def test_load_is_frozen_for_inference_unless_trainable(bert, tmp_path):
    import peft

    base = bert()
    model = _ours(base)
    rw.save(model, tmp_path / "rw")
    rw.export_peft(model, tmp_path / "peft")
    for trainable in (False, True):
        ours = rw.load(copy.deepcopy(base), tmp_path / "rw", trainable=trainable) if trainable else \
            rw.load(copy.deepcopy(base), tmp_path / "rw")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=trainable)
        assert _flags(ours) == _flags(theirs, peft_style=True), trainable
        assert all(_flags(ours).values()) is trainable and any(_flags(ours).values()) is trainable
        assert rw.parameter_count(ours)[:2] == theirs.get_nb_trainable_parameters()
    # loaded inactive and frozen: made active later, it stays frozen (a later set_active never unfreezes it)
    again = rw.load(copy.deepcopy(base), tmp_path / "rw", active=False)
    rw.set_active(again, "default")
    assert not any(p.requires_grad for p in adapter_parameters(again, "default"))
