"""io/atomic.py: writing a folder never deletes the user's files, survives crashes and concurrent writers.

Reliability cases W5–W10, S2, S4 (output paths), C1–C4 (concurrency), K1, K2 (kill -9 while a
checkpoint is written). Every refusal must name the path and the fix, and leave the files as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.errors import OutputPathError
from rankwise.io import atomic
from rankwise.train import train as train_loop


def _model(seed=0):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = rw.adapt(base, "lora", rank=2, targets=["0"], seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(seed)
    return model


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (hidden entries included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(e for e in os.listdir(folder) if ".rw-" in e or e.endswith(".tmp") or ".old." in e)


# --------------------------------------------------------------------------- output paths (W5–W10, S2, S4)

def test_save_onto_a_regular_file_is_refused(tmp_path):
    """W5: the user's file was renamed to a hidden ``.<name>.old.<pid>`` and the path became a folder."""
    f = tmp_path / "notes"
    f.write_text("mine")
    with pytest.raises(OutputPathError, match=r"notes is an existing file, not a folder.*Pass a folder path"):
        rw.save(_model(), f)
    assert f.read_text() == "mine" and os.listdir(tmp_path) == ["notes"]


def test_save_under_a_regular_file_names_it(tmp_path):
    """W6: ``FileExistsError: [Errno 17] File exists`` named nothing useful."""
    (tmp_path / "f2").write_text("mine")
    with pytest.raises(OutputPathError, match=r"f2 is a file, so no folder can be made under it"):
        rw.save(_model(), tmp_path / "f2" / "sub")
    assert (tmp_path / "f2").read_text() == "mine"


@pytest.mark.parametrize("writer", ["save", "export_peft"])
def test_a_folder_with_the_users_files_is_refused_and_kept(tmp_path, writer):
    """W7 / W8: the whole folder was replaced; notes.txt and sub/data.csv were deleted, no copy left."""
    d = tmp_path / "ad"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = _tree(d)
    with pytest.raises(OutputPathError, match=r"holds files rankwise did not write \(notes.txt, sub\).*new or empty folder"):
        getattr(rw, writer)(_model(), d)
    assert _tree(d) == before and sorted(os.listdir(tmp_path)) == ["ad"]


def test_an_unknown_file_with_an_adapter_name_is_not_taken_for_an_adapter(tmp_path):
    """A folder holding only a file named like ours but not an adapter config is the user's."""
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text("my notes, not JSON")
    with pytest.raises(OutputPathError, match=r"is not a rw.save: adapter folder rankwise wrote"):
        rw.save(_model(), d)
    assert (d / "adapter_config.json").read_text() == "my notes, not JSON"


def test_an_earlier_adapter_is_replaced(tmp_path):
    d = tmp_path / "ad"
    rw.save(_model(seed=0), d)
    rw.export_peft(_model(seed=0), tmp_path / "peft")
    rw.save(_model(seed=1), d)  # rankwise over rankwise
    rw.save(_model(seed=1), tmp_path / "peft")  # rankwise over a PEFT adapter: an adapter folder too
    for folder in (d, tmp_path / "peft"):
        loaded = rw.load(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), folder)
        a = loaded[0].adapters["default"].lora_A
        assert torch.equal(a, _model(seed=1)[0].adapters["default"].lora_A)
    assert sorted(os.listdir(tmp_path)) == ["ad", "peft"]


@pytest.mark.parametrize("where", [".", "..", "cwd"])
def test_the_current_folder_or_above_is_refused(tmp_path, monkeypatch, where):
    """W10: ``OSError: [Errno 16] Device or resource busy: '.' -> '..old.12199'``."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = str(work) if where == "cwd" else where
    with pytest.raises(OutputPathError, match=r"is the current folder or one above it.*folder of its own"):
        rw.save(_model(), path)
    assert os.listdir(work) == [] and sorted(os.listdir(tmp_path / "a")) == ["b"]


def test_a_symlink_to_an_adapter_is_written_through(tmp_path):
    """S2: the symlink was replaced by a real folder and a stray ``.link.old.<pid>`` link was left."""
    real = tmp_path / "real"
    rw.save(_model(seed=0), real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    rw.save(_model(seed=1), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    loaded = rw.load(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), real)
    assert torch.equal(loaded[0].adapters["default"].lora_B, _model(seed=1)[0].adapters["default"].lora_B)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_a_dangling_symlink_names_its_target(tmp_path):
    """S4: the message named an internal temporary folder."""
    link = tmp_path / "ad"
    link.symlink_to(tmp_path / "gone" / "x")
    with pytest.raises(OutputPathError, match=r"ad is a symlink to .*gone/x, which does not exist"):
        rw.save(_model(), link)
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["ad"]


def test_finetune_out_with_the_users_files_is_refused_before_any_work(tmp_path):
    """W9: ``rankwise finetune --out D`` deleted D/adapter/README.txt and overwrote D/report.md."""
    from rankwise.cli.main import run  # the CLI with errors raised (main() prints them and exits 2)

    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "README.txt").write_text("my notes")
    before = _tree(out)
    args = ["finetune", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.csv"), "--out", str(out)]
    with pytest.raises(OutputPathError, match=r"adapter folder .*adapter holds files rankwise did not write \(README.txt\)"):
        run(args)
    assert _tree(out) == before

    (out / "adapter" / "README.txt").unlink()
    (out / "report.md").write_text("# my own report\n")  # a name rankwise writes, but not a rankwise report
    with pytest.raises(OutputPathError, match=r"--out .*run is not a rankwise finetune --out rankwise wrote"):
        run(args)
    assert (out / "report.md").read_text() == "# my own report\n"


def test_replacing_a_read_only_adapter_leaves_no_old_copy(tmp_path, monkeypatch):
    """W3: as a normal user, replacing a ``chmod 555`` adapter folder left ``.ad.old.<pid>`` behind
    (its removal failed silently). The tests may run as root, which ignores modes, so the kernel's
    rule for other users is applied here: no entry leaves a folder without write permission."""
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def writable(path, dir_fd):
        mode = os.fstat(dir_fd).st_mode if dir_fd is not None else os.stat(os.path.dirname(os.path.abspath(path))).st_mode
        if not mode & 0o200:
            raise PermissionError(13, "Permission denied", path)

    def unlink(path, *, dir_fd=None):
        writable(path, dir_fd)
        return real_unlink(path, dir_fd=dir_fd)

    def rmdir(path, *, dir_fd=None):
        writable(path, dir_fd)
        return real_rmdir(path, dir_fd=dir_fd)

    d = tmp_path / "ad"
    rw.save(_model(seed=0), d)
    os.chmod(d, 0o555)  # the user protects the adapter; the parent stays writable
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "rmdir", rmdir)
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")  # "could not remove" would fail the test
        rw.save(_model(seed=1), d)
    assert os.listdir(tmp_path) == ["ad"]
    _, tensors = rw.io.files.read(d)
    assert torch.equal(tensors["default/0/lora_A"], _model(seed=1)[0].adapters["default"].lora_A)


# --------------------------------------------------------------------------------- concurrency (C1–C4)

def test_threads_saving_to_one_folder_take_turns(tmp_path):
    """C3: 281 of 300 saves failed (both threads used the same ``.ad.old.<pid>`` name)."""
    d, errors = tmp_path / "ad", []
    models = [_model(seed=0), _model(seed=1)]

    def writer(m):
        try:
            for _ in range(25):
                rw.save(m, d)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    cfg, tensors = rw.io.files.read(d)  # one consistent adapter (checksum verified)
    assert any(torch.equal(tensors["default/0/lora_A"], m[0].adapters["default"].lora_A) for m in models)
    assert os.listdir(tmp_path) == ["ad"]


_WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import rankwise as rw
    seed, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    m = rw.adapt(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), "lora", rank=2, targets=["0"], seed=seed)
    print("ready", flush=True)
    for _ in range(n):
        rw.save(m, path)
""")


def test_processes_writing_while_another_reads(tmp_path):
    """C1 / C2: saves raised ``FileNotFoundError`` on an internal rename; loads saw a missing folder
    or a raw ``RuntimeError``. Two writer processes, readers here: every save and every read succeeds."""
    d = tmp_path / "ad"
    rw.save(_model(seed=0), d)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(seed), str(d), "40"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    expect = {seed: _model_a(seed) for seed in (0, 1)}
    reads = 0
    while any(p.poll() is None for p in procs):
        _, tensors = rw.io.files.read(d)
        assert any(torch.equal(tensors["default/0/lora_A"], a) for a in expect.values())
        reads += 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    assert reads > 0 and os.listdir(tmp_path) == ["ad"]


def _model_a(seed):
    torch.manual_seed(0)
    m = rw.adapt(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), "lora", rank=2, targets=["0"], seed=seed)
    return m[0].adapters["default"].lora_A.detach().clone()


@pytest.mark.parametrize("stale", [".ad.old.1", ".ad.rw-old-0123abcd", ".ad.rw-tmp-0123abcd", ".ad.k2j4h5g6.tmp"])
def test_temporaries_of_a_killed_writer_are_cleaned(tmp_path, stale):
    """C4 / K1: a ``.ad.old.1`` left by a killed pid-1 process made every later save fail; killed runs
    left ``.tmp`` folders behind forever."""
    d = tmp_path / "ad"
    rw.save(_model(seed=0), d)
    (tmp_path / stale).mkdir()
    (tmp_path / stale / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".ad.rw-tmp-file00").write_bytes(b"x")  # a file temporary of the same target
    (tmp_path / ".other.rw-tmp-0123").mkdir()  # another target's: not touched
    rw.save(_model(seed=1), d)
    assert sorted(os.listdir(tmp_path)) == [".other.rw-tmp-0123", "ad"]


@pytest.mark.parametrize("old", [".checkpoint.rw-old-5f2a", ".checkpoint.old.1"])
def test_a_swap_cut_between_its_renames_is_repaired_on_resume(tmp_path, old):
    """K2: the checkpoint folder was missing (the good copy sat in a hidden folder) and ``--resume``
    silently restarted from step 0."""
    from rankwise.train import TrainConfig, has_checkpoint, train

    data = [(torch.randn(6), i % 3) for i in range(16)]

    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    cfg = TrainConfig(steps=6, batch_size=4, seed=0, checkpoint_every=4)
    ck = tmp_path / "checkpoint"
    full = train(_model(), data, collate, loss, cfg, progress=False)
    calls = []

    def crash_at_step_5(m, b):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return loss(m, b)

    with pytest.raises(KeyboardInterrupt):  # a checkpoint at step 4, then the run dies
        train(_model(), data, collate, crash_at_step_5, cfg, checkpoint_dir=ck, progress=False)
    os.replace(ck, tmp_path / old)  # the state a kill between `path -> old` and `tmp -> path` leaves
    (tmp_path / ".checkpoint.rw-tmp-77aa").mkdir()  # the complete new copy, never renamed in
    assert has_checkpoint(ck)
    resumed = train(_model(seed=3), data, collate, loss, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert resumed.losses == full.losses  # steps 1-4 from the history, 5-6 run again: bitwise
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_the_two_rename_swap_is_used_where_exchange_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_EXCHANGE", False)
    d = tmp_path / "ad"
    rw.save(_model(seed=0), d)
    rw.save(_model(seed=1), d)
    _, tensors = rw.io.files.read(d)
    assert torch.equal(tensors["default/0/lora_A"], _model(seed=1)[0].adapters["default"].lora_A)
    assert os.listdir(tmp_path) == ["ad"]


# ---------------------------------------------------------------------- kill -9 during a checkpoint (K1)

_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    import rankwise as rw
    from rankwise.io import atomic
    from rankwise.train import TrainConfig, train

    def build(seed=0):
        torch.manual_seed(0)  # the same frozen base; `seed` changes only the adapter's init
        return rw.adapt(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), "lora", rank=2,
                        targets=["0"], seed=seed)

    g = torch.Generator().manual_seed(7)
    DATA = [(torch.randn(6, generator=g), i % 3) for i in range(32)]
    CFG = TrainConfig(steps=8, batch_size=4, seed=0, checkpoint_every=2, lr=1e-2)

    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def loss(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    def inject(point, at_write):
        '''SIGKILL this process at ``point`` of checkpoint write number ``at_write``.'''
        count = {"dirs": 0}
        real_dir, real_save, real_replace, real_remove = (atomic.atomic_dir, atomic.save_tensors, os.replace,
                                                          atomic._remove)
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        def atomic_dir(*a, **k):
            count["dirs"] += 1
            return real_dir(*a, **k)
        def save_tensors(path, *a, **k):
            real_save(path, *a, **k)
            if point == "mid-build" and count["dirs"] == at_write:
                die()  # model.safetensors written, optimizer.safetensors not yet
        def replace(src, dst):
            if point == "between-renames" and count["dirs"] == at_write and ".rw-tmp-" in str(src) \\
                    and os.path.isdir(src):
                die()  # the old folder is aside, the new one not yet in
            return real_replace(src, dst)
        def remove(p):
            if point == "before-cleanup" and count["dirs"] == at_write:
                die()  # the new folder is in, the old one not yet removed
            return real_remove(p)
        import rankwise.train as T
        T.atomic_dir, T.save_tensors, os.replace, atomic._remove = atomic_dir, save_tensors, replace, remove
        if point == "between-renames":
            atomic._EXCHANGE = False

    if __name__ == "__main__":
        inject(sys.argv[2], int(sys.argv[3]))
        train(build(), DATA, collate, loss, CFG, checkpoint_dir=sys.argv[1], progress=False)
        sys.exit(3)  # not reached: the kill comes first
""")


@pytest.mark.parametrize("point", ["mid-build", "between-renames", "before-cleanup"])
def test_kill_during_a_checkpoint_then_resume_is_bitwise_an_uninterrupted_run(tmp_path, point):
    """K1 / K2: kill -9 at each point of the third checkpoint write (step 6) of an 8-step run, then
    ``resume=True``: the result equals the uninterrupted run bit for bit, and no temporary is left."""
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    ck = tmp_path / "out" / "checkpoint"
    proc = subprocess.run([sys.executable, str(script), str(ck), point, "3"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr  # killed by the signal, not finished
    assert _leftovers(tmp_path / "out"), "the kill must hit the write (a temporary is left behind)"

    env: dict = {}
    exec(compile(_RUN, "run", "exec"), env)  # the same setup, in this process
    build, data, cfg, collate, loss = env["build"], env["DATA"], env["CFG"], env["collate"], env["loss"]
    straight = build()
    full = train_loop(straight, data, collate, loss, cfg, progress=False)
    fresh = build(seed=5)  # another init: every trainable value comes from the checkpoint
    resumed = train_loop(fresh, data, collate, loss, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert resumed.losses == full.losses
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 8
    assert _leftovers(tmp_path / "out") == []
