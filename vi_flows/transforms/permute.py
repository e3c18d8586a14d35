"""Coordinate permutations: the free mixing step between autoregressive layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import FlowTransform

__all__ = ["Permute", "Reverse", "check_permutation"]


class Permute(FlowTransform):
    r"""``y_i = x_{π(i)}``, with ``log|det J| = 0``.

    ``permutation`` is a rearrangement of ``range(dim)``; the default reverses
    the coordinates. ``π`` and ``π⁻¹`` are buffers, so ``.to(device)`` moves
    them and they round-trip through ``state_dict``. Shapes: ``x (..., dim)``;
    ``log|det J| = 0`` has shape ``x.shape[:-1]``.
    """

    volume_preserving = True

    def __init__(self, dim: int, permutation: Sequence[int] | Tensor | None = None):
        super().__init__(dim)
        if permutation is None:
            perm = torch.arange(dim - 1, -1, -1)
        else:
            perm = check_permutation(permutation, dim)
        self.register_buffer("permutation", perm)
        self.register_buffer("inv_permutation", torch.argsort(perm))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, permutation={self.permutation.tolist()}"

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        return y[..., self.inv_permutation]

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._inverse(y), y.new_zeros(y.shape[:-1])


class Reverse(Permute):
    """``y = (x_d, …, x_1)``: :class:`Permute` with its default permutation."""

    def __init__(self, dim: int):
        super().__init__(dim)


def check_permutation(permutation: Sequence[int] | Tensor, dim: int, name: str = "permutation") -> Tensor:
    """``permutation`` as a long tensor, or ValueError unless it rearranges ``range(dim)``."""
    try:
        perm = torch.as_tensor(permutation)
    except (TypeError, ValueError, RuntimeError):
        perm = None
    ok = (
        perm is not None
        and perm.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        and perm.shape == (dim,)
        and torch.equal(torch.sort(perm.cpu()).values, torch.arange(dim, dtype=perm.dtype))
    )
    if not ok:
        raise ValueError(f"{name} must be a rearrangement of range({dim}), got {permutation!r}")
    return perm.to(torch.long).clone()
