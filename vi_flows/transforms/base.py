"""The contract every vi_flows transform follows.

A flow layer is a bijection ``f: R^d -> R^d`` acting on the last dimension.
Besides the :class:`torch.distributions.Transform` API it offers
:meth:`FlowTransform.call_and_ladj`, which returns ``y = f(x)`` and
``log|det df/dx|`` from one pass (as in zuko), so a guide's sample and
log-density cost one sweep through the stack.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints

from ..validate import check_hidden_dims, check_positive_int
from .networks import ACTIVATIONS, activation_factory  # noqa: F401  (re-exported: older import path)

__all__ = [
    "ComposeFlow",
    "ConditionalFlowTransform",
    "Conditioned",
    "ContextHeadStack",
    "FlowTransform",
    "check_dim",
    "check_hidden_dims",
]


def check_dim(dim: int, name: str = "dim") -> int:
    """An integer ``>= 1`` (a dimension); :func:`vi_flows.validate.check_positive_int`."""
    return check_positive_int(dim, name)


class FlowTransform(TransformModule):
    """A bijection of ``R^dim`` with an exact log-determinant.

    Subclasses implement ``call_and_ladj(x) -> (y, log|det J|)`` and
    ``_inverse(y)``; ``_call`` and ``log_abs_det_jacobian`` follow from them.
    The last ``(x, y, ladj)`` triple is cached, so ``log_abs_det_jacobian`` of
    a pair just produced costs nothing.

    Conditional layers (a family ``f(·; c)``, ``context_dim > 0``) also
    implement ``transform(x, context)`` and ``invert(y, context)``, both
    returning the log-determinant; :meth:`condition` binds a context.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    context_dim: int = 0

    def __init__(self, dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.dim = check_dim(dim)
        self._last: tuple | None = None

    def __hash__(self):  # nn.Module and Transform both define __hash__
        return super(torch.nn.Module, self).__hash__()

    __repr__ = torch.nn.Module.__repr__  # Transform's would hide extra_repr

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def __getstate__(self):
        state = super().__getstate__()
        state["_last"] = None
        return state

    # The sign of det J where the layer's type fixes it (+1: orientation-preserving), else None.
    _sign: int | None = None

    @property
    def sign(self) -> int:
        """The sign of ``det J`` (``+1`` or ``-1``) where the layer's type fixes it; absent otherwise.

        Absent means ``AttributeError`` (``hasattr(layer, "sign")`` is ``False``), not the
        ``NotImplementedError`` of :attr:`torch.distributions.Transform.sign`: ``torch.jit.trace_module``
        probes every attribute of every submodule with ``hasattr``, and any other error aborts the trace
        (``JitTrace_ELBO``, a traced guide or ``Predictive``).
        """
        if self._sign is None:
            raise AttributeError(f"{type(self).__name__}: the sign of its Jacobian determinant is not known")
        return self._sign

    def is_identity(self) -> bool:
        """``True`` only when the layer is provably the identity map with its present parameters.

        ``False`` means "not proven": a layer type that cannot tell keeps this default. Used to answer
        moments and quantiles in closed form (:class:`~vi_flows.distributions.FlowDistribution`).
        """
        return False

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

    def _check_input(self, x: Tensor, arg: str = "x") -> None:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}(dim={self.dim}) expects {arg} with last dimension {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )

    # The last (x, y, ladj) is remembered by tensor identity *and* the parameters' version counters:
    # an optimizer step updates parameters in place, after which the same input tensor must be recomputed.
    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.parameters())

    def _remember(self, x: Tensor, y: Tensor, ladj: Tensor | None) -> None:
        if self._cache_size:
            self._last = (x, y, ladj, self._versions())

    def _recall(self, x: Tensor | None = None, y: Tensor | None = None) -> tuple | None:
        last = self._last
        if last is None or (x is not None and x is not last[0]) or (y is not None and y is not last[1]):
            return None
        return last if last[3] == self._versions() else None

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``f(x)`` and ``log|det df/dx|`` (shape ``x.shape[:-1]``)."""
        self._check_input(x)
        y, ladj = self._call_and_ladj(x)
        self._remember(x, y, ladj)
        return y, ladj

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def __call__(self, x: Tensor) -> Tensor:
        last = self._recall(x=x)
        return last[1] if last is not None else self.call_and_ladj(x)[0]

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``x = f⁻¹(y)`` and ``log|det df/dx|`` at that ``x``."""
        last = self._recall(y=y)
        if last is not None and last[2] is not None:
            return last[0], last[2]
        self._check_input(y, "y")
        x, ladj = self._inverse_and_ladj(y)
        self._remember(x, y, ladj)
        return x, ladj

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # Layers whose inverse yields the log-determinant for free override this.
        x = self._inverse(y)
        return x, self._call_and_ladj(x)[1]

    def _inv_call(self, y: Tensor) -> Tensor:
        last = self._recall(y=y)
        if last is not None:
            return last[0]
        self._check_input(y, "y")
        x = self._inverse(y)
        self._remember(x, y, None)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last = self._recall(x=x, y=y)
        if last is not None and last[2] is not None:
            return last[2]
        return self.call_and_ladj(x)[1]


class ConditionalFlowTransform(FlowTransform):
    r"""The conditioning protocol: a layer ``f(·; c)`` whose parameters may depend on a context ``c``.

    Subclasses implement ``transform(x, context) -> (f(x; c), log|det ∂f/∂x|)`` and
    ``invert(y, context) -> (f⁻¹(y; c), log|det ∂f/∂x|)`` at that ``x``. Shapes: ``x, y (*batch_x, dim)``,
    ``context (*batch_c, context_dim)`` with ``batch_c`` broadcasting against ``batch_x`` (a context
    ``(B, c)`` serves inputs ``(B, d)`` and ``(S, B, d)``); outputs have the broadcast batch shape.
    :meth:`~FlowTransform.condition` binds one context (:class:`Conditioned`). With ``context_dim = 0``
    the context is None and the layer is a plain one; with ``context_dim > 0`` calling the layer without a
    context is refused, naming :meth:`~FlowTransform.condition`. :meth:`_context_batch` checks a pair,
    :meth:`_broadcast` expands it.
    """

    def _context_batch(self, x: Tensor, context: Tensor | None) -> torch.Size | None:
        """The broadcast batch shape of ``x`` and ``context`` (None without a context); ValueError if none."""
        if not self.context_dim:
            return None
        if context is None:
            raise ValueError(
                f"context: {type(self).__name__} has context_dim={self.context_dim}; call .condition(context) "
                "and use the transform it returns"
            )
        try:
            return torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"context batch shape {tuple(context.shape[:-1])} does not broadcast with the input batch shape "
                f"{tuple(x.shape[:-1])}"
            ) from None

    def _broadcast(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(x, context)`` expanded to their broadcast batch shape (``context`` None without one)."""
        batch = self._context_batch(x, context)
        if batch is None:
            return x, None
        # no expand where the shape is already the batch's: each would be one more autograd node
        if x.shape[:-1] != batch:
            x = x.expand(*batch, self.dim)
        if context.shape[:-1] != batch:
            context = context.expand(*batch, self.context_dim)
        return x, context

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(x, None)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.invert(y, None)[0]

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.invert(y, None)


class ContextHeadStack(ConditionalFlowTransform):
    r"""``num_flows`` layers ``f_K(·; θ_K(c)) ∘ … ∘ f_1(·; θ_1(c))`` whose parameters are linear heads of ``c``.

    ``log|det J| = Σ_k log|det J_{f_k}|``. Subclasses set ``self.heads`` (``nn.Linear(context_dim, K · s)``
    per parameter of size ``s``) and give ``params(context)``: one tuple per layer, each parameter of shape
    ``(*batch_c, ...)`` so that it broadcasts against the inputs (the heads run once per context, not once
    per draw), and the functional ``_layer_call(x, *p) -> (y, ladj)`` and ``_layer_inverse(y, *p) -> x``.
    The amortized planar, radial and Sylvester layers of Rezende & Mohamed (2015, §6.2) and van den Berg
    et al. (2018) are of this kind.
    """

    def __init__(self, dim: int, num_flows: int, context_dim: int):
        super().__init__(dim)
        self.num_flows = check_dim(num_flows, "num_flows")
        self.context_dim = check_dim(context_dim, "context_dim")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_flows={self.num_flows}, context_dim={self.context_dim}"

    def _heads(self, context: Tensor, *sizes: int) -> list[Tensor]:
        """Each head's output as ``(*batch_c, num_flows, size)``."""
        return [h(context).unflatten(-1, (self.num_flows, s)) for h, s in zip(self.heads, sizes)]

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._context_batch(x, context)
        total = 0.0
        for p in self.params(context):
            x, ladj = self._layer_call(x, *p)
            total = total + ladj
        return x, total

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._context_batch(y, context)
        for p in reversed(self.params(context)):
            y = self._layer_inverse(y, *p)
        return y, self.transform(y, context)[1]


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


def _ladj_of(t: Transform, x: Tensor, y: Tensor) -> Tensor:
    """log|det J| of a plain torch transform, summed over the vector dimension."""
    ladj = t.log_abs_det_jacobian(x, y)
    extra = 1 - t.domain.event_dim
    if extra > 0:
        ladj = ladj.sum(-1)
    return ladj.expand(x.shape[:-1]) if ladj.dim() < x.dim() - 1 else ladj


class ComposeFlow(FlowTransform):
    r"""``f = f_K ∘ … ∘ f_1`` with ``log|det J_f| = Σ_k log|det J_{f_k}(x_{k-1})|``.

    Accepts :class:`FlowTransform` layers and plain torch transforms on
    vectors (e.g. permutations); parameters of module layers are registered.
    """

    def __init__(self, parts: Iterable[Transform], dim: int | None = None):
        parts = list(parts)
        if dim is None:
            dims = [p.dim for p in parts if isinstance(p, FlowTransform)]
            if not dims:
                raise ValueError("ComposeFlow needs dim= when no part is a FlowTransform")
            dim = dims[0]
        super().__init__(dim)
        for p in parts:
            if isinstance(p, FlowTransform) and p.dim != dim:
                raise ValueError(f"all parts of a ComposeFlow must have dim={dim}; {type(p).__name__} has dim={p.dim}")
        self.parts = parts
        self.layers = torch.nn.ModuleList([p for p in parts if isinstance(p, torch.nn.Module)])

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> Transform:
        return self.parts[i]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layers={len(self.parts)}"

    @property
    def sign(self) -> int:
        """The product of the parts' signs (``+1`` with no parts); absent (``AttributeError``) if one is unknown."""
        total = 1
        for p in self.parts:
            try:
                total *= p.sign
            except (AttributeError, NotImplementedError):  # a FlowTransform's, or a plain torch transform's
                raise AttributeError(f"ComposeFlow: the sign of part {type(p).__name__} is not known") from None
        return total

    def is_identity(self) -> bool:
        """Every part is provably the identity (true for no parts)."""
        return all(isinstance(p, FlowTransform) and p.is_identity() for p in self.parts)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = None
        for p in self.parts:
            if isinstance(p, FlowTransform):
                y, ladj = p._call_and_ladj(x)
            else:
                y = p(x)
                ladj = _ladj_of(p, x, y)
            total = ladj if total is None else total + ladj
            x = y
        if total is None:
            total = x.new_zeros(x.shape[:-1])
        return x, total

    def _inverse(self, y: Tensor) -> Tensor:
        for p in reversed(self.parts):
            y = p._inverse(y) if isinstance(p, FlowTransform) else p.inv(y)
        return y

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        total = None
        for p in reversed(self.parts):
            if isinstance(p, FlowTransform):
                x, ladj = p._inverse_and_ladj(y)
            else:
                x = p.inv(y)
                ladj = _ladj_of(p, x, y)
            total = ladj if total is None else total + ladj
            y = x
        if total is None:
            total = y.new_zeros(y.shape[:-1])
        return y, total
