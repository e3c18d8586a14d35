"""Invertible linear map with an LU parameterization (Glow's 1×1 convolution, vector form)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..validate import check_choice
from .base import FlowTransform

__all__ = ["InvertibleLinear"]


class InvertibleLinear(FlowTransform):
    r"""``y = W x`` with ``W = P L (U + diag(s))``, ``log|det J| = Σ_i log|s_i|``.

    ``P`` is a fixed permutation (a buffer), ``L`` unit lower triangular,
    ``U`` strictly upper triangular and ``s = sign ⊙ exp(log|s|)`` with a
    fixed sign, so the log-determinant costs O(d) and ``W`` is invertible by
    construction. The inverse ``x = (U + diag s)⁻¹ L⁻¹ Pᵀ y`` is two
    triangular solves, O(d²) per point, never a general matrix inverse (for
    batches of ``≥ d`` points the solves are applied to ``Pᵀ`` once and the
    result multiplies the batch).

    Initialized, as in Glow, from the LU factors of a random rotation
    (``init="rotation"``): the layer starts volume preserving
    (``|det W| = 1``) and mixes all coordinates. ``init="identity"``
    (``P = L = I``, ``U = 0``, ``s = 1``) suits guides, which must start at
    their base Gaussian.

    Shapes: ``x (..., dim)``; ``log|det J|`` has shape ``x.shape[:-1]``.

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1×1
    Convolutions", NeurIPS 2018, section 3.2.
    """

    def __init__(self, dim: int, init: str = "rotation"):
        super().__init__(dim)
        self.init = check_choice(init, ("rotation", "identity"), "init")
        q = torch.eye(dim, dtype=torch.float64)
        if init == "rotation":
            q = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = upper.diagonal()
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("signs", s.sign().to(dtype))
        self.lower = nn.Parameter(lower.tril(-1).to(dtype))
        self.upper = nn.Parameter(upper.triu(1).to(dtype))
        self.log_scale = nn.Parameter(s.abs().log().to(dtype))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.signs * self.log_scale.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """``W = P L (U + diag s)``, shape ``(dim, dim)``."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x @ self.weight().mT
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        lower, upper = self._factors()
        rows = y.reshape(-1, self.dim)
        if rows.shape[0] >= self.dim:
            # Many points: the same two solves applied to the columns of Pᵀ (O(d³) once), then one matmul,
            # which BLAS runs faster than a batched triangular solve (about 1.5× at d = 64, 256 points).
            a = torch.linalg.solve_triangular(lower, self.perm.mT, upper=False, unitriangular=True)
            return y @ torch.linalg.solve_triangular(upper, a, upper=True).mT
        rows = rows @ self.perm  # rows of Pᵀ y
        # For row vectors r, L a = r reads aᵀ Lᵀ = rᵀ (solve from the right, Lᵀ upper).
        a = torch.linalg.solve_triangular(lower.mT, rows, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.mT, a, upper=False, left=False)
        return x.reshape(y.shape)

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._inverse(y), self.log_scale.sum().expand(y.shape[:-1])
