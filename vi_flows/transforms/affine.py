"""Affine map ``y = loc + L x`` with ``L`` diagonal or lower triangular."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FlowTransform

__all__ = ["Affine"]


class Affine(FlowTransform):
    r"""``y = loc + L x``, ``log|det J| = Σ_i log|L_ii|``.

    ``L`` is ``diag(scale)`` or a lower-triangular ``scale_tril``; the inverse
    is a triangular solve. Holds tensors, not parameters: guides build it from
    their own parameters (it is the base Gaussian written as a transform).
    """

    def __init__(self, loc: Tensor, scale: Tensor | None = None, scale_tril: Tensor | None = None):
        if (scale is None) == (scale_tril is None):
            raise ValueError("Affine needs exactly one of scale= and scale_tril=")
        super().__init__(loc.shape[-1])
        self.loc, self.scale, self.scale_tril = loc, scale, scale_tril
        diag = scale if scale is not None else scale_tril.diagonal(dim1=-2, dim2=-1)
        self._log_det = diag.abs().log().sum(-1)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.scale is not None:
            y = self.loc + self.scale * x
        else:
            y = self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)
        return y, self._log_det.expand(x.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        if self.scale is not None:
            return (y - self.loc) / self.scale
        diff = (y - self.loc).unsqueeze(-1)
        tril = self.scale_tril.expand(diff.shape[:-2] + self.scale_tril.shape[-2:])
        return torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
