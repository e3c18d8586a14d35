"""Flow autoguides: drop-in replacements for Pyro's ``AutoNormal``.

Every guide here is an :class:`~pyro.infer.autoguide.AutoContinuous`: the
model's latent sites are mapped to one unconstrained vector ``z ∈ R^d`` through
``biject_to(support)``, and the posterior over ``z`` is

.. math::  z = μ + L f_K ∘ … ∘ f_1(ε),\\qquad ε ~ N(0, I),

standard noise warped by ``K`` flow layers, then mapped by a learnable affine ``μ + L ·`` whose start
``(μ_0, L_0)`` is found from the model (Pathfinder / Laplace) and whose parameters the optimizer sees
in units of that start (see :class:`AutoFlow`).
Sampling and ``log q`` cost one pass through the stack.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

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

from .distributions import FlowDistribution, StandardNormal
from .start import INITS, MAX_DENSE_DIM, laplace, pathfinder
from .transforms.affine import Affine, affine_call
from .transforms.base import ComposeFlow, FlowTransform, check_hidden_dims
from .transforms.planar import STARTS, PlanarStack
from .transforms.radial import RadialStack

__all__ = ["AutoFlow", "AutoPlanar", "AutoRadial", "AutoIAF", "AutoCNF", "AutoRealNVP", "AutoSylvester", "AutoNSF"]

TransformsArg = Sequence[FlowTransform] | FlowTransform | Callable[[int], Sequence[FlowTransform] | FlowTransform]


def _check_num_flows(num_flows: int) -> int:
    if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
        raise ValueError(f"num_flows must be an integer >= 1, got {num_flows!r}")
    return num_flows


def _tensor_shapes(args, kwargs) -> tuple:
    shapes = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
    shapes += [(k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, Tensor)]
    return tuple(shapes)


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


class AutoFlow(AutoContinuous):
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
    ):
        if init_scale is not None and (not isinstance(init_scale, (int, float)) or not init_scale > 0):
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        if base not in ("diag", "full"):
            raise ValueError(f"base must be 'diag' or 'full', got {base!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        if init == "auto" and (init_loc_fn is not None or init_scale is not None):
            init = None  # the user's own start wins
        self._init_transforms = transforms
        self._init_scale = 0.1 if init_scale is None else float(init_scale)
        self._base = base
        self._init = init
        self._laplace_steps = laplace_steps
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

    @staticmethod
    def _prototype_hide_fn(msg) -> bool:
        # Discrete sites the model enumerates are summed out by TraceEnum_ELBO, not guided.
        if msg["type"] == "sample" and not msg["is_observed"] and msg["infer"].get("enumerate") == "parallel":
            return True
        return pyro.infer.autoguide.guides.prototype_hide_fn(msg)

    def _check_prototype_sites(self):
        """Raise a ``ValueError`` naming the first latent site a flow guide cannot cover, and what to do."""
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(self._discrete_site_advice(name, fn))
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"{type(self).__name__}: latent site '{name}' is inside the subsampled plate "
                        f"'{frame.name}' ({frame.size} of {frame.full_size}). A global flow cannot cover "
                        "local latents of a subsampled plate: guide them with AutoNormal in an AutoGuideList "
                        "(poutine.block the flow guide to the global sites), or use vi_flows.AmortizedFlow."
                    )
            try:
                biject_to(fn.support)
            except NotImplementedError:
                raise ValueError(self._unsupported_support_advice(name, fn)) from None

    def _discrete_site_advice(self, name: str, fn) -> str:
        """The error for a discrete latent site: Pyro's advice (its enumeration tutorial, as Pyro's own
        ``AutoContinuous`` says, which Pyro's tests match) and the flow-specific ways out."""
        return (
            f"{type(self).__name__}: latent site '{name}' is discrete ({type(fn).__name__}); continuous inference "
            "cannot handle discrete sample sites. Flow guides cover continuous sites only: enumerate it in the "
            "model (@config_enumerate or infer={'enumerate': 'parallel'}) and train with TraceEnum_ELBO, as "
            "documented in https://pyro.ai/examples/enumeration.html . If you already enumerate it another way, "
            f"hide it from the guide, e.g. {type(self).__name__}(poutine.block(model, hide=['{name}'])), or guide "
            "it separately with AutoGuideList (e.g. AutoDiscreteParallel)."
        )

    def _unsupported_support_advice(self, name: str, fn) -> str:
        """The error for a site whose support has no bijection to ``R^d``; a sphere (``ProjectedNormal``) gets
        Pyro's advice, ``ProjectedNormalReparam``."""
        message = f"{type(self).__name__}: latent site '{name}' has support {fn.support}, which has no bijection to R^d"
        if "sphere" in repr(fn.support).lower():
            return (
                f"{message}; continuous inference cannot handle spherical sample sites. Use the ProjectedNormal "
                "distribution together with its reparameterizer, e.g. "
                f"poutine.reparam(model, config={{'{name}': ProjectedNormalReparam()}}) "
                "(from pyro.infer.reparam), or guide the site separately with AutoGuideList."
            )
        return f"{message}; reparameterize the site or guide it separately with AutoGuideList."

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
        from .objectives import PathGradientDistribution, path_gradient_active

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

    # --------------------------------------------------------- summaries
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
    def _latent_draws(self, num_samples: int, seed: int | None, args, kwargs) -> Tensor:
        """``num_samples`` unconstrained draws ``z = μ + L f(ε)``, ``(S, d)``: ``get_posterior().sample``'s."""
        _, flowed = self._noise_draws(num_samples, seed, args, kwargs)  # sets the guide up first
        return self._base_map()(flowed)

    def _constrained_draws(self, num_samples: int, seed: int | None, args, kwargs) -> dict[str, Tensor]:
        latent = self._latent_draws(num_samples, seed, args, kwargs)
        return {site["name"]: self._bijections[site["name"]](u) for site, u in self._unpack_draws(latent)}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args, num_samples: int = 4000, seed: int | None = 0, **kwargs
    ) -> dict[str, Tensor]:
        """Marginal posterior quantiles of each site, from ``num_samples`` draws with a fixed ``seed``.

        Per element of each site, the empirical quantiles of the constrained draws: monotone in ``quantiles``
        and inside the support, the same on every call (the caller's RNG is untouched). An estimate: the
        standard error of a quantile is about ``sqrt(q (1 − q)) / (density · sqrt(num_samples))``, about
        ``0.02 sd`` for the median of a Gaussian-like marginal at the default 4000 draws. ``0.5`` equals
        :meth:`median` where the flow is not the identity (the same draws), and agrees with its exact value
        to that error where it is.

        :return: ``{site: tensor of shape (len(quantiles),) + site_shape}``.
        """
        q = torch.as_tensor(quantiles, dtype=torch.float64)  # checked before the draws
        if q.dim() != 1 or ((q < 0) | (q > 1)).any():
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        draws = self._constrained_draws(num_samples, seed, args, kwargs)
        q = q.to(dtype=self.loc.dtype, device=self.loc.device)
        return {name: torch.quantile(v, q, dim=0) for name, v in draws.items()}

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
        self._prototype_ready(args, kwargs)
        if self.flow.is_identity():
            return self._centre_median()
        eps, flowed = self._noise_draws(num_samples, seed, args, kwargs)
        if _moves_no_draw(eps, flowed):
            return self._centre_median()
        return self._draws_median(self._base_map()(flowed))

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


class AutoPlanar(AutoFlow):
    """``num_flows`` planar layers (:class:`~vi_flows.transforms.PlanarStack`) on a Gaussian.

    Cheap (O(d) per layer) and invertible by 1-D root finding; each layer bends
    the density along one hyperplane, so expressiveness grows slowly with
    ``num_flows``. Default 16: on the paper's 2-D energies KL keeps dropping up
    to 16-32 layers (Rezende & Mohamed 2015, Fig. 3b) at well under a
    millisecond per layer per step.

    ``start="identity"`` (default) starts every layer at the identity, so the
    guide starts at its base Gaussian (``init_loc_fn``, ``init="laplace"``).
    ``start="random"`` draws ``u, w, b ~ U(−1/√d, 1/√d)`` as Pyro's planar
    layers: the layers start bent in random directions, which on the paper's
    multimodal energies lowered the 3-seed mean KL (U2 0.29 → 0.21, U3 0.67 →
    0.58, U4 0.46 → 0.41; ``docs/benchmarks.md``). The bends are in absolute
    units, so use it where the posterior's scale is about 1.
    """

    def __init__(self, model: Callable, num_flows: int = 16, *, start: str = "identity", **kwargs):
        num_flows = _check_num_flows(num_flows)
        if start not in STARTS:
            raise ValueError(f"start must be one of {list(STARTS)}, got {start!r}")
        super().__init__(model, partial(PlanarStack, num_flows=num_flows, start=start), **kwargs)


class AutoRadial(AutoFlow):
    """``num_flows`` radial layers (:class:`~vi_flows.transforms.RadialStack`) on a Gaussian.

    Each layer contracts or expands around a learned centre; closed-form inverse.
    Default 16, as for :class:`AutoPlanar`.
    """

    def __init__(self, model: Callable, num_flows: int = 16, **kwargs):
        num_flows = _check_num_flows(num_flows)
        super().__init__(model, partial(RadialStack, num_flows=num_flows), **kwargs)


class AutoIAF(AutoFlow):
    """Inverse autoregressive flows (Kingma et al. 2016) on the noise of a Gaussian.

    ``num_flows`` affine IAF layers (:class:`~vi_flows.transforms.AffineInverseAutoregressive`, eq. 10 of
    the paper) with MADE networks, each in its own random autoregressive order (two orders, reversed,
    at ``d = 2``), by :func:`~vi_flows.transforms.affine_iaf_stack`. Every layer starts as the identity,
    so the guide starts at its base Gaussian. Sampling and ``log q`` of a sample cost one network pass
    per layer; ``log_prob`` of an arbitrary point costs ``d``. Default 2 layers, as in Pyro's
    ``AutoIAFNormal`` and the IAF paper's small models; ``hidden_dims`` default ``(3d + 1,)``.
    """

    def __init__(self, model: Callable, num_flows: int = 2, hidden_dims: Sequence[int] | None = None, **kwargs):
        from .transforms.autoregressive import affine_iaf_stack

        num_flows = _check_num_flows(num_flows)
        if hidden_dims is not None:
            hidden_dims = check_hidden_dims(hidden_dims)
        super().__init__(model, partial(affine_iaf_stack, num_flows=num_flows, hidden_dims=hidden_dims), **kwargs)


class AutoCNF(AutoFlow):
    """A continuous normalizing flow (FFJORD, Grathwohl et al. 2019) on a Gaussian.

    The most flexible family (free-form Jacobian) and the slowest: every step
    solves an ODE. Defaults follow FFJORD: ``dopri5`` with ``rtol = atol = 1e-5``
    (looser tolerances make ``log q`` biased, which the ELBO cannot see);
    ``trace="auto"`` uses the exact trace in low dimension and Hutchinson's
    estimator above it. Check ``guide.flow[0].nfe`` to tune tolerances.
    ``gradient`` (``"backprop"``, ``"checkpoint"``, ``"adjoint"``) and
    ``trace_weight``: see :class:`~vi_flows.transforms.ContinuousFlow`;
    ``"checkpoint"`` trades 1.4-1.5x the time for the memory of one solver step.
    """

    def __init__(
        self,
        model: Callable,
        hidden_dims: Sequence[int] = (64, 64),
        trace: str = "auto",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = False,
        *,
        gradient: str | None = None,
        trace_weight: float = 1.0,
        **kwargs,
    ):
        from .transforms.continuous import ContinuousFlow

        options = dict(hidden_dims=hidden_dims, trace=trace, solver=solver, rtol=rtol, atol=atol, adjoint=adjoint)
        options.update(gradient=gradient, trace_weight=trace_weight)
        ContinuousFlow(1, **options)  # validate the options now, not at the first step
        super().__init__(model, partial(ContinuousFlow, **options), **kwargs)


class AutoRealNVP(AutoFlow):
    """RealNVP (Dinh et al. 2017) on a Gaussian: affine coupling layers with learned mixing.

    ``num_flows`` :class:`~vi_flows.transforms.AffineCoupling` layers, each
    preceded by an :class:`~vi_flows.transforms.InvertibleLinear` (Glow's
    1×1 convolution), built by :func:`~vi_flows.transforms.coupling_stack`.
    Sampling, ``log q`` of a sample and ``log_prob`` of any point all cost one
    network pass per layer. The linear layers start at the identity and the
    couplings at the identity, so the guide starts at its base Gaussian.
    Default 4 layers of hidden ``(64, 64)``; ``log_scale_bound`` as in
    :class:`~vi_flows.transforms.AffineCoupling`.
    """

    def __init__(
        self,
        model: Callable,
        num_flows: int = 4,
        hidden_dims: Sequence[int] = (64, 64),
        log_scale_bound: float = 3.0,
        **kwargs,
    ):
        from .transforms.coupling import check_bound, coupling_stack

        num_flows = _check_num_flows(num_flows)
        hidden_dims = check_hidden_dims(hidden_dims)
        log_scale_bound = check_bound(log_scale_bound)
        make = partial(
            coupling_stack,
            num_flows=num_flows,
            hidden_dims=hidden_dims,
            linear_init="identity",
            log_scale_bound=log_scale_bound,
        )
        super().__init__(model, make, **kwargs)


class AutoSylvester(AutoFlow):
    """Householder Sylvester flows (van den Berg et al. 2018) on a Gaussian.

    ``num_flows`` :class:`~vi_flows.transforms.Sylvester` layers, each
    ``z + Q R h(R̃ Qᵀ z + b)`` with ``Q`` a product of ``num_householder``
    reflections (default ``d``): planar flows generalized from a rank-1 to a
    full-rank update, still with an O(d) log-determinant. Starts as the
    identity. Default 4 layers (the paper's VAE experiments use 4-16).
    """

    def __init__(self, model: Callable, num_flows: int = 4, num_householder: int | None = None, **kwargs):
        from .transforms.sylvester import Sylvester

        num_flows = _check_num_flows(num_flows)
        Sylvester(1, num_householder=num_householder)  # validate now, not at the first step
        make = partial(_sylvester_layers, num_flows=num_flows, num_householder=num_householder)  # picklable
        super().__init__(model, make, **kwargs)


def _sylvester_layers(dim: int, num_flows: int, num_householder: int | None) -> list[FlowTransform]:
    from .transforms.sylvester import Sylvester

    return [Sylvester(dim, num_householder=num_householder) for _ in range(num_flows)]


class AutoNSF(AutoFlow):
    r"""Neural spline flows (Durkan et al. 2019) under a Gaussian: ``z = μ + L g(ε)``, ``ε ~ N(0, I)``.

    ``g`` is ``num_flows`` :class:`~vi_flows.transforms.SplineCoupling` layers on alternating odd/even
    halves (:func:`~vi_flows.transforms.spline_stack`): each coordinate of one half goes through a
    monotonic rational-quadratic spline with ``bins`` bins on ``[−bound, bound]`` (the identity outside)
    whose knots and derivatives are an MLP (``hidden_dims``) of the other half, so

    .. math::  \log q(z) = \log N(ε; 0, I) − \log|\det J_g(ε)| − Σ_i \log|L_{ii}|,\qquad ε = g^{-1}(L^{-1}(z − μ)).

    Sampling, ``log q`` of a sample and ``log_prob`` of any point each cost one network pass per layer
    (the spline's inverse is closed form). The layers start as the identity, so the guide starts at its
    base Gaussian (``init_loc_fn`` or ``init="laplace"``). ``d = 1``: learned elementwise splines.

    Unlike the other presets the flow acts *before* the base's affine map, on the noise: a spline bends
    only inside its fixed window ``[−bound, bound]``, which covers ``ε`` whatever the posterior's location
    and scale. After the map it covers ``z`` only near the origin at unit scale. KL to a 2-D banana (the
    best diagonal Gaussian: 0.77 nats), median of 5 seeds, 400 steps, 2 layers of hidden ``(32,)``, noise
    side against ``z`` side: 0.20 against 0.19 at the origin at unit scale; 0.18 against 1.35 moved to
    ``(20, 20)`` (outside the window); 0.26 against 78 shrunk to scale 0.05 (inside one bin).

    Defaults: 4 layers of hidden ``(64, 64)``, 8 bins, ``bound = 5`` (``ε`` leaves ``[−5, 5]`` with
    probability 6e-7 per coordinate).

    Reference: Durkan, Bekasov, Murray, Papamakarios, "Neural Spline Flows", NeurIPS 2019.
    """

    def __init__(
        self,
        model: Callable,
        num_flows: int = 4,
        hidden_dims: Sequence[int] = (64, 64),
        bins: int = 8,
        bound: float = 5.0,
        **kwargs,
    ):
        from .transforms.spline import SplineCoupling, spline_stack

        num_flows = _check_num_flows(num_flows)
        hidden_dims = check_hidden_dims(hidden_dims)
        SplineCoupling(1, hidden_dims, bins, bound)  # validate bins and bound now, not at the first step
        make = partial(spline_stack, num_flows=num_flows, hidden_dims=hidden_dims, bins=bins, bound=float(bound))
        super().__init__(model, make, **kwargs)
