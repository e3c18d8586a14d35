"""Affine coupling layers (RealNVP, Dinh et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..validate import check_bool, check_hidden_dims, check_nonneg_int, check_positive_float, check_positive_int
from .base import ComposeFlow, ConditionalFlowTransform, FlowTransform
from .linear import InvertibleLinear
from .networks import _Constant as _Constant
from .networks import mlp, soft_bound
from .stack import ConditionalComposeFlow

__all__ = ["AffineCoupling", "coupling_stack", "mlp", "soft_bound"]


def check_bound(bound: float, name: str = "log_scale_bound") -> float:
    """A positive finite bound (a log-scale bound, a spline's window), as a float."""
    return check_positive_float(bound, name, example=3.0 if name == "log_scale_bound" else 5.0)


def check_context_dim(context_dim: int) -> int:
    """The width of a layer's context, ``0`` for none."""
    return check_nonneg_int(context_dim, "context_dim", example=0, note="0: no context")


class _Coupling(ConditionalFlowTransform):
    """What coupling layers share: the two halves of the input, the conditioner's input, and the way back.

    ``x₁`` (kept) are the first ``dim // 2`` coordinates (``swap=True``: the last ``dim // 2``), ``x₂``
    (changed) the rest; ``interleave=True``: ``x₁`` the odd-indexed coordinates (``swap``: the even ones).
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int], context_dim: int, swap: bool, interleave: bool) -> None:
        super().__init__(dim)
        self.hidden_dims = check_hidden_dims(hidden_dims)
        self.context_dim = check_context_dim(context_dim)
        self.swap, self.interleave = check_bool(swap, "swap"), check_bool(interleave, "interleave") and dim > 1
        if self.interleave:
            odd, even = slice(1, None, 2), slice(0, None, 2)
            self._keep, self._change = (even, odd) if swap else (odd, even)
        elif swap:
            self._keep, self._change = slice(dim - dim // 2, dim), slice(0, dim - dim // 2)
        else:
            self._keep, self._change = slice(0, dim // 2), slice(dim // 2, dim)
        index = torch.arange(dim)
        self.split = len(index[self._keep])
        # _join's permutation: (kept, changed) back to the coordinates' order
        self.register_buffer("_unshuffle", torch.argsort(torch.cat([index[self._keep], index[self._change]])), False)

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., self._keep], x[..., self._change]

    def _conditioner_input(self, kept: Tensor, context: Tensor | None) -> Tensor:
        return kept if context is None else torch.cat([kept, context], -1)

    def _join(self, kept: Tensor, changed: Tensor) -> Tensor:
        if self.interleave:
            return torch.cat([kept, changed], -1)[..., self._unshuffle]
        return torch.cat([changed, kept] if self.swap else [kept, changed], -1)


class AffineCoupling(_Coupling):
    r"""``y₁ = x₁``, ``y₂ = (x₂ − t(x₁)) ⊙ exp(s(x₁))``, ``log|det J| = Σ s(x₁)``.

    ``x₁`` are the first ``split = dim // 2`` coordinates (``swap=True``: the
    last ``split``), ``x₂`` the rest; with ``interleave=True``, ``x₁`` are the
    odd-indexed coordinates (``swap=True``: the even-indexed ones), as in
    zuko's ``RealNVP``. ``(s', t) = MLP(x₁[, context])``. The inverse is
    closed-form, ``x₂ = y₂ ⊙ exp(−s(y₁)) + t(y₁)``; both directions cost one
    network pass. This is RealNVP's ``y₂ = x₂ ⊙ exp(s) + t'`` with
    ``t' = −t exp(s)``: the same family, but the shift is added after the
    scaling in the density direction (as in zuko), which fit held-out data
    better. Stacks alternate the halves (a :class:`~.permute.Reverse` or
    :class:`~.linear.InvertibleLinear` between layers, see
    :func:`coupling_stack`).

    Shapes: ``x (..., dim)``, ``context (..., context_dim)``; ``log|det J|``
    has shape ``x.shape[:-1]``.

    Defaults, each for one reason:

    - ``hidden_dims=(64, 64)``: zuko's width, enough for the 2-D to 64-D
      targets of ``docs/benchmarks.md``.
    - ``interleave=False``: first/last halves; interleaved halves suit data
      whose neighbouring coordinates are correlated (images, see
      ``docs/benchmarks.md``).
    - ``log_scale_bound=3``: ``s = a·tanh(s'/a)``, ``a = 3``, scales a
      coordinate by at most ``e³`` per layer. Unbounded, one confident layer
      can scale by ``e^{20}`` and the product of such scales in a deep stack
      overflows the inverse; a hard clamp has zero gradient past the bounds
      (or, in Pyro's ``clamp_preserve_gradients``, not the gradient of the
      function computed); ``tanh`` is smooth, the identity near 0, and its
      gradient is the true one.
    - ``activation=nn.ReLU``: the usual choice for coupling conditioners
      (any name in :data:`~.networks.ACTIVATIONS` or an ``nn.Module`` class).

    The last network layer starts at zero, so the layer starts as the identity.
    With ``context_dim > 0`` the network also reads a context ``c``: use
    ``condition(c)``. ``dim = 1`` has nothing to condition on, and the layer
    is a learned elementwise affine map (plus the context, if any).

    Reference: Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real
    NVP", ICLR 2017.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        *,
        swap: bool = False,
        interleave: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        log_scale_bound: float = 3.0,
    ):
        super().__init__(dim, hidden_dims, context_dim, swap, interleave)
        self.log_scale_bound = check_bound(log_scale_bound)
        self.net = mlp(self.split + self.context_dim, self.hidden_dims, 2 * (dim - self.split), activation)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dims={self.hidden_dims}, context_dim={self.context_dim}, swap={self.swap}, "
            f"interleave={self.interleave}"
        )

    def _shift_log_scale(self, x1: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(self._conditioner_input(x1, context)).chunk(2, -1)
        return shift, soft_bound(raw, self.log_scale_bound)

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)`` for ``x`` given ``context`` (``None`` when ``context_dim = 0``)."""
        x, context = self._broadcast(x, context)
        x1, x2 = self._halves(x)
        shift, log_scale = self._shift_log_scale(x1, context)
        return self._join(x1, (x2 - shift) * log_scale.exp()), log_scale.sum(-1)

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det J(x)|)`` for ``y = f(x; context)``, in one network pass."""
        y, context = self._broadcast(y, context)
        y1, y2 = self._halves(y)
        shift, log_scale = self._shift_log_scale(y1, context)
        return self._join(y1, y2 * torch.exp(-log_scale) + shift), log_scale.sum(-1)


def coupling_stack(
    dim: int,
    num_flows: int,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    *,
    linear: bool = True,
    linear_init: str = "rotation",
    interleave: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    log_scale_bound: float = 3.0,
) -> ComposeFlow:
    """``num_flows`` :class:`AffineCoupling` layers, alternating halves.

    With ``linear=True`` (RealNVP + Glow's mixing) an
    :class:`~.linear.InvertibleLinear` precedes every coupling layer, so each
    layer conditions on a learned mix of all coordinates; otherwise the halves
    just alternate (``swap``); ``linear_init`` is passed on as its ``init``.
    ``interleave=True``: odd/even-indexed halves instead of first/last ones
    (see :class:`AffineCoupling`). With ``context_dim > 0`` the result is a
    :class:`~.stack.ConditionalComposeFlow`.
    """
    check_positive_int(dim, "dim")
    check_positive_int(num_flows, "num_flows", example=4)
    parts: list[FlowTransform] = []
    for k in range(num_flows):
        if linear and dim > 1:
            parts.append(InvertibleLinear(dim, linear_init))
        parts.append(
            AffineCoupling(
                dim,
                hidden_dims,
                context_dim,
                swap=bool(k % 2),
                interleave=interleave,
                activation=activation,
                log_scale_bound=log_scale_bound,
            )
        )
    return ConditionalComposeFlow(parts, dim) if context_dim else ComposeFlow(parts, dim)
