"""Stacks of flow layers, with optional reversals between them and a shared context."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor
from torch.distributions import Transform

from ..validate import check_positive_int
from .base import ComposeFlow, FlowTransform
from .permute import Reverse

__all__ = ["ConditionalComposeFlow", "is_conditional", "stack"]


def is_conditional(t: Transform) -> bool:
    """Whether ``t`` takes a context: it has ``context_dim > 0`` and ``condition(context)``."""
    return getattr(t, "context_dim", 0) > 0


def stack(make_layer: Callable[[], FlowTransform], num_flows: int, *, dim: int, permute: bool = False) -> ComposeFlow:
    """``f_K ∘ R ∘ … ∘ R ∘ f_1`` from ``num_flows`` calls of ``make_layer``.

    With ``permute=True`` a :class:`Reverse` ``R`` sits between consecutive
    layers, so a stack of autoregressive layers lets every output depend on
    every input. Returns a :class:`ConditionalComposeFlow` when any layer takes
    a context, else a plain :class:`ComposeFlow`.
    """
    check_positive_int(dim, "dim")
    check_positive_int(num_flows, "num_flows", example=4)
    parts: list[FlowTransform] = []
    for k in range(num_flows):
        if permute and k > 0:
            parts.append(Reverse(dim))
        layer = make_layer()
        if not isinstance(layer, FlowTransform):
            raise ValueError(f"make_layer must return a FlowTransform, got {type(layer).__name__}")
        parts.append(layer)
    if any(is_conditional(p) for p in parts):
        return ConditionalComposeFlow(parts, dim)
    return ComposeFlow(parts, dim)


class ConditionalComposeFlow(ComposeFlow):
    """A :class:`ComposeFlow` whose conditional parts share one context.

    ``condition(context)`` returns a plain :class:`ComposeFlow` in which every
    conditional part is replaced by ``part.condition(context)`` (same
    parameters); the unconditioned stack refuses to transform.
    """

    def __init__(self, parts: Iterable[Transform], dim: int | None = None):
        super().__init__(parts, dim)
        context_dims = {p.context_dim for p in self.parts if is_conditional(p)}
        if len(context_dims) != 1:
            raise ValueError(
                "parts of a ConditionalComposeFlow must include conditional layers that all share one "
                f"context_dim; got context_dims {sorted(context_dims)}"
            )
        self.context_dim: int = context_dims.pop()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, context_dim={self.context_dim}"

    def condition(self, context: Tensor) -> ComposeFlow:
        return ComposeFlow([p.condition(context) if is_conditional(p) else p for p in self.parts], self.dim)

    def _unbound(self) -> ValueError:
        return ValueError(
            f"this flow has context_dim={self.context_dim}: call .condition(context) with a context of "
            f"shape (..., {self.context_dim}) and use the transform it returns"
        )

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise self._unbound()

    def _inverse(self, y: Tensor) -> Tensor:
        raise self._unbound()

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise self._unbound()
