"""Planar flow (Rezende & Mohamed 2015, eq. 10 and appendix A.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._roots import solve_increasing
from .base import ContextHeadStack, FlowTransform

__all__ = ["ConditionalPlanar", "Planar", "PlanarStack"]

MARGIN = 1e-4


def planar_u_hat(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``(û, wᵀû)`` for ``u, w`` of shape ``(..., d)``: ``wᵀû = m(wᵀu) = −1 + δ + softplus(wᵀu)``."""
    wu = (w * u).sum(-1, keepdim=True)
    w_sq = (w * w).sum(-1, keepdim=True)
    # ‖w‖² = 0 makes the layer a shift for any û; avoid 0/0 there.
    w_sq = torch.where(w_sq > torch.finfo(w.dtype).tiny, w_sq, torch.ones_like(w_sq))
    m = F.softplus(wu) + (MARGIN - 1.0)
    return u + ((m - wu) / w_sq) * w, m.squeeze(-1)


def identity_u(w: Tensor) -> Tensor:
    """The ``u`` that makes ``û = 0`` (the identity): ``u = a w/‖w‖²`` with ``m(a) = 0``."""
    a = math.log(math.expm1(1.0 - MARGIN))  # softplus(a) = 1 − δ
    return a * w / (w * w).sum(-1, keepdim=True)


STARTS = ("identity", "random")


def planar_init(shape: tuple, dim: int, init_scale: float | None, start: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, w, b)`` of shapes ``(*shape, dim), (*shape, dim), shape``: ``w ~ U(−s, s)``, ``s = 1/√d`` by default.

    ``start="identity"``: ``û = 0`` and ``b = 0``; ``"random"``: ``u, b ~ U(−s, s)`` too, as Pyro's ``Planar``.
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {list(STARTS)}, got {start!r}")
    scale = 1.0 / math.sqrt(dim) if init_scale is None else init_scale
    if not scale > 0:
        raise ValueError(f"init_scale must be a positive float (or None for 1/sqrt(dim)), got {init_scale!r}")
    w = torch.empty(*shape, dim).uniform_(-scale, scale)
    if start == "identity":
        return identity_u(w), w, torch.zeros(shape)
    return torch.empty(*shape, dim).uniform_(-scale, scale), w, torch.empty(shape).uniform_(-scale, scale)


def _dot(x: Tensor, w: Tensor) -> Tensor:
    # one shared w (d,) is a matrix-vector product; per-example w (..., d) broadcasts
    return x @ w if w.dim() == 1 else (x * w).sum(-1)


def planar_call(x: Tensor, w: Tensor, b: Tensor, u_hat: Tensor, wu_hat: Tensor) -> tuple[Tensor, Tensor]:
    """One layer: ``y = x + û h``, ``h = tanh(wᵀx + b)``, ``log|det J| = log(1 + (1 − h²) wᵀû)``.

    ``w, û`` have shape ``(d,)`` or a batch ``(..., d)`` broadcasting with ``x`` (amortized
    layers), ``b`` and ``wᵀû`` the matching ``()`` or ``(...)``.
    """
    h = torch.tanh(_dot(x, w) + b)
    return x + h.unsqueeze(-1) * u_hat, torch.log1p((1 - h * h) * wu_hat)


def planar_inverse(y: Tensor, w: Tensor, b: Tensor, u_hat: Tensor, wu_hat: Tensor) -> Tensor:
    """Solve ``wᵀy = α + wᵀû tanh(α + b)`` for ``α = wᵀx``, then ``x = y − û tanh(α + b)``."""
    s = _dot(y, w)

    def g(alpha: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.tanh(alpha + b)
        return alpha + wu_hat * t - s, 1 + wu_hat * (1 - t * t)

    # |tanh| ≤ 1 brackets the root within |wᵀû| of wᵀy.
    reach = wu_hat.detach().abs()
    alpha = solve_increasing(g, s.detach() - reach, s.detach() + reach)
    if torch.is_grad_enabled():
        # One Newton step at the root carries the implicit-function gradient dα/dθ = −(∂g/∂θ)/g'.
        value, slope = g(alpha)
        alpha = alpha - value / slope.detach()
    return y - torch.tanh(alpha + b).unsqueeze(-1) * u_hat


class Planar(FlowTransform):
    r"""``y = x + û tanh(wᵀx + b)``.

    ``û = u + (m(wᵀu) − wᵀu) w/‖w‖²`` with ``m(a) = −1 + δ + softplus(a)`` keeps
    ``wᵀû > −1``, which makes the layer invertible. The paper has ``δ = 0``;
    then ``wᵀû`` rounds to exactly −1 once ``wᵀu < −37`` (float64) and the
    layer turns singular, so ``δ = 1e-4`` bounds ``|det J| ≥ 1e-4``.
    By the matrix determinant lemma ``log|det J| = log|1 + (1 − tanh²(wᵀx + b)) wᵀû|``, O(d).

    The inverse solves the scalar equation ``wᵀy = α + wᵀû tanh(α + b)``
    (strictly increasing in ``α``) by safeguarded Newton to machine precision,
    then ``x = y − û tanh(α + b)``. Its gradient is the implicit-function
    gradient, so ``log_prob`` of data trains the layer (maximum likelihood).

    By default it starts as the identity (``û = 0``, random ``w``), so a guide starts at
    its base Gaussian; the gradient with respect to ``u`` is not zero there.
    ``start="random"`` draws ``u, w, b ~ U(−s, s)`` as Pyro's ``Planar`` does: the
    layers then start bent in random directions, which helps a stack of many
    layers split mass between modes (measured in ``docs/benchmarks.md``).

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing
    Flows", ICML 2015.
    """

    def __init__(self, dim: int, init_scale: float | None = None, start: str = "identity"):
        super().__init__(dim)
        u, w, b = planar_init((), dim, init_scale, start)
        self.u, self.w, self.b = nn.Parameter(u), nn.Parameter(w), nn.Parameter(b)

    def u_hat(self) -> Tensor:
        """The constrained ``û``, with ``wᵀû > −1``."""
        return planar_u_hat(self.u, self.w)[0]

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat, wu_hat = planar_u_hat(self.u, self.w)
        return planar_call(x, self.w, self.b, u_hat, wu_hat)

    def _inverse(self, y: Tensor) -> Tensor:
        u_hat, wu_hat = planar_u_hat(self.u, self.w)
        return planar_inverse(y, self.w, self.b, u_hat, wu_hat)


class PlanarStack(FlowTransform):
    r"""``num_flows`` planar layers ``f_K ∘ … ∘ f_1`` with their parameters packed.

    Same math as :class:`Planar` (rows ``u_k, w_k, b_k`` of ``u, w, b``), but
    three parameter tensors instead of ``3K``; ``start`` as there. Pyro's optimizers keep one
    torch optimizer per parameter, and at small ``d`` that bookkeeping, not
    the math, dominates a step.
    """

    def __init__(self, dim: int, num_flows: int, init_scale: float | None = None, start: str = "identity"):
        super().__init__(dim)
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
        self.num_flows = num_flows
        u, w, b = planar_init((num_flows,), dim, init_scale, start)
        self.u, self.w, self.b = nn.Parameter(u), nn.Parameter(w), nn.Parameter(b)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_flows={self.num_flows}"

    def _layers(self):
        u_hat, wu_hat = planar_u_hat(self.u, self.w)
        return zip(self.w.unbind(0), self.b.unbind(0), u_hat.unbind(0), wu_hat.unbind(0))

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = 0.0
        for w, b, u_hat, wu_hat in self._layers():
            x, ladj = planar_call(x, w, b, u_hat, wu_hat)
            total = total + ladj
        return x, total

    def _inverse(self, y: Tensor) -> Tensor:
        for w, b, u_hat, wu_hat in reversed(list(self._layers())):
            y = planar_inverse(y, w, b, u_hat, wu_hat)
        return y


class ConditionalPlanar(ContextHeadStack):
    r"""``num_flows`` planar layers ``y = x + û(c) tanh(w(c)ᵀx + b(c))`` with ``(u, w, b)`` linear in ``c``.

    Per example and layer, ``w = W_w c + a_w``, ``b = W_b c + a_b`` and ``u = W_u c + a_u + u₀(w)``, where
    ``u₀(w)`` (:func:`identity_u`) makes ``û = 0``; ``W_u, a_u`` start at zero so that every layer starts as
    the identity for every context (``q`` starts as its Gaussian). ``û`` and
    ``log|det J| = log(1 + (1 − h²) wᵀû)`` are those of :class:`Planar`. Shapes: ``x (*batch_x, dim)``,
    ``context (*batch_c, context_dim)``, broadcasting (:class:`~.base.ConditionalFlowTransform`).

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015, §6.2.
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int):
        super().__init__(dim, num_flows, context_dim)
        k = self.num_flows
        self.heads = nn.ModuleList([nn.Linear(context_dim, k * dim), nn.Linear(context_dim, k * dim)])
        self.heads.append(nn.Linear(context_dim, k))
        nn.init.zeros_(self.heads[1].weight)
        nn.init.zeros_(self.heads[1].bias)

    def params(self, context: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(w, b, û, wᵀû)`` per layer, of shapes ``(*batch_c, d)`` (``w, û``) and ``(*batch_c,)`` (``b, wᵀû``)."""
        w, u, b = self._heads(context, self.dim, self.dim, 1)
        u_hat, wu_hat = planar_u_hat(u + identity_u(w), w)
        return list(zip(w.unbind(-2), b.squeeze(-1).unbind(-1), u_hat.unbind(-2), wu_hat.unbind(-1)))

    _layer_call = staticmethod(planar_call)
    _layer_inverse = staticmethod(planar_inverse)
