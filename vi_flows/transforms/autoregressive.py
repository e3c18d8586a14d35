"""Autoregressive flows on a MADE network (Germain et al. 2015): the gated IAF (Kingma et al. 2016), the
MAF (Papamakarios et al. 2017) and the affine IAF, its inverse."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import check_choice, check_float, check_int, check_nonneg_int, check_positive_int
from .base import ComposeFlow, ConditionalFlowTransform, Conditioned
from .coupling import check_bound
from .networks import MADE, made_hidden_dims, soft_bound
from .permute import check_permutation
from .stack import stack

__all__ = [
    "AffineInverseAutoregressive",
    "Autoregressive",
    "Conditioned",
    "InverseAutoregressive",
    "MaskedAutoregressive",
    "affine_iaf_stack",
    "iaf_stack",
    "maf_stack",
]


class Autoregressive(ConditionalFlowTransform):
    r"""What the autoregressive layers share: ``(m, s) = MADE(x[, c])`` with ``m_i, s_i`` functions of
    ``x_{order[:rank(i)]}`` only, so ``J`` is triangular in ``order``.

    The network is a :class:`~.networks.MADE` with the masks of
    :class:`pyro.nn.AutoRegressiveNN` (``param_dims=[1, 1]``; with
    ``context_dim > 0`` those of :class:`~pyro.nn.ConditionalAutoRegressiveNN`,
    the context feeding every hidden unit), its weights packed into few
    tensors. Subclasses say how ``(m, s)`` move a point (:meth:`transform`,
    :meth:`invert`); inverting the autoregressive direction fills the
    coordinates in one by one in ``order``, ``d`` network passes.

    Defaults: ``hidden_dims=(3d + 1,)`` as in Pyro's ``affine_autoregressive``
    (MADE connects every input only with at least ``d`` units per layer, and
    about three per degree leaves room for nonlinearity); ``order``
    ``0, 1, …, d−1`` (stacks vary it between layers); ``activation=nn.ReLU``,
    Pyro's. With ``d = 1``, ``m`` and ``s`` depend only on biases (and the
    context): a learned affine map. With ``context_dim > 0`` the layer is a
    family ``f(·; c)``; use ``condition(c)`` to get the :class:`Conditioned`
    transform.

    Shapes: ``x (..., dim)``, ``context (..., context_dim)``; ``log|det J|``
    has shape ``x.shape[:-1]``.

    Reference: Germain, Gregor, Murray, Larochelle, "MADE: Masked Autoencoder
    for Distribution Estimation", ICML 2015.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int = 0,
        *,
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__(dim)
        self.hidden_dims = made_hidden_dims(hidden_dims, dim)
        self.context_dim = check_nonneg_int(context_dim, "context_dim", note="0: no context")
        order = torch.arange(dim) if order is None else check_permutation(order, dim, "order")
        self.arn = MADE(dim, self.hidden_dims, context_dim, order=order, num_outputs=2, activation=activation)
        # rank[i]: the step of the inverse at which coordinate i is known
        self.register_buffer("rank", torch.argsort(order))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dims={self.hidden_dims}, context_dim={self.context_dim}"

    @property
    def order(self) -> Tensor:
        """The autoregressive order: ``y_order[k]`` depends on ``x_order[:k]``."""
        return self.arn.permutation

    def params(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """MADE outputs ``(m, s)``, each shaped like ``x`` (``context`` already broadcast to its batch)."""
        if self.context_dim:
            return self.arn(x, context)
        return self.arn(x)


class InverseAutoregressive(Autoregressive):
    r"""``y = σ ⊙ x + (1 − σ) ⊙ m``, ``σ = σ_min + (1 − σ_min) sigmoid(s + b)``, ``(m, s) = MADE(x)``.

    ``log|det J| = Σ_i log σ_i``, computed with ``logsigmoid``: the
    numerically stable form of eq. 15–16 of the paper. The forward map
    (sampling and the density of a sample, in a guide) is one network pass;
    the inverse ``x_i = (y_i − (1 − σ_i) m_i)/σ_i`` is ``d`` passes in
    ``order``, the last of which also gives ``log|det J|``. Network, order,
    context and shapes: :class:`Autoregressive`.

    Defaults, each for one reason:

    - ``sigmoid_bias=2`` (``b``): ``σ ≈ 0.88`` at the start, close to the
      identity, as the paper recommends.
    - ``min_scale=1e-3`` (``σ_min``): the paper's ``σ`` has no lower bound, so
      the inverse can expand by ``1/σ`` per coordinate and layer without
      limit, overflowing in float32 with trained weights; ``σ_min`` bounds
      that by ``1/σ_min`` and leaves the usual range of ``σ`` unchanged.
    - ``hidden_dims``, ``order``, ``activation``: see :class:`Autoregressive`.

    Reference: Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling,
    "Improved Variational Inference with Inverse Autoregressive Flow",
    NeurIPS 2016.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int = 0,
        *,
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        sigmoid_bias: float = 2.0,
        min_scale: float = 1e-3,
    ):
        super().__init__(dim, hidden_dims, context_dim, order=order, activation=activation)
        self.min_scale = check_float(min_scale, "min_scale", low=0.0, high=1.0, high_open=True, example=1e-3)
        self.sigmoid_bias = check_float(sigmoid_bias, "sigmoid_bias", example=2.0)

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)`` for ``x`` given ``context`` (``None`` when ``context_dim = 0``), one network pass."""
        x, context = self._broadcast(x, context)
        m, s = self.params(x, context)
        sigma, log_sigma = self._gate(s)
        return m + sigma * (x - m), log_sigma.sum(-1)

    def _gate(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """``σ = σ_min + (1 − σ_min) sigmoid(s + b)`` and ``log σ``, stably."""
        log_gate = F.logsigmoid(s + self.sigmoid_bias)
        if not self.min_scale:
            return log_gate.exp(), log_gate
        log_sigma = torch.logaddexp(
            torch.full_like(log_gate, math.log(self.min_scale)), log_gate + math.log1p(-self.min_scale)
        )
        return log_sigma.exp(), log_sigma

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det J(x)|)`` for ``y = f(x; context)``, by ``d`` network passes."""
        y, context = self._broadcast(y, context)
        x = torch.zeros_like(y)
        for k in range(self.dim):
            # The coordinate of rank k depends on those of rank < k only, all known by now.
            m, s = self.params(x, context)
            sigma, log_sigma = self._gate(s)
            x = torch.where(self.rank == k, m + (y - m) / sigma, x)
        # The last pass saw every coordinate but the final one, on which no (m, s) depends.
        return x, log_sigma.sum(-1)


def iaf_stack(
    dim: int,
    num_flows: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    *,
    activation: Callable[[], nn.Module] = nn.ReLU,
    sigmoid_bias: float = 2.0,
) -> ComposeFlow:
    """``num_flows`` :class:`InverseAutoregressive` layers with a :class:`~.permute.Reverse` between each pair.

    ``f = f_K ∘ R ∘ … ∘ R ∘ f_1``, ``x (..., dim) → (..., dim)``; the reversals let every output depend on
    every input. Options as in :class:`InverseAutoregressive`. With ``context_dim > 0`` the result is a
    :class:`~.stack.ConditionalComposeFlow`: call ``condition(context)``.
    """
    check_positive_int(dim, "dim")

    def make_layer() -> InverseAutoregressive:
        return InverseAutoregressive(dim, hidden_dims, context_dim, activation=activation, sigmoid_bias=sigmoid_bias)

    return stack(make_layer, num_flows, dim=dim, permute=True)


class MaskedAutoregressive(Autoregressive):
    r"""MAF: ``y_i = (x_i − m_i(y_{<i})) exp(a_i(y_{<i}))``, ``a = b·tanh(s/b)``, ``(m, s) = MADE(y)``.

    The autoregressive inputs are the *outputs* ``y``, so the density
    direction (inverse, ``x = y ⊙ exp(−a(y)) + m(y)``) is one network pass and
    sampling (forward) ``d`` passes in ``order``: the reverse of the IAF. Use
    MAF to fit data by maximum likelihood, an IAF as a guide.
    ``log|det J| = Σ_i a_i``. Network, order, context and shapes:
    :class:`Autoregressive`.

    Unlike the gated IAF's ``σ x + (1 − σ) m``, which only contracts (right
    for a guide starting at a broad Gaussian), the affine ``exp(a)`` can
    expand a narrow data set to unit scale. The shift is added after the
    scaling in the density direction (as in zuko's MAF), so it is not tied to
    the scale. The last network layer starts at zero, so the layer starts as
    the identity, as :class:`~.coupling.AffineCoupling` does (measurements of
    both choices: ``docs/benchmarks.md``, density).

    Defaults: ``log_scale_bound=3`` (``b``), for the reason given in
    :class:`~.coupling.AffineCoupling`; ``hidden_dims``, ``order``,
    ``activation``: see :class:`Autoregressive`.

    Reference: Papamakarios, Pavlakou, Murray, "Masked Autoregressive Flow for
    Density Estimation", NeurIPS 2017.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] | None = None,
        context_dim: int = 0,
        *,
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        log_scale_bound: float = 3.0,
    ):
        super().__init__(dim, hidden_dims, context_dim, order=order, activation=activation)
        self.log_scale_bound = check_bound(log_scale_bound)
        self.arn.zero_output_()  # m = a = 0: the identity map

    def _shift_log_scale(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        m, s = self.params(y, context)
        return m, soft_bound(s, self.log_scale_bound)

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)``: sampling direction, ``d`` network passes."""
        x, context = self._broadcast(x, context)
        y = torch.zeros_like(x)
        for k in range(self.dim):
            shift, log_scale = self._shift_log_scale(y, context)
            y = torch.where(self.rank == k, (x - shift) * log_scale.exp(), y)
        return y, log_scale.sum(-1)

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det J(x)|)``: density direction, one network pass."""
        y, context = self._broadcast(y, context)
        shift, log_scale = self._shift_log_scale(y, context)
        return y * torch.exp(-log_scale) + shift, log_scale.sum(-1)


class AffineInverseAutoregressive(MaskedAutoregressive):
    r"""Affine IAF: ``y = x ⊙ exp(−a(x)) + m(x)``, ``(m, a)`` autoregressive in ``x`` (Kingma et al. 2016, eq. 10).

    The inverse of :class:`MaskedAutoregressive` with the same network: sampling (and the density of a
    sample) is one network pass, the density of an arbitrary point ``d`` passes, as for
    :class:`InverseAutoregressive`. Unlike the gated IAF, whose contraction ``σ = sigmoid(s + 2) ≈ 0.88``
    shrinks every coordinate at the start, the last network layer starts at zero, so the layer starts
    as the identity: a guide built on it starts exactly at its base Gaussian. ``log|det J| = −Σ_i a_i``,
    ``a`` smoothly bounded by ``log_scale_bound`` (3: a layer scales a coordinate by at most ``e³``).
    Shapes and the other options: :class:`Autoregressive`.

    Reference: Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling, "Improved Variational Inference
    with Inverse Autoregressive Flow", NeurIPS 2016.
    """

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)``: one network pass."""
        y, ladj = super().invert(x, context)
        return y, -ladj

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det J(x)|)``: ``d`` network passes."""
        x, ladj = super().transform(y, context)
        return x, -ladj


def maf_stack(
    dim: int,
    num_flows: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    *,
    orders: str = "auto",
    seed: int = 0,
    activation: Callable[[], nn.Module] = nn.ReLU,
    log_scale_bound: float = 3.0,
) -> ComposeFlow:
    """``num_flows`` :class:`MaskedAutoregressive` layers, each in its own autoregressive order.

    ``f = f_K ∘ … ∘ f_1``, ``x (..., dim) → (..., dim)``. ``orders="reverse"``:
    the identity order with a :class:`~.permute.Reverse` between each pair of
    layers (two orders in all); ``"random"``: a random permutation per layer,
    drawn from a generator seeded with ``seed`` (as in Pyro's
    ``AutoRegressiveNN`` and zuko's ``MAF(randperm=True)``), no permutation
    layers; ``"auto"`` (default): ``"random"`` when ``dim > 2``, else
    ``"reverse"``, because with two orders only, coordinates far apart in the
    order interact through few layers, while in 2-D the two orders are all
    there is (measurements: ``docs/benchmarks.md``, density). ``seed=0``:
    the same orders on every call, so a rebuilt stack matches a saved state.
    Other options as in :class:`MaskedAutoregressive`.

    With ``context_dim > 0`` the result is a :class:`~.stack.ConditionalComposeFlow`.
    """
    return _ordered_stack(
        MaskedAutoregressive, dim, num_flows, hidden_dims, context_dim, orders, seed, activation, log_scale_bound
    )


def affine_iaf_stack(
    dim: int,
    num_flows: int,
    hidden_dims: Sequence[int] | None = None,
    context_dim: int = 0,
    *,
    orders: str = "auto",
    seed: int = 0,
    activation: Callable[[], nn.Module] = nn.ReLU,
    log_scale_bound: float = 3.0,
) -> ComposeFlow:
    """``num_flows`` :class:`AffineInverseAutoregressive` layers, orders as in :func:`maf_stack`."""
    return _ordered_stack(
        AffineInverseAutoregressive, dim, num_flows, hidden_dims, context_dim, orders, seed, activation, log_scale_bound
    )


def _ordered_stack(layer, dim, num_flows, hidden_dims, context_dim, orders, seed, activation, log_scale_bound):
    check_positive_int(dim, "dim")
    check_choice(orders, ("auto", "reverse", "random"), "orders")
    seed = check_int(seed, "seed", None)
    if orders == "auto":
        orders = "random" if dim > 2 else "reverse"
    gen = torch.Generator().manual_seed(seed)

    def make_layer() -> MaskedAutoregressive:
        order = torch.randperm(dim, generator=gen) if orders == "random" else None
        return layer(dim, hidden_dims, context_dim, order=order, activation=activation, log_scale_bound=log_scale_bound)

    return stack(make_layer, num_flows, dim=dim, permute=orders == "reverse")
