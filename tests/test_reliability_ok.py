"""Reliability cases the review found OK (``/work/shared/reviews/reliability.md``), re-run as tests.

Each test reproduces one row's input on a tiny model and asserts the row's expectation: a
``rankwise.errors`` exception that names the problem and the fix, with the model and the files
unchanged, or (where the row expects it to work) the result checked against an independent
re-computation. ``benchmarks/reliability.py`` collects them by the id in the docstring.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise as rw
from rankwise.core.api import adapter_state
from rankwise.errors import (
    AdapterExistsError,
    ConfigError,
    CorruptFileError,
    MethodNotFoundError,
    ShapeMismatchError,
)
from rankwise.io.files import sha256

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# ------------------------------------------------------------------------------------------ helpers
def _net(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def _trained(method: str = "lora", seed: int = 1, **kw) -> nn.Module:
    """A net with a non-zero adapter (lora_B is zero at init, which would hide wrong loads)."""
    model = rw.adapt(_net(**kw), method, rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _saved(tmp_path: Path, **kw) -> Path:
    d = tmp_path / "ad"
    rw.save(_trained(**kw), d)
    return d


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _assert_unchanged(model: nn.Module, before) -> None:
    tensors, modules, flags = _snapshot(model)
    assert modules == before[1], "module structure changed"
    assert flags == before[2], "requires_grad flags changed"
    assert tensors.keys() == before[0].keys()
    for k, v in before[0].items():
        assert torch.equal(v, tensors[k]), f"tensor {k} changed"
    assert not adapter_state(model), "an adapter was added"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(path: Path, error, match: str, load=rw.load):
    """Load ``path`` onto a fresh net: ``error`` matching ``match``, the net and the files unchanged."""
    model = _net()
    before, files = _snapshot(model), _files(path) if path.is_dir() else None
    with pytest.raises(error, match=match) as e:
        load(model, path)
    _assert_unchanged(model, before)
    if files is not None:
        assert _files(path) == files, "the files were changed"
    return str(e.value)


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    edit(cfg)
    (path / CONFIG).write_text(json.dumps(cfg))


def _rehash(path: Path) -> None:
    """Record the current weights' checksum, so that only the check under test can fail."""
    _edit_config(path, lambda c: c.update(weights_sha256=sha256(path / WEIGHTS)))


class _Payload:
    """A pickle that creates ``marker`` when unpickled: it must never be."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle(path: Path, marker: Path) -> None:
    torch.save({"w": _Payload(marker)}, path)


# ------------------------------------------------------------------------------ damaged adapter files
def test_flipped_header_length_without_checksum_is_corrupt(tmp_path):
    """Reliability case F4: a bit flipped in the safetensors header length, no checksum in the config."""
    d = _saved(tmp_path)
    _edit_config(d, lambda c: c.pop("weights_sha256"))
    data = bytearray((d / WEIGHTS).read_bytes())
    data[5] ^= 0x01  # the 8-byte little-endian header length becomes ~2**40
    (d / WEIGHTS).write_bytes(bytes(data))
    _refused(d, CorruptFileError, r"adapter_model\.safetensors cannot be read as safetensors.*Save the adapter again")


@pytest.mark.parametrize("checksum", [True, False])
def test_empty_weights_file_is_corrupt(tmp_path, checksum):
    """Reliability case F5: a 0-byte weights file, with and without the checksum in the config."""
    d = _saved(tmp_path)
    if not checksum:
        _edit_config(d, lambda c: c.pop("weights_sha256"))
    (d / WEIGHTS).write_bytes(b"")
    _refused(d, CorruptFileError, r"adapter_model\.safetensors")


def test_weights_file_with_no_tensors_names_the_missing_ones(tmp_path):
    """Reliability case F6: a valid safetensors file holding no tensors (checksum updated)."""
    d = _saved(tmp_path)
    save_file({}, str(d / WEIGHTS))
    _rehash(d)
    _refused(d, ShapeMismatchError, r"module '0'.*lora_A.*lora_B")


def test_empty_config_is_not_valid_json(tmp_path):
    """Reliability case F7: an empty ``adapter_config.json``."""
    d = _saved(tmp_path)
    (d / CONFIG).write_text("")
    _refused(d, CorruptFileError, r"adapter_config\.json.*not valid JSON")


@pytest.mark.parametrize("edit,error,match", [
    (lambda c: c["adapters"]["default"]["config"].update(rank="4"), ConfigError, r"rank='4'.*integer"),
    (lambda c: c["adapters"]["default"]["config"].update(rank=4.0), ConfigError, r"rank=4\.0.*integer"),
    (lambda c: c["adapters"]["default"]["config"].update(dropout=float("nan")), ConfigError, r"dropout=nan"),
    (lambda c: c["adapters"]["default"]["config"].update(targets=5), ConfigError, r"targets"),
    (lambda c: c["adapters"]["default"]["config"].update(rnak=4), ConfigError, r"'rnak'.*rank"),
])
def test_ill_typed_config_fields_are_named(tmp_path, edit, error, match):
    """Reliability case F8: wrong types the config class checks (rank '4' / 4.0, dropout NaN,
    targets 5, an unknown key) are refused naming the field."""
    d = _saved(tmp_path)
    _edit_config(d, edit)
    _refused(d, error, match)


def test_config_without_format_or_with_an_extra_key(tmp_path):
    """Reliability case F8: ``format`` removed is refused, naming it; an extra top-level key is ignored
    and the adapter loads exactly."""
    d = _saved(tmp_path)
    want = _trained()
    _edit_config(d, lambda c: c.update(my_note="hello"))
    loaded = rw.load(_net(), d)
    x = torch.randn(5, 16)
    assert torch.equal(loaded(x), want(x))
    _edit_config(d, lambda c: c.pop("format"))
    model = _net()
    with pytest.raises(CorruptFileError, match=r"has format None, expected 'rankwise-adapter/1'.*rw\.save"):
        rw.load(model, d)
    assert not rw.core.api.adapter_state(model)


def test_unknown_method_in_the_file_lists_the_registered_ones(tmp_path):
    """Reliability case F11: an unknown method name (``evil_method``) in the config."""
    d = _saved(tmp_path)
    _edit_config(d, lambda c: c["adapters"]["default"].update(method="evil_method"))
    _refused(d, MethodNotFoundError, r"'evil_method'.*Registered: .*lora")


def test_reshaped_tensor_names_both_shapes(tmp_path):
    """Reliability case F13: one tensor reshaped in the file (checksum updated)."""
    d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS))
    tensors["default/0/lora_A"] = torch.randn(8, 16)
    save_file(tensors, str(d / WEIGHTS))
    _rehash(d)
    _refused(d, ShapeMismatchError, r"'lora_A' has shape \(8, 16\) in the file but \(4, 16\) in the model")


def test_float64_tensors_are_cast_to_the_model_dtype(tmp_path):
    """Reliability case F14: tensors stored as float64 load, cast to the model's float32."""
    d = _saved(tmp_path)
    tensors = {k: v.double() for k, v in load_file(str(d / WEIGHTS)).items()}
    save_file(tensors, str(d / WEIGHTS))
    _rehash(d)
    loaded = rw.load(_net(), d)
    for key, t in tensors.items():
        _, module, name = key.split("/")
        got = getattr(loaded[int(module)].adapters["default"], name)
        assert got.dtype == torch.float32
        assert torch.equal(got, t.float())


def test_nan_values_in_a_well_formed_file_load(tmp_path):
    """Reliability case F15: NaN values in a well-formed file load (no value check, as in PEFT)."""
    d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS))
    tensors["default/0/lora_B"][0, 0] = float("nan")
    save_file(tensors, str(d / WEIGHTS))
    _rehash(d)
    loaded = rw.load(_net(), d)
    assert torch.isnan(loaded[0].adapters["default"].lora_B[0, 0])
    assert torch.isnan(loaded(torch.randn(3, 16))).any()


# ------------------------------------------------------------------------------------- pickles
def test_only_a_pickled_bin_is_refused_unread(tmp_path):
    """Reliability case P1: a rankwise adapter folder holding only ``adapter_model.bin`` (a pickle
    that creates a file when unpickled): refused, never unpickled."""
    d = _saved(tmp_path)
    (d / WEIGHTS).unlink()
    marker = tmp_path / "MARKER"
    _pickle(d / "adapter_model.bin", marker)
    _refused(d, CorruptFileError, r"adapter_model\.safetensors does not exist")
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_refused_unread(tmp_path):
    """Reliability case P2: a ``torch.save`` payload renamed to ``adapter_model.safetensors`` (checksum updated)."""
    d = _saved(tmp_path)
    marker = tmp_path / "MARKER"
    _pickle(d / WEIGHTS, marker)
    _rehash(d)
    _refused(d, CorruptFileError, r"cannot be read as safetensors")
    assert not marker.exists()


def test_a_pt_file_given_as_the_adapter_is_refused_unread(tmp_path):
    """Reliability case P3: ``rw.load(model, 'evil.pt')`` where the path is a pickle file."""
    marker = tmp_path / "MARKER"
    _pickle(tmp_path / "evil.pt", marker)
    _refused(tmp_path / "evil.pt", CorruptFileError, r"evil\.pt.*directory written by rw\.save")
    assert not marker.exists()


def test_a_pickle_written_as_the_config_is_refused_unread(tmp_path):
    """Reliability case P4: a pickle written as ``adapter_config.json``."""
    d = _saved(tmp_path)
    marker = tmp_path / "MARKER"
    _pickle(d / CONFIG, marker)
    _refused(d, CorruptFileError, r"adapter_config\.json.*not valid JSON")
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors"])
def test_pickled_checkpoint_files_are_refused_unread(tmp_path, victim):
    """Reliability case P5: a checkpoint folder whose ``model.safetensors`` / ``optimizer.safetensors``
    are pickles: ``load_checkpoint`` refuses, nothing is unpickled, the model is unchanged."""
    from rankwise.train import load_checkpoint, save_checkpoint

    model = _trained()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, opt, step=1)
    marker = tmp_path / "MARKER"
    _pickle(tmp_path / "ck" / victim, marker)
    fresh = _trained(seed=2)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    before = _snapshot(fresh)
    with pytest.raises(CorruptFileError, match=victim.replace(".", r"\.") + r".*cannot be read as safetensors"):
        load_checkpoint(tmp_path / "ck", fresh, opt2)
    assert not marker.exists()
    tensors = fresh.state_dict()
    assert all(torch.equal(v, tensors[k]) for k, v in before[0].items())
    assert not opt2.state


@pytest.mark.parametrize("how", ["payload", "peft"])
def test_peft_folder_with_a_pickled_bin_is_refused_unread(tmp_path, how):
    """Reliability case P6: a PEFT folder with only ``adapter_model.bin`` (a payload), and a real PEFT
    ``safe_serialization=False`` folder: refused naming safetensors, never unpickled."""
    marker = tmp_path / "MARKER"
    d = tmp_path / "peft"
    if how == "payload":
        rw.export_peft(_trained(), d)
        (d / WEIGHTS).unlink()
        _pickle(d / "adapter_model.bin", marker)
    else:
        import peft

        pm = peft.get_peft_model(_net(), peft.LoraConfig(r=4, target_modules=["0", "2"]))
        pm.save_pretrained(d, safe_serialization=False)
        assert (d / "adapter_model.bin").exists() and not (d / WEIGHTS).exists()
    _refused(d, CorruptFileError, r"does not exist; rankwise reads safetensors only, never pickled \.bin",
             load=rw.import_peft)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ symlinks
def test_load_through_a_symlink_to_the_adapter(tmp_path):
    """Reliability case S1: loading through a symlink to an adapter folder works."""
    d = _saved(tmp_path)
    (tmp_path / "link").symlink_to(d, target_is_directory=True)
    x = torch.randn(5, 16)
    assert torch.equal(rw.load(_net(), tmp_path / "link")(x), _trained()(x))


def test_weights_symlinked_to_another_file_fail_the_checksum(tmp_path):
    """Reliability case S3: ``adapter_model.safetensors`` is a symlink to ``/etc/passwd``."""
    d = _saved(tmp_path)
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).symlink_to("/etc/passwd")
    _refused(d, CorruptFileError, r"SHA-256.*Restore the file or save it again")


# ------------------------------------------------------------------------------------- permissions
@contextlib.contextmanager
def _as_nobody():
    """Run the block as an unprivileged user: root (as the tests may run) ignores file modes, so
    drop the effective uid to ``nobody`` for the block and restore it after."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def shared_dir():
    """A folder every user may write into (tmp_path's parents are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="rw-perm-"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o700)
        import shutil

        shutil.rmtree(d)


def test_save_into_a_read_only_parent_is_a_permission_error(shared_dir):
    """Reliability case W1: as an unprivileged user, save into a read-only parent: PermissionError,
    nothing written."""
    ro = shared_dir / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    model = _trained()
    with _as_nobody(), pytest.raises(PermissionError):
        rw.save(model, ro / "ad")
    assert list(ro.iterdir()) == []


def test_overwrite_under_a_read_only_parent_keeps_the_old_adapter(shared_dir):
    """Reliability case W2: as an unprivileged user, overwrite an adapter whose parent is read-only:
    an error, the old adapter intact and loadable."""
    ro = shared_dir / "ro"
    ro.mkdir()
    os.chmod(ro, 0o777)
    with _as_nobody():
        rw.save(_trained(seed=1), ro / "ad")
    os.chmod(ro, 0o555)
    files = _files(ro)
    with _as_nobody(), pytest.raises(PermissionError):
        rw.save(_trained(seed=2), ro / "ad")
    assert _files(ro) == files and sorted(os.listdir(ro)) == ["ad"]
    x = torch.randn(5, 16)
    assert torch.equal(rw.load(_net(), ro / "ad")(x), _trained(seed=1)(x))


def test_unreadable_weights_are_a_permission_error(shared_dir):
    """Reliability case W4: as an unprivileged user, load an adapter whose weights file is mode 000."""
    d = shared_dir / "ad"
    rw.save(_trained(), d)
    os.chmod(d / WEIGHTS, 0)
    model = _net()
    before = _snapshot(model)
    with _as_nobody(), pytest.raises(PermissionError, match=r"adapter_model\.safetensors"):
        rw.load(model, d)
    _assert_unchanged(model, before)


# ------------------------------------------------------------------------------------- PEFT import
def _peft_saved(tmp_path: Path, seed: int = 5, **kw) -> tuple[Path, nn.Module]:
    """A PEFT 0.21 LoRA on ``_net()`` (layers '0' and '2'), randomized, saved; returns (folder, PeftModel)."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = dict(r=4, lora_alpha=8, target_modules=["0", "2"]) | kw
        pm = peft.get_peft_model(_net(), peft.LoraConfig(**options)).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if "magnitude" in n else 0.0))
        pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", pm


def _peft_tensors(d: Path) -> dict:
    return load_file(str(d / WEIGHTS))


def test_peft_rank_and_alpha_patterns_are_refused_or_give_peft_outputs(tmp_path):
    """Reliability case E2: a PEFT adapter with ``rank_pattern`` / ``alpha_pattern`` (one rank and
    alpha per module since LoRA reads the patterns): imported, with the same outputs as PEFT (the oracle)."""
    for pattern in ({"rank_pattern": {"0": 2}}, {"alpha_pattern": {"2": 32}}):
        d, pm = _peft_saved(tmp_path / next(iter(pattern)), **pattern)
        model = rw.import_peft(_net(), d)
        x = torch.randn(6, 16)
        torch.testing.assert_close(model(x), pm(x), atol=1e-6, rtol=0)


def test_peft_config_rank_above_the_tensors_names_both_shapes(tmp_path):
    """Reliability case E4: the PEFT config says ``r: 8`` but the tensors have rank 4."""
    d, _ = _peft_saved(tmp_path, target_modules=["0"])
    _edit_config(d, lambda c: c.update(r=8))
    _refused(d, ShapeMismatchError, r"lora_A\.weight has shape \(4, 16\), rankwise expects \(8, 16\)",
             load=rw.import_peft)


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(modules_to_save=["2"], target_modules=["0"]),
                                     dict(use_rslora=True)])
def test_peft_dora_saved_head_and_rslora_give_peft_outputs(tmp_path, variant):
    """Reliability case E8: DoRA, ``modules_to_save`` and rsLoRA folders written by PEFT 0.21
    import and give PeftModel's outputs (the oracle)."""
    d, pm = _peft_saved(tmp_path, **variant)
    model = rw.import_peft(_net(), d).eval()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=1e-6, rtol=0)
        assert (model(x) - _net()(x)).abs().max() > 1e-3  # the adapter does act


@pytest.mark.parametrize("damage", ["extra key", "one module at rank 2", "truncated"])
def test_peft_file_damage_is_named(tmp_path, damage):
    """Reliability case E11: an extra unknown key, one module at rank 2 while the config says 4, and a
    truncated weights file: refused naming the key / module and shapes (or the file)."""
    d, _ = _peft_saved(tmp_path)
    tensors = _peft_tensors(d)
    if damage == "truncated":
        data = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(data[: len(data) // 2])
        _refused(d, CorruptFileError, r"adapter_model\.safetensors", load=rw.import_peft)
        return
    if damage == "extra key":
        tensors["base_model.model.0.lora_C.weight"] = torch.zeros(2, 2)
        match = r"lora_C"
    else:
        key = next(k for k in tensors if k.endswith("0.lora_A.weight"))
        tensors[key] = tensors[key][:2]
        match = r"'0'.*\(2, 16\).*\(4, 16\)"
    save_file(tensors, str(d / WEIGHTS))
    _refused(d, ShapeMismatchError, match, load=rw.import_peft)


def test_peft_import_twice_under_one_name_is_refused(tmp_path):
    """Reliability case E12: importing the same folder twice under the same name."""
    d, _ = _peft_saved(tmp_path)
    model = rw.import_peft(_net(), d)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterExistsError, match=r"'default'"):
        rw.import_peft(model, d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert list(adapter_state(model)) == ["default"]


# --------------------------------------------------------------------------------------------- API
def test_fp16_merge_unmerge_cycles_drift_only_by_rounding():
    """Reliability case A13: 100 merge/unmerge cycles on fp16 weights drift by fp16 rounding only
    (a few ulp of the largest weight); in fp32 the same cycles drift by ~1e-7."""
    for dtype, tol in ((torch.float16, 4e-3), (torch.float32, 1e-6)):
        model = _trained().to(dtype)
        w0 = model[0].base.weight.detach().clone()
        for _ in range(100):
            rw.merge(model)
            rw.unmerge(model)
        drift = (model[0].base.weight.float() - w0.float()).abs().max().item()
        assert drift <= tol * max(1.0, w0.abs().max().item()), (dtype, drift)


def test_torch_compile_runs_and_sees_later_switches():
    """Reliability case A14: ``torch.compile`` (aot_eager backend) of an adapted lora model gives the
    eager outputs and gradients; a later ``set_active(None)`` / ``merge`` is seen by the compiled model."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    model = _trained().eval()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=0)
    eager_grads = torch.autograd.grad(model(x).sum(), [model[0].adapters["default"].lora_A])
    comp_grads = torch.autograd.grad(compiled(x).sum(), [model[0].adapters["default"].lora_A])
    torch.testing.assert_close(comp_grads, eager_grads, atol=1e-6, rtol=0)
    rw.set_active(model, None)
    torch.testing.assert_close(compiled(x), _net()(x), atol=1e-6, rtol=0)
    rw.set_active(model, "default")
    rw.merge(model)
    torch.testing.assert_close(compiled(x), _trained()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(llama, method, reentrant):
    """Reliability case A15: gradient checkpointing (reentrant and not) in a tiny Llama with an
    adapter gives the loss and gradients of the run without it, and every adapter parameter a grad."""
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(checkpointing):
        model = rw.adapt(llama(0), method, rank=2, targets=["q_proj", "v_proj"], seed=0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss0, g0 = run(False)
    loss1, g1 = run(True)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    assert g1.keys() == g0.keys() and all(g is not None for g in g1.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)


def test_deepcopy_of_shared_tensors_is_independent(tmp_path):
    """Reliability case A16: ``copy.deepcopy`` of a model with vera (shared tensors) + lora is an
    independent copy: its shared tensors are its own, save/load of it is exact, deleting on it leaves
    the original."""
    model = rw.adapt(_net(), "vera", rank=4, targets=["0", "2"], name="v", seed=0)
    rw.adapt(model, "lora", rank=2, targets=["0"], name="l", seed=0)
    rw.set_active(model, ["v", "l"])
    x = torch.randn(3, 16)
    out = model(x).detach()
    twin = copy.deepcopy(model)
    tensors = lambda m: [*m.parameters(), *m.buffers()]  # noqa: E731  (non-persistent bases too)
    assert not {t.data_ptr() for t in tensors(model)} & {t.data_ptr() for t in tensors(twin)}
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert torch.equal(model(x), out)
    assert not torch.equal(twin(x), out)
    rw.save(twin, tmp_path / "twin")
    loaded = rw.load(_net(), tmp_path / "twin")
    rw.set_active(loaded, ["v", "l"])
    assert torch.equal(loaded(x), twin(x))
    rw.delete(twin, "v")
    assert "v" in adapter_state(model) and torch.equal(model(x), out)


def test_state_dict_round_trip_between_adapted_models():
    """Reliability case A17: ``state_dict()`` into an identically adapted model is exact; into a plain
    or a rank-2 model torch refuses (``Error(s) in loading state_dict``)."""
    src = _trained()
    dst = rw.adapt(_net(seed=9), "lora", rank=4, seed=3)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(dst(x), src(x))
    for other in (_net(), rw.adapt(_net(), "lora", rank=2, seed=0)):
        with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
            other.load_state_dict(src.state_dict())


def test_torch_save_of_a_whole_merged_model_round_trips(tmp_path):
    """Reliability case A19: ``torch.save(model)`` of a whole module (merged vera) and
    ``torch.load(weights_only=False)`` keep outputs and merge state; unmerge and rw.save still work."""
    model = rw.adapt(_net(), "vera", rank=4, targets=["0", "2"], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    rw.merge(model)
    x = torch.randn(3, 16)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():  # a merged model is for inference (training through it is refused)
        assert torch.equal(back(x), model(x))
        assert list(back[0].merged) == list(model[0].merged) == ["default"]
        rw.unmerge(back)
        rw.unmerge(model)
        assert torch.equal(back(x), model(x))
        rw.save(back, tmp_path / "ad")
        torch.testing.assert_close(rw.load(_net(), tmp_path / "ad")(x), model(x), atol=1e-6, rtol=0)


def test_repeated_merge_and_unmerge_are_no_ops():
    """Reliability case A20: merge twice, unmerge without a merge, unmerge twice: outputs unchanged."""
    model = _trained().eval()
    x = torch.randn(5, 16)
    want = model(x).detach()
    for step in (rw.unmerge, rw.merge, rw.merge, rw.unmerge, rw.unmerge):
        step(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    w0 = _net()[0].weight
    torch.testing.assert_close(model[0].base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["my adapter", "snow \u2603 \U0001f600", "line\nbreak", "modules_to_save",
                                  "(shared)", "x" * 300])
def test_unusual_adapter_names_round_trip(tmp_path, name):
    """Reliability case A24: adapter names with spaces, emoji, a newline, ``modules_to_save``,
    ``(shared)`` or 300 characters save and load exactly."""
    model = rw.adapt(_net(), "lora", rank=4, name=name, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    rw.save(model, tmp_path / "ad")
    loaded = rw.load(_net(), tmp_path / "ad")
    assert list(adapter_state(loaded)) == [name]
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), model(x))


# -------------------------------------------------------------------------------------------- data
def test_a_label_with_one_example_keeps_it_for_training(tmp_path):
    """Reliability case D5: a label with a single example is read; that example goes to the training
    split and the validation split lacks the label (training still works)."""
    from rankwise.data import read_table

    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},common\n" for i in range(6)) + "alone,rare\n")
    ds = read_table(path)
    assert ds.label_names == ["common", "rare"]
    train, valid = ds.split(valid_frac=0.4)
    rare = ds.label_names.index("rare")
    assert train.labels.count(rare) == 1 and rare not in valid.labels
    assert "alone" in train.texts and len(train) + len(valid) == len(ds)


def test_labels_ints_as_ids_the_rest_as_names(tmp_path):
    """Reliability case D7: integer labels are class ids; a float-looking ``0.0``, JSON bool / float /
    object / NaN labels are names; a BOM and extra columns are harmless."""
    from rankwise.data import read_table

    ints = tmp_path / "ints.csv"
    ints.write_text("text,label\na,2\nb,0\nc,1\n")
    assert read_table(ints).labels == [2, 0, 1] and read_table(ints).label_names == ["0", "1", "2"]
    bom = tmp_path / "bom.csv"
    bom.write_text("text,label,extra\nx,0.0,q\ny,1,r\n", encoding="utf-8-sig")
    ds = read_table(bom)
    assert ds.texts == ["x", "y"] and ds.label_names == ["0.0", "1"] and ds.labels == [0, 1]
    jl = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": True}, {"text": "b", "label": 1.5}, {"text": "c", "label": {"k": 1}},
            {"text": "d", "label": float("nan")}]
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = read_table(jl)
    names = [ds.label_names[i] for i in ds.labels]
    assert names == ["true", "1.5", '{"k": 1}', "NaN"]


# -------------------------------------------------------------------------------------- optimizers
OPTIMIZERS = ["galore", "galore8bit", "qgalore", "fira", "flora", "apollo", "apollo-mini", "frugal",
              "gradnorm-lorp", "adafactor", "smmf"]


def _optimizer(name, model, rank=4):
    from rankwise.cli.pretrain import make_optimizer

    return make_optimizer(name, model, rank=rank, update_gap=2, targets=None)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_rank_above_the_matrix_size_runs(name):
    """Reliability case O1: ``rank=1000`` on 32×16 / 4×32 matrices is clamped: the runs stay finite
    and the loss goes down."""
    model = _net()
    opt = _optimizer(name, model, rank=1000)
    first = _loss(model, 0).item()
    for step in range(6):
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item()), (name, step)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _loss(model, 0).item() < first, name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_non_contiguous_parameter_matches_a_contiguous_copy(name):
    """Reliability case O4: a non-contiguous parameter (``randn(32, 16).t()``-style) gets the same
    updates as a contiguous copy of it."""
    def build(contiguous):
        model = _net()
        w = model[0].weight.detach().t().contiguous().t()  # a transposed view of a (16, 32) tensor
        model[0].weight = nn.Parameter(w.contiguous() if contiguous else w)
        assert model[0].weight.is_contiguous() == contiguous
        return model

    results = []
    for contiguous in (True, False):
        model = build(contiguous)
        torch.manual_seed(123)  # random projectors draw from the global generator
        opt = _optimizer(name, model)
        for step in range(4):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_zero_gradients_do_not_move_the_weights(name):
    """Reliability case O6: all-zero gradients for 3 steps leave every weight where it was.
    Two documented exceptions: QGaLore re-quantizes its int8 weights stochastically (by design; checked
    to stay within three int8 steps of max|W|/127), and GradNormLoRP recomposes W = m·V/‖V‖ from its
    weight-normalized parts at its first step (a rounding of 1-2 ulp, checked not to grow)."""
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _optimizer(name, model)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for a, p in zip(before, model.parameters()):
        if name == "qgalore":
            assert (a - p).abs().max() <= 3 * a.abs().max() / 127
        elif name == "gradnorm-lorp":
            torch.testing.assert_close(p.detach(), a, atol=2 * torch.finfo(a.dtype).eps * a.abs().max().item(), rtol=0)
        else:
            assert torch.equal(a, p), name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_sparse_gradient_is_refused_naming_the_fix(name):
    """Reliability case O5: an ``nn.Embedding(sparse=True)`` weight given to the optimizer is refused with
    a message naming sparse gradients (TypeError or ConfigError), before any weight moves."""
    model = nn.Sequential(nn.Embedding(50, 16, sparse=True), nn.Linear(16, 4))
    from rankwise.cli.pretrain import make_optimizer

    opt = make_optimizer(name, model, rank=4, update_gap=2, targets=None)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(torch.tensor([1, 2, 3])), torch.tensor([0, 1, 2])).backward()
    with pytest.raises((TypeError, ConfigError), match=r"sparse"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
