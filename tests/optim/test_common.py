"""Optimizer option validation: errors name the value and the fix."""

from __future__ import annotations

import pytest
import torch

import rankwise.optim as ro
from rankwise.errors import ConfigError


# ---------------------------------------------------------------------------------------- errors
def test_config_errors_name_the_value():
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ConfigError, match="scale_type='row'"):
        ro.APOLLO([{"params": p, "rank": 1}], scale_type="row")
    with pytest.raises(ConfigError, match="inactive_update='adam'"):
        ro.FRUGAL(p, inactive_update="adam")
    with pytest.raises(ConfigError, match="relative_step"):
        ro.Adafactor(p, lr=1e-3, relative_step=True)
    with pytest.raises(ConfigError, match="decay_rate=0.5"):
        ro.SMMF(p, decay_rate=0.5)
    with pytest.raises(ConfigError, match="rank=0"):
        ro.GradNormLoRP([{"params": p, "rank": 0}])
