"""Frozen random bases generated from a seed, for ``vera``, ``randlora`` and ``nola``.

A :class:`SeededBases` module holds an ``int64`` buffer ``key`` (the seed, and for bases shared
between layers the largest ``out`` and ``in`` of the layers that share them) and the frozen
tensors that :meth:`SeededBases.generate` makes from it.

* The numbers are those of a CPU ``torch.Generator`` (Mersenne Twister) seeded with the key — the
  same sequence on every platform, and PEFT's for VeRA and RandLoRA — so they are drawn on the CPU
  and copied to the base weight's device (CUDA …); on the meta device only the shapes are made.
* ``persistent=False`` (the default of the methods): the bases are non-persistent buffers, so
  ``rw.save`` writes only the key; after ``rw.load`` (or ``load_state_dict``) has copied a new key
  in, :meth:`refresh` regenerates the bases from it, bit for bit.
* ``persistent=True``: the bases themselves are state (saved and loaded as tensors), e.g. the
  projections of an adapter imported from PEFT, which rankwise did not generate.
* Freshness: :meth:`refresh` (called by every forward) regenerates the bases when the key tensor
  was replaced or written in place (its ``data_ptr()`` / version stamp changed); ``load_state_dict``
  (a post-hook) and ``.to()`` keep them fresh eagerly. Under ``torch.compile`` the stamp cannot be
  traced (``data_ptr()`` breaks the graph at every adapted layer; ``_version`` would be frozen as a
  constant without a guard) and a CPU generator cannot run in a graph, so there ``refresh`` only
  asserts in the graph that the key still holds the values the bases were made from (a 1-3 entry
  comparison, no host sync) and raises otherwise: a key written in place by hand must be followed by
  one eager ``refresh()`` (or ``rw.load``), never a silently stale basis.

``vera`` and ``randlora`` share one ``SeededBases`` between all layers of an adapter through the
engine's ``shared`` hook (one object, saved once) and their PEFT codec, both in
:class:`SharedBasesMethod`; ``nola`` gives every layer its own seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..errors import ConfigError, ShapeMismatchError
from ._structured_common import require_peft_kinds

SEED_LIMIT = 2**62  # drawn seeds are below this: an int64, valid for torch.Generator.manual_seed and JSON


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed from ``generator`` (the global RNG when None), drawn on the generator's device (never on
    an ambient ``torch.device("meta")``)."""
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, SEED_LIMIT, (1,), generator=generator, device=device).item())


def largest_dims(views) -> tuple[int, int]:
    """``(max out, max in)`` over ``views``: the shape of the bases that every layer slices."""
    return max(v.out_features for v in views), max(v.in_features for v in views)


def _refresh_after_load(module: SeededBases, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: a new key regenerates the bases now, outside any compiled graph."""
    module.refresh()


class SeededBases(nn.Module):
    """Frozen tensors generated from ``key`` (see module docstring), on ``device`` in ``dtype``
    (default: float32). Subclasses list their tensors in ``names`` and define :meth:`generate`
    → ``{name: float32 CPU tensor}``; ``exact`` names the dimensions of each that a tensor taken
    from a file must match exactly (the others may be larger: every layer slices them)."""

    names: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[dict[str, tuple[int, ...]]] = {}

    def __init__(self, key: list[int], persistent: bool = False, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        device = torch.device("cpu" if device is None else device)
        self.register_buffer("key", torch.tensor(key, dtype=torch.int64, device=device))
        self.persistent = persistent
        for name, t in self._make(tuple(key), device, dtype).items():
            self.register_buffer(name, t, persistent=persistent)
        self._made = tuple(int(k) for k in key)  # the key the bases were generated from
        self._stamp = self._key_stamp()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def generate(self, key: tuple[int, ...]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _make(self, key, device: torch.device, dtype) -> dict[str, torch.Tensor]:
        if device.type == "meta":  # shapes only: the same code, every tensor on meta
            with torch.device("meta"):
                made = self.generate(key)
        else:
            made = self.generate(key)
        return {n: t.to(device=device, dtype=dtype or t.dtype) for n, t in made.items()}

    def _key_stamp(self):
        return (self.key.data_ptr(), self.key._version)

    def refresh(self) -> None:
        """Regenerate the bases if ``key`` changed since they were made (cheap when it did not:
        two attribute reads, no device sync). Persistent bases are state and never regenerated.
        Under ``torch.compile``: an in-graph check that ``key`` still equals the key the bases were
        made from (see module docstring)."""
        if torch.compiler.is_compiling():
            if not self.persistent:
                made = torch.tensor(self._made, dtype=torch.int64, device=self.key.device)
                torch._assert_async(torch.eq(self.key, made).all(),
                                    "rankwise: the key of seeded bases was changed in place since the bases were "
                                    "made; call refresh() on them (or rw.load) once outside torch.compile")
            return
        stamp = self._key_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if self.persistent or self.key.is_meta:
            return
        key = tuple(int(v) for v in self.key.tolist())
        made = self.generate(key)
        for name, t in made.items():
            old = getattr(self, name)
            setattr(self, name, t.to(device=old.device, dtype=old.dtype))
        self._made = key

    def assign(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Take ``tensors`` (a PEFT file's bases) as the bases, after checking that every layer can
        slice them: the same number of dimensions, each at least as large as now, ``exact`` ones equal."""
        for name, t in tensors.items():
            cur = getattr(self, name)
            if (t.dim() != cur.dim() or any(a < b for a, b in zip(t.shape, cur.shape))
                    or any(t.shape[i] != cur.shape[i] for i in self.exact.get(name, ()))):
                raise ShapeMismatchError(
                    f"{where}: PEFT tensor {name} has shape {tuple(t.shape)}; the adapted layers need "
                    f"{tuple(cur.shape)} (larger along the dimensions other than {self.exact.get(name, ())} is "
                    "fine). Load the adapter onto the model it was trained on."
                )
        with torch.no_grad():
            for name, t in tensors.items():
                cur = getattr(self, name)
                setattr(self, name, t.to(device=cur.device, dtype=cur.dtype).clone())
        self._stamp = self._key_stamp()
        if not self.key.is_meta:
            self._made = tuple(int(v) for v in self.key.tolist())

    def _apply(self, fn, recurse=True):  # .to()/.cuda() replace the key tensor: keep the stamp in step
        fresh = self._stamp == self._key_stamp()
        out = super()._apply(fn, recurse)
        if fresh:
            self._stamp = self._key_stamp()
        return out

    def extra_repr(self) -> str:
        key = "(meta)" if self.key.is_meta else self.key.tolist()
        return f"key={key}, persistent={self.persistent}"


@dataclass
class SharedBasesConfig(AdapterConfig):
    """dropout: on the adapter's input; projection_seed: seed of the shared bases (None: drawn from
    the adapter's generator); save_projection: store the bases in saved files instead of
    regenerating them from the seed."""

    dropout: float = 0.0
    projection_seed: int | None = None
    save_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                    "dropout", "dropout must be in [0, 1).")
        self._check(self.projection_seed is None or (isinstance(self.projection_seed, int)
                                                     and 0 <= self.projection_seed < 2**63),
                    "projection_seed", "use None (drawn from the generator) or an integer in [0, 2**63).")


class SharedBasesMethod(Method):
    """One set of seeded bases (``Bases``) for all layers of an adapter, and the PEFT codec of such a
    method: PEFT stores the bases once per model (``base_model.<name>``) and the trained tensors
    ``trained`` per layer. Subclasses add their own config entries with :meth:`peft_options` and
    :meth:`from_peft_options`; ``peft_name`` is PEFT's name of the method, for messages."""

    Bases: ClassVar[type[SeededBases]]
    trained: ClassVar[tuple[str, ...]] = ()
    peft_name: ClassVar[str] = ""

    @classmethod
    def shared(cls, views: list[LayerView], config: SharedBasesConfig, generator=None) -> SeededBases:
        seed = draw_seed(generator) if config.projection_seed is None else config.projection_seed
        return cls.Bases([seed, *largest_dims(views)], config, persistent=config.save_projection,
                         device=views[0].weight.device)

    def __init__(self, view: LayerView, config: SharedBasesConfig, generator=None, shared=None):
        super().__init__(view, config)
        self.rank = config.rank
        # one module for all layers (registered under every adapter, saved once by rw.save); an
        # adapter built outside rw.adapt gets bases of its own
        self.bases = self.shared([view], config, generator) if shared is None else shared

    def loaded(self) -> None:
        self.bases.refresh()

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    @classmethod
    def peft_options(cls, config) -> dict:
        return {}

    @classmethod
    def from_peft_options(cls, pcfg: dict) -> dict:
        return {}

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == cls.peft_type

    @classmethod
    def to_peft_config(cls, config: SharedBasesConfig, views: list[LayerView]) -> dict:
        require_peft_kinds(cls.name, cls.peft_name, views, ("linear", "hf_conv1d"))
        return {
            "peft_type": cls.peft_type,
            "r": config.rank,
            f"{cls.name}_dropout": config.dropout,
            "projection_prng_key": config.projection_seed,  # a drawn seed comes from peft_shared
            "save_projection": True,
            "fan_in_fan_out": any(v.kind == "hf_conv1d" for v in views),
            "bias": "none",
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            **cls.peft_options(config),
        }

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError(f"PEFT {cls.peft_name} adapter trains biases (bias != 'none'); rankwise's {cls.name} "
                              "leaves biases frozen.")
        return {"rank": int(pcfg["r"]), "dropout": float(pcfg.get(f"{cls.name}_dropout") or 0.0),
                "projection_seed": int(pcfg.get("projection_prng_key", 0)),
                # the file's bases are kept as state (PEFT saves them by default)
                "save_projection": bool(pcfg.get("save_projection", True)), **cls.from_peft_options(pcfg)}

    @classmethod
    def peft_shared_keys(cls) -> tuple[str, ...]:
        return tuple(f"base_model.{n}" for n in cls.Bases.names)

    @classmethod
    def peft_shared(cls, shared: SeededBases) -> tuple[dict[str, torch.Tensor], dict]:
        """(model-level PEFT tensors, adapter_config entries) of the shared bases."""
        shared.refresh()
        return ({f"base_model.{n}": getattr(shared, n) for n in shared.names},
                {"projection_prng_key": int(shared.key[0])})

    @classmethod
    def load_peft_shared(cls, shared: SeededBases, tensors: dict[str, torch.Tensor]) -> None:
        shared.assign({n: tensors[f"base_model.{n}"] for n in shared.names}, "the model")

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.trained}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in self.trained:
            param = getattr(self, key)
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ShapeMismatchError(
                    f"module '{self.view.name}': PEFT tensor {key} has shape {tuple(tensors[key].shape)}, rankwise "
                    f"expects {tuple(param.shape)} (rank {self.rank}, weight {self.view.out_features}x"
                    f"{self.view.in_features}). Load it onto the model it was trained on."
                )
        with torch.no_grad():
            for key in self.trained:
                getattr(self, key).copy_(tensors[key])

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return cls.trained
