"""Optimizer option validation: errors name the value and the fix."""

from __future__ import annotations

import re

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


# ---- param_groups' default: the GaLore recipe's targets ----------------------------------------------
def test_param_groups_default_projects_attention_and_mlp_only(llama, gpt2, bert):
    """The recipe (GaLore's ``target_modules_list = ["attn", "mlp"]``, ``rankwise pretrain``'s
    ``(self_attn|mlp)\\.``): attention and MLP matrices are projected, lm_head / embeddings / heads are not."""
    import torch.nn as nn

    from rankwise.cli.pretrain import TARGETS

    model = llama()
    low = {id(p) for p in ro.param_groups(model, rank=4)[-1]["params"]}
    recipe = {id(p) for n, p in model.named_parameters() if re.search(TARGETS, n) and p.ndim == 2}
    assert low == recipe and id(model.lm_head.weight) not in low
    for m, heads in ((gpt2(), ["lm_head"]), (bert(), ["classifier", "bert.pooler.dense"])):
        low = {id(p) for p in ro.param_groups(m, rank=4)[-1]["params"]}
        linear = {n: mod.weight for n, mod in m.named_modules() if isinstance(mod, nn.Linear) or
                  type(mod).__name__ == "Conv1D"}
        assert {n for n, w in linear.items() if id(w) in low} == {n for n in linear if n not in heads}
    # explicit targets still win: every matrix, or a regex
    every = {id(p) for p in ro.param_groups(model, rank=4, targets="all")[-1]["params"]}
    assert id(model.lm_head.weight) in every and every > recipe
    only_q = ro.param_groups(model, rank=4, targets=r"q_proj")[-1]["params"]
    assert [id(p) for p in only_q] == [id(model.model.layers[0].self_attn.q_proj.weight)]
    # no attention / MLP names: every weight matrix (a plain MLP)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [id(p) for p in ro.param_groups(mlp, rank=2)[-1]["params"]] == [id(mlp[0].weight), id(mlp[2].weight)]
