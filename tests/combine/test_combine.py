"""rw.combine as an API: bad input leaves the model unchanged; the result saves, reloads and exports to
PEFT like any LoRA; heads, dtypes, small layers."""

from __future__ import annotations

import pytest
import torch
from _combine_helpers import (
    NAMES,
    add_lora,
    base,
    delta,
    fingerprint,
    peft_copy,
    same_fingerprint,
    two_adapters,
)

import rankwise as rw
from rankwise.combine import methods
from rankwise.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, ShapeMismatchError

A, B = NAMES


@pytest.mark.parametrize("call,error,match", [
    (lambda m: rw.combine(m, [A, "nope"], [1, 1], "c"), AdapterNotFoundError, "no adapter 'nope'"),
    (lambda m: rw.combine(m, [], [], "c"), ConfigError, "empty list"),
    (lambda m: rw.combine(m, [A, B], [1.0], "c"), ConfigError, "1 weights for 2 adapters"),
    (lambda m: rw.combine(m, [A, B], [1.0, float("nan")], "c"), ConfigError, "finite"),
    (lambda m: rw.combine(m, [A, B], None, "c", method="linear"), ConfigError, "needs weights"),
    (lambda m: rw.combine(m, [A, B], [1, 1], "c", method="tie"), ConfigError, "unknown combine method"),
    (lambda m: rw.combine(m, [A, B], [1, 1], "c", method="ties", density=0), ConfigError, "density"),
    (lambda m: rw.combine(m, [A, B], [1, 1], "c", method="svd", rank=0), ConfigError, "rank"),
    (lambda m: rw.combine(m, [A, B], [1, 1], "c", method="svd", densty=0.5), ConfigError, "no option"),
    (lambda m: rw.combine(m, [A, B], [1, 1], A), AdapterExistsError, "already has"),
    (lambda m: rw.combine(m, [A, B], [1, 1], "a.b"), ConfigError, "without '.'"),
    (lambda m: rw.combine(m, A, [1], "c"), ConfigError, "list of adapter names"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(call, error, match):
    model = two_adapters()
    before = fingerprint(model)
    rng = torch.get_rng_state()
    with pytest.raises(error, match=match):
        call(model)
    assert same_fingerprint(before, fingerprint(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_adapter_that_does_not_fit_its_module_is_refused_before_any_change():
    model = two_adapters()
    layer = dict(rw.core.api.adapted_layers(model))["q"]
    bad = layer.adapters[B]
    bad.lora_A = torch.nn.Parameter(torch.zeros(5, 3))  # made for another model: 3 inputs, not 8
    before = fingerprint(model)
    with pytest.raises(ShapeMismatchError, match="module 'q'"):
        rw.combine(model, [A, B], [1, 1], "c", method="cat")
    assert same_fingerprint(before, fingerprint(model))


def test_result_saves_reloads_and_exports_to_peft(tmp_path):
    from peft import PeftModel

    model = two_adapters()
    rw.combine(model, [A, B], [0.7, -0.4], "both", method="svd", rank=4)
    want = delta(model, "both")
    assert rw.active_adapters(model) == ["both"]
    x = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        out = model(x)

    rw.save(model, tmp_path / "rw", names="both")
    fresh = base()
    rw.load(fresh, tmp_path / "rw")
    for k, d in delta(fresh, "both").items():
        assert torch.equal(d, want[k])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)

    rw.export_peft(model, tmp_path / "peft", name="both")
    pm = PeftModel.from_pretrained(base(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(pm(x), out, atol=1e-5, rtol=1e-5)
    back = base()
    rw.import_peft(back, tmp_path / "peft", name="both")
    for k, d in delta(back, "both").items():
        torch.testing.assert_close(d, want[k])


def test_heads_combine_by_task_arithmetic_and_weights_one_zero_keep_the_first():
    model = base()
    add_lora(model, A, 3, 3.0, 1, targets=["q"], modules_to_save=["head"])
    add_lora(model, B, 2, 2.0, 2, targets=["q"], modules_to_save=["head"])
    copies = model.get_submodule("head").copies
    with torch.no_grad():
        copies[A].weight.add_(1.0)
        copies[B].weight.sub_(2.0)
    orig = model.get_submodule("head").original.weight.detach()
    rw.combine(model, [A, B], [1.0, 0.0], "first", method="linear")
    rw.combine(model, [A, B], [0.5, 0.25], "mix", method="ties", density=0.5)
    torch.testing.assert_close(copies["first"].weight, copies[A].weight)
    want = orig + 0.5 * (copies[A].weight - orig) + 0.25 * (copies[B].weight - orig)
    torch.testing.assert_close(copies["mix"].weight, want)


def test_bfloat16_model_and_merged_inputs():
    model = two_adapters()
    model.to(torch.bfloat16)
    rw.merge(model, [A])  # a merged input reads the same ΔW
    rw.combine(model, [A, B], [1.0, 1.0], "sum", method="cat")
    for k, d in delta(model, "sum").items():
        assert d.dtype == torch.bfloat16
        want = delta(model, A)[k].float() + delta(model, B)[k].float()
        torch.testing.assert_close(d.float(), want, atol=0.1, rtol=0.02)


def test_rank_above_a_small_layer_gets_a_per_module_rank_and_stays_exact(tmp_path):
    # q is 8 -> 6 (rank ≤ 6) while up is 9 -> 7: cat of ranks 5 + 5 needs 10 > 7 → exact re-factor per module
    model = two_adapters(ranks=(5, 5))
    rw.combine(model, [A, B], [1.0, 1.0], "sum", method="cat")
    layers = dict(rw.core.api.adapted_layers(model))
    assert {n: layers[n].adapters["sum"].lora_A.shape[0] for n in ("q", "v", "up")} == {"q": 6, "v": 6, "up": 7}
    for k, d in delta(model, "sum").items():
        torch.testing.assert_close(d, delta(model, A)[k] + delta(model, B)[k], atol=2e-5, rtol=1e-5)
    rw.save(model, tmp_path / "s", names="sum")
    fresh = base()
    rw.load(fresh, tmp_path / "s")
    for k, d in delta(fresh, "sum").items():
        assert torch.equal(d, delta(model, "sum")[k])


def test_methods_lists_every_family():
    names = set(methods())
    assert {"linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune",
            "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "peft_linear", "peft_ties", "iso_c",
            "iso_cts", "knots", "lora_lego", "soup", "greedy_soup"} <= names
    assert all(isinstance(s, str) and s for s in methods().values())


def test_peft_oracle_fixture_holds_the_same_adapters():
    # the PEFT copy used as oracle across these tests carries exactly rankwise's ΔW
    from _combine_helpers import peft_delta

    model = two_adapters()
    pm = peft_copy(model, [A, B])
    for n in (A, B):
        for k, d in peft_delta(pm, n).items():
            torch.testing.assert_close(d, delta(model, n)[k])
