"""rankwise.pretrain: registry, parametrize (validation leaves the model unchanged), pretrain_step
through rank_step / train(), to_dense (same outputs, plain HF save/load), dtypes, bit-exact resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _pretrain_helpers import SMALL, collate, config, data, ids, lm_loss, perturb_, run, tiny_llama
from torch import nn

import rankwise.pretrain as rp
from rankwise.core.rank import has_rank_hooks, rank_step
from rankwise.errors import ConfigError, TargetError
from rankwise.train import train

NAMES = list(SMALL)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    mods, sd = snap
    now = model.state_dict()
    return ([(n, type(m)) for n, m in model.named_modules()] == mods and now.keys() == sd.keys()
            and all(torch.equal(now[k], v) for k, v in sd.items()))


def test_registry_and_register_checks():
    assert set(NAMES) <= set(rp.PARAMETRIZATIONS)
    for name in NAMES:
        cls = rp.PARAMETRIZATIONS[name]
        assert cls.name == name and dataclasses.is_dataclass(cls.Config)

    class NoName:
        Config = dataclasses.make_dataclass("Config", [])
    with pytest.raises(TypeError, match="name"):
        rp.register(NoName)

    class NoDataclass:
        name = "x"
        Config = dict
    with pytest.raises(TypeError, match="dataclass"):
        rp.register(NoDataclass)


@pytest.mark.parametrize("name", NAMES)
def test_parametrize_replaces_the_projections_only(name):
    model = tiny_llama()
    embed, head = model.model.embed_tokens, model.lm_head
    rp.parametrize(model, name, **SMALL[name])
    layers = rp.wrapped_layers(model)
    assert sorted(n for n, _ in layers) == sorted(f"model.layers.{i}.{blk}.{p}" for i in range(2)
                                                  for blk, ps in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:]))
                                                  for p in ps)
    assert model.model.embed_tokens is embed and model.lm_head is head and type(head) is nn.Linear
    for _, m in layers:
        assert not isinstance(m, nn.Linear) and (m.in_features, m.out_features) in {(32, 32), (32, 64), (64, 32)}
    assert model._rankwise_pretrain[0] == name
    with pytest.raises(ConfigError, match="already parametrized"):
        rp.parametrize(model, name, **SMALL[name])


@pytest.mark.parametrize("name, kwargs, error, match", [
    ("sltrain", dict(rank=4, density=0.0), ConfigError, r"density=0\.0 must be in \(0, 1\)"),
    ("sltrain", dict(rank=4, density=1.0), ConfigError, r"density=1\.0 must be in \(0, 1\)"),
    ("sltrain", dict(rank=4, density=1.5), ConfigError, "density"),
    ("relora", dict(rank=32), ConfigError, r"rank=32 is not below min\(out, in\) = 32 of model.layers.0.self_attn"),
    ("cola", dict(rank=40), ConfigError, "rank=40"),
    ("relora", dict(rank=4, rnak=3), ConfigError, "no option 'rnak'.*Did you mean: rank"),
    ("relora", dict(rank=4, targets="nothing_here"), TargetError, "matches no nn.Linear.*q_proj"),
    ("relora", dict(rank=4, targets="("), ConfigError, "not a valid regular expression"),
    ("relora", dict(rank=4, targets="lm_head"), TargetError, "matches no nn.Linear"),  # output layer never
    ("reloar", dict(rank=4), ConfigError, "unknown parametrization 'reloar'.*relora"),
    ("relora", dict(rank=0), ConfigError, "rank=0 must be an int >= 1"),
    ("relora", dict(rank=4, prune=0.0), ConfigError, r"prune=0\.0 must be in \(0, 1\]"),
    ("relora", dict(rank=4, seed=-1), ConfigError, "seed=-1"),
    ("cola", dict(rank=4, activation="swish"), ConfigError, "activation='swish'"),
])
def test_bad_input_raises_and_leaves_the_model_unchanged(name, kwargs, error, match):
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        rp.parametrize(model, name, **kwargs)
    assert _same(model, snap) and getattr(model, "_rankwise_pretrain", None) is None
    rp.parametrize(model, "relora", rank=4)  # and the model still takes a valid parametrization


def _logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits


@pytest.mark.parametrize("name", ["relora", "periodic_lora", "sltrain"])
def test_to_dense_gives_the_same_outputs_and_a_plain_hf_model(name, tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    rp.parametrize(model, name, **SMALL[name])
    perturb_([p for _, m in rp.wrapped_layers(model) for p in (m.lora_B, m.lora_A)], std=0.1)  # B ≠ 0
    before = _logits(model)
    rp.to_dense(model)
    assert not rp.wrapped_layers(model) and getattr(model, "_rankwise_pretrain", None) is None
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(PROJ))
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)  # loads back with transformers alone
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(again), before, atol=1e-5, rtol=1e-5)


def test_counts_for_the_report():
    model = tiny_llama()
    dense_total = sum(p.numel() for p in model.parameters())
    proj = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(PROJ))
    r = 4
    low_rank = 2 * (4 * (32 + 32) * r + 3 * (32 + 64) * r)  # (m + n)·r per projection, 2 layers
    rp.parametrize(model, "relora", rank=r)
    assert rp.stored_parameters(model) == dense_total + low_rank  # W is kept (frozen)
    assert rp.trainable_parameters_count(model) == dense_total - proj + low_rank
    model = tiny_llama()
    rp.parametrize(model, "cola", rank=r)
    assert rp.stored_parameters(model) == rp.trainable_parameters_count(model) == dense_total - proj + low_rank


def test_pretrain_step_runs_through_rank_step():
    model = tiny_llama()
    assert not has_rank_hooks(model)
    assert rp.pretrain_step(model, 3) == {}
    rp.parametrize(model, "relora", rank=4, reset_every=3)
    assert has_rank_hooks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_loss(model, ids()).backward()
    opt.step()
    assert rank_step(model, 1, opt) == {}
    info = rank_step(model, 3, opt, total_steps=10)
    assert info["pretrain"]["merged_layers"] == 14 and info["pretrain"]["optimizer_entries_zeroed"] > 0
    cola = tiny_llama()
    rp.parametrize(cola, "cola", rank=4)
    assert has_rank_hooks(cola) and rank_step(cola, 3) == {}  # has on_step, nothing to do without refactorize


@pytest.mark.parametrize("name", NAMES)
def test_train_runs_a_tiny_llama(name):
    model = tiny_llama()
    rp.parametrize(model, name, **SMALL[name])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(model, 4)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".lora_A" in k for k in changed) and any(".lora_B" in k for k in changed)
    if name in ("relora", "periodic_lora"):  # the merge at step 3 moved the frozen W
        assert all(k in changed for k in before if k.endswith("proj.weight") and "lm_head" not in k)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_model_and_autocast(name):
    model = tiny_llama(dtype=torch.bfloat16)
    rp.parametrize(model, name, **SMALL[name])
    for _, m in rp.wrapped_layers(model):
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    out = model(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(m.lora_A.grad is not None and m.lora_A.grad.dtype == torch.bfloat16 for _, m in rp.wrapped_layers(model))

    model = tiny_llama()
    rp.parametrize(model, name, **SMALL[name])
    perturb_([m.lora_B for _, m in rp.wrapped_layers(model)], std=0.1)
    ref = _logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids(), labels=ids())
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), ref, atol=0.15, rtol=0.05)  # bf16 rounding only
    assert all(m.lora_B.grad.dtype == torch.float32 and torch.isfinite(m.lora_B.grad).all()
               for _, m in rp.wrapped_layers(model))


class _Stop(Exception):
    pass


def _interrupted(model, steps, stop_after, ckpt, **kw):
    """train(steps) with a checkpoint every ``stop_after`` steps, killed during step stop_after + 1."""
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) > stop_after:
            raise _Stop
        return lm_loss(m, batch)

    with pytest.raises(_Stop):
        train(model, data(), collate, loss_fn, config(steps, checkpoint_every=stop_after, **kw),
              checkpoint_dir=ckpt, progress=False)


def _resume(model, steps, ckpt):
    return train(model, data(), collate, lm_loss, config(steps, checkpoint_every=steps // 2),
                 checkpoint_dir=ckpt, resume=True, progress=False)


@pytest.mark.parametrize("name, options", [
    ("relora", dict(rank=4, reset_every=6, prune_mode="random")),  # merge + random pruning at step 6
    ("relora", dict(rank=4, reset_every=5)),
    ("periodic_lora", dict(rank=4, reset_every=6)),
    ("sltrain", dict(rank=4, density=0.1, refactorize_every=5)),
    ("cola", dict(rank=4, activation="identity", refactorize_every=6)),
    ("cola", dict(rank=4)),
])
def test_resume_is_bit_exact_with_an_event_in_the_second_half(name, options, tmp_path):
    steps = 8
    straight = tiny_llama()
    rp.parametrize(straight, name, seed=7, **options)
    run(straight, steps)

    first = tiny_llama()
    rp.parametrize(first, name, seed=7, **options)
    _interrupted(first, steps, steps // 2, tmp_path / "ckpt")
    resumed = tiny_llama()  # a fresh process: the same model and parametrization, same seed
    rp.parametrize(resumed, name, seed=7, **options)
    _resume(resumed, steps, tmp_path / "ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_after_a_merge_is_bit_exact(tmp_path):
    """A merge in the first half changes ReLoRA's frozen W: the checkpoint keeps the wrapped layers'
    whole state (``checkpoint_frozen``), so resuming from it alone is bit-exact."""
    from safetensors.torch import load_file

    steps, options = 8, dict(rank=4, reset_every=3)  # merges at steps 3 and 6
    straight = tiny_llama()
    rp.parametrize(straight, "relora", **options)
    run(straight, steps)

    first = tiny_llama()
    rp.parametrize(first, "relora", **options)
    _interrupted(first, steps, steps // 2, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    frozen = rp.frozen_state(first)
    assert frozen and all(k.endswith(".weight") for k in frozen)
    assert all(torch.equal(saved[k], v) for k, v in frozen.items())  # the merged W is in the checkpoint

    resumed = tiny_llama()
    rp.parametrize(resumed, "relora", **options)
    _resume(resumed, steps, tmp_path / "ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
