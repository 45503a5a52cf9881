"""Adapted models under ``torch.distributed``: DDP wrappers and FSDP2-sharded (DTensor) tensors.

* ``DistributedDataParallel`` / ``DataParallel`` wrap the model: :func:`unwrap` returns the model
  inside, where rankwise keeps its adapter records (``rw.save``, ``rw.merge``, ``rw.rank_step``
  accept the wrapper).
* FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps the model object and turns its parameters
  into ``DTensor`` shards. :func:`full` gathers one (a collective: every process must call the code
  that calls it — ``rw.save`` of a sharded model runs on every rank, and only rank 0 writes, so the
  saved adapter is complete, never the local shard or empty).
* Merging into a sharded weight (``rw.merge`` / ``rw.unmerge`` on every rank):
  :func:`layer_delta` gathers the adapter's factors (and ``W0`` for a method that reads it),
  computes the whole ``ΔW`` exactly as one process would, and keeps the local shard that matches
  the weight's placements (``distribute_tensor(..., src_data_rank=None)``: every rank computed the
  same ``ΔW``, so no data moves); each rank then adds its shard in place. The merged weight is
  therefore bitwise the single-process one, whatever the method's ops (no reliance on DTensor
  support for them).
* :func:`full_state_dict` gathers a whole state dict (on every rank), optionally as the plain
  model's (``dense=True``: adapters merged, rankwise's wrappers removed), for rank 0 to save.

Helpers for launched processes (``torchrun``, ``accelerate launch``): :func:`init_from_env` joins
the process group the launcher describes (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in the
environment; gloo on CPU, nccl on CUDA), :func:`shutdown` leaves it at the end of a successful run,
:func:`torchrun_command` builds the command that runs a module on ``n`` local processes through
``torch.distributed.run``.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import nn

from ..errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 / tensor-parallel shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a ``DTensor`` is all-gathered (collective), any other tensor returned as is."""
    return t.full_tensor() if is_sharded(t) else t


def initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialized in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when several processes run, else nothing."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def is_fsdp_sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard`` or tensor parallel)."""
    return any(is_sharded(p) for p in model.parameters())


# --------------------------------------------------------------------------------------- merging
@contextlib.contextmanager
def gathered(*modules: nn.Module | None, grads: bool = False, write_back: bool = False,
             differentiable: bool = False, optimizers=()):
    """Inside the block, every ``DTensor`` parameter of ``modules`` (and their submodules) is replaced
    by its whole tensor (all-gathered: a collective, so every rank must enter the block); the shards
    are put back on exit. Plain parameters are left as they are.

    ``differentiable``: the whole tensor is ``p.full_tensor()`` itself, so a loss computed from it
    sends its gradient back to the shard (a rank's rows of it: no communication). ``grads``: the whole
    tensor gets the whole ``.grad``. ``write_back``: on exit each rank copies its shard of the (changed)
    whole tensor into ``p`` (and its ``requires_grad``); a parameter replaced or reshaped inside the
    block cannot be sharded back and raises :class:`~rankwise.errors.ConfigError`. ``optimizers``:
    inside the block they hold the whole parameters (in their param groups, with their state gathered),
    so code that finds a parameter's learning rate or state by identity finds it; restored on exit."""
    swapped = []
    moved = []  # (optimizer, group lists before, {whole: (p, keys that were sharded)})
    try:
        for module in modules:
            if module is None:
                continue
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and is_sharded(p):
                        if differentiable:
                            whole = p.full_tensor()
                        else:
                            whole = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                            if grads and p.grad is not None:
                                whole.grad = p.grad.full_tensor()
                        sub._parameters[name] = whole
                        swapped.append((sub, name, p, whole))
        remap = {id(p): whole for _, _, p, whole in swapped}
        for opt in optimizers if remap else ():
            before = [g["params"] for g in opt.param_groups]
            states = {}
            for g in opt.param_groups:
                g["params"] = [remap.get(id(q), q) for q in g["params"]]
            for _, _, p, whole in swapped:
                if p in opt.state:
                    st = opt.state.pop(p)
                    keys = [k for k, v in st.items() if is_sharded(v)]
                    opt.state[whole] = {k: (v.full_tensor() if k in keys else v) for k, v in st.items()}
                    states[whole] = (p, keys)
            moved.append((opt, before, states))
        yield
        if write_back:
            with torch.no_grad():
                for sub, name, p, whole in swapped:
                    now = sub._parameters.get(name)
                    if now is not whole or tuple(now.shape) != tuple(p.shape):
                        raise ConfigError(
                            f"{type(sub).__name__}.{name}: the method replaced or resized this parameter "
                            f"({tuple(p.shape)} -> {tuple(now.shape) if now is not None else None}) while it is an "
                            "FSDP2 shard; a rank-changing method cannot run on a sharded model. Train it with "
                            "DistributedDataParallel (adapters are small), or shard the base only.")
                    p.copy_(shard_like(whole.detach(), p))
                    p.requires_grad_(whole.requires_grad)
    finally:
        for opt, before, states in moved:
            for g, params in zip(opt.param_groups, before):
                g["params"] = params
            for whole, (p, keys) in states.items():
                st = opt.state.pop(whole, {})
                opt.state[p] = {k: (shard_like(v, p) if k in keys and tuple(v.shape) == tuple(p.shape) else v)
                                for k, v in st.items()}
        for sub, name, p, _ in reversed(swapped):
            sub._parameters[name] = p


def shard_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (whole, identical on every rank) laid out like ``ref``: for a ``DTensor`` ``ref`` the
    ``DTensor`` of ``t`` with ``ref``'s mesh and placements, built from each rank's own copy (no
    communication); otherwise ``t``."""
    if not is_sharded(ref):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, ref.device_mesh, ref.placements, src_data_rank=None)


@contextlib.contextmanager
def whole_parameter(p: torch.Tensor):
    """Inside the block, a plain tensor holding the whole of an FSDP2-sharded (``DTensor``) parameter,
    with ``.grad`` its whole gradient (two all-gathers: a collective, every rank enters the block for
    the same parameters in the same order); on exit each rank copies its own shard of the result back
    into ``p`` (no communication: every rank computed the same whole tensor). An optimizer whose step
    is not elementwise (a projection, a factored moment) runs its single-process arithmetic on it, so
    its state is the single-process state, identical on every rank. A plain ``p`` is yielded as is."""
    if not is_sharded(p):
        yield p
        return
    whole = p.detach().full_tensor()
    if p.grad is not None:
        whole.grad = p.grad.full_tensor()
    yield whole
    with torch.no_grad():
        p.copy_(shard_like(whole, p))


def shard_adapters(model: nn.Module, **fsdp_kwargs) -> list[nn.Module]:
    """``fully_shard`` every adapter of every adapted layer of ``model`` as its own FSDP2 unit, before
    the layers (or the blocks holding them) and the root are sharded. An adapter's unit all-gathers
    and reduce-scatters its own tensors, in their own dtype (float32 factors on a bfloat16 base), and
    ``fsdp_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward`` …) can differ from the base's.
    Returns the adapter modules it sharded. A method whose tensors are shared between layers (VeRA's
    frozen bases, …) is refused: its shared module would belong to several units."""
    from torch.distributed.fsdp import fully_shard

    from .adapted import AdaptedLayer

    model = unwrap(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    for name, layer in layers:
        for aname, adapter in layer.adapters.items():
            mine = {id(p) for p in adapter.parameters(recurse=False)} | {id(b) for b in adapter.buffers(recurse=False)}
            if any(id(p) not in mine for p in [*adapter.parameters(), *adapter.buffers()]):
                raise ConfigError(f"shard_adapters: adapter '{aname}' of module '{name}' holds tensors in submodules "
                                  "(shared between layers, or nested), which cannot each belong to one FSDP unit; "
                                  "shard the layers or blocks only (fully_shard(layer)), the adapters in them.")
    done = []
    for _, layer in layers:
        for adapter in layer.adapters.values():
            if any(is_sharded(p) for p in adapter.parameters()):
                continue
            fully_shard(adapter, **fsdp_kwargs)
            done.append(adapter)
    return done


def layer_delta(layer: nn.Module, name: str) -> torch.Tensor:
    """``ΔW`` of adapter ``name`` of an ``AdaptedLayer`` in the layout and dtype of ``layer.base.weight``.

    Unsharded: the adapter's ``delta_weight()``. Sharded (FSDP2): computed from the gathered factors
    (and the gathered ``W0`` for a method with ``reads_base``), then cut to the weight's local shard
    (:func:`shard_like`) — a collective, so every rank calls it for the same layers in the same order.
    A ``ΔW`` kept at merge time (``reads_base`` methods) is returned as kept.
    """
    w = layer.base.weight
    kept = layer._merged_delta.get(name)
    if kept is not None:
        return kept.to(w.dtype)
    adapter = layer.adapters[name]
    if not (is_sharded(w) or any(is_sharded(p) for p in adapter.parameters())):
        return adapter.delta_weight().to(w.dtype)
    try:
        with gathered(adapter, layer.base if adapter.reads_base else None):
            delta = full(adapter.delta_weight()).to(w.dtype)
    except (RuntimeError, NotImplementedError) as e:
        raise ConfigError(
            f"module '{layer.view.name}': could not compute ΔW of adapter '{name}' from its gathered shards "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A tensor it reads outside the layer "
            "(a shared basis) may be sharded separately: keep such modules out of fully_shard, or merge on a full "
            "copy: rw.save(model, dir) on every rank, then rw.load onto an unsharded base and rw.merge there."
        ) from None
    if is_sharded(w) and tuple(delta.shape) != tuple(w.shape):
        raise ConfigError(f"module '{layer.view.name}': ΔW of adapter '{name}' has shape {tuple(delta.shape)}, the "
                          f"sharded weight {tuple(w.shape)}; this adapter cannot be merged into it.")
    return shard_like(delta, w)


# --------------------------------------------------------------------------------------- state dicts
def full_state_dict(model: nn.Module, *, dense: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with every ``DTensor`` gathered — a collective: call it on **every**
    rank (each gets the whole dict; save it from rank 0). A DDP wrapper's ``module.`` prefix is dropped.

    ``dense=True``: the state dict of the plain model, as ``rw.unadapt(model, merge=True).state_dict()``
    would give, without changing the model: each adapted layer contributes its base layer's
    tensors under the layer's own name (``q_proj.base.weight`` → ``q_proj.weight``; adapters and
    merge markers dropped), a module trained per adapter (``modules_to_save``) its active copy.
    Every active adapter must be merged first (``rw.merge(model)`` on every rank), otherwise the
    weights would lack their updates: a :class:`~rankwise.errors.ConfigError` says so before
    anything is gathered.
    """
    model = unwrap(model)
    if not dense:
        return {k: full(v).detach() for k, v in model.state_dict().items()}
    from .adapted import MERGED_KEY, AdaptedLayer, TrainedCopies

    rename: dict[str, str | None] = {}  # key prefix -> new prefix (None: dropped)
    for mname, module in model.named_modules():
        at = f"{mname}." if mname else ""
        if isinstance(module, AdaptedLayer):
            live = [n for n in module.active if n not in module.merged]
            if live:
                raise ConfigError(f"full_state_dict(dense=True): adapter(s) {live} of module '{mname}' are not merged, "
                                  "so the dense weights would lack their updates; call rw.merge(model) on every rank "
                                  "first (rw.unmerge afterwards to train on).")
            rename.update({f"{at}base.": at, f"{at}adapters.": None, f"{at}{MERGED_KEY}": None})
        elif isinstance(module, TrainedCopies):
            keep = f"copies.{module.active}." if module.active in module.copies else "original."
            rename.update({f"{at}{other}": None for other in ("original.", *(f"copies.{n}." for n in module.copies))})
            rename[f"{at}{keep}"] = at
    prefixes = sorted(rename, key=len, reverse=True)  # the innermost module's prefix first
    out = {}
    for key, value in model.state_dict().items():
        value = full(value).detach()  # gathered whatever its fate: every rank takes part in the same order
        new = key
        while new is not None:  # nested wrappers (a trained copy holding an adapted layer): until none applies
            prefix = next((p for p in prefixes if new.startswith(p)), None)
            if prefix is None:
                break
            new = None if rename[prefix] is None else rename[prefix] + new[len(prefix):]
        if new is not None:
            out[new] = value
    return out


# --------------------------------------------------------------------------------------- launching
def device_for(name: str = "auto") -> torch.device:
    """The device a process of a (possibly launched) run works on: ``"auto"`` is ``cuda:LOCAL_RANK``
    when CUDA is available (one GPU per process under ``torchrun``; ``cuda:0`` alone), else the CPU;
    ``"cuda"`` is ``cuda:LOCAL_RANK``; anything else is taken as written (``"cpu"``, ``"cuda:1"``, ``"mps"``).
    A CUDA device without CUDA is a :class:`~rankwise.errors.ConfigError`."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device("cuda", local) if name == "cuda" else torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {name!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available in this torch build or machine "
                          f"(torch {torch.__version__}); use --device cpu (or auto).")
    return device


def backend_for(device: torch.device) -> str:
    """The ``torch.distributed`` backend for processes working on ``device``: nccl for CUDA, else gloo."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``): backend ``nccl`` when
    CUDA is available (each process on ``cuda:LOCAL_RANK``), else ``gloo``. Returns whether a group
    with several processes is now initialized (already initialized: nothing is done)."""
    import torch.distributed as dist

    if initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = backend_for(device_for("auto"))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    """End this process's part of a multi-process run after it succeeded: wait for every rank
    (``barrier``: no rank tears down while another still sends to it), then destroy the process
    groups, so gloo/NCCL threads are not left to the interpreter's exit (where they abort with
    "terminate called without an active exception"). Not for a failed rank: the others would wait at
    the barrier; the launcher stops them. Nothing happens without ``torch.distributed``."""
    import torch.distributed as dist

    if not initialized():
        return
    if world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by a launcher for a multi-process run (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m module args…``: ``nproc``
    local processes on one machine (a free rendezvous port is picked: ``--standalone``)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"torchrun_command: nproc={nproc!r} must be an int >= 1 (processes on this machine).")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def relaunch(nproc: int, argv: list[str], module: str = "rankwise.cli.main") -> int:
    """Run ``python -m module argv…`` on ``nproc`` local processes through ``torch.distributed.run``
    (:func:`torchrun_command`); wait, and return its exit code (non-zero if any process failed)."""
    import subprocess

    args, skip = [], False
    for a in argv:  # the processes need no --nproc (the launcher's WORLD_SIZE says it), and torchrun's own
        if skip:     # parser would take "--nproc" for an abbreviation of its --nproc-per-node
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    return subprocess.call(torchrun_command(nproc, module, args))
