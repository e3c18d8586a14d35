"""A base distribution pushed through a flow, with one-pass sample + log-density."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from .transforms.base import ComposeFlow, FlowTransform

__all__ = ["FlowDistribution", "StandardNormal"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StandardNormal(TorchDistribution):
    """``N(0, I_d)`` over vectors, with batch shape; cheaper than ``Normal(...).to_event(1)``."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, dim: int, batch_shape=torch.Size(), *, dtype=None, device=None):
        self.dim = dim
        self._dtype = dtype or torch.get_default_dtype()
        self._device = device
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return StandardNormal(self.dim, batch_shape, dtype=self._dtype, device=self._device)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self._dtype, device=self._device)

    def log_prob(self, value: Tensor) -> Tensor:
        return -0.5 * (value * value).sum(-1) - self.dim * _HALF_LOG_2PI

    def entropy(self) -> Tensor:
        return torch.full(self.batch_shape, self.dim * (0.5 + _HALF_LOG_2PI), dtype=self._dtype, device=self._device)


class FlowDistribution(TorchDistribution):
    r"""``y = f(x)``, ``x ~ base``: ``log q(y) = log base(f⁻¹(y)) − log|det J_f(f⁻¹(y))|``.

    ``rsample`` computes the log-density of what it draws in the same pass
    and caches it, so the ``log_prob`` that Pyro asks for next is free. For
    any other point ``log_prob`` goes through the flow's inverse.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, base: TorchDistribution, transform: FlowTransform):
        if base.event_dim != 1:
            raise ValueError(f"FlowDistribution needs a base with event_dim=1, got {base.event_dim}")
        if isinstance(transform, (list, tuple)):
            transform = ComposeFlow(transform)
        self.base = base
        self.transform = transform
        self._cache: tuple[Tensor, Tensor] | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return FlowDistribution(self.base.expand(batch_shape), self.transform)

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        x = self.base.rsample(sample_shape)
        y, ladj = self.transform.call_and_ladj(x)
        log_q = self.base.log_prob(x) - ladj
        self._cache = (y, log_q)
        return y, log_q

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        cache = self._cache
        if cache is not None and value is cache[0]:
            return cache[1]
        x, ladj = self.transform.inverse_and_ladj(value)
        return self.base.log_prob(x) - ladj
