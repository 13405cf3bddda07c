"""The low-rank gradient projector: which sides to project, how to find the subspace, project and project back.

Shared by GaLore (the optimizer state lives in the projected subspace, GaLore paper Eq. 5-6) and LoQT (P holds the
top-r singular vectors of a weight's gradient, LoQT paper Sec. 3.1). The projector of an m x n gradient G is stored
as plain float32 tensors (float64 for float64 weights): ``left`` (m x r, orthonormal columns) and/or ``right``
(r x n, orthonormal rows). The low-rank gradient is R = left^T G, G right^T, or left^T G right^T (``full``);
the update goes back as scale * left N, N right, or left N right (paper Eq. 5-6).

Refresh (``svd_method``):

* ``exact``: ``torch.linalg.svd``, bit-for-bit the reference implementation's choice (used for parity).
* ``subspace``: block subspace iteration with Rayleigh-Ritz (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1),
  O(m n r) instead of O(m n min(m, n)). It starts from the previous projector, which spans almost the same subspace
  T steps later, so one or two iterations suffice; the first refresh starts from a seeded Gaussian sketch.

The slices are copied (``.contiguous()`` of a slice keeps the full factor alive in the reference implementation, up to
32x the projector's memory at width 4096 and rank 128).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["low_rank_svd", "project", "project_back", "projection_sides", "refresh_projector"]

logger = logging.getLogger(__name__)
_OVERSAMPLE = 8


def projection_sides(proj_type: str, shape: torch.Size | tuple[int, ...]) -> tuple[bool, bool]:
    """``(use_left, use_right)`` for a weight of ``shape``; ``std`` keeps the larger side and projects the smaller."""
    m, n = shape
    if proj_type == "std":
        return (m < n, m >= n)
    if proj_type == "reverse_std":
        return (m >= n, m < n)
    if proj_type == "left":
        return (True, False)
    if proj_type == "right":
        return (False, True)
    if proj_type == "full":
        return (True, True)
    raise ValueError(f"proj_type must be one of std, reverse_std, left, right, full; got {proj_type!r}")


def project(grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """R = left^T G right^T (each factor optional), in at least float32."""
    low = grad.to(_compute_dtype(grad))
    if left is not None:
        low = left.t() @ low
    if right is not None:
        low = low @ right.t()
    return low


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def project_back(
    low: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """scale * left N right (each factor optional).

    The product is a fresh tensor whenever a factor is given, so it is scaled in place: a second m x n temporary
    (180 MB for a 4096 x 11008 float32 weight) would otherwise live beside it. Without factors ``low`` is the
    caller's tensor and is scaled out of place.
    """
    full = low
    if left is not None:
        full = left @ full
    if right is not None:
        full = full @ right
    return full * scale if full is low else full.mul_(scale)


def low_rank_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    start: torch.Tensor | None = None,
    iterations: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` singular vectors ``(U_r, Vh_r)`` of ``matrix`` (m x n, float32).

    ``start`` (m x k) is a basis to iterate from (the previous projector); missing columns up to ``rank`` plus a
    small oversampling are filled with a Gaussian sketch A @ Omega drawn from ``generator``.
    """
    m, n = matrix.shape
    width = min(rank + _OVERSAMPLE, m, n)
    blocks = [] if start is None else [start[:, :width]]
    missing = width - (0 if start is None else blocks[0].shape[1])
    if missing > 0:
        omega = torch.randn(n, missing, generator=generator, dtype=matrix.dtype, device="cpu").to(matrix.device)
        blocks.append(matrix @ omega)
    basis, _ = torch.linalg.qr(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
    for _ in range(iterations):
        row_basis, _ = torch.linalg.qr(matrix.t() @ basis)
        basis, _ = torch.linalg.qr(matrix @ row_basis)
    small_u, _, vh = torch.linalg.svd(basis.t() @ matrix, full_matrices=False)  # Rayleigh-Ritz on a (k x n) matrix
    return (basis @ small_u[:, :rank]).contiguous(), vh[:rank].contiguous()


def _exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank].contiguous(), vh[:rank].contiguous()


def refresh_projector(
    grad: torch.Tensor,
    rank: int,
    sides: tuple[bool, bool],
    *,
    method: str,
    previous: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    iterations: int = 2,
    generator: torch.Generator | None = None,
    name: str = "",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """New ``(left, right)`` projector from the gradient ``grad``, computed in float32 (or float64).

    A non-finite gradient keeps the previous projector (logged). If the exact SVD does not converge, the subspace
    iteration is used instead (logged), so a refresh never kills a run.
    """
    matrix = grad.detach().to(_compute_dtype(grad))
    prev_left, prev_right = previous
    if not torch.isfinite(matrix).all():
        if prev_left is not None or prev_right is not None:
            logger.warning(
                "projector: non-finite gradient for %s; keeping the previous projector", name or "a parameter"
            )
            return previous
        raise FloatingPointError(f"projector: non-finite gradient for {name or 'a parameter'} at its first projection")
    if method == "exact":
        try:
            u, vh = _exact_svd(matrix, rank)
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # LinAlgError subclasses RuntimeError on some builds
            logger.warning(
                "projector: exact SVD failed for %s (%s); using subspace iteration", name or "a parameter", err
            )
            u, vh = low_rank_svd(matrix, rank, iterations=max(iterations, 4), generator=generator)
    else:
        start = prev_left if prev_left is not None else (matrix @ prev_right.t() if prev_right is not None else None)
        u, vh = low_rank_svd(matrix, rank, start=start, iterations=iterations, generator=generator)
    use_left, use_right = sides
    return (u if use_left else None, vh if use_right else None)
