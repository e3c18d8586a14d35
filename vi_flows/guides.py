"""Flow autoguides: drop-in replacements for Pyro's ``AutoNormal``.

Every guide here is an :class:`~pyro.infer.autoguide.AutoContinuous`: the
model's latent sites are mapped to one unconstrained vector ``z ∈ R^d`` through
``biject_to(support)``, and the posterior over ``z`` is

.. math::  z = f_K ∘ … ∘ f_1(μ + L ε),\\qquad ε ~ N(0, I),

a learnable Gaussian (diagonal or full-rank ``L``, initialized from
``init_loc_fn`` or a Laplace approximation) pushed through ``K`` flow layers
(:class:`AutoNSF` warps the noise instead, ``z = μ + L g(ε)``: see there).
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

from .distributions import AffineNormal, FlowDistribution, StandardNormal
from .transforms.affine import Affine
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
    r"""A Gaussian pushed through normalizing flows, over all latent sites.

    :param model: a Pyro model.
    :param transforms: the flow layers: a sequence of
        :class:`~vi_flows.transforms.FlowTransform`, or a callable taking the
        latent dimension ``d`` and returning them (built on first call, on the
        device and dtype of the model's tensors).
    :param init_loc_fn: per-site initialization of the base Gaussian's mean,
        as in Pyro's ``AutoNormal`` (default :func:`init_to_median`).
    :param init_scale: initial standard deviation of the base Gaussian.
    :param base: ``"diag"`` (``L = diag(σ)``) or ``"full"`` (lower-triangular
        ``L`` as in ``AutoMultivariateNormal``).
    :param init: ``None`` or ``"laplace"``: fit the MAP by L-BFGS first and
        start the base Gaussian at the Laplace approximation (mode, Cholesky
        of the inverse Hessian), so the flows only learn the non-Gaussian part.
    :param laplace_steps: L-BFGS iterations of the MAP pre-fit.

    Defaults (diagonal base, no pre-fit) and when to change them are measured
    in ``docs/guides.md``: on narrow, correlated posteriors use
    ``base="full", init="laplace"`` with a small learning rate; on
    hierarchical models (no MAP) keep ``init=None``.

    ``median`` and ``quantiles`` have no closed form for a flow: they are
    computed from ``num_samples`` draws with a fixed ``seed`` (so repeated calls
    agree), elementwise in the constrained space.
    """

    scale_constraint = constraints.softplus_positive
    scale_tril_constraint = constraints.unit_lower_cholesky

    def __init__(
        self,
        model: Callable,
        transforms: TransformsArg | None = None,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        base: str = "diag",
        init: str | None = None,
        laplace_steps: int = 200,
    ):
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        if base not in ("diag", "full"):
            raise ValueError(f"base must be 'diag' or 'full', got {base!r}")
        if init not in (None, "laplace"):
            raise ValueError(f"init must be None or 'laplace', got {init!r}")
        self._init_transforms = transforms
        self._init_scale = float(init_scale)
        self._base = base
        self._init = init
        self._laplace_steps = laplace_steps
        super().__init__(model, init_loc_fn=init_loc_fn)

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

        loc = self._init_loc()
        scale = torch.full_like(loc, self._init_scale)
        scale_tril = torch.eye(self.latent_dim, dtype=loc.dtype, device=loc.device)
        if self._init == "laplace":
            loc, cov_tril = self._laplace(loc, args, kwargs)
            if cov_tril is not None:
                scale = cov_tril.diagonal()
                scale_tril = cov_tril / scale.unsqueeze(-1)
                if self._base == "diag":
                    scale = cov_tril.pow(2).sum(-1).sqrt()
        self.loc = torch.nn.Parameter(loc)
        self.scale = PyroParam(scale, self.scale_constraint)
        if self._base == "full":
            self.scale_tril = PyroParam(scale_tril, self.scale_tril_constraint)
        self.flow = self._build_flow(loc)
        if self._pyro_context.active:
            # Adopt values already in the param store (a reloaded run), as PyroParams do.
            pyro.module(self._pyro_get_fullname("flow"), self.__dict__["_modules"]["flow"], update_module_params=True)

    @staticmethod
    def _prototype_hide_fn(msg) -> bool:
        # Discrete sites the model enumerates are summed out by TraceEnum_ELBO, not guided.
        if msg["type"] == "sample" and not msg["is_observed"] and msg["infer"].get("enumerate") == "parallel":
            return True
        return pyro.infer.autoguide.guides.prototype_hide_fn(msg)

    def _check_prototype_sites(self):
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"{type(self).__name__}: latent site '{name}' is discrete ({type(fn).__name__}). "
                    "Flow guides cover continuous sites only: enumerate it in the model "
                    "(@config_enumerate or infer={'enumerate': 'parallel'}) and train with TraceEnum_ELBO, "
                    "or guide it separately with AutoGuideList."
                )
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
                raise ValueError(
                    f"{type(self).__name__}: latent site '{name}' has support {fn.support}, which has no "
                    "bijection to R^d; reparameterize the site or guide it separately with AutoGuideList."
                ) from None

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

    def _laplace(self, loc: Tensor, args, kwargs) -> tuple[Tensor, Tensor | None]:
        """MAP by L-BFGS in unconstrained space, then ``Σ = H⁻¹`` at the mode."""

        def neg_log_joint(z: Tensor) -> Tensor:
            return -self._log_joint(z, args, kwargs)

        z = loc.detach().clone().requires_grad_()
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=self._laplace_steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = neg_log_joint(z)
            value.backward()
            return value

        opt.step(closure)
        mode = z.detach()
        if not torch.isfinite(mode).all():
            warnings.warn("init='laplace': the MAP fit diverged; starting from init_loc_fn instead", stacklevel=3)
            return loc, None
        mode, chol, info = self._newton(neg_log_joint, mode)
        if info != 0:
            warnings.warn(
                "init='laplace': the Hessian at the MAP is not positive definite; using the mode with init_scale",
                stacklevel=3,
            )
            return mode, None
        cov = torch.cholesky_inverse(chol)
        return mode, torch.linalg.cholesky(cov).to(mode.dtype)

    @staticmethod
    def _newton(neg_log_joint, mode: Tensor, steps: int = 3) -> tuple[Tensor, Tensor, int]:
        """Polish an L-BFGS mode by Newton steps ``z ← z − H⁻¹∇``, each kept only if it lowers the objective.

        L-BFGS in float32 stops far from the mode of an ill-conditioned posterior (4 posterior sds on a
        regression whose Hessian has condition number 1e9); on a Gaussian posterior one Newton step is
        exact. Stops once the predicted decrease ``∇ᵀH⁻¹∇ / 2`` is below 1e-8 nats. ``H`` is factored in
        float64. Returns the mode, the Cholesky factor of ``H`` there and its info (nonzero: not positive
        definite).
        """

        def factor(z: Tensor) -> tuple[Tensor, int]:
            hess = torch.autograd.functional.hessian(neg_log_joint, z)
            chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T).double())
            return chol, int(info.item())

        value = neg_log_joint(mode).detach()
        chol, info = factor(mode)
        for _ in range(steps):
            if info != 0:
                break
            z = mode.clone().requires_grad_()
            (grad,) = torch.autograd.grad(neg_log_joint(z), z)
            step = torch.cholesky_solve(grad.double().unsqueeze(-1), chol).squeeze(-1)
            if (grad.double() @ step).item() < 2e-8:
                break
            candidate = mode - step.to(mode.dtype)
            new_value = neg_log_joint(candidate).detach()
            if not (torch.isfinite(new_value) and new_value <= value):
                break
            mode, value = candidate, new_value
            chol, info = factor(mode)
        return mode, chol, info

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
    def _affine_args(self) -> dict[str, Tensor]:
        """The base Gaussian's ``L``: ``scale=σ`` (diagonal) or ``scale_tril=diag(σ) L₁``."""
        if self._base == "full":
            return {"scale_tril": self.scale.unsqueeze(-1) * self.scale_tril}
        return {"scale": self.scale}

    def get_base_dist(self) -> StandardNormal:
        return StandardNormal(self.latent_dim, dtype=self.loc.dtype, device=self.loc.device)

    def get_transform(self, *args, **kwargs) -> ComposeFlow:
        """The whole map ``ε ↦ z`` (for ``NeuTraReparam`` and friends)."""
        base = Affine(self.loc, **self._affine_args(), dim=self.latent_dim)
        return ComposeFlow([base, *self.flow.parts], dim=self.latent_dim)

    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """``q(z)`` over the unconstrained latent vector; ``log_prob`` works at any point."""
        return FlowDistribution(AffineNormal(self.loc, **self._affine_args()), self.flow)

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

    @torch.no_grad()
    def _latent_draws(self, num_samples: int, seed: int | None, args, kwargs) -> Tensor:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with _seeded(seed, self.loc.device):
            return self.get_posterior(*args, **kwargs).sample((num_samples,))

    def _constrained_draws(self, num_samples: int, seed: int | None, args, kwargs) -> dict[str, Tensor]:
        latent = self._latent_draws(num_samples, seed, args, kwargs)
        return {site["name"]: self._bijections[site["name"]](u) for site, u in self._unpack_draws(latent)}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args, num_samples: int = 4000, seed: int | None = 0, **kwargs
    ) -> dict[str, Tensor]:
        """Marginal posterior quantiles of each site, from ``num_samples`` draws.

        :return: ``{site: tensor of shape (len(quantiles),) + site_shape}``.
        """
        draws = self._constrained_draws(num_samples, seed, args, kwargs)
        q = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        if q.dim() != 1 or ((q < 0) | (q > 1)).any():
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        return {name: torch.quantile(v, q, dim=0) for name, v in draws.items()}

    @torch.no_grad()
    def median(self, *args, num_samples: int = 4000, seed: int | None = 0, **kwargs) -> dict[str, Tensor]:
        """Posterior median of each site, from ``num_samples`` draws.

        Sites with an elementwise bijection (real, positive, interval) get their
        marginal medians; sites whose bijection couples elements (simplex,
        correlation Cholesky) get the image of the unconstrained medians, which
        stays inside the support.
        """
        latent = self._latent_draws(num_samples, seed, args, kwargs)
        result = {}
        for site, u in self._unpack_draws(latent):
            name = site["name"]
            t = self._bijections[name]
            if t.domain.event_dim == 0:
                result[name] = t(u).median(dim=0).values if num_samples % 2 else torch.quantile(t(u), 0.5, dim=0)
            else:
                result[name] = t(torch.quantile(u, 0.5, dim=0))
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
    """Inverse autoregressive flows (Kingma et al. 2016) on a Gaussian.

    ``num_flows`` IAF layers with MADE networks, reversing the variable order
    between layers. Sampling and ``log q`` of a sample cost one network pass per
    layer; ``log_prob`` of an arbitrary point costs ``d`` passes. Default 2
    layers, as in Pyro's ``AutoIAFNormal`` and the IAF paper's small models.
    """

    def __init__(self, model: Callable, num_flows: int = 2, hidden_dims: Sequence[int] | None = None, **kwargs):
        from .transforms.autoregressive import iaf_stack

        num_flows = _check_num_flows(num_flows)
        if hidden_dims is not None:
            hidden_dims = check_hidden_dims(hidden_dims)
        super().__init__(model, partial(iaf_stack, num_flows=num_flows, hidden_dims=hidden_dims), **kwargs)


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

        def make(dim: int) -> list[FlowTransform]:
            return [Sylvester(dim, num_householder=num_householder) for _ in range(num_flows)]

        super().__init__(model, make, **kwargs)


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

    def get_transform(self, *args, **kwargs) -> ComposeFlow:
        """The whole map ``ε ↦ z = μ + L g(ε)`` (for ``NeuTraReparam`` and friends)."""
        return ComposeFlow([*self.flow.parts, self._base_map()], dim=self.latent_dim)

    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """``q(z)`` over the unconstrained latent vector; ``log_prob`` works at any point."""
        base = StandardNormal(self.latent_dim, dtype=self.loc.dtype, device=self.loc.device)
        return FlowDistribution(base, [self.flow, self._base_map()])

    def _base_map(self) -> Affine:
        """``x ↦ μ + L x``."""
        return Affine(self.loc, **self._affine_args(), dim=self.latent_dim)
