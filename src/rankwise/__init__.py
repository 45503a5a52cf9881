"""rankwise: low-rank deep learning on PyTorch.

    import rankwise as rw
    model = rw.adapt(model, "lora", rank=8, alpha=16, targets="all-linear")
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import analysis as analysis  # rw.analysis: analyze(), per-matrix measures, reports
from . import compose as compose  # rw.compose: mixtures of adapters (MoLE, X-LoRA, MixLoRA ...)
from . import errors
from . import optim as optim  # rw.optim: low-rank optimizers (GaLore, Fira, APOLLO ...)
from . import reparam as reparam  # rw.reparam: weight reparameterizations; rw.init: low_rank_ ...
from .combine import combine
from .core import registry as _registry
from .core.api import (
    active_adapters,
    adapt,
    delete,
    disabled,
    merge,
    parameter_count,
    print_trainable_parameters,
    set_active,
    summary,
    trainable_parameters,
    unadapt,
    unmerge,
)
from .core.config import AdapterConfig
from .core.mixed import mixed_batch
from .core.rank import rank_regularization, rank_step
from .core.registry import get_method, register
from .integrations.bnb import prepare_for_kbit_training
from .integrations.hf import from_pretrained
from .io.files import load, save
from .io.peft import export_peft, import_peft
from .methods.lora import LoraConfig
from .reparam import init as init

# Bound after the imports: importing the ``rankwise.methods`` package sets an attribute of that name.
methods = _registry.methods

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "__version__",
    "active_adapters",
    "adapt",
    "combine",
    "delete",
    "disabled",
    "errors",
    "export_peft",
    "from_pretrained",
    "get_method",
    "import_peft",
    "load",
    "merge",
    "methods",
    "mixed_batch",
    "parameter_count",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "rank_regularization",
    "rank_step",
    "register",
    "save",
    "set_active",
    "summary",
    "trainable_parameters",
    "unadapt",
    "unmerge",
]
