"""Errors raised by rankwise.

Every message names the module, the shape or value at fault, and what to do.
They subclass ``ValueError``/``TypeError`` so callers can catch the builtins.
"""

from __future__ import annotations

import difflib


class RankwiseError(Exception):
    """Base class of all rankwise errors."""


class ConfigError(RankwiseError, ValueError):
    """A method or training configuration holds an invalid value."""


class TargetError(RankwiseError, ValueError):
    """A target pattern matched nothing, or a module cannot be adapted."""


class UnsupportedLayerError(RankwiseError, TypeError):
    """A method was asked to adapt a layer kind it does not support."""


class AdapterExistsError(RankwiseError, ValueError):
    """An adapter with this name already exists on the model."""


class AdapterNotFoundError(RankwiseError, ValueError):
    """No adapter with this name exists on the model."""


class ShapeMismatchError(RankwiseError, ValueError):
    """Saved tensors do not fit the model they are loaded onto."""


class CorruptFileError(RankwiseError, ValueError):
    """A file is truncated, corrupted, or not in the expected format."""


class MethodNotFoundError(RankwiseError, ValueError):
    """No method is registered under this name."""


class CalibrationError(RankwiseError, ValueError):
    """A data-driven init got no, empty or unusable calibration data."""


class NonFiniteLossError(RankwiseError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; nothing was stepped or saved for it."""


class OutputPathError(ConfigError):
    """An output path cannot be written without deleting or overwriting something rankwise did not write."""


def close_names(name: str, candidates, n: int = 5) -> str:
    """Return ``" Did you mean: a, b?"`` for the closest candidates, or ``""``."""
    cands = sorted(set(candidates))
    matches = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not matches:
        # suffix matches are common for module names ("query" vs "self.query")
        matches = [c for c in cands if c.endswith(name) or name in c][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
