"""``rankwise serve``: an HTTP server for one base model and many hot-loaded adapters.

* :mod:`.cache` — :class:`AdapterCache`: adapters loaded on demand from rankwise or PEFT folders, LRU by bytes;
* :mod:`.engine` — :class:`Engine`: a bounded queue, dynamic batches run with :func:`rankwise.mixed_batch`;
* :mod:`.app` — the Starlette app (OpenAI-compatible endpoints, limits, auth, metrics); needs the
  ``rankwise[serve]`` extra (starlette, uvicorn);
* :mod:`.uploads` — safe reading of uploaded tar archives (safetensors + JSON only).
"""

from .cache import AdapterCache, load_adapter_dir
from .engine import Engine, Job, load_model

__all__ = ["AdapterCache", "Engine", "Job", "load_adapter_dir", "load_model"]
