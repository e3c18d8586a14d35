"""Affine map ``y = loc + L x`` with ``L`` diagonal or lower triangular."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FlowTransform

__all__ = ["Affine", "affine_call", "affine_inverse", "affine_log_det"]


def affine_call(x: Tensor, loc: Tensor, scale: Tensor | None, scale_tril: Tensor | None) -> Tensor:
    """``loc + diag(scale) x`` or ``loc + scale_tril x``."""
    if scale is not None:
        return loc + scale * x
    return loc + (scale_tril @ x.unsqueeze(-1)).squeeze(-1)


def affine_inverse(y: Tensor, loc: Tensor, scale: Tensor | None, scale_tril: Tensor | None) -> Tensor:
    """``L⁻¹ (y − loc)``: a division or one triangular solve."""
    if scale is not None:
        return (y - loc) / scale
    diff = (y - loc).unsqueeze(-1)
    tril = scale_tril.expand(diff.shape[:-2] + scale_tril.shape[-2:])
    return torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)


def affine_log_det(scale: Tensor | None, scale_tril: Tensor | None) -> Tensor:
    """``Σ_i log|L_ii|``."""
    diag = scale if scale is not None else scale_tril.diagonal(dim1=-2, dim2=-1)
    return diag.abs().log().sum(-1)


class Affine(FlowTransform):
    r"""``y = loc + L x``, ``log|det J| = Σ_i log|L_ii|``.

    ``L`` is ``diag(scale)`` or a lower-triangular ``scale_tril``; the inverse
    is a triangular solve. Holds tensors, not parameters: guides build it from
    their own parameters (it is the base Gaussian written as a transform).
    ``dim`` defaults to ``loc.shape[-1]`` (pass it under ``torch.jit.trace``,
    where that size is a traced tensor).
    """

    def __init__(
        self, loc: Tensor, scale: Tensor | None = None, scale_tril: Tensor | None = None, dim: int | None = None
    ):
        if (scale is None) == (scale_tril is None):
            raise ValueError("Affine needs exactly one of scale= and scale_tril=")
        if dim is not None and not torch.jit.is_tracing() and dim != loc.shape[-1]:
            raise ValueError(f"Affine: dim={dim} but loc has {loc.shape[-1]} entries")
        super().__init__(loc.shape[-1] if dim is None else dim)
        self.loc, self.scale, self.scale_tril = loc, scale, scale_tril
        self._log_det = affine_log_det(scale, scale_tril)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return affine_call(x, self.loc, self.scale, self.scale_tril), self._log_det.expand(x.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        return affine_inverse(y, self.loc, self.scale, self.scale_tril)
