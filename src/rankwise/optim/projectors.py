"""Gradient projectors: map an ``m × n`` gradient ``G`` to a rank-``r`` coordinate and back.

A projector holds one basis of the side it projects:

* ``side="left"``:  ``P ∈ R^{m×r}``,  ``low = Pᵀ G`` (``r × n``),  ``back(low) = s · P low``
* ``side="right"``: ``Q ∈ R^{n×r}``,  ``low = G Q`` (``m × r``),  ``back(low) = s · low Qᵀ``

``s`` is ``scale``. ``side="auto"`` (GaLore's ``"std"``) projects the smaller dimension: right when
``m ≥ n``, else left, so the optimizer state ``low`` is as small as possible; ``"reverse"`` picks
the other one.

Kinds (``make_projector(kind, ...)``):

``svd``             top-``r`` singular vectors of ``G`` (GaLore, Zhao et al., 2024, arXiv:2403.03507).
                    ``O(mn·min(m, n))`` per refresh.
``randomized_svd``  Halko, Martinsson & Tropp (2011): sketch ``Y = G Ω`` with ``r + oversample``
                    Gaussian columns, ``power_iters`` rounds of ``Y ← G(GᵀY)`` (QR between), then
                    the SVD of the small ``Qᵀ G``. ``O(mn(r + p))`` per refresh; on a matrix of
                    rank ≤ ``r + p`` it is exact, otherwise the error is bounded by the tail
                    singular values (Halko et al., Thm. 10.6) and shrinks with ``power_iters``.
``random``          Gaussian ``N(0, 1/r)`` entries, resampled at every refresh from an integer
                    seed (Flora, Hao et al., 2024, arXiv:2402.03293; APOLLO, Zhu et al., 2024,
                    arXiv:2412.05270). Not orthonormal unless ``orthonormalize=True``:
                    ``E[P Pᵀ] = I`` only in expectation. No data is read: the cheapest refresh.
``dct``             SVD-free: columns of the orthonormal DCT-II basis of the projected dimension,
                    the ``r`` with the largest gradient energy ``‖(Bᵀ G)_j‖²`` (one FFT of ``G``,
                    ``O(mn log m)``). Only the ``r`` column indices are stored.
``hadamard``        as ``dct`` with the normalised Walsh–Hadamard basis (fast transform
                    ``O(mn log m)``); the projected dimension must be a power of two.
``online_pca``      Online Subspace Descent (OSD; Liang et al., 2024, arXiv:2408.12857, as its
                    official code does it): the basis starts from the SVD of the first gradient
                    and then moves at **every** step (``update_gap`` is not an interval here) by one
                    optimizer step on the PCA loss of the normalised gradient ``Ĝ = G/‖G‖_F``::

                        L(P) = ‖P Pᵀ Ĝ − Ĝ‖²_F      (left; the right side uses Ĝᵀ and Q)
                        ∇L  = 2 (P PᵀS P + S P PᵀP − 2 S P),   S = Ĝ Ĝᵀ (never formed)

                    with AdamW (``pca_optimizer="adamw"``, torch's defaults β = (0.9, 0.999),
                    ε = 1e-8, decay 0.01, as the official ``torch.optim.AdamW([P], lr)``) or plain
                    SGD, at the learning rate ``pca_lr = 1/update_gap`` (the official
                    ``lr = 1/update_proj_gap``). No re-orthonormalisation (``orthonormalize=True``
                    adds a QR after each step). As in the official code, step ``t`` projects with
                    the basis ``P_t`` and then takes ``P_{t+1} = P_t − lr·AdamW(∇L(P_t; G_t))``;
                    that step is applied at the start of the next ``update`` from the stored
                    moments, so AdamW stores nothing beyond its moments. ``O(mnr)`` per step, no
                    SVD after the first. State: ``proj_osd_exp_avg``, ``proj_osd_exp_avg_sq``
                    (shaped as the stored basis; SGD keeps its pending gradient in the first),
                    ``proj_osd_step`` (gradient evaluations), ``proj_osd_pending``. Since the
                    basis moves at every step, the optimizers refuse ``subspace_change="reset"``.

Refresh schedule: ``update(grad, step)`` recomputes the basis when it is missing or when
``(step − offset) % update_gap == 0`` (``step`` counts from 0, as in galore-torch; ``offset`` is
``state["proj_offset"]``, 0 unless the optimizer staggers the refreshes of its matrices — option
``stagger_refresh``, see :mod:`rankwise.optim._common`), and returns whether it did
(``online_pca`` moves its basis at every call, see above). A per-parameter gap stored in the
state (``proj_gap``) overrides ``update_gap`` (Q-GaLore's lazy updates grow it).

State: everything a projector needs between steps lives in the dict ``state`` it is bound to
(in an optimizer, the parameter's ``optimizer.state[p]``), under keys starting ``proj_``:
``proj_basis`` (left: ``P`` ``m×r``; right: ``Qᵀ`` ``r×n``, both contiguous), ``proj_index``
(DCT/Hadamard column indices), ``proj_seed`` (random kinds). The objects themselves hold only
their configuration, so ``optimizer.state_dict()`` contains plain tensors and numbers and loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..errors import ConfigError

KINDS = ("svd", "randomized_svd", "random", "dct", "hadamard", "online_pca")
SIDES = ("auto", "reverse", "left", "right")
# galore-torch's names for the side
_SIDE_ALIASES = {"std": "auto", "reverse_std": "reverse"}

_INT64_MAX = torch.iinfo(torch.int64).max


def stable_randn(shape, seed: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal tensor drawn from a fresh generator seeded with ``seed`` (CPU generator
    unless ``device`` is CUDA), so the same seed gives the same matrix on every call; this is
    the draw galore-torch's relatives (APOLLO, Flora) use."""
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def next_seed(seed: int, advance: int = 15) -> int:
    """The seed after ``seed``: the last of ``advance`` int64 draws from a generator seeded with it."""
    gen = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(0, _INT64_MAX, (advance,), generator=gen)[-1])


def resolve_side(side: str, shape) -> str:
    """``"left"`` or ``"right"`` for a matrix of ``shape`` (m, n) under the requested ``side``."""
    side = _SIDE_ALIASES.get(side, side)
    m, n = int(shape[0]), int(shape[1])
    if side == "auto":
        return "right" if m >= n else "left"
    if side == "reverse":
        return "left" if m >= n else "right"
    return side


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Linear algebra runs in float32 for half/bfloat16 inputs, in the input dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its own storage of exactly ``numel`` elements, keeping its row- or column-major order
    (LAPACK returns column-major factors; keeping that order keeps matmuls bit-identical to code
    that uses the factor views directly)."""
    column_major = t.ndim == 2 and t.stride(0) == 1 and t.shape[0] > 1 and t.shape[1] > 1
    out = t.t().contiguous().t() if column_major else t.contiguous()
    if out.untyped_storage().nbytes() > out.numel() * out.element_size():
        out = out.t().clone().t() if column_major else out.clone()
    return out


class Projector:
    """Base class; see the module docstring. Subclasses implement :meth:`_refresh`."""

    kind = ""
    orthonormal = True

    def __init__(self, rank: int | float, *, side: str = "auto", update_gap: int = 200, scale: float = 1.0,
                 generator: torch.Generator | None = None, state: dict | None = None, shape=None):
        side_name = _SIDE_ALIASES.get(side, side)
        if side_name not in SIDES:
            raise ConfigError(f"{type(self).__name__}: side={side!r} is not one of {SIDES} "
                              "(or galore-torch's 'std' / 'reverse_std').")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not rank > 0 or (
                isinstance(rank, float) and rank >= 1):
            raise ConfigError(f"{type(self).__name__}: rank={rank!r} must be a positive int, or a float in "
                              "(0, 1) meaning that fraction of the projected dimension.")
        if isinstance(update_gap, bool) or not isinstance(update_gap, int) or update_gap < 1:
            raise ConfigError(f"{type(self).__name__}: update_gap={update_gap!r} must be an int ≥ 1 "
                              "(steps between basis refreshes).")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"{type(self).__name__}: scale={scale!r} must be a finite number > 0.")
        self.rank = rank
        self.requested_side = side_name
        self.update_gap = update_gap
        self.scale = float(scale)
        self.generator = generator
        self.state = {} if state is None else state
        self._side: str | None = None
        if shape is not None:
            self._bind_shape(shape)

    # ------------------------------------------------------------------ shape and side
    def _bind_shape(self, shape) -> None:
        if len(shape) != 2:
            raise ConfigError(f"{type(self).__name__}: expects a 2-D gradient, got shape {tuple(shape)}; "
                              "reshape it to (shape[0], -1) first.")
        self.shape = (int(shape[0]), int(shape[1]))
        self._side = resolve_side(self.requested_side, self.shape)

    @property
    def side(self) -> str:
        """``"left"`` or ``"right"`` once the shape is known, else the requested side."""
        return self._side or self.requested_side

    @property
    def dim(self) -> int:
        """Length of the projected dimension (``m`` for left, ``n`` for right)."""
        return self.shape[0] if self._side == "left" else self.shape[1]

    def effective_rank(self) -> int:
        """The rank used: ``rank``, or for a fraction ``ρ`` of the projected dimension ``d`` the
        ``round(ρ·d)`` of FRUGAL's official code (Python's round, half to even), at least 1; at
        most ``min(m, n)``."""
        r = self.rank if isinstance(self.rank, int) else max(1, round(self.rank * self.dim))
        return max(1, min(r, self.shape[0], self.shape[1]))

    # ------------------------------------------------------------------ basis
    @property
    def basis(self) -> torch.Tensor | None:
        """``P`` (``m×r``, left) or ``Q`` (``n×r``, right), or ``None`` before the first refresh."""
        thin = self._thin()
        if thin is None:
            return None
        return thin if self._side == "left" else thin.t()

    def _thin(self) -> torch.Tensor | None:
        """Stored layout: ``P`` (m×r) for left, ``Qᵀ`` (r×n) for right."""
        return self.state.get("proj_basis")

    def due(self, step: int) -> bool:
        gap = int(self.state.get("proj_gap", self.update_gap))
        return not self._thin_known() or (step - int(self.state.get("proj_offset", 0))) % gap == 0

    def _thin_known(self) -> bool:
        return "proj_basis" in self.state

    def update(self, grad: torch.Tensor, step: int) -> bool:
        """Refresh the basis from ``grad`` if it is missing or ``step`` is a refresh step.
        Returns ``True`` when the basis changed."""
        if self._side is None or getattr(self, "shape", None) != tuple(grad.shape):
            self._bind_shape(grad.shape)
        if not self.due(step):
            return False
        if not bool(torch.isfinite(grad).all()):  # one check per refresh: an SVD of NaNs raises mid-step()
            if self._thin_known():
                warnings.warn(f"{type(self).__name__}: the gradient at step {step} has NaN/inf entries; kept the "
                              "previous basis (lower the learning rate or clip gradients).", RuntimeWarning,
                              stacklevel=3)
                return False
            warnings.warn(f"{type(self).__name__}: the first gradient (step {step}) has NaN/inf entries; built the "
                          "basis from its finite part.", RuntimeWarning, stacklevel=3)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.no_grad():
            self._refresh(grad, step)
        return True

    def _refresh(self, grad: torch.Tensor, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ apply
    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """``Pᵀ G`` (left) or ``G Q`` (right)."""
        if self._side is None:
            self._bind_shape(grad.shape)
        thin = self._thin()
        if thin is None:
            raise ConfigError(f"{type(self).__name__}: project() before update(); call update(grad, step) "
                              "first to build the basis.")
        thin = thin.to(grad.dtype)
        return thin.t() @ grad if self._side == "left" else grad @ thin.t()

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        """``s · P low`` (left) or ``s · low Qᵀ`` (right)."""
        thin = self._thin().to(low.dtype)
        full = thin @ low if self._side == "left" else low @ thin
        return full * self.scale if self.scale != 1.0 else full

    def _store(self, thin: torch.Tensor, like: torch.Tensor) -> None:
        self.state["proj_basis"] = _compact(thin.to(like.dtype))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, side={self.side!r}, update_gap={self.update_gap}, "
                f"scale={self.scale})")


class SVDProjector(Projector):
    """Top-``r`` singular vectors of the gradient (GaLore)."""

    kind = "svd"

    def _refresh(self, grad, step):
        r = self.effective_rank()
        mat = grad.detach().to(_compute_dtype(grad))
        u, _, vh = torch.linalg.svd(mat, full_matrices=False)
        self._store(u[:, :r] if self._side == "left" else vh[:r], grad)


def _orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced")[0]


class _SeededMixin:
    """Integer seed kept in ``state["proj_seed"]`` and advanced with :func:`next_seed` at each draw."""

    def _init_seed(self, seed: int | None) -> None:
        self._seed0 = seed

    def _take_seed(self) -> int:
        if "proj_seed" not in self.state:
            if self._seed0 is not None:
                self.state["proj_seed"] = int(self._seed0)
            else:
                self.state["proj_seed"] = int(torch.randint(0, _INT64_MAX, (1,), generator=self.generator))
        seed = self.state["proj_seed"]
        self.state["proj_seed"] = next_seed(seed)
        return seed


class RandomizedSVDProjector(_SeededMixin, Projector):
    """Randomized range finder + small SVD (Halko et al., 2011), seeded."""

    kind = "randomized_svd"

    def __init__(self, rank, *, oversample: int = 8, power_iters: int = 1, seed: int | None = None, **kw):
        super().__init__(rank, **kw)
        if not isinstance(oversample, int) or oversample < 0:
            raise ConfigError(f"RandomizedSVDProjector: oversample={oversample!r} must be an int ≥ 0.")
        if not isinstance(power_iters, int) or power_iters < 0:
            raise ConfigError(f"RandomizedSVDProjector: power_iters={power_iters!r} must be an int ≥ 0.")
        self.oversample = oversample
        self.power_iters = power_iters
        self._init_seed(seed)

    def _refresh(self, grad, step):
        r = self.effective_rank()
        mat = grad.detach().to(_compute_dtype(grad))
        # work on A with the projected dimension as rows: its range is the wanted basis
        a = mat if self._side == "left" else mat.t()
        k = min(r + self.oversample, a.shape[0], a.shape[1])
        omega = stable_randn((a.shape[1], k), self._take_seed(), device=a.device, dtype=a.dtype)
        y = _orthonormal_columns(a @ omega)
        for _ in range(self.power_iters):
            y = _orthonormal_columns(a @ (a.t() @ y))
        ub = torch.linalg.svd(y.t() @ a, full_matrices=False)[0]
        basis = y @ ub[:, :r]  # (dim × r), orthonormal columns
        self._store(basis if self._side == "left" else basis.t(), grad)


class RandomProjector(_SeededMixin, Projector):
    """Gaussian ``N(0, 1/r)`` basis resampled at each refresh from an integer seed.

    The draw uses APOLLO's layout: left draws ``P`` as ``(m, r)``, right draws ``Qᵀ`` as ``(r, n)``,
    each from :func:`stable_randn` with the current seed, divided by ``√r``; the seed then advances
    with :func:`next_seed`. ``orthonormalize=True`` replaces the draw by its QR factor (then
    ``project_back(project(G))`` is an orthogonal projection)."""

    kind = "random"

    def __init__(self, rank, *, seed: int | None = None, orthonormalize: bool = False, **kw):
        super().__init__(rank, **kw)
        self._init_seed(seed)
        self.orthonormalize = bool(orthonormalize)
        self.orthonormal = self.orthonormalize

    def _refresh(self, grad, step):
        r = self.effective_rank()
        dtype = _compute_dtype(grad)
        seed = self._take_seed()
        if self._side == "left":
            thin = stable_randn((self.shape[0], r), seed, device=grad.device, dtype=dtype) / math.sqrt(r)
            if self.orthonormalize:
                thin = _orthonormal_columns(thin)
        else:
            thin = stable_randn((r, self.shape[1]), seed, device=grad.device, dtype=dtype) / math.sqrt(r)
            if self.orthonormalize:
                thin = _orthonormal_columns(thin.t()).t()
        self._store(thin, grad)


# ---------------------------------------------------------------------- fixed orthogonal bases
def dct_matrix_columns(k: int, index: torch.Tensor, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Columns ``index`` of the orthonormal DCT-II basis of size ``k``: ``B[i, j] = c_j cos(π(2i+1)j / 2k)``,
    ``c_0 = √(1/k)``, ``c_j = √(2/k)``. ``B`` is orthogonal; ``Bᵀ x`` is the orthonormal DCT-II of ``x``."""
    i = torch.arange(k, device=device, dtype=torch.float64).unsqueeze(1)
    j = index.to(device=device, dtype=torch.float64).unsqueeze(0)
    cols = torch.cos(math.pi * (2 * i + 1) * j / (2 * k)) * math.sqrt(2.0 / k)
    cols = torch.where(j == 0, cols / math.sqrt(2.0), cols)
    return cols.to(dtype)


def dct_rows(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along dim 0 of ``x`` (``k × n``), i.e. ``Bᵀ x``, by one FFT (Makhoul, 1980)."""
    k = x.shape[0]
    v = torch.cat([x[0::2], x[1::2].flip(0)], dim=0)
    spec = torch.fft.fft(v, dim=0)
    j = torch.arange(k, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(j), -math.pi * j / (2 * k)).unsqueeze(1)
    out = (spec * twiddle).real
    scale = torch.full((k, 1), math.sqrt(2.0 / k), dtype=x.dtype, device=x.device)
    scale[0] = math.sqrt(1.0 / k)
    return out * scale


def hadamard_matrix_columns(k: int, index: torch.Tensor, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Columns ``index`` of the normalised Sylvester–Hadamard matrix ``H[i, j] = (-1)^{popcount(i & j)} / √k``."""
    i = torch.arange(k, device=device).unsqueeze(1)
    bits = torch.bitwise_and(i, index.to(device).unsqueeze(0))
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return ((1 - 2 * parity).to(dtype)) / math.sqrt(k)


def hadamard_rows(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh–Hadamard transform along dim 0 (``k`` a power of two): ``Hᵀ x = H x``."""
    k = x.shape[0]
    y = x.clone()
    h = 1
    while h < k:
        y = y.view(k // (2 * h), 2, h, -1)
        a, b = y[:, 0], y[:, 1]
        y = torch.stack([a + b, a - b], dim=1).view(k, -1)
        h *= 2
    return y.view(x.shape) / math.sqrt(k)


class _FixedBasisProjector(Projector):
    """A fixed orthogonal basis of the projected dimension; the ``r`` columns with the largest
    gradient energy are picked at each refresh; only their indices are stored (``proj_index``)."""

    _basis_dtype = torch.float32

    def _columns(self, k, index, dtype, device):  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform_rows(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _thin_known(self) -> bool:
        return "proj_index" in self.state

    def _thin(self):
        index = self.state.get("proj_index")
        if index is None:
            return None
        cols = self._columns(self.dim, index, self._basis_dtype, index.device)
        return cols if self._side == "left" else cols.t()

    def _refresh(self, grad, step):
        r = self.effective_rank()
        mat = grad.detach().to(_compute_dtype(grad))
        a = mat if self._side == "left" else mat.t()
        coeff = self._transform_rows(a)  # (dim × other): coefficients in the basis
        energy = coeff.pow(2).sum(dim=1)
        self.state["proj_index"] = torch.topk(energy, r).indices
        self._basis_dtype = grad.dtype

    def project(self, grad):
        self._basis_dtype = grad.dtype
        return super().project(grad)


class DCTProjector(_FixedBasisProjector):
    """SVD-free: DCT-II columns chosen by gradient energy."""

    kind = "dct"

    def _columns(self, k, index, dtype, device):
        return dct_matrix_columns(k, index, dtype=dtype, device=device)

    def _transform_rows(self, x):
        return dct_rows(x)


class HadamardProjector(_FixedBasisProjector):
    """SVD-free: Walsh–Hadamard columns chosen by gradient energy (power-of-two dimension)."""

    kind = "hadamard"

    def _bind_shape(self, shape):
        super()._bind_shape(shape)
        k = self.dim
        if k & (k - 1):
            raise ConfigError(f"HadamardProjector: the projected dimension is {k} (gradient shape {self.shape}, "
                              f"side {self._side!r}), not a power of two; use kind='dct' for this parameter.")

    def _columns(self, k, index, dtype, device):
        return hadamard_matrix_columns(k, index, dtype=dtype, device=device)

    def _transform_rows(self, x):
        return hadamard_rows(x)


class OnlinePCAProjector(Projector):
    """Online Subspace Descent: one AdamW (or SGD) step on the PCA loss of the normalised gradient at
    every call (see the module docstring for the equations and the timing of the step).

    Options: ``pca_lr`` (default ``1/update_gap``), ``pca_optimizer`` ("adamw" | "sgd"),
    ``pca_betas``, ``pca_eps``, ``pca_weight_decay`` (AdamW's; torch's defaults), ``orthonormalize``
    (QR after each step; off, as in the official code)."""

    kind = "online_pca"
    OPTIMIZERS = ("adamw", "sgd")

    def __init__(self, rank, *, pca_lr: float | None = None, pca_optimizer: str = "adamw",
                 pca_betas=(0.9, 0.999), pca_eps: float = 1e-8, pca_weight_decay: float = 0.01,
                 orthonormalize: bool = False, **kw):
        super().__init__(rank, **kw)
        if pca_lr is not None and (isinstance(pca_lr, bool) or not isinstance(pca_lr, (int, float))
                                   or not math.isfinite(pca_lr) or not pca_lr > 0):
            raise ConfigError(f"OnlinePCAProjector: pca_lr={pca_lr!r} must be a finite number > 0, or None "
                              "(1/update_gap, the official Online Subspace Descent rate).")
        if pca_optimizer not in self.OPTIMIZERS:
            raise ConfigError(f"OnlinePCAProjector: pca_optimizer={pca_optimizer!r} must be one of "
                              f"{self.OPTIMIZERS}.")
        try:
            b1, b2 = (float(b) for b in pca_betas)
        except (TypeError, ValueError):
            raise ConfigError(f"OnlinePCAProjector: pca_betas={pca_betas!r} must be a pair of floats in "
                              "[0, 1).") from None
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConfigError(f"OnlinePCAProjector: pca_betas={pca_betas!r} must both lie in [0, 1).")
        if not isinstance(pca_eps, (int, float)) or not pca_eps >= 0:
            raise ConfigError(f"OnlinePCAProjector: pca_eps={pca_eps!r} must be ≥ 0.")
        if not isinstance(pca_weight_decay, (int, float)) or not pca_weight_decay >= 0:
            raise ConfigError(f"OnlinePCAProjector: pca_weight_decay={pca_weight_decay!r} must be ≥ 0.")
        self.pca_lr = None if pca_lr is None else float(pca_lr)
        self.pca_optimizer = pca_optimizer
        self.pca_betas = (b1, b2)
        self.pca_eps = float(pca_eps)
        self.pca_weight_decay = float(pca_weight_decay)
        self.orthonormalize = bool(orthonormalize)
        self.orthonormal = self.orthonormalize

    @property
    def lr(self) -> float:
        """The basis optimizer's learning rate: ``pca_lr``, else ``1 / update_gap``."""
        return self.pca_lr if self.pca_lr is not None else 1.0 / self.update_gap

    def due(self, step: int) -> bool:
        return True  # the basis moves at every step

    def update(self, grad: torch.Tensor, step: int) -> bool:
        """First call: the SVD basis. Later calls: apply the pending basis step (if any), then take the
        gradient of the PCA loss at the current basis and leave its step pending. Returns whether
        the basis changed."""
        if self._side is None or getattr(self, "shape", None) != tuple(grad.shape):
            self._bind_shape(grad.shape)
        with torch.no_grad():
            if "proj_basis" not in self.state:
                self._first_basis(grad)
                return True
            changed = self._apply_pending(grad)
            self._evaluate(grad)
        return changed

    # the stored basis (left: P, m×r; right: Qᵀ, r×n) is optimized in that layout, as the official
    # code does; the loss is the same function of P or of Q = (Qᵀ)ᵀ.
    def _first_basis(self, grad):
        r = self.effective_rank()
        mat = grad.detach().to(_compute_dtype(grad))
        u, _, vh = torch.linalg.svd(mat, full_matrices=False)
        self._store(u[:, :r] if self._side == "left" else vh[:r], grad)

    def _loss_grad(self, thin: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """``∇L`` in the stored layout at the basis ``thin``, or ``None`` for a zero gradient."""
        mat = grad.detach().to(thin.dtype)
        norm = torch.linalg.matrix_norm(mat)
        if not norm > 0:
            return None
        a = mat / norm
        a = a if self._side == "left" else a.t()  # (dim × other)
        p = thin if self._side == "left" else thin.t()
        sp = a @ (a.t() @ p)  # S P
        g = 2 * (p @ (p.t() @ sp) + sp @ (p.t() @ p) - 2 * sp)
        return g if self._side == "left" else g.t()

    def _evaluate(self, grad) -> None:
        st = self.state
        thin = st["proj_basis"].to(_compute_dtype(st["proj_basis"]))
        g = self._loss_grad(thin, grad)
        if g is None:  # G = 0: the loss is undefined; take no step
            return
        if "proj_osd_exp_avg" not in st:
            st["proj_osd_exp_avg"] = torch.zeros_like(thin)
            if self.pca_optimizer == "adamw":
                st["proj_osd_exp_avg_sq"] = torch.zeros_like(thin)
            st["proj_osd_step"] = 0
        st["proj_osd_step"] += 1
        if self.pca_optimizer == "sgd":
            st["proj_osd_exp_avg"].copy_(g)
        else:
            b1, b2 = self.pca_betas
            st["proj_osd_exp_avg"].lerp_(g, 1 - b1)
            st["proj_osd_exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        st["proj_osd_pending"] = True

    def _apply_pending(self, grad) -> bool:
        st = self.state
        if not st.get("proj_osd_pending", False):
            return False
        lr = self.lr
        thin = st["proj_basis"].to(_compute_dtype(st["proj_basis"]))
        m = st["proj_osd_exp_avg"]
        if self.pca_optimizer == "sgd":
            new = thin - lr * m
        else:  # torch.optim.AdamW's arithmetic: decay first, then the bias-corrected Adam step
            k = st["proj_osd_step"]
            b1, b2 = self.pca_betas
            new = thin * (1 - lr * self.pca_weight_decay)
            denom = (st["proj_osd_exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** k)).add_(self.pca_eps)
            new = new.addcdiv(m, denom, value=-lr / (1 - b1 ** k))
        if self.orthonormalize:
            new = _orthonormal_columns(new) if self._side == "left" else _orthonormal_columns(new.t()).t()
        st["proj_osd_pending"] = False
        self._store(new, grad)
        return True


_CLASSES: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "randomized_svd": RandomizedSVDProjector,
    "random": RandomProjector,
    "dct": DCTProjector,
    "hadamard": HadamardProjector,
    "online_pca": OnlinePCAProjector,
}


def make_projector(kind: str, rank: int | float, *, side: str = "auto", update_gap: int = 200, scale: float = 1.0,
                   generator: torch.Generator | None = None, **kw: Any) -> Projector:
    """Build a projector of ``kind`` (one of :data:`KINDS`).

    ``kw`` holds the kind's options (``seed``, ``oversample``, ``power_iters``, ``orthonormalize``,
    ``pca_lr``, ``pca_optimizer``, ``pca_betas``, ``pca_eps``, ``pca_weight_decay``) and ``state=``
    (the dict to keep tensors in) / ``shape=`` (fix the side now)."""
    cls = _CLASSES.get(kind)
    if cls is None:
        from ..errors import close_names

        raise ConfigError(f"make_projector: unknown projector kind {kind!r}; choose one of {KINDS}."
                          + close_names(str(kind), KINDS))
    try:
        return cls(rank, side=side, update_gap=update_gap, scale=scale, generator=generator, **kw)
    except TypeError as e:
        raise ConfigError(f"make_projector({kind!r}): {e}") from None
