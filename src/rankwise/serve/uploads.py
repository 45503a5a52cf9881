"""Adapter uploads: a tar archive (optionally gzip-compressed) read in memory and checked member by member.

Accepted: regular files named ``adapter_config.json`` and ``adapter_model.safetensors`` (and a
``README.md``, ignored), at the top of the archive or inside one folder. Refused with
:class:`UploadError` (the server answers 422): absolute names, ``..`` components, backslashes, links,
devices and other special members, any other file (a pickled ``.bin``, code), duplicates, members
whose sizes add up past the limit, and a config that is not a JSON object. Nothing is extracted with
``tarfile``'s own extract (no path is ever built from a member name): the two files' bytes are
written under fixed names into a staging folder through ``io.atomic``. The staged safetensors and JSON
are then read by ``rw.load`` / ``rw.import_peft`` — never unpickled.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path, PurePosixPath

from ..errors import RankwiseError
from ..io.atomic import ADAPTER_NAMES, atomic_dir

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class UploadError(RankwiseError, ValueError):
    """An upload that is not a safe adapter archive."""


def read_adapter_tar(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """``{"adapter_config.json": ..., "adapter_model.safetensors": ...}`` from a tar archive's bytes."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UploadError(f"the upload is not a tar archive ({e}); send `tar -cf - -C <adapter folder> .`.") from None
    out: dict[str, bytes] = {}
    total = 0
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UploadError(f"the tar archive is damaged ({e}).") from None
        for m in members:
            name = m.name
            parts = [p for p in PurePosixPath(name).parts if p != "."]
            if name.startswith("/") or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
                raise UploadError(f"tar member {name!r} points outside the archive (absolute path or '..'); refused.")
            if m.isdir():
                continue
            if not m.isfile():
                what = "a link" if (m.issym() or m.islnk()) else "not a regular file"
                raise UploadError(f"tar member {name!r} is {what}; an adapter upload holds regular files only.")
            if len(parts) > 2:
                raise UploadError(f"tar member {name!r} is nested too deep; put the adapter files at the top of the "
                                  "archive or in one folder.")
            base = parts[-1] if parts else ""
            if base == "README.md":
                continue
            if base not in (CONFIG, WEIGHTS):
                raise UploadError(f"tar member {name!r} is not an adapter file; an upload holds only {CONFIG} and "
                                  f"{WEIGHTS} (safetensors; pickled .bin files are refused).")
            if base in out:
                raise UploadError(f"tar archive holds {base} twice.")
            total += m.size
            if total > max_bytes:
                raise UploadError(f"the archive's files add up to more than {max_bytes} bytes.")
            f = tar.extractfile(m)
            out[base] = f.read() if f is not None else b""
    missing = [n for n in (CONFIG, WEIGHTS) if n not in out]
    if missing:
        raise UploadError(f"the tar archive lacks {', '.join(missing)}; it must hold {CONFIG} and {WEIGHTS}.")
    try:
        cfg = json.loads(out[CONFIG])
    except (ValueError, UnicodeDecodeError) as e:
        raise UploadError(f"{CONFIG} in the upload is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise UploadError(f"{CONFIG} in the upload is not a JSON object.")
    return out


def stage(files: dict[str, bytes], folder: str | Path) -> Path:
    """Write the adapter files into ``folder`` (atomically, under their fixed names); return it."""
    with atomic_dir(folder, ADAPTER_NAMES, "staged adapter upload") as tmp:
        for name in (CONFIG, WEIGHTS):
            (tmp / name).write_bytes(files[name])
    return Path(folder)
