"""The Hugging Face Trainer drives the adapters' training hooks (rankwise.integrations.hf_trainer).

Oracle: a hand-written loop with the same optimizer, schedule and data that calls
``rw.rank_regularization`` and ``rw.rank_step`` the documented way. Every Trainer step sees the
whole (tiny) dataset as one batch, so the Trainer's shuffling cannot change what a step computes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.methods import adalora

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 8


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 6), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _opt(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * STEPS))


def _reference(model, data):
    """The documented loop: loss + rank_regularization, step, rank_step (before the scheduler)."""
    opt, sched = _opt(model)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    model.train()
    for step in range(1, STEPS + 1):
        loss = model(**batch).loss
        reg = rw.rank_regularization(model)
        (loss if reg is None else loss + reg).backward()
        opt.step()
        rw.rank_step(model, step, opt, total_steps=STEPS)
        sched.step()
        opt.zero_grad()
    return model


def _trainer(cls, model, data, tmp_path, callbacks=None):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=len(data),
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                             seed=0, data_seed=0, max_grad_norm=0.0, remove_unused_columns=False)
    return cls(model=model, args=args, train_dataset=data, optimizers=_opt(model), callbacks=callbacks)


@pytest.mark.parametrize("method,kw", [
    ("adalora", dict(rank=4, target_rank=2, tinit=1, tfinal=2, delta_t=1, orth_reg_weight=0.5)),
    ("sora", dict(rank=4, lam=0.5)),
    ("lamda", dict(rank=4, freeze_steps=4)),
])
def test_rankwise_trainer_matches_the_documented_loop(bert, tmp_path, method, kw):
    from rankwise.integrations.hf_trainer import RankwiseTrainer

    data = _data()
    base = bert()
    targets = ["query", "value"]
    ours = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **kw)
    ref = _reference(rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **kw), data)
    _trainer(RankwiseTrainer, ours, data, tmp_path).train()
    a, b = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert a.keys() == b.keys()
    for n in a:  # shapes included: pruned / frozen the same way
        torch.testing.assert_close(a[n], b[n], atol=2e-5, rtol=1e-4, msg=n)
    if method == "adalora":
        assert adalora.ranks(ours) == adalora.ranks(ref)
        assert sum(adalora.ranks(ours).values()) == 2 * 4  # the target budget
    if method == "lamda":
        assert rw.parameter_count(ours).trainable == rw.parameter_count(ref).trainable


def test_rank_callback_on_a_plain_trainer_and_no_hooks(bert, tmp_path):
    from transformers import Trainer

    from rankwise.integrations.hf_trainer import RankCallback

    data = _data()
    # SoRA's proximal step needs no loss term: the plain Trainer with the callback matches the loop
    model = rw.adapt(bert(), "sora", rank=4, lam=0.5, targets=["query"], seed=0)
    ref = _reference(rw.adapt(bert(), "sora", rank=4, lam=0.5, targets=["query"], seed=0), data)
    _trainer(Trainer, model, data, tmp_path, callbacks=[RankCallback()]).train()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)
    # LoRA has no hooks: the callback changes nothing
    plain = rw.adapt(bert(), "lora", rank=2, targets=["query"], seed=0)
    ref = _reference(rw.adapt(bert(), "lora", rank=2, targets=["query"], seed=0), data)
    _trainer(Trainer, plain, data, tmp_path / "b", callbacks=[RankCallback()]).train()
    for p, q in zip(plain.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


def test_loss_terms_count_once_per_step_with_gradient_accumulation(bert, tmp_path):
    """2 micro-batches of 4 accumulate to the step of one batch of 8, loss terms included, on
    both of the Trainer's accumulation paths: it divides each micro-batch loss by the steps, or
    (a ``compute_loss_func`` normalizing by ``num_items_in_batch``) it does not. The plain-LoRA
    control shows the Trainer's own accumulation is exact on each path."""
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments

    from rankwise.integrations.hf_trainer import RankwiseTrainer

    data = _data()

    def summed_ce(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    def run(cls, method, kw, accum, path, out):
        model = rw.adapt(bert(), method, targets=["query", "value"], seed=0, **kw)
        args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=len(data) // accum,
                                 gradient_accumulation_steps=accum, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True, seed=0, data_seed=0, max_grad_norm=0.0,
                                 remove_unused_columns=False)
        extra = {"compute_loss_func": summed_ce} if path == "normalized" else {}
        trainer = cls(model=model, args=args, train_dataset=data, optimizers=_opt(model), **extra)
        if path == "divided":
            trainer.model_accepts_loss_kwargs = False  # the Trainer divides by the accumulation steps
        trainer.train()
        return dict(model.named_parameters())

    for path in ("divided", "normalized"):
        for cls, method, kw in ((Trainer, "lora", dict(rank=2)),
                                (RankwiseTrainer, "sorsa", dict(rank=2, gamma=5.0, lr=0.5))):
            one = run(cls, method, kw, 1, path, tmp_path / "a")
            two = run(cls, method, kw, 2, path, tmp_path / "b")
            for n in one:
                torch.testing.assert_close(one[n], two[n], atol=2e-5, rtol=1e-4, msg=f"{path} {method} {n}")


# ---- adapter-only checkpoints, the one-call load, resume ------------------------------------------------
def _ckpt_args(out, steps, save_steps=None, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 1,
                             disable_tqdm=True, seed=0, data_seed=0, logging_steps=1, remove_unused_columns=False,
                             learning_rate=5e-2, **kw)


@pytest.mark.parametrize("trainer_cls", ["RankwiseTrainer", "Trainer"])
def test_checkpoints_hold_the_adapter_and_load_in_one_call(bert, tmp_path, trainer_cls):
    """Oracle: the live model after training. The checkpoint holds no base weights; rw.from_pretrained
    (base folder + checkpoint) and PEFT's PeftModel (the peft/ folder) give the live logits."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    from rankwise.integrations import hf_trainer

    cls = getattr(hf_trainer, trainer_cls, None) or transformers.Trainer
    base_dir = tmp_path / "base"
    bert().save_pretrained(base_dir)
    model = rw.adapt(bert(), "lora", rank=2, targets=["query", "value"], modules_to_save=["classifier"], seed=0)
    extra = {} if cls is hf_trainer.RankwiseTrainer else {"callbacks": [hf_trainer.RankCallback()]}
    trainer = cls(model=model, args=_ckpt_args(tmp_path / "out", 4, save_steps=2), train_dataset=_data(), **extra)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ckpt = tmp_path / "out" / "checkpoint-4"
    for folder in (ckpt, tmp_path / "final"):
        assert not list(folder.glob("model*.safetensors")) and not (folder / "config.json").exists()
        keys = set(load_file(folder / "adapter" / "adapter_model.safetensors"))
        assert keys and all(k.startswith("default/") for k in keys)
        assert any("/modules_to_save/classifier/" in k for k in keys)
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    x = {k: torch.stack([d[k] for d in _data()]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        live = model(**x).logits
        assert not torch.allclose(live, bert()(**x).logits, atol=1e-3)  # it trained
        for folder in (ckpt, tmp_path / "final"):
            loaded = rw.from_pretrained(str(base_dir), folder)
            assert not any(p.requires_grad for p in loaded.parameters())  # for inference
            torch.testing.assert_close(loaded(**x).logits, live, atol=1e-6, rtol=0)
        peft_model = PeftModel.from_pretrained(bert(), ckpt / "peft").eval()
        torch.testing.assert_close(peft_model(**x).logits, live, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,kw", [("lora", dict(rank=2)),
                                       ("adalora", dict(rank=4, target_rank=2, tinit=1, tfinal=2, delta_t=1))])
def test_resume_from_an_adapter_checkpoint_equals_an_uninterrupted_run(bert, tmp_path, method, kw):
    """Oracle: the same 6 steps run straight through. The resumed run restores the adapter, optimizer,
    scheduler, RNG (dropout on) and AdaLoRA's importance averages and rank budget from checkpoint-3."""
    from rankwise.integrations.hf_trainer import RankwiseTrainer

    def run(out, resume=None, steps=6):
        model = rw.adapt(bert(), method, targets=["query", "value"], dropout=0.1, seed=0, **kw)
        args = _ckpt_args(out, steps, save_steps=3, lr_scheduler_type="linear", warmup_steps=2)
        trainer = RankwiseTrainer(model=model, args=args, train_dataset=_data())
        trainer.train(resume_from_checkpoint=resume)
        return dict(model.named_parameters())

    straight = run(tmp_path / "b")  # uninterrupted; writes checkpoint-3 on the way
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "checkpoint-3"))
    assert straight.keys() == resumed.keys()
    for n in straight:
        torch.testing.assert_close(resumed[n], straight[n], atol=1e-6, rtol=0, msg=n)
    if method == "adalora":
        assert (tmp_path / "b" / "checkpoint-3" / "rankwise_rank_state.safetensors").is_file()


def test_transformers_adapter_api_acts_on_rankwise_adapters(bert, token_batch, tmp_path):
    """Oracle: rankwise's own calls (set_active, disabled, active_adapters) on a twin model."""
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"], name="a", seed=0)
    rw.adapt(model, "lora", rank=2, targets=["value"], name="b", seed=1)
    for p in rw.core.api.adapter_parameters(model, "a") + rw.core.api.adapter_parameters(model, "b"):
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        outs = {}
        for names in ("a", "b"):
            rw.set_active(model, names)
            outs[names] = model(**token_batch).logits
        with rw.disabled(model):
            outs[None] = model(**token_batch).logits
        model.set_adapter("a")
        assert model.active_adapters() == ["a"] == rw.active_adapters(model)
        assert torch.equal(model(**token_batch).logits, outs["a"])
        model.disable_adapters()
        assert torch.equal(model(**token_batch).logits, outs[None])
        model.enable_adapters()
        assert torch.equal(model(**token_batch).logits, outs["a"]) and model.active_adapters() == ["a"]
    with pytest.raises(rw.errors.ConfigError, match=r"use rw\.load\(model, path\)"):
        model.load_adapter(str(tmp_path))
    # save_pretrained writes the adapters, not the wrapped base
    model.save_pretrained(tmp_path / "sp")
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["adapter", "peft", "peft_b"]
    # the plain model gets transformers' own methods back
    rw.unadapt(model)
    assert "set_adapter" not in model.__dict__ and "save_pretrained" not in model.__dict__
