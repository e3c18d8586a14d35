"""The flow families as ready guides: :class:`AutoFlow` with its layers chosen and defaulted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from ..transforms.autoregressive import affine_iaf_stack
from ..transforms.base import FlowTransform
from ..transforms.coupling import check_bound, coupling_stack
from ..transforms.planar import STARTS, PlanarStack
from ..transforms.radial import RadialStack
from ..transforms.spline import check_spline_options, spline_stack
from ..transforms.sylvester import Sylvester
from ..validate import check_choice, check_hidden_dims, check_positive_int
from .autoflow import AutoFlow

__all__ = ["AutoPlanar", "AutoRadial", "AutoIAF", "AutoCNF", "AutoRealNVP", "AutoSylvester", "AutoNSF"]


class AutoPlanar(AutoFlow):
    """``num_flows`` planar layers (:class:`~vi_flows.transforms.PlanarStack`) on a Gaussian.

    Cheap (O(d) per layer) and invertible by 1-D root finding; each layer bends
    the density along one hyperplane, so expressiveness grows slowly with
    ``num_flows``. Default 16: on the paper's 2-D energies KL keeps dropping up
    to 16-32 layers (Rezende & Mohamed 2015, Fig. 3b), each O(d).

    ``start="identity"`` (default) starts every layer at the identity, so the
    guide starts at its base Gaussian (``init_loc_fn``, ``init="laplace"``).
    ``start="random"`` draws ``u, w, b ~ U(−1/√d, 1/√d)`` as Pyro's planar
    layers: the layers start bent in random directions, which helps on
    multimodal targets (measured on the paper's energies: ``docs/benchmarks.md``).
    The bends are in absolute units, so use it where the posterior's scale is about 1.
    """

    def __init__(self, model: Callable, num_flows: int = 16, *, start: str = "identity", **kwargs):
        num_flows = check_positive_int(num_flows, "num_flows")
        check_choice(start, STARTS, "start")
        super().__init__(model, partial(PlanarStack, num_flows=num_flows, start=start), **kwargs)


class AutoRadial(AutoFlow):
    """``num_flows`` radial layers (:class:`~vi_flows.transforms.RadialStack`) on a Gaussian.

    Each layer contracts or expands around a learned centre; closed-form inverse.
    Default 16, as for :class:`AutoPlanar`.
    """

    def __init__(self, model: Callable, num_flows: int = 16, **kwargs):
        num_flows = check_positive_int(num_flows, "num_flows")
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

    def __init__(
        self,
        model: Callable,
        num_flows: int = 2,
        hidden_dims: Sequence[int] | None = None,
        **kwargs,
    ):
        num_flows = check_positive_int(num_flows, "num_flows")
        if hidden_dims is not None:
            hidden_dims = check_hidden_dims(hidden_dims)
        make = partial(affine_iaf_stack, num_flows=num_flows, hidden_dims=hidden_dims)
        super().__init__(model, make, **kwargs)


class AutoCNF(AutoFlow):
    """A continuous normalizing flow (FFJORD, Grathwohl et al. 2019) on a Gaussian.

    The most flexible family (free-form Jacobian) and the slowest: every step
    solves an ODE. Defaults follow FFJORD: ``dopri5`` with ``rtol = atol = 1e-5``
    (looser tolerances make ``log q`` biased, which the ELBO cannot see);
    ``trace="auto"`` uses the exact trace in low dimension and Hutchinson's
    estimator above it. Check ``guide.flow[0].nfe`` to tune tolerances.
    ``gradient`` (``"backprop"``, ``"checkpoint"``, ``"adjoint"``) and
    ``trace_weight``: see :class:`~vi_flows.transforms.ContinuousFlow`;
    ``"checkpoint"`` trades time for the memory of one solver step. ``adjoint``: deprecated,
    use ``gradient="adjoint"``.
    """

    def __init__(
        self,
        model: Callable,
        hidden_dims: Sequence[int] = (64, 64),
        trace: str = "auto",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool | None = None,
        *,
        gradient: str | None = None,
        trace_weight: float = 1.0,
        **kwargs,
    ):
        from ..transforms.continuous import ContinuousFlow, check_options  # lazy: torchdiffeq loads on first use

        options = check_options(
            hidden_dims,
            trace=trace,
            solver=solver,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            adjoint=adjoint,
            trace_weight=trace_weight,
            _stacklevel=4,
        )
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
        num_flows = check_positive_int(num_flows, "num_flows")
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
        num_flows = check_positive_int(num_flows, "num_flows")
        if num_householder is not None:
            check_positive_int(num_householder, "num_householder")
        make = partial(_sylvester_layers, num_flows=num_flows, num_householder=num_householder)  # picklable
        super().__init__(model, make, **kwargs)


def _sylvester_layers(dim: int, num_flows: int, num_householder: int | None) -> list[FlowTransform]:
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
    and scale. After the map it would cover ``z`` only near the origin at unit scale (the measurement:
    ``CHANGELOG.md``, measurements history).

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
        num_flows = check_positive_int(num_flows, "num_flows")
        hidden_dims = check_hidden_dims(hidden_dims)
        bins, bound = check_spline_options(bins, bound)
        make = partial(spline_stack, num_flows=num_flows, hidden_dims=hidden_dims, bins=bins, bound=float(bound))
        super().__init__(model, make, **kwargs)
