"""rankwise's own fake quantizer: block-wise absmax ``int8`` / ``int4`` / ``nf4`` in pure torch (CPU or GPU).

A tensor is flattened (row-major) and cut into blocks of ``block_size`` consecutive elements; each
block stores its absolute maximum ``m`` (float32) and one code per element::

    q = nearest code to  x / m        (codes in [-1, 1]),     dequantized  x̂ = m · code[q]

* ``int8``: codes ``k / 127``, ``k = -127 … 127`` (symmetric, no ``-128``), one byte per element;
* ``int4``: codes ``k / 7``, ``k = -7 … 7``, two codes per byte;
* ``nf4``: QLoRA's 4-bit NormalFloat code book (Dettmers et al. 2023, arXiv:2305.14314, App. E):
  8 positive and 7 negative quantiles of N(0, 1) plus an exact zero, normalized to ``[-1, 1]``
  (bitsandbytes' ``create_normal_map(offset=0.9677083)``; built here from ``torch.special.ndtri``
  and checked against bitsandbytes' table in ``tests/test_quant.py``), two codes per byte, the
  first element of each pair in the high nibble (bitsandbytes' packing).

Rounding is to the nearest code; a value exactly halfway between two codes goes to the lower one
for ``nf4`` (bitsandbytes' rule) and to the even integer for ``int4``/``int8`` (``torch.round``).
A block whose maximum is 0 stores 0 and dequantizes to zeros.

Error (element-wise, stated and tested): ``|x − x̂| ≤ m · h`` with ``m`` the element's block
absmax and ``h`` the largest half-gap between neighbouring codes (:data:`HALF_GAP`):
``1/254`` for int8, ``1/14`` for int4, ``(1 − 0.6961928) / 2 ≈ 0.1519`` for nf4 (its widest gap
is at the ends of the range, where Gaussian weights rarely fall, so its *typical* error on
Gaussian blocks is far below the int4 grid's). The block maximum itself is always exact.

Memory: ``numel / 2`` bytes (4-bit) or ``numel`` bytes (int8) plus ``4 · ⌈numel / block_size⌉``
bytes of absmax. ``nf4`` with ``block_size=64`` is bitsandbytes' ``quantize_4bit(...,
quant_type="nf4", blocksize=64)`` bit for bit (same codes, same packing, same absmax), the
quantizer PEFT's LoftQ uses (``Params4bit(compress_statistics=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

KINDS = ("nf4", "int4", "int8")
_NF4_OFFSET = 0.9677083


def _nf4_code() -> torch.Tensor:
    # bitsandbytes' construction: float32 probability grid → float64 normal quantiles → float32,
    # normalized by the largest in float32 (so the table is reproduced to the last bit)
    pos = torch.linspace(_NF4_OFFSET, 0.5, 9)[:-1].double()
    neg = torch.linspace(_NF4_OFFSET, 0.5, 8)[:-1].double()
    vals = torch.cat([torch.special.ndtri(pos), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(neg)])
    vals = vals.float().sort().values
    return vals / vals.max()


NF4_CODE = _nf4_code()
LEVELS = {"int4": 7, "int8": 127}
BITS = {"nf4": 4, "int4": 4, "int8": 8}
HALF_GAP = {
    "nf4": float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2),
    "int4": 1.0 / (2 * LEVELS["int4"]),
    "int8": 1.0 / (2 * LEVELS["int8"]),
}


def code_book(kind: str) -> torch.Tensor:
    """The ``2^bits`` (nf4: 16, int4: 15, int8: 255) code values in ``[-1, 1]``, ascending."""
    check_kind(kind)
    if kind == "nf4":
        return NF4_CODE.clone()
    lv = LEVELS[kind]
    return torch.arange(-lv, lv + 1, dtype=torch.float32) / lv


def check_kind(kind: str, block_size: int = 64) -> None:
    if kind not in KINDS:
        raise ConfigError(f"quantizer kind={kind!r} is unknown; use one of {list(KINDS)}.")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2 or block_size % 2:
        raise ConfigError(f"quantizer block_size={block_size!r}: use an even integer ≥ 2 (64 is QLoRA's).")


@dataclass(frozen=True, eq=False)
class Quantized:
    """A block-wise quantized tensor: ``data`` (uint8; 4-bit kinds packed two per byte), ``absmax``
    (float32, one per block), and what is needed to rebuild the original tensor."""

    data: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.absmax.numel() * 4

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data, self.absmax, self.shape, self.kind, self.block_size, self.dtype)


def storage_shapes(numel: int, kind: str, block_size: int) -> tuple[int, int]:
    """(bytes of ``data``, number of blocks) for a tensor of ``numel`` elements."""
    n_data = (numel + 1) // 2 if BITS[kind] == 4 else numel
    return n_data, -(-numel // block_size)


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    n = flat.numel()
    pad = -n % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size), n


def quantize(x: torch.Tensor, kind: str = "nf4", block_size: int = 64) -> Quantized:
    """Block-wise absmax quantization of ``x`` (any shape; computed in float32)."""
    check_kind(kind, block_size)
    blocks, n = _blocks(x.detach().float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = blocks / safe[:, None]
    if kind == "nf4":
        code = NF4_CODE.to(x.device)
        mids = (code[1:] + code[:-1]) / 2
        idx = torch.bucketize(scaled, mids)  # x ≤ midpoint → lower code (bitsandbytes' x > mid → upper)
    else:
        lv = LEVELS[kind]
        idx = torch.round(scaled * lv).clamp_(-lv, lv) + (8 if kind == "int4" else 0)
    idx = idx.reshape(-1)[:n]
    if BITS[kind] == 4:
        idx = idx.to(torch.uint8)
        if n % 2:
            idx = torch.cat([idx, idx.new_zeros(1)])
        data = (idx[0::2] << 4) | idx[1::2]
    else:
        data = idx.to(torch.int8).view(torch.uint8)
    return Quantized(data, absmax, tuple(x.shape), x.dtype, kind, block_size)


def dequantize(data: torch.Tensor, absmax: torch.Tensor, shape, kind: str, block_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``absmax[block] · code[q]`` in ``dtype``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if BITS[kind] == 4:
        idx = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:numel].long()
        vals = NF4_CODE.to(data.device)[idx] if kind == "nf4" else (idx - 8).float() / LEVELS["int4"]
    else:
        vals = data.view(torch.int8)[:numel].float() / LEVELS["int8"]
    pad = -numel % block_size
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    out = (vals.view(-1, block_size) * absmax[:, None]).reshape(-1)[:numel]
    return out.view(*shape).to(dtype)


def fake_quantize(x: torch.Tensor, kind: str = "nf4", block_size: int = 64) -> torch.Tensor:
    """``dequantize(quantize(x))``: the value a quantized model computes with, in ``x``'s dtype."""
    return quantize(x, kind, block_size).dequantize()


def error_bound(x: torch.Tensor, kind: str = "nf4", block_size: int = 64) -> torch.Tensor:
    """The stated element-wise bound ``absmax(block) · HALF_GAP[kind]`` for ``x`` (shape of ``x``)."""
    check_kind(kind, block_size)
    blocks, n = _blocks(x.detach().float(), block_size)
    m = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks)
    return (m * HALF_GAP[kind]).reshape(-1)[:n].view(x.shape)
