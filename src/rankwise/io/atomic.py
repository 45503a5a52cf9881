"""File I/O shared by adapters, PEFT files and checkpoints.

Writes are atomic (a crash never leaves a half-written file); reads of JSON and safetensors
files turn every way a file can be missing or damaged into one :class:`CorruptFileError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory, so ``os.replace`` is atomic on POSIX.
    On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (tensors detached, on the CPU, contiguous, unshared)."""
    from safetensors.torch import save_file

    clean = {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        clean[k] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


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
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{path} cannot be read as safetensors ({e}); the file is damaged. {fix}") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a directory under a temporary name and swap it in when the block succeeds.

    An existing directory at ``path`` is replaced only after the new one is complete. Between
    the two renames the old copy lives at ``.<name>.old.<pid>`` (POSIX has no atomic swap of
    non-empty directories); a crash in that instant leaves it there, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old.{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
