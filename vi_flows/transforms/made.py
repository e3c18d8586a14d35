"""MADE (Germain et al. 2015) with every weight in one tensor: the network of the IAF and the MAF."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pyro.nn.auto_reg_nn import create_mask
from torch import Tensor, nn

from .base import activation_factory

__all__ = ["MADE", "PACK_LIMIT"]

#: Most numbers packed into one parameter tensor (1 MiB of float32).
PACK_LIMIT = 1 << 18


class MADE(nn.Module):
    r"""``x ↦ (h_1, …, h_P)``, each shaped like ``x``, with ``h_p[i]`` a function of ``x[order[:rank(i)]]`` only.

    A multilayer perceptron ``x → hidden_dims → P·d`` whose weights are
    multiplied by fixed 0/1 masks built from degrees (Pyro's ``create_mask``,
    so the masks are those of :class:`pyro.nn.AutoRegressiveNN` with the same
    ``order``). With ``context_dim > 0`` the context is prepended to the input
    and feeds every hidden unit (Paige & Wood 2016).

    The layers' weights and biases are packed into as few flat parameters
    as hold at most :data:`PACK_LIMIT` numbers each (one for the default
    network up to ``d ≈ 170``), viewed layer by layer in ``forward``: Pyro's
    optimizers keep one torch optimizer per parameter tensor, and that
    bookkeeping cost more than a small network's math (a 2-layer IAF guide
    at ``d = 2``: 10 tensors, 0.9× the time of Pyro's 8). Above the limit
    each tensor stands alone: an optimizer's passes over one tensor larger
    than the cache cost more than over several that fit (the same IAF at
    ``d = 1000`` took 2× Pyro's time with one 9M-number tensor per network).
    Initialization is that of :class:`torch.nn.Linear`,
    ``U(−1/√fan_in, 1/√fan_in)`` for weights and biases.

    Reference: Germain, Gregor, Murray, Larochelle, "MADE: Masked Autoencoder
    for Distribution Estimation", ICML 2015.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        context_dim: int = 0,
        *,
        order: Tensor,
        num_outputs: int = 2,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.dim, self.context_dim, self.num_outputs = dim, context_dim, num_outputs
        self.register_buffer("permutation", torch.as_tensor(order, dtype=torch.long))
        masks, _ = create_mask(dim, context_dim, list(hidden_dims), self.permutation, num_outputs)
        widths = [dim + context_dim, *hidden_dims, num_outputs * dim]
        self.shapes = list(zip(widths[1:], widths[:-1]))  # (out, in) of each layer
        self._mask_names = [f"mask{k}" for k in range(len(masks))]
        for name, mask in zip(self._mask_names, masks):
            self.register_buffer(name, mask)
        self.groups = _pack([n for o, i in self.shapes for n in (o * i, o)], PACK_LIMIT)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(sum(g))) for g in self.groups)
        self.activation = activation_factory(activation)()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for (w, b), (_, fan_in) in zip(self._layers(), self.shapes):
                bound = 1 / math.sqrt(fan_in)
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def zero_output_(self) -> MADE:
        """Set the last layer's weights and biases to zero, so every output starts at 0; returns ``self``."""
        with torch.no_grad():
            for p in self._layers()[-1]:
                p.zero_()
        return self

    def _layers(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, bias) views of each layer into the packed parameters."""
        # one split, not a slice per tensor: a slice's backward allocates a zero tensor the size of the whole parameter
        parts = [
            part for p, sizes in zip(self.weights, self.groups) for part in (p.split(sizes) if len(sizes) > 1 else (p,))
        ]
        return [(w.view(o, i), b) for (o, i), w, b in zip(self.shapes, parts[::2], parts[1::2])]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.context_dim:
            x = torch.cat([context.expand(x.shape[:-1] + context.shape[-1:]), x], dim=-1)
        layers = self._layers()
        h = x
        for k, ((w, b), name) in enumerate(zip(layers, self._mask_names)):
            h = F.linear(h, w * self._buffers[name], b)
            if k < len(layers) - 1:
                h = self.activation(h)
        return h.unflatten(-1, (self.num_outputs, self.dim)).unbind(-2)


def _pack(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive ``sizes`` in groups whose sums stay within ``limit`` (a size above it alone)."""
    groups: list[list[int]] = [[]]
    for n in sizes:
        if groups[-1] and sum(groups[-1]) + n > limit:
            groups.append([])
        groups[-1].append(n)
    return groups
