"""The method registry: every adapter method registers itself under its name.

``@register("lora")`` on a :class:`~rankwise.core.method.Method` subclass checks the class against
the contract written in ``core/method.py`` (required views, config dataclass, layer kinds, and
all-or-nothing optional capabilities) and makes it available to ``rw.adapt``, save/load, PEFT
interop, the CLI and the registry-wide tests.
"""

from __future__ import annotations

from ..errors import MethodNotFoundError, close_names
from .method import check_contract

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: ``@register("lora")`` makes the method available by name."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name '{name}' is already registered by {_REGISTRY[name].__name__}")
        check_contract(cls, name)
        # the very same Config class as another method (a subclass inherits ``method`` but is its own class)
        owner = next((n for n, other in _REGISTRY.items() if n != name and other.Config is cls.Config), None)
        if owner is not None:
            raise TypeError(
                f"method '{name}' reuses the Config class of method '{owner}'; give each method its own "
                "Config subclass (e.g. class MyConfig(LoraConfig): pass)."
            )
        cls.name = name
        cls.Config.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodNotFoundError(
            f"no adapter method named '{name}'. Registered: {', '.join(sorted(_REGISTRY))}."
            + close_names(name, _REGISTRY)
        ) from None


def methods() -> list[str]:
    """Names of all registered adapter methods, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from .. import methods as _  # noqa: F401  (importing registers the built-in methods)
