"""``rankwise analyze`` on what users hand it (issue 13): a finetune --out folder, a PEFT adapter with a
classification head of another size than the base's, names that tell two ``adapter`` folders apart,
and a wrong folder refused before any analysis.

Oracle for the PEFT head: ``peft.PeftModel.from_pretrained`` on the same base gives the same logits as
the model ``analyze`` loads."""

from __future__ import annotations

import re

import pytest
import torch
from _cli_helpers import tiny_classifier_dir, write_csv

from rankwise.cli.analyze import display_names, load_adapted
from rankwise.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("tiny_bert"))  # a 2-label head


@pytest.fixture(scope="module")
def peft_dir(model_dir, tmp_path_factory):
    """A PEFT LoRA adapter with a 4-label classifier (modules_to_save) on the 2-label base."""
    import peft
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    m = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=4, ignore_mismatched_sizes=True)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                                                task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("peft") / "peft_lora"
    pm.save_pretrained(d)
    return d


def test_peft_adapter_with_a_classifier_head_loads_as_peft_does(model_dir, peft_dir):
    """Trial 2: ``ShapeMismatchError … classifier bias (8,) vs (2,)``: PEFT files name the saved head
    ``classifier.weight``, with no ``modules_to_save`` segment."""
    import peft
    from transformers import AutoModelForSequenceClassification

    ours, cname = load_adapted(str(model_dir), peft_dir)
    assert cname == "AutoModelForSequenceClassification" and ours.config.num_labels == 4
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=4, ignore_mismatched_sizes=True)
    theirs = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    ids = torch.tensor([[2, 5, 9, 11, 3], [2, 20, 21, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_analyze_names_models_by_folder_and_method(model_dir, peft_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", n=24, names=("a", "b", "c", "d"))
    for run in ("ft_lora", "ft_dora"):
        method = run.split("_")[1]
        assert main(["finetune", "--model", str(model_dir), "--data", str(data), "--text-col", "sentence",
                     "--label-col", "topic", "--method", method, "--rank", "2", "--steps", "1", "--batch-size", "4",
                     "--out", str(tmp_path / run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["analyze", "--base", str(model_dir), "--adapter", str(tmp_path / "ft_lora"), "--adapter",
                 str(tmp_path / "ft_dora" / "adapter"), "--adapter", str(peft_dir), "--out", str(tmp_path / "rep"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"ft_lora/adapter +lora ", printed) and re.search(r"peft_lora +lora \(PEFT\)", printed)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert re.search(r"\| measure +\| ft_lora/adapter +\| ft_dora/adapter +\| peft_lora +\|", md)
    assert re.search(r"\| method +\| lora +\| dora +\| lora \(PEFT\) +\|", md)
    assert "## Layers: ft_dora/adapter (dora)" in md


def test_display_names():
    assert display_names(["/r/one/adapter", "/r/two/adapter"]) == ["one/adapter", "two/adapter"]
    assert display_names(["/a/x/lora", "/b/x/lora", "/c/peft"]) == ["a/x/lora", "b/x/lora", "peft"]
    assert display_names(["/r/lora", "/r/lora"]) == ["lora", "lora'"]


def test_a_wrong_folder_is_refused_before_any_analysis(model_dir, peft_dir, tmp_path, capsys, monkeypatch):
    """Trial 2: given a training checkpoint, analyze crashed with a traceback after 50 s of adapter
    analysis, and wrote nothing."""
    import rankwise.analysis

    monkeypatch.setattr(rankwise.analysis, "analyze", lambda *a, **k: pytest.fail("nothing may be analysed"))
    ckpt = tmp_path / "ft_full" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert main(["analyze", "--base", str(model_dir), "--adapter", str(peft_dir), "--finetuned", str(ckpt),
                 "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"rankwise analyze: error: --finetuned .*checkpoint is a training checkpoint "
                                      r".*rankwise finetune --method full", err[0]), err
    assert main(["analyze", "--base", str(model_dir), "--finetuned", str(peft_dir), "--out",
                 str(tmp_path / "rep")]) == 2
    assert "holds an adapter, not a full model; pass it with --adapter" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()
