"""Tiny model folders with adapters, a real uvicorn server on a free loopback port, and the oracles
(direct calls on an independently loaded copy of the model)."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import torch

import rankwise as rw
from rankwise.integrations.hf import minilm_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary (its tokenizer is copied into every folder)
EOS = 102  # [SEP]


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()


def _tokenizer_into(folder: Path) -> None:
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, folder / f)


def perturb(model, name: str, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rw.core.api.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=101,
                      eos_token_id=EOS, pad_token_id=0, initializer_range=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def make_bert(classifier: bool):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    _quiet()
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    torch.manual_seed(0)
    return (BertForSequenceClassification(cfg) if classifier else BertModel(cfg)).eval()


def build_llama_dir(root: Path) -> Path:
    """``root/model`` (tiny Llama + MiniLM tokenizer) and ``root/adapters/{a, b, d}``:
    a = rankwise LoRA r4, b = PEFT LoRA r2 (all-linear), d = DoRA r4 saved under the name 'default'."""
    model = make_llama()
    (root / "model").mkdir(parents=True)
    model.save_pretrained(root / "model")
    _tokenizer_into(root / "model")
    adapters = root / "adapters"
    adapters.mkdir()
    for name, method, rank, targets, seed in (("a", "lora", 4, ["q_proj", "v_proj"], 1),
                                               ("b", "lora", 2, "all-linear", 2),
                                               ("default", "dora", 4, ["q_proj", "o_proj", "down_proj"], 3)):
        m = make_llama()
        rw.adapt(m, method, name=name, rank=rank, targets=targets, seed=seed)
        perturb(m, name, seed)
        if name == "b":
            rw.export_peft(m, adapters / "b", name="b")
        else:
            rw.save(m, adapters / ("d" if name == "default" else name))
    return root


def build_bert_dir(root: Path, classifier: bool) -> Path:
    model = make_bert(classifier)
    (root / "model").mkdir(parents=True)
    model.save_pretrained(root / "model")
    _tokenizer_into(root / "model")
    (root / "adapters").mkdir()
    head = ["classifier"] if classifier else []
    for name, method, seed in (("a", "lora", 1), ("b", "dora", 2)):
        m = make_bert(classifier)
        rw.adapt(m, method, name=name, rank=4, targets=["query", "value", "dense"], modules_to_save=head, seed=seed)
        perturb(m, name, seed)
        rw.save(m, root / "adapters" / name)
    return root


def oracle_model(root: Path):
    """The model folder loaded again with every adapter of ``root/adapters`` through rw.load /
    rw.import_peft, each under the name it was saved with (folder 'd' holds 'default')."""
    import json

    from rankwise.serve import load_model

    model, tok, task = load_model(root / "model", "cpu")
    for d in sorted(p for p in (root / "adapters").iterdir() if p.is_dir() and not p.name.startswith(".")):
        if "peft_type" in json.loads((d / "adapter_config.json").read_text()):
            rw.import_peft(model, d, name=d.name)
        else:
            rw.load(model, d)
    return model, tok, task


def greedy(model, ids: list[int], adapter, max_new: int) -> list[int]:
    with torch.no_grad():
        rw.set_active(model, adapter)
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(EOS)] if EOS in out else out


def pooled(model, ids: list[int], adapter) -> torch.Tensor:
    """Mean of the last hidden states over the tokens, L2-normalized (the embeddings endpoint's pooling)."""
    with torch.no_grad():
        rw.set_active(model, adapter)
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return torch.nn.functional.normalize(h.mean(0), dim=-1)


def tar_of(folder: Path, extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(folder / f, arcname=f)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@contextlib.contextmanager
def serving(app):
    """Run ``app`` under uvicorn in a thread on a free 127.0.0.1 port; yield its base URL; stop it."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
