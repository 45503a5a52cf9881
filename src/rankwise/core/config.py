"""The base configuration every method's config dataclass extends."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError


@dataclass
class AdapterConfig:
    """Options shared by all adapter methods.

    targets: ``"all-linear"`` (every Linear / HF Conv1D except the output head), a list of
        module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``), or a
        regular expression matched against the whole module name.
    exclude: module-name suffixes or a regex to leave out of ``targets``.
    modules_to_save: module-name suffixes of modules trained fully and saved with the adapter
        (a classifier head, say). Each adapter trains its own copy; the original stays frozen
        and is used when no adapter with a copy is active (see ``TrainedCopies``).
    """

    method: ClassVar[str] = ""
    targets: str | list[str] = "all-linear"
    exclude: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not isinstance(self.targets, (str, list)) or (isinstance(self.targets, list) and not self.targets):
            raise ConfigError(
                f"{type(self).__name__}.targets={self.targets!r}: give 'all-linear', a non-empty list of "
                "module-name suffixes, or a regex string."
            )
        self.modules_to_save = list(self.modules_to_save or [])

    # ---- helpers for validation in subclasses ------------------------------------------
    def _check(self, ok: bool, field_name: str, fix: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{field_name}={getattr(self, field_name)!r}: {fix}")

    def _check_int(self, field_name: str, low: int = 1) -> None:
        """``field_name`` is an int ≥ ``low`` (not a bool)."""
        v = getattr(self, field_name)
        self._check(isinstance(v, int) and not isinstance(v, bool) and v >= low, field_name,
                    f"{field_name} must be an integer ≥ {low}.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown options {sorted(unknown)}; valid options: {sorted(names)}."
            )
        return cls(**d)

    def replace(self, **kw) -> AdapterConfig:
        return dataclasses.replace(self, **kw)


@dataclass
class RankAlphaConfig(AdapterConfig):
    """The LoRA hyperparameters most methods share, validated once.

    rank: r; alpha: α (default None: α = r, so s = 1 — kept None so a per-module rank override
    follows); dropout: on the adapter's input; rslora: s = α/√r instead of α/r (Kalajdzievski 2023).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(self.alpha is None or (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and 0 < self.alpha < 1e30),
                    "alpha", "alpha must be a positive, finite number below 1e30 (or None: alpha = rank), "
                    "e.g. alpha=16; a string or inf gives no usable scale.")
        self._check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                    "dropout", "dropout must be in [0, 1).")
        self._check(isinstance(self.rslora, bool), "rslora", "use True or False.")

    @property
    def lora_alpha(self) -> float:
        """α in effect: ``alpha``, or the rank when ``alpha`` is None."""
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        """``s = α / r`` (``α / √r`` with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
