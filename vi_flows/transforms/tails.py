"""Sinh-arcsinh tails (Jones & Pewsey 2009): elementwise skew and tail weight, learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import FlowTransform

__all__ = ["SinhArcsinh", "sinh_arcsinh_call", "sinh_arcsinh_inverse"]

#: ``|τ| ≤ log 4``: tails from ``x^{1/4}`` to ``x^4`` of the Gaussian's. ``τ = log 2`` is an exponential tail
#: (the left tail of ``log τ`` in a hierarchical model); ``log 4`` is a Weibull tail of shape 1/2, heavier
#: than any posterior a Gaussian base should stretch to, and keeps ``sinh`` finite for any float32 noise.
TAIL_BOUND = math.log(4.0)


def _log_cosh(a: Tensor) -> Tensor:
    """``log cosh a`` without overflow: ``|a| + log1p(e^{−2|a|}) − log 2``."""
    a = a.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


def sinh_arcsinh_call(x: Tensor, skew: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    r"""``y = sinh(e^τ (asinh x + s))`` per coordinate, and ``log|det J|`` summed over the last dim.

    .. math::  \log|\det J| = Σ_i \log\cosh(e^{τ_i}(\operatorname{asinh} x_i + s_i)) + τ_i − ½\log(1 + x_i^2)

    ``x (..., d)``; ``skew, tail (d,)``. ``s = τ = 0`` is the identity.
    """
    a = torch.exp(tail) * (torch.asinh(x) + skew)
    return torch.sinh(a), (_log_cosh(a) + tail - 0.5 * torch.log1p(x * x)).sum(-1)


def sinh_arcsinh_inverse(y: Tensor, skew: Tensor, tail: Tensor) -> Tensor:
    """``x = sinh(e^{−τ} asinh y − s)``: closed form."""
    return torch.sinh(torch.exp(-tail) * torch.asinh(y) - skew)


class SinhArcsinh(FlowTransform):
    r"""``y_i = sinh(e^{τ_i}(\operatorname{asinh} x_i + s_i))``: a learned skew ``s`` and tail weight ``τ``.

    For large ``|x|``, ``|y| ≈ ½(2|x|)^{e^τ}``: a Gaussian ``x`` gets tails ``exp(−|y|^{2e^{−τ}}/2)``, heavier
    than Gaussian for ``τ > 0`` (exponential at ``τ = log 2``), lighter for ``τ < 0``. Affine, planar,
    coupling and spline layers all keep a Gaussian base's tails Gaussian; where the posterior's tail is
    heavier (a hierarchical scale's ``log τ``), importance weights blow up there and PSIS k̂ says so.
    This layer, last before the guide's affine map, lets the ELBO choose the tail per coordinate. It
    starts as the identity (``s = 0``, ``τ = 0``). ``τ = TAIL_BOUND · tanh(ρ / TAIL_BOUND)`` keeps
    ``|τ| ≤ log 4`` (:data:`TAIL_BOUND`). O(d); closed-form inverse.

    Reference: Jones & Pewsey, "Sinh-arcsinh distributions", Biometrika 96(4), 2009.
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        self.skew = nn.Parameter(torch.zeros(dim))
        self.raw_tail = nn.Parameter(torch.zeros(dim))

    def tail(self) -> Tensor:
        """``τ``, bounded to ``[−log 4, log 4]``."""
        return TAIL_BOUND * torch.tanh(self.raw_tail / TAIL_BOUND)

    def is_identity(self) -> bool:
        return not (self.skew.any() or self.raw_tail.any())

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return sinh_arcsinh_call(x, self.skew, self.tail())

    def _inverse(self, y: Tensor) -> Tensor:
        return sinh_arcsinh_inverse(y, self.skew, self.tail())
