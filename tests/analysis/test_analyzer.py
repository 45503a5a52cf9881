"""rankwise.analysis against closed forms and independent re-derivations.

Oracles: matrices built from chosen singular values and random orthogonal factors (so every
spectral measure has a closed form), float64 LAPACK on the same matrices, brute-force
per-example autograd for the tangent kernel, the textbook HSIC form of CKA with an explicit
centering matrix, and dense re-derivations of the adapters' weight view.
"""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch

import rankwise as rw
from rankwise.analysis import (
    adapter_similarity,
    amplification_factor,
    analyze,
    effective_rank,
    energy_at_rank,
    intruder_count,
    intruder_dimensions,
    kernel_alignment,
    label_kernel,
    linear_cka,
    matrix_measures,
    norms,
    numerical_rank,
    principal_angles,
    rank_at_energy,
    rankme,
    singular_values,
    stable_rank,
    subspace_similarity,
    svd,
    tangent_kernel,
    top_alignment,
    weight_pairs,
)
from rankwise.core.api import adapted_layers
from rankwise.errors import ConfigError, ShapeMismatchError


def orth(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def with_spectrum(m: int, n: int, s, seed: int = 0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` for random orthonormal ``U (m×p)``, ``V (n×p)``: its singular values are ``s``."""
    s = torch.as_tensor(s, dtype=torch.float64)
    p = len(s)
    return orth(m, p, seed) @ torch.diag(s) @ orth(n, p, seed + 1).T


# ---- per-matrix measures ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    a = with_spectrum(20, 12, [2.5] * k, seed=k)
    s = singular_values({"a": a})["a"].s
    assert float(effective_rank(s)) == pytest.approx(k, rel=1e-5)
    assert float(effective_rank(torch.tensor([2.5] * k + [0.0] * 3))) == pytest.approx(k, rel=1e-12)


def test_effective_rank_closed_form_for_unequal_values():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    assert float(effective_rank(s)) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)


def test_stable_rank_of_rank_one_is_one_and_of_k_equal_is_k():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 1, generator=g) @ torch.randn(1, 13, generator=g)
    res = matrix_measures({"rank1": a, "eq": with_spectrum(10, 10, [1.5] * 4)})
    assert res["rank1"]["stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert res["rank1"]["numerical_rank"] == 1
    assert res["eq"]["stable_rank"] == pytest.approx(4.0, rel=1e-5)


def test_numerical_rank_energy_and_norms_closed_forms():
    s = [5.0, 4.0, 2.0, 1.0, 0.5]
    a = with_spectrum(16, 11, s, seed=3)
    spec = singular_values({"a": a}, dtype=torch.float64)["a"]
    assert int(numerical_rank(spec.s, shape=(16, 11))) == 5
    assert int(numerical_rank(spec.s, tol=1.5)) == 3
    tot = sum(x * x for x in s)
    assert float(energy_at_rank(spec.s, 2)) == pytest.approx((25 + 16) / tot, rel=1e-10)
    assert int(rank_at_energy(spec.s, 0.9)) == 3  # 45/46.25 ≥ 0.9 > 41/46.25
    nrm = norms(spec.s)
    assert float(nrm["nuclear"]) == pytest.approx(float(torch.linalg.matrix_norm(a, "nuc")), rel=1e-10)
    assert float(nrm["spectral"]) == pytest.approx(float(torch.linalg.matrix_norm(a, 2)), rel=1e-10)
    assert float(nrm["frobenius"]) == pytest.approx(float(torch.linalg.matrix_norm(a)), rel=1e-10)
    assert float(stable_rank(spec.s)) == pytest.approx(tot / 25, rel=1e-10)


def test_zero_matrix_measures():
    m = matrix_measures({"z": torch.zeros(4, 6)})["z"]
    assert m["effective_rank"] == 0 and m["stable_rank"] == 0 and m["numerical_rank"] == 0
    assert m["frobenius"] == 0


def test_batched_svd_matches_per_matrix_lapack_for_mixed_shapes(single_thread):
    g = torch.Generator().manual_seed(5)
    mats = {f"m{i}": torch.randn(*shape, generator=g) for i, shape in
            enumerate([(12, 7), (7, 12), (12, 7), (5, 5), (7, 12)])}
    dec, spec = svd(mats)
    for name, a in mats.items():
        u, s, vh = dec[name]
        ref = torch.linalg.svdvals(a.double())
        torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((u * s) @ vh, a, rtol=1e-4, atol=1e-4)
        assert spec[name].exact and spec[name].fro2 == pytest.approx(float((a.double() ** 2).sum()), rel=1e-5)


def test_randomized_svd_is_exact_on_low_rank_and_bounded_otherwise():
    low = with_spectrum(60, 40, [9.0, 5.0, 3.0, 1.0], seed=7).float()
    g = torch.Generator().manual_seed(8)
    full = torch.randn(60, 40, generator=g)
    spec = singular_values({"low": low, "full": full}, method="randomized", q=8, niter=3)
    ref_low = torch.linalg.svdvals(low.double())[:8]
    torch.testing.assert_close(spec["low"].s.double(), ref_low, rtol=1e-4, atol=1e-4)
    assert spec["low"].tail / spec["low"].fro2 < 1e-5
    # stated error: σ̂_i ≤ σ_i and tail ≥ the true energy beyond the top q
    ref = torch.linalg.svdvals(full.double())
    assert (spec["full"].s.double() <= ref[:8] * (1 + 1e-5)).all()
    assert spec["full"].tail >= float((ref[8:] ** 2).sum()) * (1 - 1e-5)
    # "auto" keeps the randomized result for the low-rank matrix and recomputes the full-rank one
    auto = singular_values({"low": low, "full": full}, method="auto", q=8)
    assert not auto["low"].exact and auto["full"].exact
    torch.testing.assert_close(auto["full"].s.double(), ref, rtol=1e-5, atol=1e-5)


def test_spectral_errors_are_clear():
    with pytest.raises(ConfigError, match="2-D"):
        singular_values({"x": torch.zeros(2, 3, 4)})
    with pytest.raises(ConfigError, match="NaN"):
        singular_values({"x": torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(ConfigError, match="method"):
        svd({"x": torch.eye(3)}, method="lanczos")
    with pytest.raises(ConfigError, match="frac"):
        rank_at_energy(torch.ones(3), 1.5)


# ---- update measures ----------------------------------------------------------------------------------
def test_intruders_zero_when_update_stays_in_top_subspace_and_planted_direction_counts():
    m, n = 40, 24
    s0 = torch.linspace(10, 1, n, dtype=torch.float64)
    u0, v0 = orth(m, n, 1), orth(n, n, 2)
    w0 = u0 @ torch.diag(s0) @ v0.T
    # ΔW inside W0's top-3 singular subspaces: W keeps W0's singular vectors
    dw_in = u0[:, :3] @ torch.diag(torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64)) @ v0[:, :3].T
    assert intruder_count(w0, w0 + dw_in, k=10, eps=0.5) == 0
    # a planted direction orthogonal to every left singular vector of W0, with a large singular value
    q = torch.linalg.qr(torch.cat([u0, torch.randn(m, 1, generator=torch.Generator().manual_seed(3),
                                                  dtype=torch.float64)], 1))[0]
    u_new = q[:, -1:]
    assert float((u_new.T @ u0).abs().max()) < 1e-12
    v_new = orth(n, 1, 4)
    w = w0 + 30.0 * u_new @ v_new.T
    assert intruder_count(w0, w, k=10, eps=0.5) >= 1
    u_w, s_w, _ = torch.linalg.svd(w, full_matrices=False)
    counts, best = intruder_dimensions(u0, u_w, k=10, eps=0.5)
    # u_1 = W v_1 / σ_1(W) and u_newᵀ U0 = 0, so U0ᵀ u_1 = U0ᵀ W0 v_1 / σ_1(W): |cos| ≤ σ_1(W0) / σ_1(W)
    assert float(best[0]) <= float(s0[0] / s_w[0]) + 1e-12 < 0.5
    assert int(counts) >= 1
    # the same planted direction with a tiny singular value stays out of the top k
    assert intruder_count(w0, w0 + 1e-3 * u_new @ v_new.T, k=10, eps=0.5) == 0


def test_intruder_arguments_validated():
    with pytest.raises(ConfigError, match="k=0"):
        intruder_dimensions(torch.eye(3), torch.eye(3), k=0)
    with pytest.raises(ConfigError, match="eps=1.5"):
        intruder_dimensions(torch.eye(3), torch.eye(3), eps=1.5)


def test_principal_angles_closed_forms():
    x = orth(10, 3, 0)
    assert principal_angles(x, x).abs().max() < 1e-6
    rot = orth(3, 3, 1)  # another basis of the same subspace
    assert principal_angles(x, x @ rot * 2.0).abs().max() < 1e-6
    e = torch.eye(5, dtype=torch.float64)
    theta = 0.3
    a = principal_angles(e[:, :1], math.cos(theta) * e[:, :1] + math.sin(theta) * e[:, 1:2])
    assert float(a[0]) == pytest.approx(theta, abs=1e-9)
    assert float(principal_angles(e[:, :2], e[:, 2:4]).min()) == pytest.approx(math.pi / 2, abs=1e-9)


def test_subspace_similarity_phi():
    u = orth(16, 6, 0)
    grid = subspace_similarity(u, u)
    torch.testing.assert_close(grid.diagonal(), torch.ones(6, dtype=torch.float64))
    assert subspace_similarity(u, u @ orth(6, 6, 1), 6, 6) == pytest.approx(1.0, abs=1e-12)
    full = orth(16, 16, 2)
    assert subspace_similarity(full[:, :4], full[:, 4:8], 4, 4) == pytest.approx(0.0, abs=1e-12)
    u2 = orth(16, 5, 3)
    for i, j in [(1, 1), (3, 2), (6, 5)]:
        direct = float((u[:, :i].T @ u2[:, :j]).square().sum()) / min(i, j)
        assert subspace_similarity(u, u2, i, j) == pytest.approx(direct, rel=1e-12)


def test_adapter_similarity_of_nested_ranks_is_one():
    """LoRA's φ(A_r=2, A_r=4, i, j): a rank-4 update whose row space holds the rank-2 one's."""
    g = torch.Generator().manual_seed(0)
    a4 = torch.randn(4, 12, generator=g, dtype=torch.float64)
    d2 = torch.randn(10, 2, generator=g, dtype=torch.float64) @ a4[:2]
    d4 = torch.randn(10, 4, generator=g, dtype=torch.float64) @ a4
    grid = adapter_similarity(d2, d4)
    assert grid.shape == (2, 4)
    assert float(grid[1, 3]) == pytest.approx(1.0, abs=1e-10)


def test_amplification_and_alignment_closed_forms():
    n = 12
    s0 = torch.linspace(6, 1, n, dtype=torch.float64)
    u0, v0 = orth(n, n, 0), orth(n, n, 1)
    w0 = u0 @ torch.diag(s0) @ v0.T
    c, i = 0.7, 5
    dw = c * u0[:, i:i + 1] @ v0[:, i:i + 1].T  # ΔW along W0's i-th pair: Uᵀ W0 V = σ_i
    ud, _, vhd = torch.linalg.svd(dw)
    assert float(amplification_factor(w0, ud, vhd, c, 1)) == pytest.approx(c / float(s0[i]), rel=1e-10)
    vh0 = v0.T
    assert float(top_alignment(dw, u0, vh0, i + 1)) == pytest.approx(1.0, rel=1e-10)
    assert float(top_alignment(dw, u0, vh0, i)) == pytest.approx(0.0, abs=1e-10)


# ---- representation measures ----------------------------------------------------------------------
def cka_hsic(x, y):
    """Textbook CKA: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)) with an explicit centering matrix."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    return float(torch.trace(k @ h @ l_ @ h) / torch.sqrt(torch.trace(k @ h @ k @ h) * torch.trace(l_ @ h @ l_ @ h)))


@pytest.mark.parametrize("n,p", [(50, 8), (6, 30)])  # feature and Gram branches
def test_linear_cka_identity_invariances_and_textbook_form(n, p):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.randn(n, p + 3, generator=g, dtype=torch.float64) + 0.5 * torch.cat([x, x[:, :3]], 1)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ orth(p, p, 1) + 2.0) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, y) == pytest.approx(cka_hsic(x, y), rel=1e-10)
    assert linear_cka(x @ orth(p, p, 2), y @ orth(p + 3, p + 3, 3)) == pytest.approx(cka_hsic(x, y), rel=1e-10)


def test_rankme_and_kernel_alignment_closed_forms():
    z = with_spectrum(30, 10, [2.0] * 4, seed=1)
    assert rankme(z) == pytest.approx(4.0, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 3, generator=g, dtype=torch.float64)
    k = f @ f.T
    assert kernel_alignment(k, 5.0 * k) == pytest.approx(1.0, abs=1e-12)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2])
    y = torch.nn.functional.one_hot(labels).double()
    assert kernel_alignment(label_kernel(labels), y @ y.T) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ShapeMismatchError):
        linear_cka(torch.zeros(4, 2), torch.zeros(5, 2))


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def first4(output, batch):
    """The first 4 coordinates of the pooled embedding: a small output for an exact kernel."""
    from rankwise.analysis.representations import default_embedding

    return default_embedding(output, batch)[:, :4]


def brute_tangent_kernel(model, batch, names):
    """Σ_c Σ_layers ⟨∂f_ic/∂W, ∂f_jc/∂W⟩ with one autograd call per example and output."""
    ws = [model.get_submodule(n).weight for n in names]
    for w in ws:
        w.requires_grad_(True)
    out = first4(model(**batch, output_hidden_states=True), batch)
    n_ex, c = out.shape
    k = torch.zeros(n_ex, n_ex, dtype=torch.float64)
    for ch in range(c):
        grads = []
        for i in range(n_ex):
            gi = torch.autograd.grad(out[i, ch], ws, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(torch.zeros_like(w) if x is None else x).reshape(-1)
                                    for w, x in zip(ws, gi)]).double())
        gm = torch.stack(grads)
        k += gm @ gm.T
    return k


def dense_copy(make, model, seed: int = 0):
    """A plain model with weights ``W0 + s·B·A`` written by hand from the LoRA factors (HF Conv1D
    stores ``(in, out)``, so its update goes in transposed)."""
    plain = make(seed=seed)
    for name, layer in adapted_layers(model):
        ad = layer.adapters["default"]
        mod = plain.get_submodule(name)
        d = ad.scale * ad.lora_B.detach() @ ad.lora_A.detach()
        with torch.no_grad():
            mod.weight += d.T if type(mod).__name__ == "Conv1D" else d
    return plain


def exact(names) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def test_tangent_kernel_matches_per_example_autograd(bert, single_thread, perturb, adapter_params_of):
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = bert(seed=0)
    rw.adapt(model, "lora", rank=2, targets="all-linear")
    perturb(adapter_params_of(model), seed=1, std=0.3)
    names = [n for n, _ in adapted_layers(model)]
    k = tangent_kernel(model, batch, names, probes=4, embed_fn=first4)  # 4 outputs ≤ probes: exact trace kernel
    ref = brute_tangent_kernel(dense_copy(bert, model), batch, names)
    torch.testing.assert_close(k, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    # fewer probes than outputs: Gaussian probes give an unbiased estimate; their mean over seeds approaches it
    est = torch.stack([tangent_kernel(model, batch, names, probes=2, seed=s, embed_fn=first4) for s in range(40)])
    assert float((est.mean(0) - ref).norm() / ref.norm()) < 0.2


def test_weight_pairs_match_dense_lora_factors(gpt2, perturb, adapter_params_of, single_thread):
    """ΔW from the adapters' weight view in (out, in) layout, HF Conv1D included, equals s·B·A."""
    model, base = gpt2(seed=0), gpt2(seed=0)
    rw.adapt(model, "lora", rank=3, targets="all-linear")
    perturb(adapter_params_of(model), seed=2, std=0.2)
    pairs = weight_pairs(model)
    layers = dict(adapted_layers(model))
    assert len(pairs) == len(layers) > 0
    for name, (w0, dw) in pairs.items():
        mod = base.get_submodule(name)
        ad = layers[name].adapters["default"]
        torch.testing.assert_close(w0, mod.weight.T if type(mod).__name__ == "Conv1D" else mod.weight)
        torch.testing.assert_close(dw, ad.scale * ad.lora_B.detach() @ ad.lora_A.detach())
    two = weight_pairs(base, dense_copy(gpt2, model), layers=exact(pairs))  # two full checkpoints
    assert list(two) == list(pairs)
    for name in pairs:
        torch.testing.assert_close(two[name][1], pairs[name][1], rtol=1e-4, atol=1e-6)


def test_analyze_adapters_vs_two_models_and_restores_state(bert, token_batch, perturb, adapter_params_of,
                                                           single_thread):
    model = bert(seed=0)
    rw.adapt(model, "lora", rank=2, targets="all-linear")
    perturb(adapter_params_of(model), seed=3, std=0.3)
    with torch.no_grad():
        before = model(**token_batch).logits
    res = analyze(model, batches=[token_batch], name="lora", k=5)
    with torch.no_grad():
        after = model(**token_batch).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # adapters back on after the base pass
    assert rw.active_adapters(model) == ["default"]
    names = [r["layer"] for r in res.layers]
    two = analyze(bert(seed=0), dense_copy(bert, model), batches=[token_batch], layers=exact(names), k=5)
    assert names == [r["layer"] for r in two.layers]
    for a, b in zip(res.layers, two.layers):
        assert a["dW_rank"] == b["dW_rank"] == 2
        assert a["intruders"] == b["intruders"]
        assert a["rel_change"] == pytest.approx(b["rel_change"], rel=1e-4)
        assert a["cka"] == pytest.approx(b["cka"], abs=1e-5)
    assert res.representations["ntk_alignment"] == pytest.approx(two.representations["ntk_alignment"], abs=1e-5)
    assert res.summary["layers"] == len(res.layers) > 0


def test_zero_update_is_lazy_everywhere(bert, token_batch, single_thread):
    model = bert(seed=0)
    rw.adapt(model, "lora", rank=2, targets="all-linear")  # B = 0: ΔW = 0
    res = analyze(model, batches=[token_batch])
    assert res.summary["intruders (total)"] == 0
    assert res.summary["relative weight change"] == 0
    assert all(r["dW_rank"] == 0 for r in res.layers)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in res.representations["cka"].values())
    assert res.representations["ntk_alignment"] == pytest.approx(1.0, abs=1e-6)
    assert res.representations["rankme_base"] == pytest.approx(res.representations["rankme_adapted"], rel=1e-6)


def test_analyze_errors(bert, single_thread):
    with pytest.raises(ConfigError, match="no adapters"):
        analyze(bert(seed=0))
    model = bert(seed=0)
    rw.adapt(model, "lora", rank=2, targets="all-linear")
    with pytest.raises(ConfigError, match="eps"):
        analyze(model, eps=0)
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    with pytest.raises(ShapeMismatchError, match="same architecture"):
        analyze(bert(seed=0), other)


# ---- the CLI on saved tiny models ------------------------------------------------------------------------
WORDS = ["alpha", "beta", "gamma", "delta", "socket", "thread", "parse", "email", "json", "file"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT classifier + tokenizer, a LoRA adapter (rankwise and PEFT dirs), a full fine-tune, a CSV."""
    from conftest import adapter_params, perturb_
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("analyze")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    m = BertForSequenceClassification.from_pretrained(root / "base")
    rw.adapt(m, "lora", rank=4, targets="all-linear", modules_to_save=["classifier"])
    perturb_(adapter_params(m), seed=1, std=0.2)
    rw.save(m, root / "lora")
    rw.export_peft(m, root / "peft")
    ft = BertForSequenceClassification.from_pretrained(root / "base")
    perturb_([p for n, p in ft.named_parameters() if ".layer.1." in n and p.dim() == 2], seed=2, std=0.05)
    ft.save_pretrained(root / "ft")
    g = torch.Generator().manual_seed(0)
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(24):
            w.writerow([" ".join(WORDS[int(j)] for j in torch.randint(0, 5, (6,), generator=g) + 5 * (i % 2)), i % 2])
    return root


def test_cli_analyze_adapter_peft_and_finetuned(saved, tmp_path, single_thread, capsys):
    from rankwise.cli.main import main

    out = tmp_path / "report"
    assert main(["analyze", "--base", str(saved / "base"), "--adapter", str(saved / "lora"), "--adapter",
                 str(saved / "peft"), "--finetuned", str(saved / "ft"), "--data", str(saved / "data.csv"),
                 "--top-k", "5", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for png in ("spectra.png", "effective_rank.png", "intruders.png", "similarity.png", "subspace_similarity.png",
                "cka.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in md
    assert html.count("data:image/png;base64,") == 6
    # rankwise and PEFT dirs hold the same adapter: the same analysis; the full fine-tune changed layer 1 only
    assert "| lora " in md and "| peft " in md and "| ft " in md
    from rankwise.cli.analyze import load_adapted, load_finetuned_pair

    a = analyze(load_adapted(str(saved / "base"), saved / "lora")[0], k=5)
    b = analyze(load_adapted(str(saved / "base"), saved / "peft")[0], k=5)
    assert [r["intruders"] for r in a.layers] == [r["intruders"] for r in b.layers]
    assert all(r["dW_rank"] == 4 for r in a.layers)
    from rankwise.cli.analyze import make_batches

    batches, note = make_batches(str(saved / "base"), None, "text", "label", max_examples=20, max_length=16,
                                 batch_size=8, seed=0)  # `--data` without a file: stdlib docstrings
    assert [len(b["labels"]) for b in batches] == [8, 8, 4] and "standard library" in note
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    base, ft, fresh = load_finetuned_pair(str(saved / "base"), str(saved / "ft"))
    assert fresh == []
    c = analyze(base, ft, k=5)
    assert {r["layer"] for r in c.layers if r["rel_change"] > 0} == \
        {r["layer"] for r in c.layers if ".layer.1." in r["layer"]}


def test_demo_analysis_hook(bert, perturb, adapter_params_of, tmp_path, single_thread):
    """The demo's hook: adapters analysed on their own model, full fine-tuning against a fresh base;
    the base SVDs are computed once; the head is left out; the report is linked."""
    from rankwise.analysis.demo import DemoAnalysis

    built = []

    def make_base():
        built.append(1)
        return bert(seed=0)

    hook = DemoAnalysis(make_base, tmp_path / "analysis", head=["classifier"])
    lora = bert(seed=0)
    rw.adapt(lora, "lora", rank=2, targets="all-linear", modules_to_save=["classifier"])
    perturb(adapter_params_of(lora), seed=4, std=0.3)
    hook.add("lora", lora)
    hook.add("full", dense_copy(bert, lora))
    assert len(built) == 1
    a, f = hook.analyses["lora"], hook.analyses["full"]
    assert [r["layer"] for r in a.layers] == [r["layer"] for r in f.layers]  # classifier excluded
    assert [r["intruders"] for r in a.layers] == [r["intruders"] for r in f.layers]
    assert set(hook.cache) == {r["layer"] for r in a.layers}
    link = hook.write()
    assert "(analysis/report.html)" in link and (tmp_path / "analysis" / "report.html").is_file()


@pytest.mark.slow
def test_cli_analyze_on_minilm_folder(tmp_path, single_thread):
    """`rankwise analyze --base <the MiniLM folder> --adapter <dir>` on the real model: the sequence
    classifier class is chosen from the adapter's module names, all 37 linear layers are analysed."""
    from conftest import adapter_params, perturb_
    from transformers import AutoModelForSequenceClassification

    from rankwise.cli.analyze import load_adapted
    from rankwise.cli.main import main
    from rankwise.integrations.hf import minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    rw.adapt(model, "lora", rank=8, targets="all-linear", modules_to_save=["classifier"])
    perturb_(adapter_params(model), seed=0, std=0.02)
    rw.save(model, tmp_path / "adapter")
    out = tmp_path / "report"
    assert main(["analyze", "--base", str(minilm_path()), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out), "--no-progress"]) == 0
    md = (out / "report.md").read_text()
    loaded, cname = load_adapted(str(minilm_path()), tmp_path / "adapter")
    assert cname == "AutoModelForSequenceClassification"
    res = analyze(loaded)
    assert len(res.layers) == 37 and all(r["dW_rank"] == 8 for r in res.layers)
    assert re.search(r"\| layers +\| +37 +\|", md)  # the summary (a column per model): 37 layers


def test_cli_analyze_out_that_is_a_file_is_refused_first(saved, tmp_path, monkeypatch):
    """Reliability case AN6: the whole analysis ran, then FileExistsError."""
    import rankwise.cli.analyze as cli_analyze
    from rankwise.cli.main import run  # the CLI with errors raised (main() prints them and exits 2)

    out = tmp_path / "report.txt"
    out.write_text("mine")
    monkeypatch.setattr(cli_analyze, "make_batches", lambda *a, **k: pytest.fail("the check must come first"))
    with pytest.raises(rw.errors.ConfigError, match=r"--out .*report\.txt is an existing file, not a folder"):
        run(["analyze", "--base", str(saved / "base"), "--adapter", str(saved / "lora"), "--data",
             str(saved / "data.csv"), "--out", str(out), "--no-progress"])
    assert out.read_text() == "mine"
