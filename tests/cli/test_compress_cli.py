"""`rankwise compress` on a tiny byte-level LLaMA folder (no tokenizer, vocabulary 256)."""

from __future__ import annotations

import pytest
import torch

import rankwise.compress as rc
from rankwise.cli.main import main


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_lm")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _args(model, out, *extra):
    return ["compress", "--model", str(model), "--out", str(out), "--calib-samples", "4", "--max-length", "32",
            "--eval-windows", "4", "--no-progress", "--threads", "1", *extra]


def test_compress_cli_writes_a_loadable_model(tiny_lm, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_lm, out, "--method", "svd_llm", "--ratio", "0.6", "--calib", "demo", "--export-hf")) == 0
    text = capsys.readouterr().out
    assert "perplexity before" in text and "bytes after" in text and "model.layers.0.mlp.up_proj" in text
    for f in ("compress_config.json", "model.safetensors", "config.json", "report.md", "hf/model.safetensors"):
        assert (out / f).is_file()
    model = rc.load(out)
    assert len(rc.factored_layers(model)) == 7
    ids = torch.randint(0, 256, (1, 9))
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out / "hf")
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_compress_cli_eora_writes_a_peft_adapter(tiny_lm, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_lm, out, "--method", "eora", "--rank", "4", "--calib", "demo")) == 0
    assert (out / "adapter_peft" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (("--method", "svd", "--ratio", "1.5"), "--ratio 1.5 must be in (0, 1]"),
    (("--method", "svd_llm", "--ratio", "0.5", "--calib", "SHORT"), "too short"),
    (("--method", "svd_llm", "--ratio", "0.5"), "calibration"),
    (("--method", "svd", "--ratio", "0.5", "--ranks", "TABLE"), "rank ≤ 32"),
])
def test_compress_cli_bad_input_writes_nothing(tiny_lm, tmp_path, capsys, extra, message):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    table = tmp_path / "ranks.json"
    table.write_text('{"q_proj": 999}')
    extra = tuple(str(short) if e == "SHORT" else str(table) if e == "TABLE" else e for e in extra)
    out = tmp_path / "out"
    assert main(_args(tiny_lm, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "rankwise compress: error:" in err and message in err
    assert not out.exists()
