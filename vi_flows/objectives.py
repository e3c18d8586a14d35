r"""Lower-variance objectives for flow guides: sticking the landing and importance weighting with DReG.

The reparameterized ELBO gradient of a guide ``z = T_θ(ε)`` is

.. math::  ∇_θ \,E_ε[\log p(x, T_θ(ε)) − \log q_θ(T_θ(ε))]
           = E_ε\big[(∇_z \log p − ∇_z \log q_θ)\,∂_θ z\big] − E_ε\big[∇_θ \log q_θ(z)|_{z}\big],

and the last (score) term has mean zero, so dropping it leaves an unbiased *path* gradient
whose variance vanishes where ``q = p(z | x)`` (Roeder, Wu, Duvenaud, "Sticking the Landing", NeurIPS
2017). Rather than re-deriving every flow with detached parameters, :func:`stl_log_prob` replaces
``log q(z)`` by a surrogate with the same value whose gradient reaches ``θ`` only through ``z``:

.. math::  \widetilde{\log q}(z) = \mathrm{sg}[\log q_θ(z)] + s \cdot (z − \mathrm{sg}[z]),
           \qquad s = ∇_{z'} \log q_θ(z')|_{z' = \mathrm{sg}[z]},

``s`` taken with respect to a fresh leaf ``z'`` only (one pass through the flow's inverse, nothing
accumulates into ``θ``). Inside :func:`path_gradient`, :meth:`vi_flows.AutoFlow.sample_latent`
registers its latent site with :class:`PathGradientDistribution`, whose ``log_prob`` is that
surrogate; the per-site ``Delta`` terms (``log|det J|`` of the bijections to the constrained
supports) depend on ``z`` alone and stay as they are. :class:`STL_ELBO` is ``Trace_ELBO`` inside that
context; :class:`IWELBO` is the importance-weighted bound with doubly reparameterized gradients
(Tucker, Lawson, Gu, Maddison, ICLR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from pyro.distributions import Delta, Independent, MaskedDistribution, TorchDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine import Trace
from pyro.util import warn_if_nan
from torch import Tensor

__all__ = ["IWELBO", "PathGradientDistribution", "STL_ELBO", "path_gradient", "path_gradient_active", "stl_log_prob"]

_PATH_GRADIENT: ContextVar[bool] = ContextVar("vi_flows_path_gradient", default=False)


@contextmanager
def path_gradient(active: bool = True) -> Iterator[None]:
    """Within the block, :class:`~vi_flows.AutoFlow` guides give their latent site the STL ``log q``."""
    token = _PATH_GRADIENT.set(active)
    try:
        yield
    finally:
        _PATH_GRADIENT.reset(token)


def path_gradient_active() -> bool:
    """Whether the caller is inside :func:`path_gradient`."""
    return _PATH_GRADIENT.get()


def stl_log_prob(fn: TorchDistribution, value: Tensor, log_q: Tensor | None = None) -> Tensor:
    r"""``sg[log q(z)] + Σ_event s · (z − sg[z])``, ``s = ∇_{z'} log q(z')`` at a fresh leaf ``z' = sg[z]``.

    Equal to ``log q(z)`` in value; its gradient reaches ``fn``'s parameters only through ``z`` (the
    path derivative of Roeder et al. 2017). ``log_q``: ``log q(z)`` when already known (the draw's
    cached density), else ``fn.log_prob(z')``. Without a gradient to propagate (``z`` not requiring
    grad, e.g. under ``torch.no_grad``) it is plain ``log q(z)`` at no extra cost.
    """
    if not (torch.is_grad_enabled() and value.requires_grad):
        return fn.log_prob(value) if log_q is None else log_q
    with torch.enable_grad():
        leaf = value.detach().requires_grad_()
        lp = fn.log_prob(leaf)
        (score,) = torch.autograd.grad(lp.sum(), leaf, allow_unused=True)
    if log_q is None:
        log_q = lp
    if score is None:  # log q does not depend on z (a flat density)
        return log_q.detach()
    return log_q.detach() + sum_rightmost(score * (value - value.detach()), fn.event_dim)


class PathGradientDistribution(TorchDistribution):
    """``base`` (any reparameterizable distribution) whose ``log_prob`` is the STL surrogate :func:`stl_log_prob`.

    ``rsample`` draws from ``base`` (with ``rsample_and_log_prob`` when it has one, as
    :class:`~vi_flows.FlowDistribution` does) and keeps the draw's ``log q``, so the surrogate's value is
    that of ``base`` exactly; ``log_prob`` of any other point goes through ``base.log_prob``.
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, base: TorchDistribution):
        if not base.has_rsample:
            raise ValueError(f"PathGradientDistribution needs a reparameterizable base, got {type(base).__name__}")
        self.base = base
        self._cache: tuple[Tensor, Tensor | None] | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None) -> PathGradientDistribution:
        return PathGradientDistribution(self.base.expand(batch_shape))

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        if hasattr(self.base, "rsample_and_log_prob"):
            z, log_q = self.base.rsample_and_log_prob(sample_shape)
        else:
            z, log_q = self.base.rsample(sample_shape), None
        self._cache = (z, log_q)
        return z

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        cache = self._cache
        log_q = cache[1] if cache is not None and value is cache[0] else None
        return stl_log_prob(self.base, value, log_q)


class STL_ELBO(Trace_ELBO):  # noqa: N801 (Pyro's naming: Trace_ELBO, TraceMeanField_ELBO)
    r"""``Trace_ELBO`` with the sticking-the-landing gradient for :class:`~vi_flows.AutoFlow` guides.

    .. math::  \hat g = \big(∇_z \log p(x, z) − ∇_z \log q_θ(z)\big)\,∂_θ z,\qquad z = T_θ(ε),

    the reparameterized gradient without its zero-mean score term ``∇_θ log q_θ(z)|_z``: unbiased, and
    of zero variance where ``q`` is the exact posterior (Roeder, Wu, Duvenaud 2017). The loss value is
    the ELBO estimate, unchanged. Works with vectorized particles, with ``fit(loss=STL_ELBO(...))`` and
    ``fit(estimator="stl")``, and with :class:`~pyro.infer.autoguide.AutoGuideList`: its AutoFlow parts
    get the path gradient, other guides (``AutoNormal``, ``AutoDelta``, ``AmortizedFlow``, custom guides)
    are unaffected and keep the plain reparameterized gradient (still unbiased: each part's score term
    has mean zero on its own). Cost: one extra pass through the flow's inverse per step (``d`` network
    passes for an IAF, an ODE solve for a CNF).
    """

    def loss_and_grads(self, model, guide, *args, **kwargs):
        with path_gradient():
            return super().loss_and_grads(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with path_gradient():
            return super().differentiable_loss(model, guide, *args, **kwargs)


class IWELBO(ELBO):
    r"""The importance-weighted bound (Burda, Grosse, Salakhutdinov 2016) with DReG gradients.

    .. math::  \mathcal L_K = E\Big[\log \frac1K Σ_{k=1}^K w_k\Big],\qquad w_k = \frac{p(x, z_k)}{q(z_k)},
               \qquad z_k \overset{iid}{\sim} q,

    ``log p(x) ≥ L_K ≥ L_1 = ELBO``, ``L_K → log p(x)`` as ``K → ∞``. The guide's parameters get the
    doubly reparameterized gradient (Tucker, Lawson, Gu, Maddison, "Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives", ICLR 2019, eq. 5)

    .. math::  \hat g_θ = Σ_k \mathrm{sg}[\tilde w_k^2]\,∇_θ \log w_k,\qquad \tilde w_k = w_k / Σ_j w_j,

    with ``log w_k`` built from the STL surrogate of ``log q`` (:func:`stl_log_prob`), so that ``∇_θ``
    acts through ``z_k`` only: unbiased for ``∇_θ L_K`` and, unlike the plain IWAE gradient, its
    signal-to-noise ratio does not vanish as ``K`` grows. The model's parameters (if any) get the plain
    IWAE gradient ``Σ_k w̃_k ∇ log p(x, z_k)``; a parameter both guide and model use counts as the model's.

    The ``K`` particles are vectorized (an outermost ``pyro.plate`` as in
    ``Trace_ELBO(vectorize_particles=True)``), so the model must broadcast over a leftmost batch
    dimension; if it cannot, a ValueError says so (use :class:`STL_ELBO` there). Guide sites: AutoFlow
    latents carry the surrogate (:class:`PathGradientDistribution`); other reparameterized sites are
    given it here (from their distribution's ``log_prob``); ``Delta`` sites are taken as they are (their
    ``log_density`` must depend on the parameters only through the value, as AutoFlow's and Pyro's
    autoguides' do); a non-reparameterized guide site is an error. Sites scaled by ``poutine.scale``
    (subsampling, tempering) enter ``log w`` scaled, as in Pyro's ``RenyiELBO``.

    ``loss`` and ``loss_and_grads`` return ``−L̂_K``, one estimate of the bound from ``K`` draws.
    """

    def __init__(self, num_particles: int = 8, max_plate_nesting: float = float("inf"), **kwargs):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(f"IWELBO needs num_particles >= 2 (K = 1 is the ELBO), got {num_particles!r}")
        kwargs.pop("vectorize_particles", None)
        super().__init__(
            num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True, **kwargs
        )

    def _get_trace(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _log_weights(self, model, guide, args, kwargs) -> tuple[Tensor, Trace, Trace]:
        """``log w_k``, shape ``(K,)``, with the STL ``log q`` where gradients are on; and the two traces."""
        try:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model_trace, guide_trace = self._get_vectorized_trace(model, guide, args, kwargs)
        except (RuntimeError, ValueError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"IWELBO: the model and guide could not be run with {self.num_particles} vectorized particles "
                f"(a pyro.plate at dim {-self.max_plate_nesting}; {type(e).__name__}: {first}); make the model "
                "broadcast over a leftmost batch dimension, or use estimator='stl' (STL_ELBO)"
            ) from e
        _check_batch_dims(model_trace, guide_trace, self.max_plate_nesting)
        dim, k = -self.max_plate_nesting, self.num_particles
        log_w = _sum_per_particle(model_trace, dim, k) - _sum_per_particle(guide_trace, dim, k, stl=True)
        return log_w, model_trace, guide_trace

    def _bound(self, log_w: Tensor) -> float:
        """``log (1/K) Σ_k w_k`` of one draw of ``K`` particles."""
        return (torch.logsumexp(log_w.detach(), 0) - math.log(self.num_particles)).item()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``−L̂_K``: minus one estimate of the importance-weighted bound."""
        with torch.no_grad():
            log_w, _, _ = self._log_weights(model, guide, args, kwargs)
        loss = -self._bound(log_w)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """``−L̂_K``; accumulates the DReG gradient into the guide's parameters, IWAE's into the model's."""
        with path_gradient():
            log_w, model_trace, guide_trace = self._log_weights(model, guide, args, kwargs)
        model_params = _trace_params(model_trace)
        shared = set(model_params)
        guide_params = [p for p in _trace_params(guide_trace) if p not in shared]
        if log_w.requires_grad:
            w_tilde = torch.softmax(log_w.detach(), 0)
            _accumulate(-torch.logsumexp(log_w, 0), model_params, retain_graph=bool(guide_params))
            _accumulate(-(w_tilde.pow(2) * log_w).sum(), guide_params, retain_graph=False)
        loss = -self._bound(log_w)
        warn_if_nan(loss, "loss")
        return loss


def _check_batch_dims(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int) -> None:
    """A ``log_prob`` with more batch dims than plates means a site mixed the particle dim into another one."""
    for who, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and torch.as_tensor(site["log_prob"]).dim() > max_plate_nesting:
                shape = tuple(site["log_prob"].shape)
                raise ValueError(
                    f"IWELBO: the model and guide do not broadcast over vectorized particles: {who} site {name!r} "
                    f"has log_prob shape {shape}, more batch dims than its {max_plate_nesting} plates (particles "
                    "included); write the model for a leftmost batch dimension, or use estimator='stl' (STL_ELBO)"
                )


def _sum_per_particle(trace: Trace, dim: int, num_particles: int, stl: bool = False) -> Tensor:
    """``Σ_sites log_prob`` summed over every dimension but the particles' (``dim``): shape ``(K,)``.

    ``stl``: guide sites that are reparameterized, not ``Delta`` and not already
    :class:`PathGradientDistribution` get the STL surrogate; a non-reparameterized one raises.
    """
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or (stl and site["is_observed"]):
            continue
        log_prob = site["log_prob"]
        if stl and torch.is_grad_enabled():
            log_prob = _stl_site(name, site, log_prob)
        total = total + _per_particle(torch.as_tensor(log_prob), dim, num_particles)
    return torch.as_tensor(total).expand(num_particles)


def _stl_site(name: str, site: dict, log_prob: Tensor) -> Tensor:
    """The site's ``log q`` with the STL gradient (kept as it is for a ``Delta`` or an AutoFlow latent)."""
    fn = inner = site["fn"]
    while isinstance(inner, (Independent, MaskedDistribution, ExpandedDistribution)):
        inner = inner.base_dist
    if isinstance(inner, (PathGradientDistribution, Delta)):
        return log_prob
    if not fn.has_rsample:
        raise ValueError(
            f"IWELBO: guide site {name!r} ({type(fn).__name__}) is not reparameterizable; DReG needs rsample"
        )
    surrogate = stl_log_prob(fn, site["value"], site["unscaled_log_prob"])
    return scale_and_mask(surrogate, site["scale"], site["mask"])


def _per_particle(log_prob: Tensor, dim: int, num_particles: int) -> Tensor:
    """Sum ``log_prob`` over all dims but ``dim`` (absent: shared by all particles), then broadcast to ``(K,)``."""
    if log_prob.dim() < -dim:
        return log_prob.sum().expand(num_particles)
    moved = log_prob.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).sum(-1).expand(num_particles)


def _trace_params(trace: Trace) -> list[Tensor]:
    """The unconstrained leaves of the trace's ``param`` sites that require grad, in trace order, once each."""
    found = {}
    for site in trace.nodes.values():
        if site["type"] == "param":
            leaf = site["value"].unconstrained() if hasattr(site["value"], "unconstrained") else site["value"]
            if leaf.requires_grad:
                found[leaf] = None
    return list(found)


def _accumulate(loss: Tensor, params: list[Tensor], retain_graph: bool) -> None:
    """``p.grad += ∂loss/∂p`` for ``params`` only (the others' gradients come from another surrogate)."""
    if not params:
        return
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
