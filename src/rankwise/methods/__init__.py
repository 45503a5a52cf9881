"""Built-in adapter methods. Each module registers one method by name on import."""

from . import lora  # noqa: F401
