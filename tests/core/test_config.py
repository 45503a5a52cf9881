"""core/config.py: the options every method shares are validated once, for every method that has them."""

from __future__ import annotations

import pytest

import rankwise as rw
from rankwise.core.config import RankAlphaConfig

RANK_ALPHA = [m for m in rw.methods() if issubclass(rw.get_method(m).Config, RankAlphaConfig)]


@pytest.mark.parametrize("method", RANK_ALPHA)
@pytest.mark.parametrize("alpha", ["16", float("inf"), float("nan"), 1e308, 0, -2.0, True])
def test_unusable_alpha_is_refused_with_the_fix(method, alpha):
    """Reliability cases A6/A7: alpha='16' raised a raw TypeError, inf gave NaN outputs and 1e308
    overflowed at the first forward."""
    with pytest.raises(rw.errors.ConfigError, match=r"alpha=.*positive, finite.*e\.g\. alpha=16"):
        rw.get_method(method).Config(alpha=alpha)


@pytest.mark.parametrize("method", RANK_ALPHA)
def test_scale_is_alpha_over_rank_or_root_rank(method):
    cfg = rw.get_method(method).Config(rank=4, alpha=8.0)
    # AdaLoRA / IncreLoRA divide by r + 1e-5, as their reference code
    assert cfg.lora_alpha == 8.0 and cfg.scale == pytest.approx(2.0, rel=1e-5)
    if "rslora" in {f for f in cfg.to_dict()}:
        try:
            rs = rw.get_method(method).Config(rank=4, alpha=8.0, rslora=True)
        except rw.errors.ConfigError:  # a method whose paper has no rsLoRA scaling refuses it
            return
        assert rs.scale == 4.0
    assert rw.get_method(method).Config(rank=4).scale == pytest.approx(1.0, rel=1e-5)  # alpha None: alpha = rank


def test_rank_alpha_config_is_shared():
    """The rank/alpha/dropout/rslora block is written once: most LoRA-shaped methods use it."""
    assert len(RANK_ALPHA) >= 20, RANK_ALPHA
