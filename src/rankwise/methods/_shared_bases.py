"""Frozen random bases generated from a seed, for ``vera``, ``randlora`` and ``nola``.

A :class:`SeededBases` module holds an ``int64`` buffer ``key`` (the seed, and for bases shared
between layers the largest ``out`` and ``in`` of the layers that share them) and the frozen
tensors that :meth:`SeededBases.generate` makes from it.

* ``persistent=False`` (the default of the methods): the bases are non-persistent buffers, so
  ``rw.save`` writes only the key; after ``rw.load`` (or ``load_state_dict``) has copied a new key
  in, :meth:`refresh` regenerates the bases from it, bit for bit (a CPU ``torch.Generator`` —
  Mersenne Twister — seeded with the key, the same sequence on every platform).
* ``persistent=True``: the bases themselves are state (saved and loaded as tensors), e.g. the
  projections of an adapter imported from PEFT, which rankwise did not generate.

``vera`` and ``randlora`` share one ``SeededBases`` between all layers of an adapter through the
engine's ``shared`` hook (one object, saved once); ``nola`` gives every layer its own seed.
"""

from __future__ import annotations

import torch
from torch import nn

SEED_LIMIT = 2**62  # drawn seeds are below this: an int64, valid for torch.Generator.manual_seed and JSON


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed from ``generator`` (the global RNG when None)."""
    return int(torch.randint(0, SEED_LIMIT, (1,), generator=generator).item())


def largest_dims(views) -> tuple[int, int]:
    """``(max out, max in)`` over ``views``: the shape of the bases that every layer slices."""
    return max(v.out_features for v in views), max(v.in_features for v in views)


class SeededBases(nn.Module):
    """Frozen tensors generated from ``key`` (see module docstring). Subclasses define
    :meth:`generate` → ``{name: float32 CPU tensor}``."""

    def __init__(self, key: list[int], persistent: bool = False):
        super().__init__()
        self.register_buffer("key", torch.tensor(key, dtype=torch.int64))
        self.persistent = persistent
        made = self.generate(tuple(key))
        self._names = tuple(made)
        for name, t in made.items():
            self.register_buffer(name, t, persistent=persistent)
        self._stamp = self._key_stamp()

    def generate(self, key: tuple[int, ...]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _key_stamp(self):
        return (self.key.data_ptr(), self.key._version)

    def refresh(self) -> None:
        """Regenerate the bases if ``key`` changed since they were made (cheap when it did not:
        two attribute reads, no device sync). Persistent bases are state and never regenerated."""
        stamp = self._key_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if self.persistent:
            return
        made = self.generate(tuple(int(v) for v in self.key.tolist()))
        for name, t in made.items():
            old = getattr(self, name)
            setattr(self, name, t.to(device=old.device, dtype=old.dtype))

    def _apply(self, fn, recurse=True):  # .to()/.cuda() replace the key tensor: keep the stamp in step
        fresh = self._stamp == self._key_stamp()
        out = super()._apply(fn, recurse)
        if fresh:
            self._stamp = self._key_stamp()
        return out

    def extra_repr(self) -> str:
        return f"key={self.key.tolist()}, persistent={self.persistent}"
