"""EigenLoRA's principal subspaces from many adapters (Kaushik et al. 2025, "EigenLoRAx: Recycling Adapters
to Find Principal Subspaces for Resource-Efficient Adaptation and Inference", arXiv:2502.04700; the
authors' code github.com/toshi2k2/EigenLoRA, ``NLU/utils.py``: ``get_eigenvectors``, ``eigendecomposition``,
``add_gram_schmidt_vectors``).

Per adapted module, the ``T`` input adapters' LoRA factors ``A_t ∈ R^{r_t×in}`` and ``B_t ∈ R^{out×r_t}`` are
stacked — the rows of the ``A``'s and the columns of the ``B``'s are the samples::

    X_A = [A_1; …; A_T] ∈ R^{N×in},        X_B = [B_1 | … | B_T]ᵀ ∈ R^{N×out},        N = Σ r_t

and their principal components are the top right singular vectors of the mean-centred stacks (the
reference: eigenvectors of ``(X − μ)ᵀ(X − μ)`` sorted by eigenvalue, the same vectors)::

    X_A − 1 μ_Aᵀ = U Σ Vᵀ,     C_A = V[:, :K]ᵀ ∈ R^{K×in}          (likewise C_B ∈ R^{out×K} from X_B)

``center=False`` takes the uncentred stack (then the span of ``C_A`` at ``K = rank(X_A)`` holds every
input ``A_t`` row exactly; centring removes the mean direction, as in the paper). When the stack has
fewer than ``K`` non-zero components (numerical rank, ``torch.linalg.matrix_rank``'s tolerance), the rest
are *pseudo-PCs*: random orthonormal directions orthogonal to the PCs (EigenLoRAx's augmentation; the
reference orthogonalizes uniform vectors by Gram–Schmidt, here Gaussian vectors by QR). ``K`` is capped at
the dimension per side; default ``K = N`` (every direction the adapters span).

LoRA inputs are stacked as stored (``lora_A``, ``lora_B``, without the scale, as the reference stacks the
saved matrices); adapters of other methods enter through their weight view ``ΔW = U S Vᵀ`` factored as
``A = S^½ Vᵀ``, ``B = U S^½``.

``rw.combine(model, adapters, weights, name, method="eigenlora", num_components=K, rank=r, center=True)``
adds an ``eigenlora`` adapter ``name`` (``rankwise/methods/eigenlora.py``: ``A = L_A C_A``, ``B = C_B L_B``,
only the loadings ``L`` train) holding these components:

* ``weights=None`` — a fresh adapter to train on a new task: ``L_B = 0`` (the model starts as the base),
  ``L_A`` random; ``rank`` default: the largest input rank.
* ``weights`` given — the loadings start at the projection of the task-arithmetic sum onto the subspaces,
  ``ΔW = P_B (Σ_t w_t ΔW_t) P_A`` with ``P_B = C_B C_Bᵀ``, ``P_A = C_Aᵀ C_A``: the ``K_B × K_A`` core
  ``M = C_Bᵀ (Σ_t w_t s_t B_t A_t) C_Aᵀ`` (formed from the factors) is factored by SVD, ``L_B = U_r S_r^½``,
  ``L_A = S_r^½ V_rᵀ``, at ``rank`` (default: the largest input rank; truncation is the best rank-``r``
  approximation inside the subspace). With ``K`` = every direction (``center=False``, or ``K`` = the
  dimension) and ``rank`` ≥ the sum's rank, this is exactly ``Σ_t w_t ΔW_t``. ``modules_to_save`` heads
  are combined by task arithmetic as for every combine method.

:func:`principal_components` returns the components alone (``{module: (C_A, C_B)}``) for other uses.
"""

from __future__ import annotations

import numbers

import torch

from ..core.api import adapt, adapted_layers, adapter_state, exact_targets
from ..core.registry import get_method
from ..errors import ConfigError, ShapeMismatchError
from ..methods.eigenlora import EigenLora, EigenLoraConfig, random_orthonormal
from .engine import LayerInputs, head_states, layer_inputs, numerical_rank


def pca(x: torch.Tensor, k: int, center: bool = True, generator=None) -> torch.Tensor:
    """The top-``k`` principal components (rows, ``k × d``, orthonormal) of the samples in the rows of
    ``x`` (``N × d``), mean-centred unless ``center=False``; pseudo-PCs (random orthonormal, orthogonal to
    the PCs) fill in where the samples span fewer than ``k`` directions. ``k ≤ d``. Float32 or wider.
    Signs: each PC's largest-magnitude entry is positive (a fixed convention; PCs are defined up to sign)."""
    d = x.shape[1]
    if not 1 <= k <= d:
        raise ConfigError(f"pca: k={k} components of {d}-dimensional samples; use 1 ≤ k ≤ {d}.")
    xc = x - x.mean(0, keepdim=True) if center else x
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    n = min(numerical_rank(s, xc.shape), k)
    pcs = vh[:n]
    idx = pcs.abs().argmax(1, keepdim=True)
    pcs = pcs * torch.where(pcs.gather(1, idx) < 0, -1.0, 1.0).to(pcs.dtype)
    if n == k:
        return pcs
    extra = random_orthonormal(d, k - n, generator, x.device, exclude=pcs.t(), dtype=x.dtype).to(x.device)
    return torch.cat([pcs, extra.t()], dim=0)


def stacks(layer, inp: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_A (N × in), X_B (N × out))``: the inputs' ``A`` rows and ``B`` columns as samples (LoRA as stored;
    other methods through ``S^½`` split evenly over the SVD factors of their weight view)."""
    lora = get_method("lora")
    rows_a, rows_b = [], []
    for name, (b, a, _) in zip(inp.names, inp.raw):
        if type(layer.adapters[name]) is not lora:  # raw = (U S, Vᵀ, 1): balance S over both sides
            sq = b.norm(dim=0).sqrt().clamp_min(torch.finfo(b.dtype).tiny)
            b, a = b / sq, a * sq[:, None]
        rows_a.append(a.to(inp.dtype))
        rows_b.append(b.t().to(inp.dtype))
    return torch.cat(rows_a, 0), torch.cat(rows_b, 0)


def _layer_components(layer, inp: LayerInputs, k: int | None, center: bool, generator):
    """``(C_A, C_B)`` of one module, ``K_A = min(K, in)``, ``K_B = min(K, out)`` (``K = None``: the stack's ``N``)."""
    xa, xb = stacks(layer, inp)
    k = k or xa.shape[0]
    ka, kb = min(k, inp.view.in_features), min(k, inp.view.out_features)
    return pca(xa, ka, center, generator), pca(xb, kb, center, generator).t()


def principal_components(model, adapters, num_components: int | None = None, center: bool = True,
                         generator=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (C_A (K_A × in), C_B (out × K_B))}``: EigenLoRA's principal components of ``adapters`` on
    every module they adapt (see the module docstring); ``K`` = ``num_components`` capped per side at the
    dimension (default: the number of stacked vectors ``Σ r_t``)."""
    _check_k(num_components)
    adapters = list(adapters)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        return {inp.name: _layer_components(layers[inp.name], inp, num_components, center, generator)
                for inp in layer_inputs(model, adapters, [1.0] * len(adapters))}


def _check_k(k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ConfigError(f"num_components={k!r}: give the number of principal components as an integer ≥ 1, "
                          "or leave it out (every direction the adapters span).")


def check_options(method: str, opts: dict) -> None:
    if method == "eigenlora":
        _check_k(opts.get("num_components"))
        if not isinstance(opts.get("center"), bool):
            raise ConfigError(f"center={opts.get('center')!r}: use True (mean-centred PCA, the paper) or False.")


def _loadings(inp: LayerInputs, ca: torch.Tensor, cb: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_A (k × K_A), L_B (K_B × k))``, ``k ≤ rank``, with ``C_B L_B L_A C_A = P_B (Σ w_t ΔW_t) P_A`` (truncated)."""
    bcat = torch.cat([w * f.B for w, f in zip(inp.weights, inp.factors)], dim=1)
    acat = torch.cat([f.A for f in inp.factors], dim=0)
    core = (cb.t() @ bcat) @ (acat @ ca.t())  # K_B × K_A
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, numerical_rank(s, core.shape))
    sq = s[:k].sqrt()
    return sq[:, None] * vh[:k], u[:, :k] * sq


def eigenlora(model, adapters, weights, name, opts, generator=None, progress=False, record=None):
    """``rw.combine(..., method="eigenlora")``: see the module docstring."""
    from tqdm.auto import tqdm

    from . import max_rank

    k, center = opts.get("num_components"), opts["center"]
    rank = opts.get("rank") or max_rank(model, adapters)
    w = weights if weights is not None else [1.0] * len(adapters)
    layers = dict(adapted_layers(model))
    total = sum(1 for layer in layers.values() if any(a in layer.adapters for a in adapters))
    # everything is computed before the model changes (a bad input leaves it as it was)
    with torch.no_grad():
        inputs = list(layer_inputs(model, adapters, w))  # factors only (r × (in + out) per adapter)
        if not inputs:
            raise ShapeMismatchError(f"adapters {adapters} adapt no module of this model; nothing to combine.")
        # one K for every module (capped per side at its dimension): default the largest stack N = Σ r_t
        k = k or max(sum(f.rank for f in inp.factors) for inp in inputs)
        found = {}
        for inp in tqdm(inputs, total=total, disable=not progress, desc=f"eigenlora {name}"):
            ca, cb = _layer_components(layers[inp.name], inp, k, center, generator)
            found[inp.name] = (inp, ca, cb)
        heads = head_states(model, adapters, weights) if weights is not None else {}
    caps = {m: min(inp.view.shape) for m, (inp, _, _) in found.items()}
    overrides = {m: {"rank": caps[m]} for m in found if caps[m] < rank}
    cfg = EigenLoraConfig(rank=rank, num_components=k, targets=exact_targets(list(found)),
                          modules_to_save=sorted(heads))
    adapt(model, cfg, name=name, generator=generator, module_overrides=overrides or None)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for m, (inp, ca, cb) in found.items():
            ad: EigenLora = layers[m].adapters[name]
            ad.set_components(ca.to(ad.components_A), cb.to(ad.components_B))
            if weights is not None:
                la, lb = _loadings(inp, ca, cb, ad.rank)
                j = la.shape[0]
                ad.loadings_A[:j].copy_(la.to(ad.loadings_A))  # rank slots past j: L_A random, L_B = 0
                ad.loadings_B[:, :j].copy_(lb.to(ad.loadings_B))
        for mname, state in heads.items():
            own = model.get_submodule(mname).copies[name].state_dict(keep_vars=True)
            for key, t in state.items():
                own[key].copy_(t.to(own[key]))
    if record is not None:
        adapter_state(model)[name]["combine"] = record
    return model


METHODS = {
    "eigenlora": (eigenlora, {"num_components": None, "rank": None, "center": True},
                  "EigenLoRA: an eigenlora adapter over the adapters' principal components (trains loadings only)",
                  "uniform"),
}
