"""CUR: keep ``k`` actual columns and rows of ``W`` and a small ``k × k`` core.

::

    W ≈ C U R,    C = W[:, J] (out × k),   R = W[I, :] (k × in),   U = C⁺ W R⁺ (k × k)

``U = C⁺ W R⁺`` is the closed-form minimizer of ``‖W − C U R‖_F`` for fixed ``C`` and ``R``
(Stewart 1999; Mahoney & Drineas 2009). When ``rank W = k`` and the chosen rows/columns span the row
and column spaces, ``C U R = W`` exactly.

Selection (``select=``):

* ``"deim"`` (default) — the discrete empirical interpolation method on the top-``k`` singular vectors
  (Sorensen & Embree 2016, Alg. 1): index ``p_1 = argmax |u_1|``, then for ``j = 2..k`` the largest
  entry of the interpolation residual ``u_j − U_{:, <j} (U_{P, <j})⁻¹ u_j[P]``. Deterministic.
* ``"leverage"`` — the ``k`` largest leverage scores ``‖U_{i, :k}‖²`` (rows) / ``‖V_{j, :k}‖²``
  (columns), taken greedily rather than sampled (deterministic).

CURing (Chen et al. 2025, "CURing Large Models: Compression via CUR Decomposition",
arXiv:2501.04211) selects on an activation-weighted matrix, ``|W| · ‖x_j‖`` (WANDA's score), with
DEIM; here, when calibration is given, the selection runs on ``W diag(‖x_j‖)`` — its singular
vectors — and ``U`` stays the closed form on ``W``. CURing also heals ``U`` by training; rankwise's
``core`` is a plain ``nn.Linear`` that ``rw.adapt`` or full fine-tuning can train.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def deim(u: torch.Tensor) -> torch.Tensor:
    """DEIM indices (``k`` distinct rows) of the ``n × k`` basis ``u``."""
    n, k = u.shape
    idx = [int(u[:, 0].abs().argmax())]
    for j in range(1, k):
        p = torch.tensor(idx, device=u.device)
        basis = u[:, :j]
        c = torch.linalg.lstsq(basis[p], u[p, j:j + 1]).solution
        r = (u[:, j:j + 1] - basis @ c).abs().squeeze(1)
        r[p] = -1.0  # never pick an index twice (numerically zero residuals)
        idx.append(int(r.argmax()))
    return torch.tensor(idx, device=u.device)


def leverage(u: torch.Tensor) -> torch.Tensor:
    """The ``k`` rows of the ``n × k`` basis ``u`` with the largest leverage scores ``‖u_i‖²``."""
    return (u * u).sum(1).topk(u.shape[1]).indices


SELECTORS = {"deim": deim, "leverage": leverage}


def cur(w: torch.Tensor, k: int, select: str = "deim", col_scale: torch.Tensor | None = None):
    """``(C, U, R, rows, cols)`` with ``C U R ≈ W`` (see the module docstring); ``col_scale`` (``in``,)
    weights the columns for the *selection* only (activation norms)."""
    if select not in SELECTORS:
        raise ConfigError(f"cur: select={select!r}; use one of {sorted(SELECTORS)}.")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.to(dt)
    score = w if col_scale is None else w * col_scale.to(dt)[None, :]
    u, _, vh = torch.linalg.svd(score, full_matrices=False)
    rows = SELECTORS[select](u[:, :k])
    cols = SELECTORS[select](vh[:k].T)
    c, r = w[:, cols], w[rows, :]
    core = torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r)
    return c, core, r, rows, cols
