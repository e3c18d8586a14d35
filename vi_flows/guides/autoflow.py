"""The flow autoguide :class:`AutoFlow`: ``z = μ_0 + L_0 (m + S f(ε))``, ``ε ~ N(0, I)``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam
from torch import Tensor
from torch.distributions import biject_to

from ..distributions import FlowDistribution, StandardNormal
from ..objectives import PathGradientDistribution, path_gradient_active
from ..start import INITS, MAX_DENSE_DIM, laplace, pathfinder
from ..transforms.affine import Affine, affine_call
from ..transforms.base import ComposeFlow, FlowTransform
from ..transforms.tails import SinhArcsinh
from ..validate import check_bool, check_choice, check_positive_float
from .sites import SiteChecks
from .summaries import Summaries

__all__ = ["AutoFlow"]

TransformsArg = Sequence[FlowTransform] | FlowTransform | Callable[[int], Sequence[FlowTransform] | FlowTransform]


def _tensor_shapes(args, kwargs) -> tuple:
    shapes = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
    shapes += [(k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, Tensor)]
    return tuple(shapes)


class AutoFlow(SiteChecks, Summaries, AutoContinuous):
    r"""Standard noise pushed through normalizing flows, then through the base Gaussian's affine map.

    .. math::  z = μ + L f(ε),\qquad ε ~ N(0, I),\qquad μ = μ_0 + L_0 m,\qquad L = L_0 S,

    over all latent sites (unconstrained ``z``). The flow ``f`` acts on the standardized noise, at unit
    scale whatever the posterior's location and scale; ``(μ_0, L_0)`` is the start (see ``init``), held
    fixed, and what the optimizer moves is ``m`` (starts at 0), ``S`` (``diag(σ)`` or ``diag(σ) L₁`` with
    unit-diagonal ``L₁``, starts at ``I``) and the flow (starts at the identity). One learning rate so
    means the same on a posterior sd of 1e-3 and of 1e4: a step of Adam moves ``μ`` by about ``lr``
    starting-scale units, and a good start is kept.

    :param model: a Pyro model.
    :param transforms: the flow layers: a sequence of
        :class:`~vi_flows.transforms.FlowTransform`, or a callable taking the
        latent dimension ``d`` and returning them (built on first call, on the
        device and dtype of the model's tensors).
    :param init_loc_fn: per-site initial location, as in Pyro's ``AutoNormal``
        (default :func:`init_to_median`); where ``init="auto"`` searches, its
        path starts here.
    :param init_scale: standard deviation of the start when it is not searched (default 0.1).
    :param base: ``"diag"`` (``S = diag(σ)``) or ``"full"`` (``S`` lower triangular, as in
        ``AutoMultivariateNormal``). ``L_0`` may be full either way (a Laplace start).
    :param init: how ``(μ_0, L_0)`` is found at the first call, from the model and its arguments:

        - ``"auto"`` (default): :func:`vi_flows.start.pathfinder`, the best-ELBO Gaussian along the
          L-BFGS path to the mode (the Laplace approximation when a mode with a positive-definite
          Hessian exists; an earlier point on a funnel). Passing ``init_loc_fn`` or ``init_scale``
          turns it off (``init=None``), as does ``d >`` :data:`vi_flows.start.MAX_DENSE_DIM`.
        - ``"laplace"``: the Laplace approximation at the MAP, or, without a mode, ``init_loc_fn``
          with ``init_scale`` (with a warning).
        - ``None``: ``init_loc_fn`` with ``init_scale``, no pre-fit.
    :param laplace_steps: L-BFGS iterations of the pre-fit.
    :param tails: end the flow with a :class:`~vi_flows.transforms.SinhArcsinh` layer (learned skew and
        tail weight per coordinate, identity at the start), so ``q``'s tails can be heavier than a
        Gaussian's where the posterior's are (a hierarchical scale). Default ``True`` for every guide
        (posteriordb, with ``fit``'s averaging: k̂ < 0.7 on 9–10 of 10 posteriors for every family;
        docs/benchmarks.md); ``False`` gives the flow exactly as ``transforms`` builds it.

    ``median`` is exact while the flow is the identity (at the start: the values ``init_loc_fn`` gave).
    Otherwise ``median`` and ``quantiles`` have no closed form for a flow: they are computed from
    ``num_samples`` draws with a fixed ``seed`` (so repeated calls agree), elementwise in the constrained
    space (see :meth:`median`).
    """

    scale_constraint = constraints.softplus_positive
    scale_tril_constraint = constraints.unit_lower_cholesky

    def __init__(
        self,
        model: Callable,
        transforms: TransformsArg | None = None,
        *,
        init_loc_fn: Callable | None = None,
        init_scale: float | None = None,
        base: str = "diag",
        init: str | None = "auto",
        laplace_steps: int = 200,
        tails: bool = True,
    ):
        if init_scale is not None:
            init_scale = check_positive_float(init_scale, "init_scale", example=0.1)
        check_choice(base, ("diag", "full"), "base")
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        if init == "auto" and (init_loc_fn is not None or init_scale is not None):
            init = None  # the user's own start wins
        self._init_transforms = transforms
        self._init_scale = 0.1 if init_scale is None else float(init_scale)
        self._base = base
        self._init = init
        self._laplace_steps = laplace_steps
        self._tails = check_bool(tails, "tails")
        self.start_info: str | None = None
        self._absolute_loc = False
        super().__init__(model, init_loc_fn=init_to_median if init_loc_fn is None else init_loc_fn)

    # ------------------------------------------------------------------ setup
    def _setup_prototype(self, *args, **kwargs):
        try:
            super()._setup_prototype(*args, **kwargs)
        except (NotImplementedError, ValueError) as e:
            if self.prototype_trace is not None:
                self._check_prototype_sites()  # raises the clearer error naming the site
            raise e
        except RuntimeError:
            if self.prototype_trace is not None and not any(True for _ in self.prototype_trace.iter_stochastic_nodes()):
                raise ValueError(
                    f"{type(self).__name__}: the model has no latent (unobserved, non-enumerated) sample sites, "
                    "so there is nothing to guide; use an empty guide (def guide(*args): pass)."
                ) from None
            raise
        self._check_prototype_sites()
        self._bijections = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            self._bijections[name] = biject_to(site["fn"].support)
        self._arg_shapes = _tensor_shapes(args, kwargs)

        loc0, scale0 = self._find_start(self._init_loc(), args, kwargs)
        d = self.latent_dim
        self.start_loc = PyroParam(loc0, constraints.real)  # fixed: read detached, never moved
        self.start_scale = PyroParam(scale0, constraints.real)
        self.loc_unit = torch.nn.Parameter(torch.zeros_like(loc0))
        self.scale_unit = PyroParam(torch.ones_like(loc0), self.scale_constraint)
        if self._base == "full":
            self.tril_unit = PyroParam(torch.eye(d, dtype=loc0.dtype, device=loc0.device), self.scale_tril_constraint)
        self.flow = self._build_flow(loc0)
        if self._pyro_context.active:
            # Adopt values already in the param store (a reloaded run), as PyroParams do.
            pyro.module(self._pyro_get_fullname("flow"), self.__dict__["_modules"]["flow"], update_module_params=True)

    def _find_start(self, loc: Tensor, args, kwargs) -> tuple[Tensor, Tensor]:
        """``(μ_0, L_0)``: ``L_0`` a vector (diagonal) or a lower-triangular matrix; see ``init``."""
        plain = loc.detach(), torch.full_like(loc, self._init_scale)
        # Without a searched start there is no posterior scale to measure μ in: it moves in absolute units, as in
        # Pyro's AutoNormal (init_scale is a guess of the width, not a unit for the location).
        self._absolute_loc = True
        mode = self._init
        if mode is None or (mode == "auto" and self.latent_dim > MAX_DENSE_DIM):
            self.start_info = "init_loc_fn, init_scale"
            return plain

        def log_joint(z: Tensor) -> Tensor:
            return self._log_joint(z, args, kwargs)

        with poutine.block():
            if mode == "laplace":
                start = laplace(log_joint, loc.detach(), self._laplace_steps)
            else:
                start = pathfinder(log_joint, loc.detach(), steps=self._laplace_steps)
        if start is None:
            warnings.warn(
                f"{type(self).__name__}: init={mode!r} found no usable Gaussian (no mode with a positive-definite "
                "Hessian, or a non-finite density along the path); starting from init_loc_fn with init_scale",
                stacklevel=4,
            )
            self.start_info = "init_loc_fn, init_scale (the pre-fit found nothing)"
            return plain
        self.start_info = start.how
        self._absolute_loc = False
        return start.loc.detach(), start.scale_tril.detach()

    def _build_flow(self, like: Tensor) -> ComposeFlow:
        spec = self._init_transforms
        layers = spec(self.latent_dim) if callable(spec) and not isinstance(spec, FlowTransform) else spec
        if layers is None:
            layers = []
        if isinstance(layers, FlowTransform):
            layers = [layers]
        layers = list(layers)
        for layer in layers:
            if isinstance(layer, FlowTransform) and layer.dim != self.latent_dim:
                raise ValueError(
                    f"{type(self).__name__}: transform {type(layer).__name__} has dim={layer.dim}, but the model's "
                    f"latent dimension is {self.latent_dim}; pass a callable transforms=lambda d: [...]"
                )
        if self._tails:
            layers.append(SinhArcsinh(self.latent_dim))
        flow = ComposeFlow(layers, dim=self.latent_dim)
        return flow.to(device=like.device, dtype=like.dtype)

    def _log_joint(self, z: Tensor, args, kwargs) -> Tensor:
        """``log p(x, T(z)) + log|det ∂T/∂z|`` for one unconstrained vector ``z``."""
        values, log_det = {}, 0.0
        for site, unconstrained in self._unpack_latent(z):
            name = site["name"]
            t = self._bijections[name]
            value = t(unconstrained)
            values[name] = value
            log_det = log_det + t.log_abs_det_jacobian(unconstrained, value).sum()
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, values)).get_trace(*args, **kwargs)
        return trace.log_prob_sum() + log_det

    # -------------------------------------------------------------- posterior
    @property
    def loc(self) -> Tensor:
        """``μ = μ_0 + L_0 m``: the base Gaussian's mean (``μ_0 + m`` when the start was not searched)."""
        return self._loc(self._start())

    def _loc(self, start: tuple[Tensor, Tensor | None, Tensor | None]) -> Tensor:
        if self._absolute_loc:
            return start[0] + self.loc_unit
        return affine_call(self.loc_unit, *start)

    @property
    def scale(self) -> Tensor:
        """The base Gaussian's marginal standard deviations ``sqrt(diag(L Lᵀ))``."""
        args = self._affine_args()
        if "scale" in args:
            return args["scale"]
        return args["scale_tril"].pow(2).sum(-1).sqrt()

    def _start(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(μ_0, diag L_0 or None, tril L_0 or None)``, detached: the start is not trained."""
        loc0, scale0 = self.start_loc.detach(), self.start_scale.detach()
        if scale0.dim() == 1:
            return loc0, scale0, None
        return loc0, None, scale0.tril()

    def _affine_args(self, start: tuple[Tensor, Tensor | None, Tensor | None] | None = None) -> dict[str, Tensor]:
        """``L = L_0 S`` as ``scale=`` (both diagonal) or ``scale_tril=``."""
        _, diag0, tril0 = self._start() if start is None else start
        sigma = self.scale_unit
        if self._base == "full":
            rel = sigma.unsqueeze(-1) * self.tril_unit
            return {"scale_tril": diag0.unsqueeze(-1) * rel if tril0 is None else tril0 @ rel}
        if tril0 is None:
            return {"scale": diag0 * sigma}
        return {"scale_tril": tril0 * sigma}

    def _base_map(self) -> Affine:
        """``x ↦ μ + L x`` (every step: the start's parameters are read once)."""
        start = self._start()
        return Affine(self._loc(start), **self._affine_args(start), dim=self.latent_dim)

    def _loc_scale(self, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """The base Gaussian's mean and marginal standard deviations (Pyro's ``AutoContinuous`` contract)."""
        return self.loc, self.scale

    def get_base_dist(self) -> StandardNormal:
        return StandardNormal(self.latent_dim, dtype=self.loc_unit.dtype, device=self.loc_unit.device)

    def get_transform(self, *args, **kwargs) -> ComposeFlow:
        """The whole map ``ε ↦ z = μ + L f(ε)`` (for ``NeuTraReparam`` and friends)."""
        return ComposeFlow([*self.flow.parts, self._base_map()], dim=self.latent_dim)

    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """``q(z)`` over the unconstrained latent vector; ``log_prob`` works at any point."""
        return FlowDistribution(self.get_base_dist(), [self.flow, self._base_map()])

    def sample_latent(self, *args, **kwargs) -> Tensor:
        """Draw ``z ~ q(z)`` at the auxiliary site ``_{name}_latent``, as Pyro's ``AutoContinuous``.

        Inside :func:`vi_flows.objectives.path_gradient` (``STL_ELBO``, ``IWELBO``) the site's
        ``log q`` is the sticking-the-landing surrogate (:func:`vi_flows.objectives.stl_log_prob`):
        same value, gradient through ``z`` only.
        """
        posterior = self.get_posterior(*args, **kwargs)
        if path_gradient_active():
            posterior = PathGradientDistribution(posterior)
        return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._check_latent_shapes(args, kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        masked = poutine.get_mask() is False
        result = {}
        for site, unconstrained in self._unpack_latent(latent):
            name = site["name"]
            transform = self._bijections[name]
            value = transform(unconstrained)
            if masked:
                log_density = 0.0
            else:
                log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
            delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        return result

    def _check_latent_shapes(self, args, kwargs) -> None:
        """Re-trace the model only when its tensor arguments changed shape."""
        shapes = _tensor_shapes(args, kwargs)
        if shapes == self._arg_shapes:
            return
        model = poutine.block(self.model, self._prototype_hide_fn)
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        for name, site in trace.iter_stochastic_nodes():
            old = self._unconstrained_shapes.get(name)
            new = self._bijections[name].inv(site["value"]).shape if name in self._bijections else None
            if old != new:
                raise ValueError(
                    f"{type(self).__name__}: latent site '{name}' changed shape from {old} to {new} between calls; "
                    "a flow guide has a fixed latent dimension. Build a new guide for the new data, or use "
                    "vi_flows.AmortizedFlow for per-datum latents."
                )
        self._arg_shapes = shapes
