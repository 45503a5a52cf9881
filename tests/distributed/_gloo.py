"""Two CPU processes (gloo) running a worker script: the launcher and the worker's preamble shared by
the distributed tests. A worker is ``SETUP + PREAMBLE + body``: it is called as
``python worker.py RANK INIT_FILE OUT_DIR``, has ``rank``, ``out``, the whole batch ``x, y`` (from the
setup's ``batch()``), this rank's half ``xs, ys`` and a ``results`` dict, and rank 0 saves ``results``
to ``OUT_DIR/results.safetensors`` when the worker ends with ``EPILOGUE``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors.torch import load_file

PREAMBLE = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x, y = batch()
    xs, ys = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
    results = {}
""")


EPILOGUE = textwrap.dedent("""
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/results.safetensors")
    from rankwise.core.distributed import shutdown
    shutdown()  # barrier, then destroy the group: no rank tears down while the other still sends
    sys.stdout.flush()
    sys.stderr.flush()
    import os
    os._exit(0)  # skip interpreter finalization, where leftover gloo threads can abort the process
""")


def run_two(worker: str, tmp: Path) -> tuple[dict, str]:
    """Run ``worker`` (the script text) on ranks 0 and 1 with ``tmp`` as OUT_DIR; return rank 0's saved
    results and its stdout. Fails with the worker's stderr if a process fails."""
    script = tmp / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp / "init"), str(tmp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return load_file(tmp / "results.safetensors"), outs[0][0]
