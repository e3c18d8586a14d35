"""A base distribution pushed through a flow, with one-pass sample + log-density."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from .transforms.affine import Affine, affine_call, affine_inverse, affine_log_det
from .transforms.base import ComposeFlow, FlowTransform

__all__ = ["AffineNormal", "FlowDistribution", "StandardNormal"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# FlowDistribution.mean / .variance without a closed form: a Monte-Carlo estimate from this many draws,
# with this seed (in a forked RNG: the caller's stream is untouched), so repeated reads agree.
MOMENT_SAMPLES = 10_000
MOMENT_SEED = 0


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

    @property
    def mean(self) -> Tensor:
        """``E[y]``: exact when the whole map is affine (see :meth:`moments`), else a seeded Monte-Carlo estimate."""
        return self.moments()[0]

    @property
    def variance(self) -> Tensor:
        """``Var[y_i]``: exact when the whole map is affine (see :meth:`moments`), else a seeded estimate."""
        return self.moments()[1]

    @torch.no_grad()
    def moments(self, num_samples: int = MOMENT_SAMPLES, seed: int = MOMENT_SEED) -> tuple[Tensor, Tensor]:
        """``(mean, variance)``, elementwise, of shape ``batch_shape + event_shape``; no gradient.

        Exact when the base is Gaussian (:class:`StandardNormal`, :class:`AffineNormal`) and every transform
        is an :class:`~vi_flows.transforms.Affine` map or provably the identity (no layers, or layers whose
        :meth:`~vi_flows.transforms.FlowTransform.is_identity` says so): the moments are then pushed
        through in closed form. Otherwise (any non-linear layer, even one that happens to act as the
        identity but cannot prove it) an *estimate* from ``num_samples`` draws with a fixed ``seed``, drawn
        in a forked RNG so the caller's random stream is left as it was; its standard error is about
        ``sd/√num_samples`` for the mean and ``var·√(2/num_samples)`` for a Gaussian-like variance.
        """
        exact = self._affine_moments()
        if exact is not None:
            return exact
        return self._sampled_moments(num_samples, seed)

    def _affine_moments(self) -> tuple[Tensor, Tensor] | None:
        """Closed-form ``(mean, variance)`` through Gaussian base and affine/identity maps, else ``None``."""
        start = _gaussian_moments(self.base)
        maps = _affine_parts(self.transforms)
        if start is None or maps is None:
            return None
        mean, cov = start
        for m in maps:
            mean = affine_call(mean, m.loc, m.scale, m.scale_tril)
            cov = _affine_covariance(cov, m.scale, m.scale_tril)
        shape = self.batch_shape + self.event_shape
        return mean.expand(shape), cov.diagonal(dim1=-2, dim2=-1).expand(shape)

    def _sampled_moments(self, num_samples: int, seed: int) -> tuple[Tensor, Tensor]:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
        device, cache = _device_of(self.base), self._cache
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            draws = self.sample((num_samples,))
        self._cache = cache  # log_prob's cache stays on the caller's own last sample
        return draws.mean(0), draws.var(0)

    def log_prob(self, value: Tensor) -> Tensor:
        cache = self._cache
        if cache is not None and value is cache[0]:
            return cache[1]
        log_det = 0.0
        for t in reversed(self.transforms):
            value, ladj = t.inverse_and_ladj(value)
            log_det = log_det + ladj
        return self.base.log_prob(value) - log_det


def _gaussian_moments(base: TorchDistribution) -> tuple[Tensor, Tensor] | None:
    """``(mean, covariance)`` of a Gaussian base (covariance ``(..., d, d)``), else ``None``."""
    if isinstance(base, StandardNormal):
        d = base.dim
        mean = torch.zeros(d, dtype=base._dtype, device=base._device)
        return mean, torch.eye(d, dtype=base._dtype, device=base._device)
    if isinstance(base, AffineNormal):
        d = base.event_shape[0]
        eye = torch.eye(d, dtype=base.loc.dtype, device=base.loc.device)
        return base.loc, _affine_covariance(eye, base.scale, base.scale_tril)
    return None


def _affine_parts(transforms: Sequence) -> list[Affine] | None:
    """The :class:`Affine` maps of a chain whose other parts are provably the identity, else ``None``."""
    maps = []
    for t in transforms:
        if isinstance(t, Affine):
            maps.append(t)
        elif isinstance(t, ComposeFlow) and not t.is_identity():
            inner = _affine_parts(t.parts)
            if inner is None:
                return None
            maps.extend(inner)
        elif not (isinstance(t, FlowTransform) and t.is_identity()):
            return None
    return maps


def _affine_covariance(cov: Tensor, scale: Tensor | None, scale_tril: Tensor | None) -> Tensor:
    """``L Σ Lᵀ`` for ``L = diag(scale)`` or ``scale_tril``."""
    if scale is not None:
        return scale.unsqueeze(-1) * cov * scale.unsqueeze(-2)
    return scale_tril @ cov @ scale_tril.transpose(-1, -2)


def _device_of(base: TorchDistribution) -> torch.device:
    """Where ``base`` draws (CPU when it cannot tell)."""
    if isinstance(base, StandardNormal):
        return torch.device(base._device or "cpu")
    loc = getattr(base, "loc", None)
    return loc.device if isinstance(loc, Tensor) else torch.device("cpu")
