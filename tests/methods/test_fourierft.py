"""fourierft (FourierFT, Gao et al. 2024): PEFT 0.21 oracle, and the update re-derived in float64 from the
paper's formula (explicit cosines)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _structured_helpers import (
    cases,
    check_clamps_round_trip_through_peft_patterns,
    check_config_round_trip,
    check_gradients_equal_dense_weight_view,
    check_peft_round_trip,
    check_same_as_peft,
    layers,
    linear,
)
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


@pytest.mark.parametrize("case", cases("fourierft"))
def test_same_weights_as_peft_same_outputs_and_gradients(case, request, token_batch):
    check_same_as_peft(case, request, token_batch)


@pytest.mark.parametrize("case", cases("fourierft"))
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    check_gradients_equal_dense_weight_view(case, request, token_batch)


@pytest.mark.parametrize("case", cases("fourierft"))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    check_peft_round_trip(case, request, token_batch, tmp_path)


def test_clamped_k_round_trips_through_peft_pattern(tmp_path):
    check_clamps_round_trip_through_peft_patterns("fourierft", {"n_frequency": 30, "scaling": 20.0},
                                                  "n_frequency_pattern", tmp_path)


def test_is_the_real_inverse_dft_of_the_sparse_spectrum():
    """ΔW[p, q] = α/(mn) Σ_k c_k cos(2π(p j_k/m + q l_k/n)), summed entry by entry in float64, with
    the entries PEFT draws from the same seed (``randperm(m·n)[:K]``, row-major)."""
    m, n, k, alpha = 9, 7, 11, 40.0
    model = rw.adapt(linear(m, n), "fourierft", n_frequency=k, scaling=alpha, random_loc_seed=3, seed=0)
    ad = model[0].adapters["default"]
    idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(3))[:k]
    p = torch.arange(m, dtype=torch.float64)[:, None]
    q = torch.arange(n, dtype=torch.float64)[None, :]
    ref = torch.zeros(m, n, dtype=torch.float64)
    for c, i in zip(ad.spectrum.detach(), idx.tolist()):
        ref += c * torch.cos(2 * math.pi * (p * (i // n) / m + q * (i % n) / n))
    ref *= alpha / (m * n)
    torch.testing.assert_close(ad.delta_weight(), ref, atol=1e-12, rtol=1e-10)
    assert rw.parameter_count(model).trainable == k


def test_embedding_path_never_forms_the_vocabulary_matrix():
    """Embedding outputs from the K phases per token equal the dense weight view (float64) for odd and
    even vocabulary and width (DC and Nyquist bins)."""
    for vocab, dim in ((31, 8), (30, 7), (16, 6)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(vocab, dim)).double()
        model = rw.adapt(copy.deepcopy(net), "fourierft", n_frequency=25, scaling=30.0, targets=["0"], seed=1)
        ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            dense = nn.functional.embedding(ids, net[0].weight + model[0].delta_weight())
            torch.testing.assert_close(model(ids), dense, atol=1e-12, rtol=1e-10)


def test_entries_shared_across_layers_and_rebuilt_on_load(bert, tmp_path, token_batch):
    base = bert(seed=0)
    model = rw.adapt(copy.deepcopy(base), "fourierft", n_frequency=30, targets=["query", "key"], seed=0)
    adapted = list(layers(model).values())
    first = adapted[0].adapters["default"].indices
    assert all(torch.equal(la.adapters["default"].indices, first) for la in adapted), "the paper shares entries"
    assert "indices" not in adapted[0].adapters["default"].state_dict(), "entries come from the seed, not the file"
    rw.save(model, tmp_path / "a")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(layers(fresh)["bert.encoder.layer.0.attention.self.query"].adapters["default"].indices, first)
    with torch.no_grad():
        assert torch.equal(fresh(**token_batch).logits, model(**token_batch).logits)


def test_clamps_k_to_small_layers():
    model = rw.adapt(linear(3, 4), "fourierft", n_frequency=1000, seed=0)
    assert model[0].adapters["default"].n_frequency == 12 == rw.parameter_count(model).trainable
    with pytest.raises(ConfigError, match="n_frequency"):
        rw.get_method("fourierft").Config(n_frequency=0)


def test_config_round_trips_and_rejects_bad_values():
    check_config_round_trip("fourierft", {"scaling": float("nan")})
