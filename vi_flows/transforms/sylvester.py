"""Householder Sylvester flow (van den Berg, Hasenclever, Tomczak, Welling 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._roots import solve_increasing
from .base import ContextHeadStack, FlowTransform, check_dim

__all__ = ["ConditionalSylvester", "Sylvester", "householder_product", "sylvester_call", "sylvester_inverse"]

MARGIN = 1e-4


def householder_product(v: Tensor) -> Tensor:
    """``Q = H_1 ⋯ H_K``, ``H_k = I − 2 v_k v_kᵀ/‖v_k‖²``, for ``v`` of shape ``(..., K, d)``; shape ``(..., d, d)``."""
    d = v.shape[-1]
    q = torch.eye(d, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], d, d)
    for vk in v.unbind(-2):
        q = q - (2 / (vk * vk).sum(-1))[..., None, None] * (q @ vk.unsqueeze(-1)) * vk.unsqueeze(-2)
    return q


def sylvester_diagonals(diag_raw: Tensor, log_rt_diag: Tensor) -> tuple[Tensor, Tensor]:
    """``(R_ii, R̃_ii)`` with ``R̃_ii = exp(ρ_i)`` and ``R_ii R̃_ii = −1 + δ + softplus(a_i)`` (``a = diag_raw``)."""
    rt_diag = log_rt_diag.exp()
    return (F.softplus(diag_raw) + (MARGIN - 1.0)) / rt_diag, rt_diag


def identity_diag_raw() -> float:
    """The ``a_i`` that makes ``R_ii = 0``: ``softplus(a) = 1 − δ``."""
    return math.log(math.expm1(1.0 - MARGIN))


def _vecmat(x: Tensor, m: Tensor) -> Tensor:
    # rows xᵀM: one shared M (d, d) is a matrix product; per-example M (..., d, d) broadcasts
    return x @ m if m.dim() == 2 else (x.unsqueeze(-2) @ m).squeeze(-2)


def sylvester_call(x: Tensor, q: Tensor, r: Tensor, rt: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One layer: ``y = x + Q R h(R̃ Qᵀ x + b)``, ``log|det J| = Σ_i log(1 + R_ii R̃_ii h'(·)_i)``.

    ``q, r, rt`` have shape ``(d, d)`` or a batch ``(..., d, d)`` broadcasting with ``x`` (amortized
    layers), ``b`` the matching ``(d,)`` or ``(..., d)``; ``r, rt`` upper triangular.
    """
    v = _vecmat(x, q)  # Qᵀx
    h = torch.tanh(_vecmat(v, rt.mT) + b)
    y = _vecmat(v + _vecmat(h, r.mT), q.mT)
    ladj = torch.log1p((r.diagonal(dim1=-2, dim2=-1) * rt.diagonal(dim1=-2, dim2=-1)) * (1 - h * h)).sum(-1)
    return y, ladj


def sylvester_inverse(y: Tensor, q: Tensor, r: Tensor, rt: Tensor, b: Tensor) -> Tensor:
    """Back substitution for ``v = Qᵀx`` in ``Qᵀy = v + R h(R̃ v + b)``, then ``x = Q v``.

    Shapes as in :func:`sylvester_call`. Solved to machine precision; under autograd one Newton
    step of the full system at the root (Jacobian detached) leaves the value and carries the
    implicit-function gradient.
    """
    target = _vecmat(y, q)
    with torch.no_grad():
        v = _back_substitute(target.detach(), r.detach(), rt.detach(), b.detach())
    if torch.is_grad_enabled():
        h = torch.tanh(_vecmat(v, rt.mT) + b)
        residual = v + _vecmat(h, r.mT) - target
        eye = torch.eye(y.shape[-1], dtype=v.dtype, device=v.device)
        jac = eye + (r * (1 - h * h).unsqueeze(-2)) @ rt
        step = torch.linalg.solve_triangular(jac.detach(), residual.unsqueeze(-1), upper=True).squeeze(-1)
        v = v - step
    return _vecmat(v, q.mT)


def _back_substitute(target: Tensor, r: Tensor, rt: Tensor, b: Tensor) -> Tensor:
    d = target.shape[-1]
    batch = torch.broadcast_shapes(target.shape[:-1], r.shape[:-2], rt.shape[:-2], b.shape[:-1])
    target = target.expand(*batch, d)
    v = torch.zeros_like(target)
    h = torch.zeros_like(target)
    for i in reversed(range(d)):
        # v'_i = v_i + R_ii tanh(R̃_ii v_i + c_i) + e_i, with c_i, e_i known from coordinates > i.
        c = (v[..., i + 1 :] * rt[..., i, i + 1 :]).sum(-1) + b[..., i]
        e = (h[..., i + 1 :] * r[..., i, i + 1 :]).sum(-1)
        s = target[..., i] - e
        r_ii, rt_ii = r[..., i, i], rt[..., i, i]

        def g(a: Tensor, r_ii=r_ii, rt_ii=rt_ii, c=c, s=s) -> tuple[Tensor, Tensor]:
            t = torch.tanh(rt_ii * a + c)
            return a + r_ii * t - s, 1 + r_ii * rt_ii * (1 - t * t)

        # |tanh| ≤ 1 brackets the root within |R_ii| of s
        reach = r_ii.abs()
        v_i = solve_increasing(g, s - reach, s + reach)
        v[..., i] = v_i
        h[..., i] = torch.tanh(rt_ii * v_i + c)
    return v


class Sylvester(FlowTransform):
    r"""``y = x + Q R h(R̃ Qᵀ x + b)``, ``h = tanh``.

    ``Q`` is a product of ``num_householder`` Householder reflections
    (orthogonal), ``R`` and ``R̃`` are upper triangular ``d × d``. In the
    rotated coordinates ``v = Qᵀ x`` the map is ``v' = v + R h(R̃ v + b)``,
    whose Jacobian ``I + R diag(h') R̃`` is upper triangular, so by Sylvester's
    determinant identity ``log|det J| = Σ_i log|1 + R_ii R̃_ii h'(·)_i|``, O(d).

    Invertibility: ``v'_i`` depends on ``v_j, j ≥ i`` only, and on ``v_i``
    through ``v_i + R_ii h(R̃_ii v_i + c_i)``, strictly increasing when
    ``R_ii R̃_ii > −1`` (as ``0 < h' ≤ 1``). The diagonal is parameterized so:
    ``R̃_ii = exp(ρ_i) > 0`` (no loss: ``tanh`` is odd) and
    ``R_ii R̃_ii = −1 + δ + softplus(a_i)``, ``δ = 1e-4``, as in
    :class:`~.planar.Planar` (the paper's ``tanh`` diagonals cap
    ``|R_ii|, |R̃_ii| ≤ 1``; this does not).

    The inverse has no closed form; the triangular structure gives it by
    back substitution, ``i = d, …, 1``: one increasing scalar equation per
    coordinate, bracketed within ``|R_ii|`` of its target and solved by
    safeguarded Newton to machine precision (steps below 4 ulps). Its
    gradient is the implicit-function gradient ``∂x/∂θ = −J⁻¹ ∂F/∂θ`` (one
    Newton step of the full system at the root, ``J`` detached), so
    ``log_prob`` of data trains the layer. With ``R = 0`` it is the identity;
    it starts there.

    Reference: van den Berg, Hasenclever, Tomczak, Welling, "Sylvester
    Normalizing Flows for Variational Inference", UAI 2018.
    """

    def __init__(self, dim: int, num_householder: int | None = None):
        super().__init__(dim)
        k = dim if num_householder is None else num_householder
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_householder must be an integer >= 1 (default dim), got {num_householder!r}")
        self.num_householder = k
        self.householder = nn.Parameter(torch.randn(k, dim))
        self.r_upper = nn.Parameter(torch.zeros(dim, dim))
        self.rt_upper = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.diag_raw = nn.Parameter(torch.full((dim,), identity_diag_raw()))  # R_ii R̃_ii = 0
        self.log_rt_diag = nn.Parameter(torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_householder={self.num_householder}"

    def matrices(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q, R, R̃)``, each ``(dim, dim)``."""
        r_diag, rt_diag = sylvester_diagonals(self.diag_raw, self.log_rt_diag)
        r = self.r_upper.triu(1) + torch.diag(r_diag)
        rt = self.rt_upper.triu(1) + torch.diag(rt_diag)
        return householder_product(self.householder), r, rt

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return sylvester_call(x, *self.matrices(), self.b)

    def _inverse(self, y: Tensor) -> Tensor:
        return sylvester_inverse(y, *self.matrices(), self.b)


class ConditionalSylvester(ContextHeadStack):
    r"""``num_flows`` Householder Sylvester layers ``y = x + Q(c) R(c) tanh(R̃(c) Q(c)ᵀ x + b(c))``, all amortized.

    As in van den Berg et al.'s amortized Householder Sylvester flow, every parameter is a linear head of
    the context, per example and layer: one ``d × d`` matrix whose strict upper triangle is ``R``'s and whose
    strict lower triangle, transposed, is ``R̃``'s; the diagonals ``(a, ρ)`` of :class:`Sylvester`
    (``R̃_ii = exp ρ_i``, ``R_ii R̃_ii = −1 + δ + softplus(a_i) > −1``); ``b``; and the ``num_householder``
    vectors whose reflections make ``Q(c)``. ``log|det J| = Σ_i log(1 + R_ii R̃_ii h'(·)_i)``. The heads of
    ``R``'s entries start at zero (``R = 0``), so every layer starts as the identity for every context.
    Cost per example and layer: ``O(H d²)`` to form ``Q``, ``O(d²)`` to apply it; the inverse is
    :func:`sylvester_inverse` (back substitution). Shapes: ``x (*batch_x, dim)``,
    ``context (*batch_c, context_dim)``, broadcasting.

    ``num_householder`` default ``min(d, 8)``: ``d`` reflections reach every orthogonal ``Q``, and the cap
    bounds the ``O(H d²)`` cost per example at large ``d``.

    The heads read ``c / √C`` (``C = context_dim``): under Adam a head weight moves by about ``lr`` per step
    whatever its gradient, so an output ``Wc + a`` moves by about ``lr ‖c‖₁``; with ``d² + (H + 3) d``
    outputs per layer, unscaled heads made the flow per-example noise within a few steps and its gradient
    into ``c`` outgrew the Gaussian head's, collapsing the encoder (the digits VAE in
    ``docs/benchmarks.md``). The scale divides both by ``√C``.

    Reference: van den Berg, Hasenclever, Tomczak, Welling, "Sylvester Normalizing Flows for Variational
    Inference", UAI 2018, §3 and their amortized implementation.
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int, num_householder: int | None = None):
        super().__init__(dim, num_flows, context_dim)
        h = min(dim, 8) if num_householder is None else check_dim(num_householder, "num_householder")
        self.num_householder = h
        k = self.num_flows
        # heads: full (R above, R̃ below the diagonal), diag_raw a, log R̃_ii ρ, b, Householder vectors
        sizes = (dim * dim, dim, dim, dim, h * dim)
        self.heads = nn.ModuleList([nn.Linear(context_dim, k * s) for s in sizes])
        with torch.no_grad():
            full = self.heads[0]
            upper = torch.ones(dim, dim, dtype=torch.bool).triu(1).repeat(k, 1, 1).flatten()
            full.weight[upper] = 0.0
            full.bias[upper] = 0.0
            full.weight.mul_(1 / math.sqrt(dim))  # R̃'s rows: the scale of Sylvester's init
            nn.init.zeros_(self.heads[1].weight)
            nn.init.constant_(self.heads[1].bias, identity_diag_raw())
            nn.init.zeros_(self.heads[2].weight)
            nn.init.zeros_(self.heads[2].bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_householder={self.num_householder}"

    def params(self, context: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(Q, R, R̃, b)`` per layer, of shapes ``(*batch_c, d, d)`` and ``(*batch_c, d)`` (``b``)."""
        d = self.dim
        context = context * self.context_dim**-0.5
        full, diag_raw, log_rt_diag, b, v = self._heads(context, d * d, d, d, d, self.num_householder * d)
        full = full.unflatten(-1, (d, d))
        r_diag, rt_diag = sylvester_diagonals(diag_raw, log_rt_diag)
        r = full.triu(1) + torch.diag_embed(r_diag)
        rt = full.mT.triu(1) + torch.diag_embed(rt_diag)
        q = householder_product(v.unflatten(-1, (self.num_householder, d)))
        return list(zip(q.unbind(-3), r.unbind(-3), rt.unbind(-3), b.unbind(-2)))

    _layer_call = staticmethod(sylvester_call)
    _layer_inverse = staticmethod(sylvester_inverse)
