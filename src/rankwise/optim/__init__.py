"""Full-parameter training with low-rank or compressed optimizer state.

Every optimizer is a ``torch.optim.Optimizer`` with standard ``param_groups``: a group whose
``rank`` is set projects its matrices, everything else takes a plain AdamW step in the same
optimizer. Build the groups with :func:`param_groups` (or by hand, galore-torch style).

    import rankwise as rw
    opt = rw.optim.GaLoreAdamW(rw.optim.param_groups(model, rank=128, scale=0.25), lr=1e-3)
    rw.optim.state_bytes(opt, model)     # exact bytes of optimizer state, by tensor
"""

from __future__ import annotations

from ._common import GROUP_DEFAULTS, LowRankOptimizer, matrix_parameters, param_groups
from .adafactor import Adafactor
from .apollo import APOLLO, APOLLOMini
from .fira import Fira
from .flora import Flora
from .frugal import FRUGAL
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .gradnorm_lorp import GradNormLoRP
from .layerwise import LayerwiseHandle, layerwise
from .lora_plus import ALLoRA, allora, lora_plus
from .projectors import KINDS as PROJECTOR_KINDS
from .projectors import Projector, make_projector
from .qgalore import QGaLoreAdamW
from .smmf import SMMF
from .state import state_bytes

__all__ = [
    "Fira",
    "Flora",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseHandle",
    "QGaLoreAdamW",
    "layerwise",
    "ALLoRA",
    "APOLLO",
    "APOLLOMini",
    "Adafactor",
    "FRUGAL",
    "GradNormLoRP",
    "SMMF",
    "allora",
    "lora_plus",
    "GROUP_DEFAULTS",
    "PROJECTOR_KINDS",
    "LowRankOptimizer",
    "Projector",
    "make_projector",
    "matrix_parameters",
    "param_groups",
    "state_bytes",
]
