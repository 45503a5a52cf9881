"""A bounded cache of adapters on one model: loaded on demand from folders, least recently used out.

``AdapterCache(model, root, max_bytes)`` serves the adapters in the subfolders of ``root``, each
named after its folder, in rankwise format (``rw.save``; one adapter per folder, loaded under the
folder's name whatever name it was saved under) or PEFT format (``rw.import_peft``). ``acquire(names)``
makes sure those adapters are on the model — loading any that is missing, or whose folder changed on
disk since it was loaded (a hot swap: the folder is replaced atomically, see ``io/atomic.py``) — and
then evicts (``rw.delete``) the least recently used others until the adapters' tensors take at most
``max_bytes``. The adapters a batch needs are never evicted for it, so one batch may exceed the budget;
the overshoot is gone before the next batch that does not need them.

Not thread-safe: one thread drives the model (the server's worker thread) and calls every method here.
Only safetensors and JSON are read (``rw.load`` / ``rw.import_peft``); nothing is unpickled.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ..core.api import adapted_layers, adapter_state, trained_copies
from ..core.api import delete as delete_adapter
from ..errors import AdapterNotFoundError, ConfigError, CorruptFileError, close_names
from ..io import files
from ..io.atomic import ADAPTER_NAMES, atomic_dir, is_adapter_dir, read_json, save_tensors, write_json
from ..io.peft import import_peft

#: Adapter (folder) names the cache accepts: no path separators, no leading dot.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"adapter name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit.")
    return name


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes of every tensor adapter ``name`` holds on ``model`` (layers, ``modules_to_save``, shared)."""
    mods = [layer.adapters[name] for _, layer in adapted_layers(model) if name in layer.adapters]
    mods += [tc.copies[name] for _, tc in trained_copies(model) if name in tc.copies]
    shared = adapter_state(model).get(name, {}).get("shared")
    if isinstance(shared, nn.Module):
        mods.append(shared)
    seen, total = set(), 0
    for m in mods:
        for t in m.state_dict(keep_vars=True).values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def load_adapter_dir(model: nn.Module, path: str | Path, name: str) -> None:
    """Load the adapter folder ``path`` (rankwise or PEFT format) onto ``model`` as adapter ``name``.

    A rankwise folder must hold one adapter; saved under another name, it is loaded through a renamed
    copy in a temporary folder (the keys ``<adapter>/...`` and the config entry renamed, the checksum
    recomputed), so two folders that both hold a ``default`` adapter can be served side by side."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise CorruptFileError(f"{path} is not an adapter folder (no adapter_config.json holding a JSON object).")
    cfg = read_json(path / files.CONFIG_NAME, "is this an adapter folder?")
    if "peft_type" in cfg and "adapters" not in cfg:
        import_peft(model, path, name=name)
        return
    cfg, tensors = files.read(path)
    saved = cfg.get("adapters")
    if not isinstance(saved, dict) or len(saved) != 1:
        raise ConfigError(f"{path} holds adapters {sorted(saved) if isinstance(saved, dict) else saved!r}; a served "
                          "adapter folder holds exactly one. Save each adapter to its own folder "
                          "(rw.save(model, path, names=name)).")
    (old,) = saved
    if old == name:
        files.load(model, path, active=False)
        return
    with tempfile.TemporaryDirectory(prefix="rankwise-rename-") as tmp:
        renamed = Path(tmp) / name
        with atomic_dir(renamed, ADAPTER_NAMES, "renamed adapter folder") as out:
            save_tensors(out / files.WEIGHTS_NAME,
                         {f"{name}/{k[len(old) + 1:]}": t for k, t in tensors.items() if k.startswith(old + "/")},
                         metadata={"format": files.FORMAT})
            write_json(out / files.CONFIG_NAME, {**cfg, "adapters": {name: saved[old]},
                                                 "weights_sha256": files.sha256(out / files.WEIGHTS_NAME)})
        files.load(model, renamed, active=False)


def _signature(path: Path):
    """What changes when a folder is replaced or its files rewritten (inode, mtimes, sizes)."""
    try:
        st = [os.stat(path)] + [os.stat(path / f) for f in (files.CONFIG_NAME, files.WEIGHTS_NAME)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in st)


class AdapterCache:
    """Adapters of ``model`` loaded from the subfolders of ``root`` on demand, LRU-evicted by bytes."""

    def __init__(self, model: nn.Module, root: str | Path | None, max_bytes: int = 1 << 30):
        if max_bytes <= 0:
            raise ConfigError(f"AdapterCache max_bytes={max_bytes}: give a positive number of bytes.")
        self.model, self.max_bytes = model, int(max_bytes)
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"adapters folder {self.root} does not exist or is not a folder; create it or pass "
                              "another --adapters.")
        self._loaded: OrderedDict[str, tuple[int, object]] = OrderedDict()  # name -> (bytes, signature), LRU first
        self.loads = self.evictions = self.hits = 0

    # ---- what is there ---------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        if self.root is None:
            raise AdapterNotFoundError(f"no adapter '{name}': the server has no adapters folder.")
        return self.root / check_name(name)

    def available(self) -> list[str]:
        """Names of the adapter folders under ``root`` (sorted)."""
        if self.root is None:
            return []
        out = []
        for e in sorted(os.listdir(self.root)):
            if NAME_RE.fullmatch(e) and (self.root / e).is_dir() and is_adapter_dir(self.root / e):
                out.append(e)
        return out

    def exists(self, name: str) -> bool:
        return (self.root is not None and isinstance(name, str) and NAME_RE.fullmatch(name) is not None
                and is_adapter_dir(self.root / name))

    @property
    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    @property
    def bytes(self) -> int:
        return sum(b for b, _ in self._loaded.values())

    # ---- load / evict --------------------------------------------------------------------------------
    def acquire(self, names: Iterable[str]) -> None:
        """Make ``names`` loaded and current (reloading a folder that changed), then evict others."""
        need = list(dict.fromkeys(names))
        for name in need:
            path = self.path(name)
            if not is_adapter_dir(path):
                raise AdapterNotFoundError(f"no adapter '{name}' in {self.root}." + close_names(name, self.available()))
            sig = _signature(path)
            entry = self._loaded.get(name)
            if entry is not None and entry[1] == sig:
                self._loaded.move_to_end(name)
                self.hits += 1
                continue
            if entry is not None:
                self.discard(name)
            load_adapter_dir(self.model, path, name)
            self._loaded[name] = (adapter_bytes(self.model, name), sig)
            self.loads += 1
        self._evict(keep=set(need))

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if self.bytes <= self.max_bytes:
                break
            if name not in keep:
                self.discard(name)
                self.evictions += 1

    def discard(self, name: str) -> bool:
        """Remove adapter ``name`` from the model if it is loaded; True if it was."""
        if self._loaded.pop(name, None) is None:
            return False
        if name in adapter_state(self.model):
            delete_adapter(self.model, name)
        return True

    # ---- install / remove folders ------------------------------------------------------------------------
    def install(self, name: str, staged: str | Path) -> dict:
        """Check the adapter folder ``staged`` against the model (loaded under a probe name, then removed),
        copy it to ``root/name`` (replacing an old version atomically) and load it. Nothing changes when the
        check fails. Returns ``{"name", "bytes", "replaced"}``."""
        dest = self.path(name)
        probe = f"upload-probe-{uuid.uuid4().hex[:12]}"
        load_adapter_dir(self.model, staged, probe)  # raises (and leaves the model as it was) if it does not fit
        size = adapter_bytes(self.model, probe)
        delete_adapter(self.model, probe)
        replaced = is_adapter_dir(dest)
        with atomic_dir(dest, ADAPTER_NAMES, "adapter folder", is_adapter_dir) as tmp:
            for f in (files.CONFIG_NAME, files.WEIGHTS_NAME):
                shutil.copyfile(Path(staged) / f, tmp / f)
        self.discard(name)
        self.acquire([name])
        return {"name": name, "bytes": size, "replaced": replaced}

    def remove(self, name: str) -> None:
        """Unload adapter ``name`` and delete its folder (moved aside atomically, then removed)."""
        dest = self.path(name)
        if not is_adapter_dir(dest):
            raise AdapterNotFoundError(f"no adapter '{name}' in {self.root}." + close_names(name, self.available()))
        foreign = [e for e in os.listdir(dest) if e not in ADAPTER_NAMES]
        if foreign:
            raise ConfigError(f"adapter folder {dest} holds other files ({', '.join(sorted(foreign)[:5])}); "
                              "rankwise deletes only folders it could have written. Remove it by hand.")
        self.discard(name)
        aside = dest.parent / f".{dest.name}.rw-del-{uuid.uuid4().hex}"
        os.replace(dest, aside)
        shutil.rmtree(aside, ignore_errors=True)
