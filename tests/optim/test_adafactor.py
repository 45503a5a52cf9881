"""Adafactor against transformers' Adafactor (4 settings) and the closed form of a rank-1 second moment."""

from __future__ import annotations

import pytest
import torch
from _optim_helpers import _max_rel, _trajectory

import rankwise.optim as ro


# ---------------------------------------------------------------------------------------- Adafactor
@pytest.mark.parametrize("settings", [
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=False),
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
    dict(lr=3e-3, beta1=0.9, weight_decay=0.01, clip_threshold=1.0, scale_parameter=True),
    dict(lr=1e-2, decay_rate=-0.5, clip_threshold=0.5, scale_parameter=False),
], ids=["paper_relative_step", "paper_warmup_init", "manual_lr_beta1_decay", "manual_lr_clip"])
def test_adafactor_matches_transformers(single_thread, settings, llama):
    from transformers.optimization import Adafactor as HFAdafactor

    full = dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                scale_parameter=True, relative_step=False, warmup_init=False)
    full.update(settings)
    ref, _, _ = _trajectory(llama, lambda m: HFAdafactor(m.parameters(), **full))
    got, model, opt = _trajectory(llama, lambda m: ro.Adafactor(m.parameters(), **full))
    assert _max_rel(got, ref) < 1e-9
    # factored state: m + n numbers per matrix (plus m·n for the first moment)
    sb = ro.state_bytes(opt, model)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert sb[f"{name}.exp_avg_sq_row"] + sb[f"{name}.exp_avg_sq_col"] == sum(p.shape) * 8
            assert sb.get(f"{name}.exp_avg", 0) == (p.numel() * 8 if full["beta1"] is not None else 0)


def test_adafactor_rank1_second_moment_is_exact():
    """With ε₁ = 0 and G = a bᵀ, G² has rank 1, so V̂ = G² exactly and the first step is −lr·sign(G)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, 9, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = ro.Adafactor([p], lr=0.1, eps=(0.0, 1e-3), clip_threshold=1.0)
    p.grad = torch.outer(a, b)
    opt.step()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * torch.outer(a, b).sign(), rtol=0, atol=1e-14)
