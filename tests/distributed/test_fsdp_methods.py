"""Every registered method trains under FSDP2 like in one process (issue 18): 2 CPU processes, gloo.

Per method: an MLP ``16 → 32 → 8`` with both linear layers adapted (rank 2 where the method has a
rank; data-driven inits calibrated on the batch), every trainable tensor moved off its init (seeded),
then ``fully_shard`` — each adapted layer its own unit, or the root only when the adapter holds
tensors shared between layers (VeRA's bases: one module cannot belong to two units) — and 2 steps of
``rankwise.train.train`` (AdamW; it also runs the methods' rank hooks and loss terms) on a global batch
of 8, 4 per rank. Oracle: the same ``train`` call in one process on the whole batch, unsharded.
Tolerance: float32 sums in another order amplified by Adam over 2 steps, atol 1e-5 (as the other
distributed tests). Forward code sees the gathered (plain) parameters; what this guards is the code
that runs outside forward on ``DTensor`` shards: rank allocation, regularizers, caches. Before this
test, 7 methods failed here (AdaLoRA, IncreLoRA, PEGO, SaRA, SoRA and SORSA crashed on Tensor/DTensor
arithmetic in their hooks; Intrinsic SAID's 0-d λ could not be sharded). The hooks now see whole tensors
(``rw.rank_step`` / ``rw.rank_regularization``); a method whose rank grows (``resizes``: IncreLoRA) is
refused clearly.
"""

from __future__ import annotations

import copy
import functools
import textwrap

import pytest
import torch
from _gloo import EPILOGUE, PREAMBLE, run_two

import rankwise as rw

SETUP = textwrap.dedent("""
    import dataclasses
    import torch
    from torch import nn
    import rankwise as rw
    from rankwise.train import TrainConfig, train

    SHORT_RUN = {"aflora": {"delta_t": 1, "tinit": 0, "tfinal": 1}}  # its freezing phase inside 2 steps

    def batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)

    def build(method):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
        cls = rw.get_method(method)
        kw = {"rank": 2} if "rank" in {f.name for f in dataclasses.fields(cls.Config)} else {}
        kw.update(SHORT_RUN.get(method, {}))
        if cls.calibration_needs:
            x, y = batch()
            kw.update(calibration=[x], loss_fn=lambda model, b: (model(b) - y).square().mean())
        rw.adapt(m, method, targets=["0", "2"], seed=0, **kw)
        for layer in (m[0], m[2]):
            for ad in layer.adapters.values():
                ad.finish_warmup()
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            for p in rw.trainable_parameters(m):
                p.add_(torch.randn(p.shape, generator=g), alpha=0.05)
        return m

    def shares(m):
        ad = m[0].adapters["default"]
        own = {id(t) for t in [*ad.parameters(recurse=False), *ad.buffers(recurse=False)]}
        return any(id(t) not in own for t in [*ad.parameters(), *ad.buffers()])

    def fit(m, x, y):
        data = list(zip(x, y))
        def collate(items):
            return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
        cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup=0, max_grad_norm=None)
        train(m, data, collate, lambda model, b: (model(b[0]) - b[1]).square().mean(), cfg, progress=False)

    def trainable(m):
        return {n: p for n, p in m.named_parameters() if p.requires_grad}
""")

WORKER = SETUP + PREAMBLE + textwrap.dedent("""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    errors = {}
    for method in rw.methods():
        try:
            m = build(method)
            if not shares(m):
                for layer in (m[0], m[2]):
                    fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
            fit(m, x, y)  # train() hands each rank its half of the global batch
            results.update({f"{method}/{n}": p.full_tensor().detach() for n, p in trainable(m).items()})
            rw.save(m, f"{out}/saved_{method}")  # every rank: the shards gathered, rank 0 writes
            m.eval()
            with torch.no_grad():
                results[f"out.unmerged/{method}"] = m(x)
        except Exception as e:  # reported per method by the test
            errors[method] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        try:
            rw.merge(m)  # every rank: ΔW from the gathered factors, each rank adds its shard
            with torch.no_grad():
                results[f"out.merged/{method}"] = m(x)
        except Exception as e:
            errors[f"{method}:merge"] = type(e).__name__
    if rank == 0:
        import json
        print("ERRORS " + json.dumps(errors))
""") + EPILOGUE


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    import json

    tmp = tmp_path_factory.mktemp("fsdp_methods")
    results, out = run_two(WORKER, tmp)
    errors = json.loads(next(line for line in out.splitlines() if line.startswith("ERRORS "))[len("ERRORS "):])
    return results, errors, tmp


RESIZING = [m for m in rw.methods() if rw.get_method(m).resizes]  # IncreLoRA: its rank grows


def test_methods_that_resize_are_refused_clearly(distributed):
    _, errors, _ = distributed
    assert RESIZING and set(RESIZING) <= set(errors)
    for method in RESIZING:
        assert errors[method].startswith("ConfigError: adapter 'default': method") and "FSDP2" in errors[method]


@functools.cache
def _one_process(method: str):
    """The oracle: ``(x, trainable tensors before, the model trained)`` in one process on the whole batch."""
    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    x, y = env["batch"]()
    m = env["build"](method)
    before = {n: p.detach().clone() for n, p in env["trainable"](m).items()}
    env["fit"](m, x, y)
    return x, before, m


def _trained(m) -> dict:
    return {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", [m for m in rw.methods() if m not in RESIZING])
def test_method_trains_under_fsdp_like_one_process(distributed, method):
    results, errors, _ = distributed
    assert method not in errors, errors.get(method)
    _, before, m = _one_process(method)
    want = _trained(m)
    got = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(method + "/")}
    assert set(got) == set(want) and got
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-5,
                                   msg=lambda msg, name=name: f"{method}: {name}: {msg}")
    assert any(not torch.equal(before[n], p) for n, p in want.items())  # it trained


@pytest.mark.parametrize("method", [m for m in rw.methods() if m not in RESIZING])
def test_saved_adapter_and_merged_model_under_fsdp_match_one_process(distributed, method):
    """After the 2 steps: ``rw.save`` on every rank writes the complete adapter (loaded onto a fresh base it
    holds the one-process tensors), and the model's output unmerged and after ``rw.merge`` on the shards
    equals one process's (atol 1e-5); a method that cannot merge fails the same way in both."""
    results, errors, tmp = distributed
    assert method not in errors, errors.get(method)
    x, _, trained = _one_process(method)
    m = copy.deepcopy(trained)  # merged below: the cached oracle stays as trained
    want = _trained(m)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    saved = tmp / f"saved_{method}"
    loaded = {n: p for n, p in rw.load(base, saved).named_parameters() if n in want}
    assert set(loaded) == set(want)
    for name, p in want.items():
        torch.testing.assert_close(loaded[name].detach(), p, rtol=1e-5, atol=1e-5)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(results[f"out.unmerged/{method}"], m(x), rtol=1e-5, atol=1e-5)
    try:
        rw.merge(m)
    except Exception as e:  # noqa: BLE001 - the same refusal on the sharded model
        assert errors.get(f"{method}:merge") == type(e).__name__
        return
    assert f"{method}:merge" not in errors, errors[f"{method}:merge"]
    with torch.no_grad():
        torch.testing.assert_close(results[f"out.merged/{method}"], m(x), rtol=1e-5, atol=1e-5)
