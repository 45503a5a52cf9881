"""LoRA+ weight decay against PEFT, and ALLoRA against its equation.

Oracles:

* ``peft.optimizers.create_loraplus_optimizer`` (PEFT 0.21) on the same model — LoRA on two
  Linear layers with trainable biases (``bias="lora_only"``), a trainable ``nn.LayerNorm``, a
  trainable ``nn.RMSNorm`` and a trainable Linear head with bias (``modules_to_save``) — with
  ``loraplus_weight_decay > 0``: PEFT decays everything but biases and LayerNorm parameters;
* ALLoRA (Huang & Balestriero, arXiv:2410.09692): a row learning rate ``lr·c_i``,
  ``c_i = 1/sqrt(‖θ_i‖² + 1/η²)``, on AdamW's update, written out here by hand (torch's AdamW
  arithmetic: ``θ ← θ − lr·c·(λθ + m̂/(√v̂ + ε))`` with ``m̂ = m/(1−β₁ᵗ)``, ``√v̂ = √v/√(1−β₂ᵗ)``);
  for ``apply_to="gradient"`` the literal reading, ``torch.optim.AdamW`` on ``c·g``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _optim_helpers import _batches
from torch import nn

import rankwise as rw
import rankwise.optim as ro
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.rms = nn.RMSNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.rms(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


def _net():
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():  # non-trivial norm parameters, so decay on them is visible
        for m in (net.norm, net.rms):
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return net


def _pair():
    import peft

    ours = _net()
    rw.adapt(ours, "lora", rank=4, alpha=8, targets=["fc1", "fc2"], seed=0)
    for name in ("fc1.base.bias", "fc2.base.bias"):
        ours.get_parameter(name).requires_grad_(True)
    for m in (ours.norm, ours.rms, ours.head):
        m.requires_grad_(True)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], bias="lora_only",
                          modules_to_save=["norm", "rms", "head"])
    theirs = peft.get_peft_model(_net(), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in ("fc1", "fc2"):
            for f in ("lora_A", "lora_B"):
                mine = ours.get_parameter(f"{layer}.adapters.default.{f}")
                mine.copy_(0.1 * torch.randn(mine.shape, generator=g, dtype=mine.dtype))  # B ≠ 0
                theirs.get_parameter(f"base_model.model.{layer}.{f}.default.weight").copy_(mine)
    # rankwise name → PEFT name of every trainable parameter
    names = {}
    for layer in ("fc1", "fc2"):
        names[f"{layer}.base.bias"] = f"base_model.model.{layer}.base_layer.bias"
        for f in ("lora_A", "lora_B"):
            names[f"{layer}.adapters.default.{f}"] = f"base_model.model.{layer}.{f}.default.weight"
    for mod, leaves in (("norm", ("weight", "bias")), ("rms", ("weight",)), ("head", ("weight", "bias"))):
        for leaf in leaves:
            names[f"{mod}.{leaf}"] = f"base_model.model.{mod}.modules_to_save.default.{leaf}"
    return ours, theirs, names


def test_lora_plus_weight_decay_matches_peft():
    """Three AdamW steps with weight decay 0.1 and trainable biases / LayerNorm / RMSNorm / head:
    the default grouping decays exactly what PEFT decays, so every parameter matches."""
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs, names = _pair()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == set(names.values())
    groups = ro.lora_plus(ours, lr=1e-2, ratio=4, weight_decay=0.1)
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    ident = {n: id(p) for n, p in ours.named_parameters()}
    assert by_name["lora_B_no_decay"] == {ident[n] for n in ("fc1.base.bias", "fc2.base.bias", "norm.weight",
                                                             "norm.bias", "head.bias")}
    # PEFT decays RMSNorm weights (nn.RMSNorm is not in transformers' ALL_LAYERNORM_LAYERS)
    assert ident["rms.weight"] in by_name["lora_B"]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4,
                                    loraplus_weight_decay=0.1)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 16, generator=g, dtype=torch.float64),
                torch.randn(8, 4, generator=g, dtype=torch.float64)) for _ in range(3)]
    for model, o in ((ours, opt), (theirs, ref)):
        model.train()
        for x, y in batches:
            (model(x) - y).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    theirs_p = dict(theirs.named_parameters())
    for mine, peft_name in names.items():
        torch.testing.assert_close(ours.get_parameter(mine), theirs_p[peft_name], rtol=1e-10, atol=1e-12,
                                   msg=mine)
    # the old default (decay every vector) is still available, and differs from PEFT here
    old = {g["name"] for g in ro.lora_plus(ours, lr=1e-2, weight_decay=0.1, decay_vectors=True)}
    assert "lora_B_no_decay" not in old
    with pytest.raises(ConfigError, match="decay_vectors='yes'"):
        ro.lora_plus(ours, lr=1e-2, decay_vectors="yes")


# ---------------------------------------------------------------------------------------- ALLoRA
def _row_coef(w, eta):
    return 1.0 / torch.sqrt(w.pow(2).sum(dim=1, keepdim=True) + 1.0 / eta**2)


def _allora_reference(params, grads_per_step, lr, eta, wd, betas=(0.9, 0.999), eps=1e-8):
    """ALLoRA's equation: AdamW's update of each row at rate lr·c_i, c_i from θ before the step."""
    b1, b2 = betas
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            c = _row_coef(theta[i], eta)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1**t)
            vhat_sqrt = v[i].sqrt() / (1 - b2**t) ** 0.5
            theta[i] = theta[i] - lr * c * (wd * theta[i] + mhat / (vhat_sqrt + eps))
        out.append([t.clone() for t in theta])
    return out


def _adapted_llama(llama):
    model = llama(0).double()
    rw.adapt(model, "lora", rank=4, alpha=4, targets=["q_proj", "v_proj"], seed=0, dropout=0.0)
    return model


def test_allora_step_is_adamw_at_the_row_learning_rate(llama):
    """Five steps (B starts at 0, A random), weight decay on: after every step each LoRA factor
    equals the hand-written equation fed the same gradients from the same start."""
    model = _adapted_llama(llama)
    eta, lr, wd = 3.0, 1e-2, 0.05
    groups = ro.allora(model, lr=lr, eta=eta, weight_decay=wd)
    factors = groups[0]["params"]
    assert len(factors) == 4 and groups[0]["allora_eta"] == eta
    start = [p.detach().clone() for p in factors]
    opt = ro.ALLoRA(groups)
    g = torch.Generator().manual_seed(12)
    grads, seen = [], []
    for _ in range(5):
        ids = torch.randint(1, 100, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in factors])
        opt.step()
        assert all(torch.equal(p.grad, gr) for p, gr in zip(factors, grads[-1]))  # .grad left as given
        opt.zero_grad()
        seen.append([p.detach().clone() for p in factors])
    for mine, ref in zip(seen, _allora_reference(start, grads, lr, eta, wd)):
        for p, r in zip(mine, ref):
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-13)


def test_allora_zero_row_moves_eta_times_an_adamw_step(llama):
    """A zero-initialized B row has c = η: its first ALLoRA step is exactly η times AdamW's
    (measured ratio η for η = 10; scaling the gradient instead gave ratio 1)."""
    eta, lr = 10.0, 1e-3
    ratios = {}
    for apply_to in ("update", "gradient"):
        model = _adapted_llama(llama)
        b = model.get_parameter("model.layers.0.self_attn.q_proj.adapters.default.lora_B")
        assert torch.count_nonzero(b) == 0
        ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(13))
        model(input_ids=ids, labels=ids).loss.backward()
        grad = b.grad.clone()
        shadow = b.detach().clone().requires_grad_(True)
        shadow.grad = grad.clone()
        torch.optim.AdamW([shadow], lr=lr, weight_decay=0.0).step()
        ro.ALLoRA(ro.allora(model, lr=lr, eta=eta), apply_to=apply_to).step()
        adamw_step = shadow.detach()  # from 0
        mask = adamw_step.abs() > 0
        ratios[apply_to] = (b.detach()[mask] / adamw_step[mask])
    torch.testing.assert_close(ratios["update"], torch.full_like(ratios["update"], eta), rtol=1e-12, atol=0)
    # the literal gradient scaling is cancelled by Adam's m/√v up to ε: ratio ≈ 1
    assert float((ratios["gradient"] - 1).abs().max()) < 1e-3


def test_allora_gradient_mode_is_adamw_on_scaled_gradients(llama):
    """apply_to="gradient": torch.optim.AdamW fed c·g (the abstract's literal reading)."""
    model = _adapted_llama(llama)
    eta = 3.0
    groups = ro.allora(model, lr=1e-2, eta=eta)
    factors = groups[0]["params"]
    shadow = [p.detach().clone().requires_grad_(True) for p in factors]
    opt = ro.ALLoRA(groups, apply_to="gradient")
    ref = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(14)
    for _ in range(3):
        ids = torch.randint(1, 100, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        for p, s in zip(factors, shadow):
            s.grad = p.grad * _row_coef(p.detach(), eta)
        opt.step()
        ref.step()
        opt.zero_grad()
        for p, s in zip(factors, shadow):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="apply_to='grad'"):
        ro.ALLoRA(groups, apply_to="grad")


# ---------------------------------------------------------------------------------------- LoRA+ / ALLoRA
def _peft_and_rankwise(llama, perturb, rank=4):
    import peft

    ours = llama(0)
    rw.adapt(ours, "lora", rank=rank, alpha=8, targets="all-linear", seed=0)
    theirs = peft.get_peft_model(llama(0), peft.LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear"))
    perturb([p for n, p in ours.named_parameters() if "lora_" in n], seed=3, std=0.1)  # B ≠ 0
    mine = {n.replace(".adapters.default.", "."): p for n, p in ours.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                key = n.removeprefix("base_model.model.").replace(".default.weight", "")
                p.copy_(mine[key])
    return ours, theirs, mine


def test_lora_plus_groups_and_step_match_peft(single_thread, llama, perturb):
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs, factors = _peft_and_rankwise(llama, perturb)
    groups = ro.lora_plus(ours, lr=1e-3, ratio=16)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora_A", "lora_B"}
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-3) and by_name["lora_A"]["lr"] == 1e-3
    ids_b = {id(p) for p in by_name["lora_B"]["params"]}
    assert ids_b == {id(p) for n, p in factors.items() if n.endswith("lora_B")}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    batches = _batches(3, seed=11)
    for model, o in ((ours, opt), (theirs, ref)):
        model.train()
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    theirs_f = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
                for n, p in theirs.named_parameters() if "lora_" in n}
    for k, p in factors.items():
        torch.testing.assert_close(p, theirs_f[k], rtol=1e-5, atol=1e-6)


def test_lora_plus_rejects_model_without_lora(llama):
    with pytest.raises(ConfigError, match="no trainable LoRA factors"):
        ro.lora_plus(llama(0), lr=1e-3)
    with pytest.raises(ConfigError, match="ratio"):
        ro.lora_plus(llama(0), lr=1e-3, ratio=0)


def test_allora_zero_rows_get_eta():
    """The coefficient 1/sqrt(‖θ_row‖² + 1/η²) in closed form: η on a zero row, 1/√26 for (3, 4) at η=1."""
    from rankwise.optim.lora_plus import allora_scale

    b = torch.zeros(5, 3)
    assert torch.allclose(allora_scale(b, 4.0), torch.full((5, 1), 4.0))
    w = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(allora_scale(w, 1.0), torch.tensor([[1 / math.sqrt(26.0)]]))
