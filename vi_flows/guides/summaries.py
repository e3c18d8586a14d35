"""Posterior summaries of a flow guide: seeded draws, ``quantiles`` and ``median``.

A flow's marginals have no closed form, so summaries come from draws with a fixed ``seed`` in a forked
RNG (repeated calls agree; the caller's stream is untouched); the median and quantiles are exact while the
flow is the identity (Pyro's ``AutoContinuous`` contract: right after the first call, the start's values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


def _moves_no_draw(eps: Tensor, flowed: Tensor, ulps: int = 128) -> bool:
    """The flow left every draw where it was, to ``ulps`` units of rounding: it acts as the identity on ``q``.

    Layers at their identity start are exactly the identity in exact arithmetic; in floating point some
    (planar, spline, Sylvester) move a point by a few ulps, far below any Monte-Carlo error.
    """
    tol = ulps * torch.finfo(eps.dtype).eps
    return bool(((flowed - eps).abs() <= tol * (1 + eps.abs())).all())


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Fix the RNG inside the block without disturbing the caller's stream."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Summaries:
    """Mixin of :class:`~vi_flows.guides.AutoFlow`: draws, ``quantiles`` and ``median``."""

    def _unpack_draws(self, latent: Tensor):
        """``(site, value)`` with value of shape ``(S,) + site shape`` for draws ``latent (S, d)``.

        Unlike ``_unpack_latent`` the draw dimension stays leftmost, whatever plates the site is in.
        """
        pos = 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            yield site, latent[:, pos : pos + size].reshape(latent.shape[:1] + shape)
            pos += size

    def _prototype_ready(self, args, kwargs) -> None:
        """Trace the model now if the guide has not run yet (summaries may come first)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)

    @torch.no_grad()
    def _noise_draws(self, num_samples: int, seed: int | None, args, kwargs) -> tuple[Tensor, Tensor]:
        """Noise ``ε (S, d)`` and its image ``f(ε)``, seeded in a forked RNG (the caller's is untouched)."""
        self._prototype_ready(args, kwargs)
        with _seeded(seed, self.loc.device):  # the flow too: a Hutchinson CNF draws its probes
            eps = self.get_base_dist().sample((num_samples,))
            return eps, self.flow(eps)

    @torch.no_grad()
    def _flowed_latent(self, num_samples: int, seed: int | None, args, kwargs) -> Tensor | None:
        """``num_samples`` unconstrained draws ``z = μ + L f(ε)``, ``(S, d)``; None while ``f`` is the identity.

        The identity: provably (no layers, a CNF's zero field) or by moving none of the draws by more than
        ``128`` ulps (:func:`_moves_no_draw`); ``q`` is then the base Gaussian and summaries are exact.
        """
        self._prototype_ready(args, kwargs)
        if self.flow.is_identity():
            return None
        eps, flowed = self._noise_draws(num_samples, seed, args, kwargs)
        return None if _moves_no_draw(eps, flowed) else self._base_map()(flowed)

    def _constrained(self, latent: Tensor) -> dict[str, Tensor]:
        """Unconstrained draws ``(S, d)`` as ``{site: constrained values, draws first}``."""
        return {site["name"]: self._bijections[site["name"]](u) for site, u in self._unpack_draws(latent)}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args, num_samples: int = 4000, seed: int | None = 0, **kwargs
    ) -> dict[str, Tensor]:
        """Marginal posterior quantiles of each site: exact while the flow is the identity, else from draws.

        While ``f`` is the identity (as :meth:`median` decides), ``q`` is the base Gaussian and the level-``p``
        quantile is ``T(μ + σ Φ⁻¹(p))`` (``σ``: the marginal sds, ``T``: the sites' bijections), exact for
        elementwise bijections and Pyro's ``AutoContinuous.quantiles`` convention for the others. Otherwise, per
        element of each site, the empirical quantiles of ``num_samples`` constrained draws with a fixed ``seed``
        (the caller's RNG untouched): monotone in ``quantiles``, inside the support, the same on every call. The
        standard error of such a quantile is about ``sqrt(p (1 − p)) / (density · sqrt(num_samples))``, about
        ``0.02 sd`` for the median of a Gaussian-like marginal at the default 4000 draws. Either way ``0.5``
        equals :meth:`median`.

        :return: ``{site: tensor of shape (len(quantiles),) + site_shape}``.
        """
        q = torch.as_tensor(quantiles, dtype=torch.float64)  # checked before the draws
        if q.dim() != 1 or ((q < 0) | (q > 1)).any():
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        latent = self._flowed_latent(num_samples, seed, args, kwargs)
        q = q.to(dtype=self.loc_unit.dtype, device=self.loc_unit.device)
        if latent is None:  # q is the base Gaussian: its quantiles exactly
            return self._constrained(self.loc + self.scale * torch.distributions.Normal(0.0, 1.0).icdf(q)[:, None])
        return {name: torch.quantile(v, q, dim=0) for name, v in self._constrained(latent).items()}

    @torch.no_grad()
    def median(self, *args, num_samples: int = 4000, seed: int | None = 0, **kwargs) -> dict[str, Tensor]:
        """Posterior median of each site.

        Exact, without draws, while the flow ``f`` is the identity: provably (no layers, a CNF's zero field)
        or by moving none of ``num_samples`` seeded noise draws by more than ``128`` ulps (every family at
        its start but ``AutoPlanar(start="random")``). ``q`` is then the base Gaussian, and the median is the
        image of the noise's centre, ``T(μ + L f(0)) = T(μ)`` (``T``: the sites' bijections), as Pyro's
        ``AutoContinuous.median``: right after the first call, exactly the values ``init_loc_fn`` gave
        (``init=None``) or the pre-fit's mean.

        Otherwise there is no closed form: it is estimated from ``num_samples`` draws with a fixed ``seed``
        (the caller's RNG untouched), the same draws as :meth:`quantiles`, so it equals their ``0.5``.
        Sites with an elementwise bijection (real, positive, interval) get their marginal medians; sites
        whose bijection couples elements (simplex, correlation Cholesky) get the image of the unconstrained
        medians, which stays inside the support.
        """
        latent = self._flowed_latent(num_samples, seed, args, kwargs)
        return self._centre_median() if latent is None else self._draws_median(latent)

    def _centre_median(self) -> dict[str, Tensor]:
        """``T(μ + L f(0))`` per site: the image of the noise's centre, the median of a Gaussian ``q``."""
        centre = torch.zeros(self.latent_dim, dtype=self.loc_unit.dtype, device=self.loc_unit.device)
        latent = self._base_map()(self.flow(centre))
        return {site["name"]: self._bijections[site["name"]](u) for site, u in self._unpack_latent(latent)}

    def _draws_median(self, latent: Tensor) -> dict[str, Tensor]:
        """Per site, the marginal medians of draws ``latent (S, d)`` (elementwise bijections), else ``T(median)``."""
        result = {}
        for site, u in self._unpack_draws(latent):
            t = self._bijections[site["name"]]
            if t.domain.event_dim == 0:
                result[site["name"]] = torch.quantile(t(u), 0.5, dim=0)  # as quantiles() computes it
            else:
                result[site["name"]] = t(torch.quantile(u, 0.5, dim=0))
        return result
