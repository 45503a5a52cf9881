"""rankwise.quant against bitsandbytes 0.50 (CPU kernels) as the oracle for NF4, and closed forms
for the integer grids and the stated error bound."""

from __future__ import annotations

import pytest
import torch

from rankwise import quant as Q
from rankwise.errors import ConfigError


def _w(shape=(24, 130), seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _bnb():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as F

        return F


@pytest.mark.parametrize("block_size", [64, 128])
def test_nf4_matches_bitsandbytes_bit_for_bit(block_size):
    F = _bnb()
    w = _w()  # 3120 elements: the last block is partial for both block sizes
    data, state = F.quantize_4bit(w, quant_type="nf4", blocksize=block_size)
    assert torch.equal(state.code.float(), Q.NF4_CODE)  # QLoRA's code book, rebuilt from normal quantiles
    mine = Q.quantize(w, "nf4", block_size)
    assert torch.equal(mine.data, data.reshape(-1))  # same codes and nibble packing
    assert torch.equal(mine.absmax, state.absmax)
    assert torch.equal(mine.dequantize(), F.dequantize_4bit(data, state))
    assert mine.nbytes == w.numel() // 2 + 4 * -(-w.numel() // block_size)


def test_nf4_matches_bitsandbytes_on_rows_shorter_than_a_block():
    """Blocks run over the flattened tensor. bitsandbytes 0.50.2 quantizes a (8, 32) tensor the same
    way (same codes and maxima) but its CPU dequantize_4bit of the 2-D tensor is wrong; its flattened
    dequantization is the oracle here."""
    F = _bnb()
    w = _w((8, 32), seed=5)
    data, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
    mine = Q.quantize(w, "nf4", 64)
    assert torch.equal(mine.data, data.reshape(-1)) and torch.equal(mine.absmax, state.absmax)
    flat_d, flat_s = F.quantize_4bit(w.reshape(-1), quant_type="nf4", blocksize=64)
    assert torch.equal(mine.dequantize(), F.dequantize_4bit(flat_d, flat_s).view(8, 32))


def test_nf4_code_book_is_normal_quantiles():
    code = Q.code_book("nf4")
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    assert bool((code[1:] > code[:-1]).all())
    # positive half: quantiles of N(0,1) at probabilities linspace(0.9677083, 0.5, 9)[:-1], scaled to max 1
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
    torch.testing.assert_close(code[8:].flip(0).double(), pos / pos[0], atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", Q.KINDS)
@pytest.mark.parametrize("shape", [(24, 130), (7,), (3, 5, 9)])
def test_error_bound_and_exact_maxima(kind, shape):
    w = _w(shape, seed=1, scale=3.0)
    q = Q.quantize(w, kind, 16)
    d = q.dequantize()
    assert d.shape == w.shape and d.dtype == w.dtype
    err = (d - w).abs()
    assert bool((err <= Q.error_bound(w, kind, 16) * (1 + 1e-6) + 1e-7).all())
    # the element holding each block's absmax is reproduced exactly (code ±1)
    flat = w.reshape(-1)
    for start in range(0, flat.numel(), 16):
        blk = flat[start:start + 16]
        i = start + int(blk.abs().argmax())
        assert d.reshape(-1)[i] == flat[i]


@pytest.mark.parametrize("kind,levels", [("int4", 7), ("int8", 127)])
def test_integer_grid_is_round_to_nearest(kind, levels):
    w = _w((4, 64), seed=2)
    d = Q.fake_quantize(w, kind, 64)
    m = w.abs().amax(dim=1, keepdim=True)
    ref = torch.round(w / m * levels) / levels * m  # closed form per row (= per block of 64)
    torch.testing.assert_close(d, ref, atol=1e-6, rtol=0)
    assert len(torch.unique(torch.round(d / m * levels))) <= 2 * levels + 1


def test_int8_storage_and_zero_block():
    w = _w((2, 32), seed=3)
    w[0] = 0.0  # an all-zero block
    q = Q.quantize(w, "int8", 32)
    assert q.data.dtype == torch.uint8 and q.data.numel() == 64 and q.absmax[0] == 0
    d = q.dequantize()
    assert torch.equal(d[0], torch.zeros(32))
    assert (d[1] - w[1]).abs().max() <= w[1].abs().max() / 254 + 1e-7


def test_nf4_beats_int4_on_gaussian_weights():
    w = _w((64, 256), seed=4)
    e_nf4 = (Q.fake_quantize(w, "nf4") - w).square().mean()
    e_int4 = (Q.fake_quantize(w, "int4") - w).square().mean()
    assert e_nf4 < e_int4


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="kind='fp4'"):
        Q.quantize(torch.zeros(4), "fp4")
    with pytest.raises(ConfigError, match="block_size=3"):
        Q.quantize(torch.zeros(4), "nf4", 3)
