"""Inverse autoregressive flow (Kingma et al. 2016) with a MADE network (Germain et al. 2015)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch import Tensor, nn

from .base import ComposeFlow, FlowTransform, check_dim, check_hidden_dims
from .permute import check_permutation
from .stack import stack

__all__ = ["Conditioned", "InverseAutoregressive", "iaf_stack"]


class InverseAutoregressive(FlowTransform):
    r"""``y = σ ⊙ x + (1 − σ) ⊙ m`` with ``σ = sigmoid(s + b)``, ``(m, s) = MADE(x)``.

    ``m_i`` and ``s_i`` depend only on the coordinates before ``i`` in
    ``order`` (default ``0, 1, …, d−1``), so ``J`` is triangular in that order
    with diagonal ``σ`` and ``log|det J| = Σ_i log σ_i``, computed with
    ``logsigmoid``. This is the numerically stable form of eq. 15–16 of the
    paper; the bias ``b = sigmoid_bias`` (2 by default, ``σ ≈ 0.88``) starts
    the layer close to the identity.

    Cost: the forward map (sampling + density in a guide) is one network
    pass; the inverse ``x_i = (y_i − (1 − σ_i) m_i)/σ_i`` is filled in
    coordinate by coordinate in ``order``, ``d`` passes, and its last pass
    also gives ``log|det J|``. Read backwards this is MAF (Papamakarios et
    al. 2017): density evaluation is one pass of :meth:`params` and sampling
    takes ``d``, so a ``MaskedAutoregressive`` needs only the update inverted.
    ``σ`` has no lower bound, so the inverse expands by up to ``1/σ`` per
    coordinate and layer: its rounding error scales like ``|det J|⁻¹``, and
    far outside the bulk of the flow the exact preimage can exceed the float
    range (``inf``/``nan``), i.e. the density there is 0 to machine precision.

    The network is :class:`pyro.nn.AutoRegressiveNN` with ``param_dims=[1, 1]``
    (:class:`~pyro.nn.ConditionalAutoRegressiveNN` when ``context_dim > 0``,
    the context feeding every hidden unit). ``hidden_dims`` defaults to
    ``(3d + 1,)`` as in Pyro's ``affine_autoregressive``: MADE needs at least
    ``d`` units per layer for every degree to be connected, and about three
    per degree leaves room for nonlinearity. With ``d = 1``, ``m`` and ``s``
    depend only on biases (and the context): a learned affine map.

    With ``context_dim > 0`` the layer is a family ``f(·; c)``; use
    ``condition(c)`` to get the :class:`Conditioned` transform.

    Reference: Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling,
    "Improved Variational Inference with Inverse Autoregressive Flow",
    NeurIPS 2016; Germain, Gregor, Murray, Larochelle, "MADE: Masked
    Autoencoder for Distribution Estimation", ICML 2015.
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
    ):
        super().__init__(dim)
        hidden = check_hidden_dims((3 * dim + 1,) if hidden_dims is None else hidden_dims)
        if min(hidden) < dim:
            raise ValueError(f"hidden_dims must all be >= dim={dim} so that MADE connects every input, got {hidden}")
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim must be an integer >= 0 (0: no context), got {context_dim!r}")
        if (
            isinstance(sigmoid_bias, bool)
            or not isinstance(sigmoid_bias, (int, float))
            or not math.isfinite(sigmoid_bias)
        ):
            raise ValueError(f"sigmoid_bias must be a finite real number, got {sigmoid_bias!r}")
        order = torch.arange(dim) if order is None else check_permutation(order, dim, "order")

        self.hidden_dims = hidden
        self.context_dim = context_dim
        self.sigmoid_bias = float(sigmoid_bias)
        with warnings.catch_warnings():
            # Pyro suggests an affine map for input_dim = 1; a MADE whose outputs are biases is exactly that.
            warnings.filterwarnings("ignore", message=".*input_dim = 1", category=UserWarning)
            if context_dim:
                self.arn = ConditionalAutoRegressiveNN(
                    dim, context_dim, list(hidden), param_dims=[1, 1], permutation=order, nonlinearity=activation()
                )
            else:
                self.arn = AutoRegressiveNN(
                    dim, list(hidden), param_dims=[1, 1], permutation=order, nonlinearity=activation()
                )
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

    def condition(self, context: Tensor) -> Conditioned:
        """``f(·; context)``, sharing this layer's parameters.

        ``context`` has shape ``(*batch_c, context_dim)``; ``batch_c``
        broadcasts against the batch of the input, e.g. context ``(B, c)``
        with inputs ``(B, d)`` or ``(S, B, d)``.
        """
        if not self.context_dim:
            raise ValueError(f"context: {type(self).__name__} has context_dim=0 and takes no context")
        if not isinstance(context, Tensor) or context.dim() < 1 or context.shape[-1] != self.context_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be a tensor of shape (..., {self.context_dim}), got {shape}")
        return Conditioned(self, context)

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(y, log|det J|)`` for ``x`` given ``context`` (``None`` when ``context_dim = 0``)."""
        x, context = self._broadcast(x, context)
        m, s = self.params(x, context)
        logit = s + self.sigmoid_bias
        y = m + torch.sigmoid(logit) * (x - m)
        return y, F.logsigmoid(logit).sum(-1)

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(x, log|det J(x)|)`` for ``y = f(x; context)``, by ``d`` network passes."""
        y, context = self._broadcast(y, context)
        x = torch.zeros_like(y)
        for k in range(self.dim):
            # The coordinate of rank k depends on those of rank < k only, all known by now.
            m, s = self.params(x, context)
            logit = s + self.sigmoid_bias
            x = torch.where(self.rank == k, m + (y - m) / torch.sigmoid(logit), x)
        # The last pass saw every coordinate but the final one, on which no (m, s) depends.
        return x, F.logsigmoid(logit).sum(-1)

    def _broadcast(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not self.context_dim:
            return x, None
        if context is None:
            raise ValueError(
                f"context: {type(self).__name__} has context_dim={self.context_dim}; call .condition(context) "
                "and use the transform it returns"
            )
        try:
            batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"context batch shape {tuple(context.shape[:-1])} does not broadcast with the input batch shape "
                f"{tuple(x.shape[:-1])}"
            ) from None
        return x.expand(*batch, self.dim), context.expand(*batch, self.context_dim)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(x, None)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.invert(y, None)[0]

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.invert(y, None)


class Conditioned(FlowTransform):
    """A conditional layer bound to one context tensor: ``x ↦ layer(x; context)``.

    ``layer`` provides ``transform(x, context)`` and ``invert(y, context)``
    (both returning the log-determinant too) and is a submodule, so
    parameters are shared with it and gradients reach both the parameters and
    ``context``. Outputs have the broadcast batch shape of input and context.
    """

    def __init__(self, layer: FlowTransform, context: Tensor):
        super().__init__(layer.dim)
        self.layer = layer
        self.context = context

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_shape={tuple(self.context.shape)}"

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.transform(x, self.context)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.layer.invert(y, self.context)[0]

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer.invert(y, self.context)


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

    With ``context_dim > 0`` the result is a
    :class:`~.stack.ConditionalComposeFlow`: call ``condition(context)``.
    """
    check_dim(dim)

    def make_layer() -> InverseAutoregressive:
        return InverseAutoregressive(dim, hidden_dims, context_dim, activation=activation, sigmoid_bias=sigmoid_bias)

    return stack(make_layer, num_flows, dim=dim, permute=True)
