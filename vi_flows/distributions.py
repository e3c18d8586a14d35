"""A base distribution pushed through a flow, with one-pass sample + log-density."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from .transforms.affine import affine_call, affine_inverse, affine_log_det
from .transforms.base import ComposeFlow, FlowTransform

__all__ = ["AffineNormal", "FlowDistribution", "StandardNormal"]

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


class AffineNormal(TorchDistribution):
    r"""``N(loc, L Lᵀ)`` with ``L = diag(scale)`` or a lower-triangular ``scale_tril``.

    Written as ``x = loc + L ε``: ``rsample_and_log_prob`` reuses ``ε`` for
    ``log q = log N(ε; 0, I) − Σ log|L_ii|`` (no solve), and is cheap to build
    every step (no module, no argument validation). The map is
    :class:`~vi_flows.transforms.Affine`'s.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor | None = None, scale_tril: Tensor | None = None, batch_shape=()):
        if (scale is None) == (scale_tril is None):
            raise ValueError("AffineNormal needs exactly one of scale= and scale_tril=")
        self.loc, self.scale, self.scale_tril = loc, scale, scale_tril
        self._log_det = affine_log_det(scale, scale_tril)
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return AffineNormal(self.loc, self.scale, self.scale_tril, batch_shape)

    def _standard_log_prob(self, eps: Tensor) -> Tensor:
        return -0.5 * (eps * eps).sum(-1) - (self.event_shape[0] * _HALF_LOG_2PI) - self._log_det

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return affine_call(eps, self.loc, self.scale, self.scale_tril), self._standard_log_prob(eps)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def log_prob(self, value: Tensor) -> Tensor:
        return self._standard_log_prob(affine_inverse(value, self.loc, self.scale, self.scale_tril))


class FlowDistribution(TorchDistribution):
    r"""``y = f(x)``, ``x ~ base``: ``log q(y) = log base(f⁻¹(y)) − log|det J_f(f⁻¹(y))|``.

    ``transform`` is one :class:`FlowTransform` or a sequence applied in
    order. ``rsample`` computes the log-density of what it draws in the same
    pass and caches it, so the ``log_prob`` that Pyro asks for next is free.
    For any other point ``log_prob`` goes through the flow's inverse.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, base: TorchDistribution, transform: FlowTransform | Sequence[FlowTransform]):
        if base.event_dim != 1:
            raise ValueError(f"FlowDistribution needs a base with event_dim=1, got {base.event_dim}")
        self.base = base
        self.transforms = tuple(transform) if isinstance(transform, (list, tuple)) else (transform,)
        self._cache: tuple[Tensor, Tensor] | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def transform(self) -> FlowTransform:
        """The whole flow as one transform."""
        return self.transforms[0] if len(self.transforms) == 1 else ComposeFlow(self.transforms)

    def expand(self, batch_shape, _instance=None):
        return FlowDistribution(self.base.expand(batch_shape), self.transforms)

    def rsample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[Tensor, Tensor]:
        if hasattr(self.base, "rsample_and_log_prob"):
            x, log_q = self.base.rsample_and_log_prob(sample_shape)
        else:
            x = self.base.rsample(sample_shape)
            log_q = self.base.log_prob(x)
        for t in self.transforms:
            x, ladj = t.call_and_ladj(x)
            log_q = log_q - ladj
        self._cache = (x, log_q)
        return x, log_q

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        cache = self._cache
        if cache is not None and value is cache[0]:
            return cache[1]
        log_det = 0.0
        for t in reversed(self.transforms):
            value, ladj = t.inverse_and_ladj(value)
            log_det = log_det + ladj
        return self.base.log_prob(value) - log_det
