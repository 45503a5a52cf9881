"""AdapterCache: rankwise and PEFT folders under the folder's name, LRU eviction by bytes, reload on change.

Oracle: the same adapters loaded with rw.load / rw.import_peft and run alone (rw.set_active)."""

from __future__ import annotations

import pytest
import torch
from _serve_helpers import build_llama_dir, make_llama, oracle_model, perturb

import rankwise as rw
from rankwise.errors import AdapterNotFoundError, ShapeMismatchError
from rankwise.serve import AdapterCache, load_model
from rankwise.serve.cache import adapter_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama_dir(tmp_path_factory.mktemp("llama-cache"))


def _logits(model, ids, names):
    with torch.no_grad(), rw.mixed_batch(model, names):
        return model(input_ids=ids).logits


def test_loads_rankwise_and_peft_folders_under_folder_names(llama_dir):
    model = load_model(llama_dir / "model", "cpu")[0]
    cache = AdapterCache(model, llama_dir / "adapters")
    assert cache.available() == ["a", "b", "d"]
    cache.acquire(["a", "b", "d"])
    assert sorted(rw.core.api.adapter_state(model)) == ["a", "b", "d"]
    oracle = oracle_model(llama_dir)[0]
    ids = torch.randint(1000, 2000, (4, 5), generator=torch.Generator().manual_seed(0))
    got = _logits(model, ids, ["d", "b", None, "a"])
    for i, name in enumerate(["default", "b", None, "a"]):
        with torch.no_grad():
            rw.set_active(oracle, name)
            torch.testing.assert_close(got[i], oracle(input_ids=ids[i:i + 1]).logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterNotFoundError, match="'zz'"):
        cache.acquire(["zz"])


def test_lru_eviction_by_bytes_and_reload_on_change(llama_dir, tmp_path):
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(llama_dir / "adapters", root)
    model = load_model(llama_dir / "model", "cpu")[0]
    probe = AdapterCache(model, root)
    probe.acquire(["a", "b", "d"])
    size = {n: adapter_bytes(model, n) for n in ("a", "b", "d")}
    for n in ("a", "b", "d"):
        probe.discard(n)
    cache = AdapterCache(model, root, max_bytes=size["a"] + size["b"] + size["d"] - 1)
    cache.acquire(["a"])
    cache.acquire(["b"])
    cache.acquire(["a"])  # a is now the most recently used
    cache.acquire(["d"])  # over budget: the least recently used (b) goes
    assert cache.loaded == ["a", "d"] and cache.evictions == 1
    assert sorted(rw.core.api.adapter_state(model)) == ["a", "d"]
    small = AdapterCache(model, root, max_bytes=1)
    for n in list(cache.loaded):
        cache.discard(n)
    small.acquire(["a", "b"])  # one batch needs both: both stay although over budget
    assert small.loaded == ["a", "b"] and small.bytes > small.max_bytes
    small.acquire(["d"])  # the next batch evicts what it does not need
    assert small.loaded == ["d"]
    # replace folder 'd' on disk: the next acquire reloads it
    ids = torch.randint(1000, 2000, (1, 5), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids, ["d"])
    m = make_llama()
    rw.adapt(m, "lora", name="d", rank=2, targets=["q_proj"], seed=5)
    perturb(m, "d", 5)
    rw.save(m, root / "d")
    loads = small.loads
    small.acquire(["d"])
    assert small.loads == loads + 1
    after = _logits(model, ids, ["d"])
    with torch.no_grad():
        rw.set_active(m, "d")
        torch.testing.assert_close(after, m(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3


def test_install_checks_before_changing_anything(llama_dir, tmp_path):
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(llama_dir / "adapters", root)
    model = load_model(llama_dir / "model", "cpu")[0]
    cache = AdapterCache(model, root)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=30522))
    rw.adapt(other, "lora", name="w", rank=2, targets=["q_proj"])
    rw.save(other, tmp_path / "wrong")
    before = (root / "a" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ShapeMismatchError):
        cache.install("a", tmp_path / "wrong")
    assert (root / "a" / "adapter_model.safetensors").read_bytes() == before
    assert rw.core.api.adapter_state(model) == {}
