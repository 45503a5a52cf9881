"""bone (Bone / MiSS, Kang 2024): PEFT 0.21 oracle (PEFT's ``miss``, the authors' implementation) and the
blocks written out in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from _structured_helpers import (
    cases,
    check_config_round_trip,
    check_export_refuses_hf_conv1d,
    check_gradients_equal_dense_weight_view,
    check_peft_round_trip,
    check_same_as_peft,
    linear,
    randomize,
)

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


@pytest.mark.parametrize("case", cases("bone"))
def test_same_weights_as_peft_same_outputs_and_gradients(case, request, token_batch):
    check_same_as_peft(case, request, token_batch)


@pytest.mark.parametrize("case", cases("bone"))
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    check_gradients_equal_dense_weight_view(case, request, token_batch)


@pytest.mark.parametrize("case", cases("bone"))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    check_peft_round_trip(case, request, token_batch, tmp_path)


def test_export_refuses_layers_peft_lacks(gpt2, tmp_path):
    check_export_refuses_hf_conv1d("bone", {"rank": 4}, gpt2, tmp_path)


def test_bat_blocks_closed_form():
    """ΔW_ij = W0_ij · B_i + B_i for every r×r block (explicit loops, float64)."""
    m, n, r = 8, 12, 4
    net = linear(m, n)
    model = rw.adapt(copy.deepcopy(net), "bone", rank=r, mode="bat", seed=0)
    ad = model[0].adapters["default"]
    assert torch.count_nonzero(ad.delta_weight()) == 0
    randomize(ad.parameters(), seed=1)
    w0, blocks = net[0].weight, ad.miss_block.detach()
    dw = ad.delta_weight()
    for i in range(m // r):
        for j in range(n // r):
            w_ij = w0[i * r:(i + 1) * r, j * r:(j + 1) * r]
            torch.testing.assert_close(dw[i * r:(i + 1) * r, j * r:(j + 1) * r], w_ij @ blocks[i] + blocks[i])
    assert rw.parameter_count(model).trainable == m * r


def test_share_closed_form_and_clamps():
    m, n, r = 6, 11, 4  # 11 = 2·4 + 3: the last block is cut
    model = rw.adapt(linear(m, n), "bone", rank=r, mode="share", seed=0)
    ad = model[0].adapters["default"]
    randomize(ad.parameters(), seed=1)
    b = ad.miss_block.detach()
    dw = ad.delta_weight()
    for p in range(m):
        for q in range(n):
            assert dw[p, q] == b[q % r, p]
    assert rw.parameter_count(model).trainable == m * r
    assert rw.adapt(linear(6, 9), "bone", rank=4, mode="bat", seed=0)[0].adapters["default"].rank == 3
    with pytest.raises(ConfigError, match="dropout"):
        rw.get_method("bone").Config(mode="bat", dropout=0.1)


def test_config_round_trips_and_rejects_bad_values():
    check_config_round_trip("bone", {"mode": "mini"})
