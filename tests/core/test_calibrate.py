"""The calibration engine (core/calibrate.py) against dense re-derivations: every statistic is
recomputed from layer inputs captured by plain forward hooks, and every gradient by plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.core import calibrate as C
from rankwise.core.layers import LayerView
from rankwise.errors import CalibrationError, ConfigError, TargetError

pytestmark = pytest.mark.usefixtures("single_thread")


def _bert_batches(n=3, seed=0):
    """Token batches with padding (attention_mask zeros at the end of some rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 100, (2, 6 + i), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _views(model, names):
    return {n: LayerView(model.get_submodule(n), n) for n in names}


def _dense_inputs(model, names, batches, masked=True):
    """All input rows of ``names`` over ``batches``, captured with plain hooks (the oracle)."""
    rows = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(mod, args, out, n=n):
            rows[n].append(args[0].detach())
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            start = {n: len(rows[n]) for n in names}
            if isinstance(b, dict):
                model(**b)
            else:
                model(b)
            for n in names:
                for j in range(start[n], len(rows[n])):
                    x = rows[n][j]
                    if masked and isinstance(b, dict) and x.shape[:2] == b["attention_mask"].shape:
                        x = x[b["attention_mask"].bool()]
                    rows[n][j] = x.reshape(-1, x.shape[-1])
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in rows.items()}


Q, K, V = (f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))
FC = "bert.encoder.layer.1.intermediate.dense"
OUT = "bert.encoder.layer.1.output.dense"


def test_input_cov_matches_dense_and_skips_padding(bert):
    model = bert()
    batches = _bert_batches()
    names = [Q, FC, OUT]
    calib = C.collect(model, _views(model, names), ("input_cov",), C.Batches(batches, progress=False))
    dense = _dense_inputs(model, names, batches)
    for n in names:
        x = dense[n]
        st = calib[n]
        assert st.rows == x.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
        torch.testing.assert_close(st.cov.double(), x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st.mean.double(), x.mean(0), atol=1e-6, rtol=1e-5)
    # without the mask every row counts
    calib2 = C.collect(model, _views(model, [Q]), ("input_cov",), C.Batches(batches, progress=False,
                                                                             token_mask=False))
    assert calib2[Q].rows == sum(b["input_ids"].numel() for b in batches)


def test_input_cov_hf_conv1d_tensor_batches(gpt2):
    model = gpt2()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 100, (2, 5), generator=g) for _ in range(2)]
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    calib = C.collect(model, _views(model, names), ("input_cov",), C.Batches(batches, progress=False))
    dense = _dense_inputs(model, names, batches)
    for n in names:
        x = dense[n]
        assert calib[n].view.kind == "hf_conv1d" and calib[n].rows == 20
        torch.testing.assert_close(calib[n].cov.double(), x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4)


def test_input_svd_exact_and_shared_between_equal_inputs(bert, monkeypatch):
    model = bert()
    batches = _bert_batches()
    calls = []
    real = C.IncrementalSVD.update

    def counting(self, x):
        calls.append(x.shape)
        return real(self, x)

    monkeypatch.setattr(C.IncrementalSVD, "update", counting)
    names = [Q, K, V, FC]
    opts = {"svd_rank": 3, "svd_oversample": 64}  # ≥ 32 features kept: exact
    calib = C.collect(model, _views(model, names), ("input_svd",), C.Batches(batches, progress=False), options=opts)
    # q, k, v see the very same tensor: one shared statistic, updated once per batch
    assert calib[Q].svd is calib[K].svd is calib[V].svd
    assert calib[FC].svd is not calib[Q].svd
    assert len(calls) == 2 * len(batches)
    dense = _dense_inputs(model, [Q, FC], batches)
    for n in (Q, FC):
        xc = dense[n] - dense[n].mean(0)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        svd = calib[n].svd
        torch.testing.assert_close(svd.singular_values.double(), s[:3], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(svd.components.double().abs(), vh[:3].abs(), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(svd.explained_variance_ratio.double(), s[:3] ** 2 / (xc**2).sum(),
                                   atol=1e-5, rtol=1e-4)


def _dense_grads(model, names, batches, loss_fn):
    """Mean over batches of d loss / d W (canonical layout), by plain autograd on a copy."""
    ref = copy.deepcopy(model)
    acc = {n: torch.zeros_like(ref.get_submodule(n).weight, dtype=torch.float64) for n in names}
    for b in batches:
        ref.zero_grad()
        loss_fn(ref, b).backward()
        for n in names:
            acc[n] += ref.get_submodule(n).weight.grad.double()
    return {n: a / len(batches) for n, a in acc.items()}


def _loss(model, batch):
    return model(**batch).logits.square().mean()


@pytest.mark.parametrize("grad_bytes", [None, 1])
def test_grad_matches_autograd_and_restores_the_model(bert, grad_bytes):
    model = bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)  # flags must come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = _bert_batches()
    names = [Q, FC, OUT]
    src = C.Batches(iter(batches), loss_fn=_loss, progress=False, grad_bytes=grad_bytes)  # a one-shot iterator
    calib = C.collect(model, _views(model, names), ("grad",), src)
    expected = _dense_grads(model, names, batches, _loss)
    held = []
    for n in names:
        g = calib[n].grad
        held.append(len(calib._grads))
        torch.testing.assert_close(g.double(), expected[n], atol=1e-6, rtol=1e-4)
        calib.release(n)
    # grad_bytes=1: one layer per pass, so never more than one layer's gradient is held
    assert max(held) == (1 if grad_bytes == 1 else len(names))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(CalibrationError, match="already released"):
        _ = calib[Q].grad


def test_grad_of_hf_conv1d_is_canonical(gpt2):
    model = gpt2()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 100, (2, 5), generator=g)} for _ in range(2)]
    name = "transformer.h.0.mlp.c_fc"
    calib = C.collect(model, _views(model, [name]), ("grad",), C.Batches(batches, loss_fn=_loss, progress=False))
    expected = _dense_grads(model, [name], batches, _loss)[name]
    assert calib[name].grad.shape == (128, 32)  # (out, in); the Conv1D weight is (in, out)
    torch.testing.assert_close(calib[name].grad.double(), expected.T, atol=1e-6, rtol=1e-4)


def test_precomputed_calibration_is_reusable(bert):
    model = bert()
    batches = _bert_batches()
    calib = C.collect(model, _views(model, [Q, FC]), ("input_svd",), C.Batches(batches, progress=False),
                      options=rw.get_method("eva").calibration_options(rw.get_method("eva").Config(rank=2)))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rw.adapt(a, "eva", rank=2, targets=[Q, FC], calibration=calib)
    rw.adapt(b, "eva", rank=2, targets=[Q, FC], calibration=C.Batches(batches, progress=False))
    for n in (Q, FC):
        assert torch.equal(a.get_submodule(n).adapters["default"].lora_A, b.get_submodule(n).adapters["default"].lora_A)
    with pytest.raises(CalibrationError, match="lacks modules"):
        rw.adapt(copy.deepcopy(model), "eva", rank=2, targets=[Q, OUT], calibration=calib)


def test_module_overrides_and_plan_hooks(bert):
    model = bert()
    rw.adapt(model, "pissa", rank=2, targets=[Q, K, FC], module_overrides={K: None, FC: {"rank": 3}})
    assert not hasattr(model.get_submodule(K), "adapters")
    assert model.get_submodule(FC).adapters["default"].rank == 3
    assert rw.parameter_count(model).trainable == 2 * (32 + 32) + 3 * (32 + 64)
    with pytest.raises(TargetError, match="does not target"):
        rw.adapt(bert(), "pissa", rank=2, targets=[Q], module_overrides={FC: {"rank": 3}})
    with pytest.raises(ConfigError, match="not options"):
        rw.adapt(bert(), "pissa", rank=2, targets=[Q], module_overrides={Q: {"bogus": 3}})


# ---- errors ------------------------------------------------------------------------------------------
def test_missing_calibration_names_the_method(bert):
    model = bert()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for method in ("eva", "corda"):
        with pytest.raises(CalibrationError, match=f"method '{method}'.*calibration=batches"):
            rw.adapt(model, method, rank=2, targets=[Q])
    assert not rw.core.api.adapter_state(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_calibration_errors(bert):
    model = bert()
    views = _views(model, [Q])
    with pytest.raises(CalibrationError, match="loss_fn"):
        C.collect(model, views, ("grad",), C.Batches(_bert_batches(), progress=False))
    with pytest.raises(CalibrationError, match="empty"):
        rw.adapt(bert(), "eva", rank=2, targets=[Q], calibration=[])
    with pytest.raises(CalibrationError, match="single Tensor"):
        rw.adapt(bert(), "eva", rank=2, targets=[Q], calibration=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(CalibrationError, match="not iterable"):
        rw.adapt(bert(), "eva", rank=2, targets=[Q], calibration=3)
    # a target that never runs: the classifier head is not used by the base BERT model
    unused = {"cls_head": LayerView(torch.nn.Linear(32, 3), "cls_head")}
    with pytest.raises(CalibrationError, match="cls_head.*received no input"):
        C.collect(model, unused, ("input_cov",), C.Batches(_bert_batches(), progress=False))
    bad_loss = C.Batches(_bert_batches(), loss_fn=lambda m, b: m(**b).logits, progress=False)
    calib = C.collect(model, views, ("grad",), bad_loss)
    with pytest.raises(CalibrationError, match="scalar tensor"):
        _ = calib[Q].grad
    # a loss that reaches FC's weight but not Q's
    fc_only = C.Batches(_bert_batches(), progress=False,
                        loss_fn=lambda m, b: m.get_submodule(FC)(torch.ones(1, 32)).sum())
    calib = C.collect(model, _views(model, [Q, FC]), ("grad",), fc_only)
    with pytest.raises(CalibrationError, match=f"'{Q}' got no gradient"):
        _ = calib[Q].grad
