"""File I/O shared by adapters, PEFT files, checkpoints and reports.

**Writes never lose data.**

* A file is written under a unique temporary name beside it and renamed onto it (``os.replace``,
  atomic on POSIX): a crash leaves the old file or the new one, never half of one.
* A folder (an adapter, a checkpoint) is built complete under a unique temporary name and swapped
  in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` — no instant where the folder is
  missing. Elsewhere it is two renames (old folder aside, new one in); a crash between them is
  repaired by the next rankwise read or write of that folder, which puts the old copy back.
* Temporary names are ``.<name>.rw-tmp-<random>`` / ``.<name>.rw-old-<random>`` — unique per
  writer, not per process id (containers run as pid 1; threads share a pid). Writers of one folder
  hold a lock on its parent (``flock`` on the directory, re-entrant within a thread), so they take
  turns, and under that lock the temporaries of a killed writer are removed.
* :func:`check_output_dir` runs before a folder is written: it refuses a path that is a file (or
  under one), ``.`` or a folder above the current one, and a non-empty folder holding anything
  rankwise does not write there — the user's files are never deleted. Symlinks are followed (the
  folder they point to is written; the link stays); a link to a missing place is refused.

**Reads name the problem.** A missing or damaged JSON / safetensors file is one
:class:`~rankwise.errors.CorruptFileError` ending in the fix. :func:`read_dir` reads a folder
consistently while another process may replace it: if the folder changed during the read, it reads
again, so a reader sees the old or the new adapter, never a mix or an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: writers in one process still take turns (the thread lock)
    fcntl = None

_EXCHANGE = hasattr(os, "uname") and os.uname().sysname == "Linux"  # tests turn it off to check the fallback


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------- locking

_guard = threading.Lock()
_locks: dict[str, threading.RLock] = {}
_held = threading.local()


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive lock on ``folder`` (a directory) across processes and threads; re-entrant per thread."""
    key = os.path.realpath(folder)
    with _guard:
        rlock = _locks.setdefault(key, threading.RLock())
    with rlock:
        depth = getattr(_held, "depth", None)
        if depth is None:
            depth = _held.depth = {}
        if depth.get(key):
            depth[key] += 1
            try:
                yield
            finally:
                depth[key] -= 1
            return
        fd = None
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fd = os.open(key, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)  # a filesystem without flock (some NFS): run unlocked
        depth[key] = 1
        try:
            yield
        finally:
            depth[key] = 0
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock


# --------------------------------------------------------------------------------- temporaries

def _temp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.rw-{kind}-{uuid.uuid4().hex}"


def _leftovers(path: Path, kinds: str = "tmp|old") -> list[Path]:
    """Temporaries of writers of ``path`` (this version's names and the ``.name.XXXX.tmp`` /
    ``.name.old.<pid>`` of earlier versions), newest first."""
    pat = re.compile(rf"\.{re.escape(path.name)}\.(rw-({kinds})-\w+(\.tmp)?|\w{{8}}\.tmp|old\.\d+)")
    try:
        found = [path.parent / e for e in os.listdir(path.parent) if pat.fullmatch(e)]
    except OSError:
        return []

    def mtime(p):
        try:
            return p.lstat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=mtime, reverse=True)


def _is_old(p: Path) -> bool:
    return ".rw-old-" in p.name or re.fullmatch(r"\..*\.old\.\d+", p.name) is not None


def _remove(p: Path) -> None:
    """Delete a temporary (file or folder). A read-only folder (an old copy the user made ``chmod 555``)
    is made writable to empty it; what still cannot go is named in a warning, not left silently."""
    if p.is_dir() and not p.is_symlink():
        def retry(fn, path, _exc):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(path), 0o700)
                if os.path.isdir(path) and not os.path.islink(path):
                    os.chmod(path, 0o700)
                fn(path)

        kw = {"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}
        shutil.rmtree(p, **kw)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
    if os.path.lexists(p):
        warnings.warn(f"rankwise could not remove its temporary {p} (permissions?); it holds an old copy "
                      "and can be deleted by hand.", stacklevel=3)


def _repair(path: Path) -> None:
    """Under the lock: put back the folder a crashed two-rename swap left aside, then remove every
    temporary of ``path`` (no writer of it is running: they hold the lock)."""
    left = _leftovers(path)
    if not os.path.lexists(path):
        olds = [p for p in left if _is_old(p) and p.is_dir()]
        if olds:
            os.replace(olds[0], path)
            left.remove(olds[0])
    for p in left:
        _remove(p)


def recover(path: str | os.PathLike) -> Path:
    """If ``path`` is missing because a writer died between the two renames of a swap, put the
    previous copy back (and clean that writer's temporaries). Returns ``path``; for readers."""
    path = Path(path)
    if not os.path.lexists(path) and any(_is_old(p) for p in _leftovers(path, "old")):
        with contextlib.suppress(OSError):  # a read-only parent: the reader reports the missing folder
            with _locked(path.parent):
                _repair(path)
    return path


# ------------------------------------------------------------------------------------------ writing

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On error the temporary file is removed and ``path`` is untouched. A symlink at ``path`` is
    followed: the file it points to is replaced, the link stays.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; rankwise writes a file there. Pass a file path "
                                f"(e.g. {path / 'report.md'}).")
    with _locked(path.parent):
        for p in _leftovers(path, "tmp"):
            _remove(p)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.rw-tmp-", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; follow the umask like open()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_png(path: str | os.PathLike, fig, dpi: int = 120) -> None:
    """Save a matplotlib figure as a PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (tensors detached, on the CPU, contiguous, unshared)."""
    from safetensors.torch import save_file

    clean = {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        clean[k] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not _EXCHANGE:
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # a filesystem without the flag: the two-rename swap
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        _remove(tmp)  # now the old folder
    else:
        old = _temp_name(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)  # a crash before this line: the next read or write puts `old` back
        _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, names: Iterable[str] = (), what: str = "folder",
               signature: Callable[[Path], bool] | None = None):
    """Build a folder under a temporary name and swap it in when the block succeeds.

    ``names``/``what``/``signature``: what may already be in ``path`` (see :func:`check_output_dir`,
    run here under the lock); the whole folder is replaced, so anything else makes it refuse.
    """
    path = check_output_dir(path, names, what, signature)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        _repair(path)
        path = check_output_dir(path, names, what, signature)  # again, now that no other writer runs
        tmp = _temp_name(path, "tmp")
        tmp.mkdir(mode=0o777 & ~_umask())
        try:
            yield tmp
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ------------------------------------------------------------------------------ output folders

def check_output_dir(path: str | os.PathLike, names: Iterable[str], what: str,
                     signature: Callable[[Path], bool] | None = None) -> Path:
    """Check that rankwise may write folder ``path``; return its real path (symlinks followed).

    ``names``: the entries (``fnmatch`` patterns) rankwise writes in such a folder; ``signature``:
    a test that a non-empty folder is one rankwise (or, for adapters, PEFT) wrote. Refused with an
    :class:`~rankwise.errors.OutputPathError` naming the path and the fix: a file, a folder under
    a file, ``.`` or a folder above the current one, a symlink to a missing place, and a non-empty
    folder holding anything else — it would be deleted or overwritten.
    """
    from ..errors import OutputPathError

    given = Path(path)
    if given.is_symlink() and not given.exists():
        target = Path(os.path.realpath(given))
        raise OutputPathError(f"{what} {given} is a symlink to {target}, which does not exist; create {target} "
                              f"(or fix the link) or pass another path.")
    real = Path(os.path.realpath(given))
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{what} {given}: {parent} is a file, so no folder can be made under it; "
                                      "pass a path under a folder.")
            break
    cwd = Path(os.getcwd()).resolve()
    if real == cwd or real in cwd.parents or real.parent == real:
        raise OutputPathError(f"{what} {given} is the current folder or one above it; rankwise replaces the "
                              f"folder it writes, so give it a folder of its own (e.g. {given / 'out'}).")
    if real.exists() and not real.is_dir():
        raise OutputPathError(f"{what} {given} is an existing file, not a folder; rankwise writes a folder "
                              f"there. Pass a folder path (e.g. {given.parent / (given.stem + '_out')}).")
    if real.is_dir():
        names = list(names)
        entries = sorted(e for e in os.listdir(real) if not re.fullmatch(r"\..*\.rw-(tmp|old)-\w+", e))
        foreign = [e for e in entries if not any(fnmatch.fnmatchcase(e, n) for n in names)]
        if foreign or (entries and signature is not None and not signature(real)):
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            why = f"holds files rankwise did not write ({shown})" if foreign else \
                f"is not a {what} rankwise wrote (it holds {', '.join(entries[:5])})"
            raise OutputPathError(f"{what} {given} {why}; writing there would delete or overwrite them. Pass a new "
                                  "or empty folder, or move those files away.")
    return real


#: What an adapter folder may hold before it is replaced (rankwise's two files, PEFT's README).
ADAPTER_NAMES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def is_adapter_dir(path: Path) -> bool:
    """An adapter folder (rankwise's or PEFT's): ``adapter_config.json`` holds a JSON object."""
    try:
        return isinstance(json.loads((path / "adapter_config.json").read_text()), dict)
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ reading

def read_json(path: str | os.PathLike, fix: str):
    """Parse a JSON file; a missing or unparsable file is a ``CorruptFileError`` ending in ``fix``."""
    from ..errors import CorruptFileError

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise CorruptFileError(f"{path} cannot be read ({e}); {fix}") from None


def read_tensors(path: str | os.PathLike, fix: str) -> dict:
    """Load a safetensors file; a missing, truncated or damaged file is a ``CorruptFileError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import CorruptFileError

    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist; {fix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} cannot be read as safetensors ({e}); the file is damaged. {fix}") from None


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def read_dir(path: str | os.PathLike, read: Callable[[Path], object], attempts: int = 100):
    """``read(path)`` for a folder another process may be replacing: if the folder changed while it
    was read (or was missing mid-swap), read again, so the result is all old or all new."""
    from ..errors import CorruptFileError

    path = recover(path)
    for _ in range(attempts - 1):
        before = _identity(path)
        try:
            result = read(path)
        except (CorruptFileError, FileNotFoundError):
            if before is not None and _identity(path) == before:
                raise  # damaged, not being replaced
            if before is None and not _leftovers(path):
                raise  # missing and no writer at work
            time.sleep(0.01)
            recover(path)
            continue
        if _identity(path) == before:
            return result
    return read(path)
