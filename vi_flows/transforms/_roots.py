"""Safeguarded Newton-bisection for batches of monotone scalar equations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


@torch.no_grad()
def solve_increasing(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    lo: Tensor,
    hi: Tensor,
    max_iter: int = 200,
) -> Tensor:
    """Root of ``g`` on ``[lo, hi]`` for strictly increasing ``g``, elementwise.

    ``fn(a)`` returns ``(g(a), g'(a))``. Newton steps that leave the current
    bracket fall back to bisection, so the bracket shrinks every iteration and
    convergence is guaranteed; iteration stops once every Newton step is below
    a few ulps of the iterate (machine precision).
    """
    lo, hi = torch.broadcast_tensors(lo, hi)
    lo, hi = lo.clone(), hi.clone()
    a = 0.5 * (lo + hi)
    tiny = torch.finfo(a.dtype).eps
    for _ in range(max_iter):
        g, dg = fn(a)
        lo = torch.where(g < 0, a, lo)
        hi = torch.where(g > 0, a, hi)
        step = g / dg
        newton = a - step
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        a_next = torch.where(inside, newton, 0.5 * (lo + hi))
        a_next = torch.where(g == 0, a, a_next)
        done = (a_next - a).abs() <= 4 * tiny * (1 + a.abs())
        a = a_next
        if bool(done.all()):
            break
    return a
