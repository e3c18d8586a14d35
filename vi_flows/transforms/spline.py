r"""Monotonic rational-quadratic spline couplings (Neural Spline Flows, Durkan et al. 2019).

On ``[−B, B]`` the spline has ``K`` bins with knots ``(x_k, y_k)``, ``k = 0..K``,
``x_0 = y_0 = −B``, ``x_K = y_K = B``, and positive derivatives ``δ_k`` at the knots
(``δ_0 = δ_K = 1``: the spline joins the identity outside ``[−B, B]`` with a
continuous derivative). In bin ``k``, with ``w_k = x_{k+1} − x_k``,
``h_k = y_{k+1} − y_k``, ``s_k = h_k / w_k`` and ``ξ = (x − x_k) / w_k`` (eq. 4, 5):

    y = y_k + h_k [s_k ξ² + δ_k ξ(1 − ξ)] / [s_k + σ_k ξ(1 − ξ)],   σ_k = δ_{k+1} + δ_k − 2 s_k,

    dy/dx = s_k² [δ_{k+1} ξ² + 2 s_k ξ(1 − ξ) + δ_k (1 − ξ)²] / [s_k + σ_k ξ(1 − ξ)]².

The inverse solves ``a ξ² + b ξ + c = 0`` (eq. 6–8) with ``a = h_k (s_k − δ_k) + (y − y_k) σ_k``,
``b = h_k δ_k − (y − y_k) σ_k``, ``c = −s_k (y − y_k) ≤ 0``; the root in ``[0, 1]`` is taken as
``ξ = 2c / (−b − √(b² − 4ac))`` (the paper's eq. 29). The textbook ``(−b + √·) / 2a`` is 0/0 in
nearly linear bins (``a → 0``); there ``b = h_k s_k − a > 0``, so ``−b − √·`` adds two negative
numbers and loses nothing.

Reference: Durkan, Bekasov, Murray, Papamakarios, "Neural Spline Flows", NeurIPS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import check_int, check_positive_int
from .base import ComposeFlow, FlowTransform
from .coupling import _Coupling, check_bound
from .networks import mlp
from .stack import ConditionalComposeFlow

__all__ = ["SplineCoupling", "check_spline_options", "rq_spline", "spline_stack"]

MIN_WIDTH = MIN_HEIGHT = MIN_DERIVATIVE = 1e-3


def _knots(raw: Tensor, bound: float, floor: float) -> tuple[Tensor, Tensor]:
    """Bin sizes ``2B (floor + (1 − K floor) softmax(raw))`` and the ``K + 1`` knots from ``−B`` to ``B``."""
    k = raw.shape[-1]
    e = torch.exp(raw - raw.detach().amax(-1, keepdim=True))  # softmax by hand: torch's is ~5x slower for K ~ 8
    size = 2 * bound * (floor + (1 - k * floor) * (e / e.sum(-1, keepdim=True)))
    knots = F.pad(torch.cumsum(size, -1), (1, 0)) - bound
    knots = torch.cat([knots[..., :-1], knots.new_full(knots[..., -1:].shape, bound)], -1)  # exactly B, no roundoff
    return knots[..., 1:] - knots[..., :-1], knots


def _derivatives(raw: Tensor, floor: float) -> Tensor:
    """Knot derivatives ``floor + softplus(raw + c)`` with ``softplus(c) = 1 − floor`` (raw 0 ↦ 1), ends fixed at 1."""
    shift = math.log(math.expm1(1 - floor))
    inner = floor + F.softplus(raw + shift)
    return F.pad(inner, (1, 1), value=1.0)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(-1, idx).squeeze(-1)


def rq_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float,
    inverse: bool = False,
    *,
    min_width: float = MIN_WIDTH,
    min_height: float = MIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotonic rational-quadratic spline on ``[−bound, bound]``, the identity outside.

    :param x: inputs ``(...)`` (outputs of the spline when ``inverse=True``).
    :param widths: unnormalized bin widths ``(..., K)``: ``w = 2B (min_width + (1 − K min_width) softmax)``.
    :param heights: unnormalized bin heights ``(..., K)``, likewise.
    :param derivatives: unconstrained derivatives at the ``K − 1`` inner knots ``(..., K − 1)``:
        ``δ = min_derivative + softplus(· + c)``, ``c`` such that 0 gives ``δ = 1`` (so all-zero
        parameters give the identity); ``δ = 1`` at ``±B``.
    :return: ``(y, log|dy/dx|)``, both of shape ``x.shape`` (per element), for the spline or,
        with ``inverse=True``, for its inverse (closed form, see the module docstring).
    """
    batch = torch.broadcast_shapes(x.shape, widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1])
    x = x.expand(batch)
    widths, heights = widths.expand(*batch, -1), heights.expand(*batch, -1)
    derivatives = derivatives.expand(*batch, -1)
    w, xk = _knots(widths, bound, min_width)
    h, yk = _knots(heights, bound, min_height)
    d = _derivatives(derivatives, min_derivative)
    inside = (x >= -bound) & (x <= bound)
    z = x.clamp(-bound, bound)  # outside values are replaced below; clamping keeps their gradients finite

    knots = yk if inverse else xk
    idx = (z.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)  # bin in 0..K−1
    w_k, h_k, x_k, y_k = _gather(w, idx), _gather(h, idx), _gather(xk, idx), _gather(yk, idx)
    d_k, d_k1 = _gather(d, idx), _gather(d, idx + 1)
    s = h_k / w_k
    sigma = d_k1 + d_k - 2 * s

    if inverse:
        dy = z - y_k
        a = h_k * (s - d_k) + dy * sigma
        b = h_k * d_k - dy * sigma
        c = -s * dy
        xi = 2 * c / (-b - (b * b - 4 * a * c).clamp(min=0).sqrt())
        xi = xi.clamp(0, 1)
        out = x_k + xi * w_k
    else:
        xi = (z - x_k) / w_k
    one = xi * (1 - xi)
    denom = s + sigma * one
    log_dydx = 2 * torch.log(s) + torch.log(d_k1 * xi**2 + 2 * s * one + d_k * (1 - xi) ** 2) - 2 * torch.log(denom)
    if inverse:
        return torch.where(inside, out, x), torch.where(inside, -log_dydx, torch.zeros_like(x))
    out = y_k + h_k * (s * xi**2 + d_k * one) / denom
    return torch.where(inside, out, x), torch.where(inside, log_dydx, torch.zeros_like(x))


def check_spline_options(bins: int = 8, bound: float = 5.0) -> tuple[int, float]:
    """``(bins, bound)`` of a :class:`SplineCoupling`, checked without building its network (for presets)."""
    return check_int(bins, "bins", 2, example=8), check_bound(bound, "bound")


class SplineCoupling(_Coupling):
    r"""``y₁ = x₁``, ``y₂ = g⁻¹(x₂; θ(x₁))``, ``g`` an elementwise rational-quadratic spline.

    ``θ(x₁[, c]) = MLP(·)`` gives, for each coordinate of ``x₂``, ``K`` widths, ``K``
    heights and ``K − 1`` inner derivatives of a spline on ``[−bound, bound]`` that is the
    identity outside (see :func:`rq_spline`); ``log|det J| = Σ log|∂y₂/∂x₂|``. As in zuko's
    ``NSF``, the spline itself maps data to noise: a density (:meth:`invert`) evaluates
    ``g``, a sample (:meth:`transform`) its closed-form inverse; each costs one network pass.
    Halves as in :class:`~.coupling.AffineCoupling` (``interleave=True``: odd/even-indexed
    coordinates; ``swap`` exchanges the roles). The last network layer starts at zero, so
    every bin starts with width and height ``2B/K`` and every derivative at 1: the layer
    starts as the identity. ``dim = 1``: a learned elementwise spline.

    Shapes: ``x (..., dim)``, ``context (..., context_dim)``; ``log|det J|`` has shape ``x.shape[:-1]``.

    Defaults, each for one reason: ``hidden_dims=(64, 64)`` and ``bins=8``, zuko's ``NSF``; ``bound=5``,
    the window a standard-normal coordinate leaves with probability 6e-7; ``interleave=True``, so in a
    stack every coordinate is changed conditioned on its neighbours (zuko's halves); ``activation=nn.ReLU``,
    as in the paper's conditioners.

    Reference: Durkan, Bekasov, Murray, Papamakarios, "Neural Spline Flows", NeurIPS 2019.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        bins: int = 8,
        bound: float = 5.0,
        context_dim: int = 0,
        interleave: bool = True,
        *,
        swap: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__(dim, hidden_dims, context_dim, swap, interleave)
        self.bins, self.bound = check_spline_options(bins, bound)
        changed = dim - self.split
        self.net = mlp(self.split + self.context_dim, self.hidden_dims, changed * (3 * bins - 1), activation)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dims={self.hidden_dims}, bins={self.bins}, bound={self.bound}, "
            f"context_dim={self.context_dim}, swap={self.swap}, interleave={self.interleave}"
        )

    def _spline(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        kept, changed = self._halves(x)
        theta = self.net(self._conditioner_input(kept, context)).unflatten(-1, (changed.shape[-1], 3 * self.bins - 1))
        widths, heights, derivatives = theta.split([self.bins, self.bins, self.bins - 1], -1)
        out, ladj = rq_spline(changed, widths, heights, derivatives, self.bound, inverse)
        return self._join(kept, out), ladj.sum(-1)

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)`` for ``x`` (noise side) given ``context`` (``None`` when ``context_dim = 0``)."""
        return self._spline(*self._broadcast(x, context), inverse=True)

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det J(x)|)`` for ``y = f(x; context)``, in one network pass."""
        x, ladj = self._spline(*self._broadcast(y, context), inverse=False)
        return x, -ladj


def spline_stack(
    dim: int,
    num_flows: int,
    hidden_dims: Sequence[int] = (64, 64),
    bins: int = 8,
    bound: float = 5.0,
    interleave: bool = True,
    *,
    context_dim: int = 0,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> ComposeFlow:
    """``num_flows`` :class:`SplineCoupling` layers whose halves alternate (``swap`` every other layer).

    ``f = f_K ∘ … ∘ f_1``, ``x (..., dim) → (..., dim)``; options as in :class:`SplineCoupling`.
    With ``context_dim > 0`` the result is a :class:`~.stack.ConditionalComposeFlow`.
    """
    check_positive_int(dim, "dim")
    check_positive_int(num_flows, "num_flows", example=4)
    parts: list[FlowTransform] = [
        SplineCoupling(dim, hidden_dims, bins, bound, context_dim, interleave, swap=bool(k % 2), activation=activation)
        for k in range(num_flows)
    ]
    return ConditionalComposeFlow(parts, dim) if context_dim else ComposeFlow(parts, dim)
