"""Representation measures on data: how far a fine-tuned model's activations and kernel moved.

* RankMe (Garrido, Balestriero, Najman & LeCun, ICML 2023) of embeddings ``Z (n × d)``:
  ``exp(-Σ p_k log p_k)`` with ``p_k = σ_k(Z) / ‖σ(Z)‖_1 + ε`` (``ε = 1e-7``).
* linear CKA (Kornblith, Norouzi, Lee & Hinton, ICML 2019) between representations
  ``X (n × p1)`` and ``Y (n × p2)`` of the same ``n`` inputs, columns centered:
  ``‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F)``; 1 for identical representations, invariant to orthogonal
  transforms and isotropic scaling. Computed from the features or from the ``n × n`` Gram
  matrices, whichever is cheaper.
* kernel alignment (Cristianini et al. 2002; centered as in Cortes, Mohri & Rostamizadeh 2012):
  ``⟨K1c, K2c⟩_F / (‖K1c‖_F ‖K2c‖_F)`` with ``Kc = HKH``.
* the rich-vs-lazy measures (e.g. Kumar, Bordelon, Gershman & Pehlevan, "Grokking as the
  transition from lazy to rich training dynamics", ICLR 2024): relative weight change
  ``‖W - W0‖_F / ‖W0‖_F``; the alignment between the empirical tangent kernels (NTK) of the base
  and the fine-tuned model on a batch (≈ 1: lazy, the kernel did not move); and each kernel's
  alignment with the labels ``Y Yᵀ`` (one-hot ``Y``), which feature learning raises.

Tangent kernel on a batch, without per-example backward passes. The kernel is taken with respect
to the analysed weight matrices (linear and HF Conv1D layers): for a layer ``y_t = W x_t`` the
gradient of an example's output ``f_i`` is ``Σ_t g_{it} x_{it}ᵀ`` with ``g = ∂f_i/∂y``. One
backward pass of ``Σ_i f_i`` gives every ``g_{it}`` (examples do not interact in the forward), so
``K_ij = Σ_layers ⟨Σ_t g_it x_itᵀ, Σ_s g_js x_jsᵀ⟩`` costs one forward and one backward per output
probe. For an output of ``C ≤ probes`` dimensions the kernel is the exact trace kernel
``Σ_c ∇f_c ∇f_cᵀ``; for more, ``probes`` seeded Gaussian projections give an unbiased estimate of it.
The output is the model's pooled embedding (masked mean of the last hidden state) by default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core.adapted import AdaptedLayer, TrainedCopies
from ..core.layers import kind_of
from ..errors import ConfigError, ShapeMismatchError

RANKME_EPS = 1e-7


# ---- closed-form measures -------------------------------------------------------------------------
def rankme(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of embeddings ``z (n, d)``."""
    if z.dim() != 2 or min(z.shape) == 0:
        raise ShapeMismatchError(f"rankme: embeddings have shape {tuple(z.shape)}; pass a non-empty (n, d) matrix.")
    s = torch.linalg.svdvals(z.detach().double())
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _centered(x: torch.Tensor) -> torch.Tensor:
    """Columns centered; float32 stays float32 (products accumulate to ~1e-6 relative), float64 stays."""
    x = x.detach().reshape(x.shape[0], -1)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x (n, p1)`` and ``y (n, p2)`` (rows: the same ``n`` inputs)."""
    if x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(f"linear_cka: x has {x.shape[0]} rows, y has {y.shape[0]}; both must hold "
                                 "representations of the same inputs.")
    if x.shape[0] < 2:
        raise ShapeMismatchError("linear_cka: needs at least 2 inputs (rows).")
    x, y = _centered(x), _centered(y)
    n, p1, p2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (p1 + p2) < n * (p1 * p1 + p2 * p2 + p1 * p2):  # Gram form is cheaper
        k, l_ = x @ x.mT, y @ y.mT
        num, dx, dy = (k * l_).sum(), k.norm(), l_.norm()
    else:
        num, dx, dy = (y.mT @ x).square().sum(), (x.mT @ x).norm(), (y.mT @ y).norm()
    num, den = float(num), float(dx) * float(dy)
    return num / den if den > 0 else float("nan")


def center_kernel(k: torch.Tensor) -> torch.Tensor:
    k = k.double()
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def kernel_alignment(k1: torch.Tensor, k2: torch.Tensor, centered: bool = True) -> float:
    """``⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)``, on centered kernels by default."""
    if k1.shape != k2.shape or k1.dim() != 2 or k1.shape[0] != k1.shape[1]:
        raise ShapeMismatchError(f"kernel_alignment: kernels {tuple(k1.shape)} and {tuple(k2.shape)} must be "
                                 "square and of one size.")
    a, b = (center_kernel(k1), center_kernel(k2)) if centered else (k1.double(), k2.double())
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def label_kernel(labels: torch.Tensor) -> torch.Tensor:
    """``Y Yᵀ`` for one-hot ``Y`` (1 where two examples share a label)."""
    labels = labels.reshape(-1)
    return (labels[:, None] == labels[None, :]).double()


def relative_weight_change(pairs) -> float:
    """``(Σ ‖ΔW‖_F²)^½ / (Σ ‖W0‖_F²)^½`` over ``{name: (W0, ΔW)}``."""
    num = sum(float(torch.linalg.vector_norm(d)) ** 2 for _, d in pairs.values())
    den = sum(float(torch.linalg.vector_norm(w)) ** 2 for w, _ in pairs.values())
    return math.sqrt(num / den) if den > 0 else float("nan")


# ---- running models ---------------------------------------------------------------------------------
def _inputs(batch):
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch


def _call(model: nn.Module, batch, hidden: bool):
    inputs = _inputs(batch)
    if isinstance(inputs, dict):
        if hidden and getattr(model, "config", None) is not None:
            return model(**inputs, output_hidden_states=True)
        return model(**inputs)
    return model(inputs)


def _mask(batch):
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def _pool(h: torch.Tensor, mask) -> torch.Tensor:
    if h.dim() == 3:
        if mask is not None and tuple(mask.shape) == tuple(h.shape[:2]):
            m = mask.to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp_min(1)
        return h.mean(1)
    return h.reshape(h.shape[0], -1)


def default_embedding(output, batch) -> torch.Tensor:
    """Pooled final representation ``(n, d)``: masked mean of the last hidden state (HF outputs with
    ``hidden_states`` or ``last_hidden_state``), else the output tensor itself (pooled if 3-D)."""
    mask = _mask(batch)
    hs = getattr(output, "hidden_states", None)
    if hs:
        return _pool(hs[-1], mask)
    last = getattr(output, "last_hidden_state", None)
    if last is not None:
        return _pool(last, mask)
    if isinstance(output, torch.Tensor):
        return _pool(output, mask)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return _pool(output[0], mask)
    logits = getattr(output, "logits", None)
    if logits is not None:
        return _pool(logits, mask)
    raise ConfigError(f"cannot find an embedding in a {type(output).__name__} output; pass embed_fn=.")


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _token_pick(batch, n_batches: int, max_tokens: int, seed: int, index: int):
    """Seeded choice of at most ``max_tokens / n_batches`` valid token positions of one batch."""
    mask = _mask(batch)
    if mask is None:
        return None
    pos = mask.bool().nonzero()
    budget = max(1, math.ceil(max_tokens / max(1, n_batches)))
    if len(pos) > budget:
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        pos = pos[torch.randperm(len(pos), generator=g)[:budget].sort().values]
    return pos


@torch.no_grad()
def layer_outputs(model: nn.Module, batches: list, names: Iterable[str], max_tokens: int = 1024, seed: int = 0,
                  embed_fn: Callable | None = None):
    """Outputs of the named layers on ``batches`` and the pooled embeddings.

    Returns ``({name: (N, d)}, embeddings (n, d))``. Token-level outputs ``(B, T, d)`` keep a seeded
    sample of at most ``max_tokens`` non-padding positions in all (the same positions for any model
    run on the same batches); other outputs keep one row per example.
    """
    names = list(names)
    mods = {n: model.get_submodule(n) for n in names}
    acts: dict[str, list] = {n: [] for n in names}
    pick: list = [(None, None)]

    def hook(name):
        def fn(_m, _args, out):
            if not isinstance(out, torch.Tensor):
                return
            pos, shape = pick[0]
            if pos is not None and out.dim() == 3 and tuple(out.shape[:2]) == shape:
                acts[name].append(out[pos[:, 0], pos[:, 1]].float())
            else:
                acts[name].append(out.reshape(out.shape[0], -1).float())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    emb = []
    try:
        with _eval(model):
            for i, batch in enumerate(batches):
                mask = _mask(batch)
                pick[0] = (_token_pick(batch, len(batches), max_tokens, seed, i),
                           None if mask is None else tuple(mask.shape))
                out = _call(model, batch, hidden=True)
                emb.append((embed_fn or default_embedding)(out, batch).float())
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in acts.items() if v}, torch.cat(emb)


def _kernel_layers(model: nn.Module, names) -> dict[str, nn.Module]:
    out = {}
    for n in names:
        m = model.get_submodule(n)
        inner = m.base if isinstance(m, AdaptedLayer) else (m.current() if isinstance(m, TrainedCopies) else m)
        if kind_of(inner) in ("linear", "hf_conv1d"):
            out[n] = m
    return out


def tangent_kernel(model: nn.Module, batch, names: Iterable[str], probes: int = 4, seed: int = 0,
                   embed_fn: Callable | None = None) -> torch.Tensor:
    """Empirical tangent kernel ``(n, n)`` of the pooled output on one batch with respect to the
    weights of the named linear layers (see the module docstring)."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"tangent_kernel: probes={probes!r} must be a positive int.")
    mods = _kernel_layers(model, names)
    if not mods:
        raise ConfigError("tangent_kernel: none of the analysed layers is a linear layer; nothing to take "
                          "gradients with respect to.")
    seen: dict[str, list] = {n: [] for n in mods}

    def pre(_m, args):
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def post(name):
        def fn(_m, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                seen[name].append((args[0].detach(), out))
        return fn

    handles = []
    for n, m in mods.items():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post(n)))
    try:
        with _eval(model), torch.enable_grad():
            f = (embed_fn or default_embedding)(_call(model, batch, hidden=True), batch)
            n_ex, c = f.shape
            g = torch.Generator().manual_seed(seed)
            v = (torch.eye(c, dtype=f.dtype) if c <= probes
                 else torch.randn(c, probes, generator=g, dtype=torch.float64).to(f.dtype) / math.sqrt(probes))
            outs = [(n, x, o) for n, lst in seen.items() for x, o in lst]
            k = torch.zeros(n_ex, n_ex, dtype=torch.float64)
            for p in range(v.shape[1]):
                grads = torch.autograd.grad((f @ v[:, p]).sum(), [o for _, _, o in outs], retain_graph=True,
                                            allow_unused=True)
                per_layer: dict[str, torch.Tensor] = {}
                for (n, x, _), gr in zip(outs, grads):
                    if gr is None:
                        continue
                    x3 = x if x.dim() == 3 else x.reshape(x.shape[0], 1, -1)
                    g3 = gr if gr.dim() == 3 else gr.reshape(gr.shape[0], 1, -1)
                    if x3.shape[0] != n_ex:
                        continue
                    j = torch.einsum("bto,bti->boi", g3.float(), x3.float()).reshape(n_ex, -1)
                    per_layer[n] = per_layer[n] + j if n in per_layer else j
                for j in per_layer.values():
                    k += (j @ j.mT).double()
            del f, outs
    finally:
        for h in handles:
            h.remove()
    return k


def representation_measures(run_base, run_adapted, batches: list, names: Iterable[str], max_tokens: int = 1024,
                            ntk_examples: int = 8, probes: int = 4, seed: int = 0,
                            embed_fn: Callable | None = None, kernel: bool = True) -> dict:
    """CKA per layer, RankMe and CKA of the embeddings, and the tangent-kernel measures.

    ``run_base`` / ``run_adapted``: context managers that yield the model to run (the same module
    with adapters off and on, or two models).
    """
    names = list(names)
    if not batches:
        raise ConfigError("representation measures need at least one batch of inputs.")
    with run_base() as m:
        acts0, emb0 = layer_outputs(m, batches, names, max_tokens, seed, embed_fn)
    with run_adapted() as m:
        acts1, emb1 = layer_outputs(m, batches, names, max_tokens, seed, embed_fn)
    res = {
        "cka": {n: linear_cka(acts0[n], acts1[n]) for n in names if n in acts0 and n in acts1},
        "rankme_base": rankme(emb0),
        "rankme_adapted": rankme(emb1),
        "embedding_cka": linear_cka(emb0, emb1),
        "n_examples": int(emb0.shape[0]),
        "n_rows": int(next(iter(acts0.values())).shape[0]) if acts0 else 0,
    }
    if kernel:
        b = _head(batches[0], ntk_examples)
        with run_base() as m:
            k0 = tangent_kernel(m, b, names, probes, seed, embed_fn)
        with run_adapted() as m:
            k1 = tangent_kernel(m, b, names, probes, seed, embed_fn)
        res["ntk_alignment"] = kernel_alignment(k0, k1)
        res["ntk_examples"] = int(k0.shape[0])
        labels = b.get("labels") if isinstance(b, dict) else None
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
            y = label_kernel(labels)
            res["ntk_label_alignment_base"] = kernel_alignment(k0, y)
            res["ntk_label_alignment_adapted"] = kernel_alignment(k1, y)
    return res


def _head(batch, n: int):
    if isinstance(batch, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in batch.items()}
    return batch[:n]
