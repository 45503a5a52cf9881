"""SMMF (square-matricized momentum factorization) against a dense float64 re-derivation of the paper's update."""

from __future__ import annotations

import math

import pytest
import torch

import rankwise.optim as ro
from rankwise.optim.smmf import nnmf_rank1, pack_bits, square_shape, unpack_bits


# ---------------------------------------------------------------------------------------- SMMF
def test_square_shape_and_bit_packing():
    for n in [1, 2, 7, 12, 36, 97, 100, 1000, 4096, 3 * 5 * 7 * 11]:
        rows, cols = square_shape(n)
        best = max(k for k in range(1, math.isqrt(n) + 1) if n % k == 0)  # brute force
        assert (rows, cols) == (n // best, best)
    g = torch.Generator().manual_seed(0)
    for n in [1, 8, 13, 1000]:
        mask = torch.rand(n, generator=g) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_bits(packed, n).bool(), mask)
    every_byte = torch.arange(256, dtype=torch.uint8)  # all bit patterns survive unpack -> pack
    assert torch.equal(pack_bits(unpack_bits(every_byte, 256 * 8).bool()), every_byte)


def test_nnmf_rank1_exact_on_rank1():
    g = torch.Generator().manual_seed(1)
    for shape in [(5, 8), (8, 5), (4, 4)]:
        a, b = torch.rand(shape[0], generator=g, dtype=torch.float64), torch.rand(shape[1], generator=g,
                                                                                    dtype=torch.float64)
        m = torch.outer(a, b)
        r, c = torch.empty(shape[0], dtype=torch.float64), torch.empty(shape[1], dtype=torch.float64)
        nnmf_rank1(m, r, c)
        torch.testing.assert_close(torch.outer(r, c), m, rtol=1e-13, atol=0)


def _smmf_dense_reference(w0, grads, lr, beta, eps, decay_rate, growth):
    """SMMF re-derived densely from the paper: moments reconstructed as (A1)(1ᵀA)/(1ᵀA1), signs kept."""
    n, m = square_shape(w0.numel())
    w = w0.clone()
    mom = torch.zeros(n, m, dtype=w.dtype)   # reconstruction of the stored first moment
    vel = torch.zeros(n, m, dtype=w.dtype)
    for t, gr in enumerate(grads, start=1):
        gm = gr.reshape(n, m)
        b1 = beta * growth ** (t - 1)
        b2 = 1 - t ** decay_rate
        mt = b1 * mom + (1 - b1) * gm
        vt = b2 * vel + (1 - b2) * gm * gm
        w = w - lr * (mt / (vt.sqrt() + eps)).reshape(w.shape)

        def rank1(x):
            tot = x.sum()
            return torch.outer(x.sum(1), x.sum(0)) / tot if tot != 0 else torch.zeros_like(x)

        mom = torch.where(mt > 0, 1.0, -1.0).to(w.dtype) * rank1(mt.abs())
        vel = rank1(vt)
    return w


@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 5), (24,)], ids=["matrix", "3d", "vector"])
def test_smmf_matches_dense_rederivation(shape):
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = ro.SMMF([p], lr=0.01, beta=0.9, eps=1e-8, decay_rate=-0.8, growth_rate=0.999)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    ref = _smmf_dense_reference(w0, grads, 0.01, 0.9, 1e-8, -0.8, 0.999)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-14)


def test_smmf_rank1_gradients_equal_uncompressed_adam_rule():
    """Positive rank-1 gradients ``c_t a bᵀ`` keep both moments rank 1 and positive, so the factorization
    loses nothing: SMMF equals the same update with dense moments (``vector_reshape=False`` on a vector)."""
    g = torch.Generator().manual_seed(3)
    # 12 x 8 is its own square matricization (square_shape(96) == (12, 8)), so G stays rank 1
    a, b = torch.rand(12, generator=g, dtype=torch.float64) + 0.1, torch.rand(8, generator=g, dtype=torch.float64) + 0.1
    w0 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    factored = torch.nn.Parameter(w0.clone())
    dense = torch.nn.Parameter(w0.reshape(-1).clone())  # a vector with vector_reshape=False: dense moments
    opts = [ro.SMMF([factored], lr=0.05), ro.SMMF([dense], lr=0.05, vector_reshape=False)]
    for t in range(10):
        grad = (1.0 + 0.3 * t) * torch.outer(a, b)
        factored.grad, dense.grad = grad.clone(), grad.reshape(-1).clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(factored.detach().reshape(-1), dense.detach(), rtol=1e-12, atol=1e-14)


def test_smmf_state_bytes_formula():
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 7))
    opt = ro.SMMF(model.parameters(), lr=1e-3)
    model(torch.randn(3, 30)).sum().backward()
    opt.step()
    expected = 0
    for p in model.parameters():
        rows, cols = square_shape(p.numel())
        expected += 2 * (rows + cols) * 4 + -(-p.numel() // 8)   # two factored moments + 1-bit signs
    assert ro.state_bytes(opt)["total"] == expected
    adam = sum(2 * p.numel() * 4 for p in model.parameters())
    assert expected < 0.25 * adam
