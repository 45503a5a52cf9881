"""rankwise's GaLore family against the reference packages, 50 steps on a tiny LLaMA.

Each test trains the same seeded model (``make_llama``: 1 layer, hidden 32, vocab 100) on the same
seeded token batches with the reference optimizer and with rankwise's, identical param groups and
hyperparameters, and compares the loss trajectories. All projectors here are deterministic
(SVD, or Flora's seed-derived Gaussian matrices, which rankwise draws from the same seeds), so
the tolerance is 1e-5 relative unless stated:

* galore-torch ``GaLoreAdamW``, fira ``FiraAdamW``, q-galore-torch ``QGaLoreAdamW8bit_simulate``
  and flora-opt ``Flora`` run on CPU as they are.
* galore-torch ``GaLoreAdamW8bit`` and q-galore run on bitsandbytes 0.50's CPU kernels; their
  ``step`` calls ``torch.cuda.synchronize()`` unconditionally, which is patched to a no-op.
  bitsandbytes' CPU quantizer snaps values to a 65536-point grid before picking a code;
  ``rounding="lut"`` reproduces it bit for bit. The default ``rounding="nearest"`` (bitsandbytes'
  CUDA behaviour) picks a different code for ~0.2% of entries, and because a code flip is an
  O(1%) change of that entry the trajectories drift apart: that comparison is held to 5%.
* Q-GaLore's stochastic weight rounding draws from torch's global generator in both packages;
  both runs seed it identically before building the optimizer, so the draws coincide.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rankwise.optim import Fira, Flora, GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW, param_groups

STEPS = 50
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet(single_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def no_cuda_sync(monkeypatch):
    """The bitsandbytes-based reference optimizers call torch.cuda.synchronize() on every step."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 100, (4, 16), generator=g) for _ in range(STEPS)]


def trajectory(llama, make_opt):
    """Losses of STEPS steps; ``make_opt(model) -> optimizer``."""
    model = llama(0).train()
    opt = make_opt(model)
    losses = []
    for ids in _batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model, opt


def rel_err(ref, mine):
    return float(((ref - mine).abs() / ref.abs()).max())


def groups(model, **extra):
    """GaLore-style param groups: projected Linear weights (rank 8, refreshed every 10 steps so
    the subspace changes 5 times), the rest (embedding, norms) in a plain group."""
    return param_groups(model, rank=8, update_proj_gap=10, scale=0.25, proj_type="std", **extra)


def test_galore_adamw_matches_galore_torch(llama):
    import galore_torch

    ref, *_ = trajectory(llama, lambda m: galore_torch.GaLoreAdamW(groups(m), lr=1e-2, weight_decay=0.1,
                                                                   no_deprecation_warning=True))
    mine, *_ = trajectory(llama, lambda m: GaLoreAdamW(groups(m), lr=1e-2, weight_decay=0.1))
    assert ref[-1] < ref[0] - 0.3  # it trains
    assert rel_err(ref, mine) < TOL


def test_galore_adamw8bit_matches_galore_torch(llama, no_cuda_sync):
    import galore_torch

    def ref_opt(m):  # min_8bit_size 256 so the rank-8 moments (8×32 = 256) are 8-bit
        return galore_torch.GaLoreAdamW8bit(groups(m), lr=1e-2, weight_decay=0.1, min_8bit_size=256)

    ref, *_ = trajectory(llama, ref_opt)
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=256)
    lut, _, opt = trajectory(llama, lambda m: GaLoreAdamW8bit(groups(m), rounding="lut", **kw))
    assert any("exp_avg_q" in s for s in opt.state.values())  # the 8-bit path ran
    assert rel_err(ref, lut) < TOL
    bnb, *_ = trajectory(llama, lambda m: GaLoreAdamW8bit(groups(m), backend="bnb", **kw))
    assert rel_err(ref, bnb) < TOL
    nearest, *_ = trajectory(llama, lambda m: GaLoreAdamW8bit(groups(m), **kw))
    assert rel_err(ref, nearest) < 0.05


def test_fira_matches_fira_package(llama):
    import fira

    def ref_groups(m):
        g = groups(m)
        g[1]["alpha"] = g[1].pop("scale")  # fira calls the scale "alpha"
        return g

    ref, *_ = trajectory(llama, lambda m: fira.FiraAdamW(ref_groups(m), lr=1e-2, weight_decay=0.1,
                                                         no_deprecation_warning=True))
    mine, _, opt = trajectory(llama, lambda m: Fira(groups(m), lr=1e-2, weight_decay=0.1))
    assert rel_err(ref, mine) < TOL
    # the limiter state exists for every projected matrix
    assert sum("residual_norm" in s for s in opt.state.values()) == len(groups(llama(0))[1]["params"])


def test_qgalore_matches_q_galore_torch(llama, no_cuda_sync):
    from q_galore_torch import QGaLoreAdamW8bit_simulate

    # refresh every 4 steps, queue of 2, threshold 0.2: several layers lengthen their gap in 50 steps
    qk = dict(quant=True, quant_group_size=64, quant_n_bit=4, cos_threshold=0.2, gamma_proj=2, queue_size=2)

    def ref_opt(m):
        g = param_groups(m, rank=8, update_proj_gap=4, scale=0.25, **qk)
        for p in g[1]["params"]:  # the reference quantizes the weights of parameters tagged like this
            p.group_size, p.stochastic_round = 64, True
        torch.manual_seed(123)
        opt = QGaLoreAdamW8bit_simulate(g, lr=1e-2, weight_decay=0.1, min_8bit_size=256)
        ref_opt.opt = opt
        return opt

    def my_opt(m):
        torch.manual_seed(123)
        return QGaLoreAdamW(param_groups(m, rank=8, update_proj_gap=4, scale=0.25, **qk), lr=1e-2,
                            weight_decay=0.1, min_8bit_size=256, rounding="lut", weight_group_size=64)

    ref, ref_model, _ = trajectory(llama, ref_opt)
    mine, model, opt = trajectory(llama, my_opt)
    assert rel_err(ref, mine) < TOL
    # same lazy-update decisions, layer by layer, and some layers did lengthen their gap
    ref_gaps = [ref_opt.opt.state[p]["projector"].update_proj_gap for p in groups(ref_model)[1]["params"]]
    gaps = [opt.state[p].get("proj_gap", 4) for p in groups(model)[1]["params"]]
    assert gaps == ref_gaps and max(gaps) > 4
    # the projector is stored as packed int4
    st = opt.state[model.model.layers[0].self_attn.q_proj.weight]
    assert st["proj_basis_q"].dtype == torch.uint8 and st["proj_basis_q"].numel() == 8 * 32 // 2


def test_flora_matches_flora_opt(llama):
    import flora_opt

    kw = dict(lr=1e-2, rank=8, kappa=7, beta1=0.9, weight_decay=0.1)  # resample every 7 steps
    ref, *_ = trajectory(llama, lambda m: flora_opt.Flora(m.parameters(), **kw))
    mine, model, opt = trajectory(llama, lambda m: Flora(m.parameters(), **kw))
    assert rel_err(ref, mine) < TOL
    # q_proj (32×32, m ≥ n: right side) keeps an (m × r) compressed momentum, not a 32×32 one
    assert opt.state[model.model.layers[0].self_attn.q_proj.weight]["exp_avg"].shape == (32, 8)
