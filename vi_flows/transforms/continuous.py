"""Continuous normalizing flow (Chen et al. 2018; Grathwohl et al. 2019, FFJORD).

``dz/dt = f(z, t)`` and ``d log|det ∂z(t)/∂z(0)| / dt = tr ∂f/∂z`` are integrated
together (by :func:`._ode.dopri5`, or :func:`torchdiffeq.odeint` for other solvers
and the adjoint); the flow map is ``x = z(0) ↦ y = z(t₁)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

from .._internals import torchdiffeq_fixed_grid_methods, torchdiffeq_methods
from ..validate import check_choice, check_hidden_dims, check_int, check_nonneg_int, check_positive_float
from ._ode import dopri5, rms_norm
from ._ode import step as dopri5_step
from .base import ConditionalFlowTransform, Conditioned
from .networks import SMOOTH_ACTIVATIONS, ConcatSquash, FieldTrace, ODENet, forward_mode_trace

__all__ = ["ConcatSquash", "ContinuousFlow", "ODENet", "check_options", "forward_mode_trace"]

TRACES = ("auto", "exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
GRADIENTS = ("checkpoint", "backprop", "adjoint")
# torchdiffeq's names of the options our own dopri5 (checkpoint and backprop modes) takes.
DOPRI5_OPTIONS = {"first_step": "first_step", "max_num_steps": "max_steps"}
# scipy_solver leaves torch (no gradients); every other torchdiffeq method is allowed.
METHODS = tuple(m for m in torchdiffeq_methods() if m != "scipy_solver")
# Under torch.jit tracing the solve runs on a fixed grid of at least this many steps (a field that starts at
# zero takes one adaptive step, too few once training bends it).
TRACED_MIN_STEPS = 8
# Field evaluations per attempted Dormand–Prince step (6 with FSAL), to read a solve's step count from its nfe.
EVALS_PER_STEP = 6


class _Dynamics:
    """``d/dt (z, a) = (f(z, t, c), tr ∂f/∂z)`` for one solve, with its context and probe ``ε`` bound.

    A fresh object per solve keeps ``ε`` fixed through the solve and through
    the backward that re-evaluates it later (adjoint solve or checkpointed
    steps), even if other solves ran in between. The field is a
    :class:`~.networks.FieldTrace`, built once per grad mode where the solve
    is one graph or none (``shared``); where a backward re-evaluates it piece
    by piece (checkpointed steps, the adjoint) each evaluation builds its own,
    so no piece of graph is back-propagated twice.
    """

    def __init__(self, net: ODENet, context: Tensor | None, eps: Tensor | None, shared: bool = True):
        self.net, self.context, self.eps, self.shared = net, context, eps, shared
        self._fields: dict[bool, FieldTrace] = {}
        self.nfe = 0

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """torchdiffeq's form: ``(z, a) ↦ (f, tr ∂f/∂z)``."""
        return self.field(t, state[0])

    def packed(self, t: float, y: Tensor) -> Tensor:
        """:func:`dopri5`'s form: the state ``[z, a]`` of shape ``(n, d + 1)`` in one tensor."""
        dz, div = self.field(t, y[:, :-1])
        return torch.cat([dz, div.unsqueeze(-1)], -1)

    def field(self, t: Tensor | float, z: Tensor) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        grad = torch.is_grad_enabled()
        if grad and not self.shared:
            return FieldTrace(self.net, self.context, self.eps)(t, z)
        if grad not in self._fields:
            self._fields[grad] = FieldTrace(self.net, self.context, self.eps)
        return self._fields[grad](t, z)


class ContinuousFlow(ConditionalFlowTransform):
    r"""``y = z(t₁)``, ``dz/dt = f(z, t[, c])``, ``z(0) = x``: a continuous normalizing flow.

    ``log|det ∂y/∂x| = ∫₀^{t₁} tr ∂f/∂z(z(t), t) dt`` (instantaneous change of
    variables) is integrated with ``z``. The inverse integrates ``t₁ → 0`` and
    returns the log-determinant from the same solve. ``f`` is an
    :class:`~.networks.ODENet` (ConcatSquash MLP; its last layer starts at
    zero, so the flow starts as the identity and a guide from its base).

    Shapes: ``x (..., dim)``, ``context (..., context_dim)``; ``log|det J|``
    has shape ``x.shape[:-1]``.

    The solve and its gradient (``gradient``):

    * ``"backprop"``: autograd records the solve and back-propagates through
      it. ``solver="dopri5"`` runs this package's own solver
      (:func:`._ode.dopri5`), whose step loop costs less than torchdiffeq's;
      other solvers run in ``torchdiffeq.odeint`` (``options`` go to it).
    * ``"checkpoint"`` (``dopri5`` only): the adaptive checkpoint adjoint
      (Zhuang et al. 2020, as zuko): the solve records no graph and keeps the
      state at the start of each accepted step; the backward re-runs each
      step with autograd, last first. The same steps, values and gradient as
      ``"backprop"`` to rounding, with the memory of one step's graph instead
      of the whole solve's, for more time (the steps run twice).
    * ``"adjoint"``: ``torchdiffeq.odeint_adjoint``, O(1) memory in the
      number of steps, gradients from a backward adjoint solve (a different
      discretization, accurate to the tolerances).

    Step-size control (own ``dopri5``): torchdiffeq's (RMS norm of the error
    over ``z`` and over the log-determinant, the larger one), starting with
    one step over ``[0, t₁]`` (zuko's start, few evaluations for the initial
    ``f ≡ 0``); ``options`` takes ``first_step`` and ``max_num_steps``.
    ``trace_weight`` (also for torchdiffeq's adaptive solvers) multiplies the
    log-determinant's error in that control; below 1 the steps grow past what
    the tolerances allow for ``log|det J|``.

    The trace, by tangents pushed forward through the layers beside ``f``
    (:class:`~.networks.FieldTrace`: a first-order graph, no nested
    autograd): ``"exact"``, ``d`` tangents per evaluation of ``f``;
    ``"hutchinson"``, ``εᵀ(∂f/∂z)ε`` with one ``ε`` per point drawn per solve
    and held fixed through it (FFJORD), Rademacher or Gaussian (``noise``):
    one tangent, and ``log|det J|`` an unbiased *estimate* whose variance
    grows with ``d``; ``"auto"``, exact when ``dim <= exact_trace_max_dim``,
    else Hutchinson.

    Defaults, each for one reason:

    - ``hidden_dims=(64, 64)``, ``activation="tanh"``: FFJORD's small
      fields; the activation must be smooth (:data:`~.networks.SMOOTH_ACTIVATIONS`).
    - ``trace="auto"``, ``exact_trace_max_dim=10``: up to ``d = 10`` the
      exact trace costs a few times Hutchinson's and removes its noise from
      the ELBO gradient; above, its cost grows with ``d``.
    - ``noise="rademacher"``: the lower-variance probe for the Hutchinson
      estimator (exact in ``d = 1``).
    - ``solver="dopri5"``, ``rtol = atol = 1e-5``: FFJORD's; looser
      tolerances bias ``log q``, which the ELBO cannot see.
    - ``t1=1``: the field's scale is learned, so the span is a convention.
    - ``gradient=None`` (``"backprop"``): the exact gradient of the discrete
      solve at the least time.
    - ``trace_weight=1``: ``log|det J|`` is held to the same tolerances as
      ``z`` (zuko's 1e-2 saves evaluations but multiplies its error).

    Measurements behind these choices: ``docs/benchmarks.md`` (speed).

    ``nfe`` is the number of evaluations of ``f`` in the last solve (either
    direction, not counting the evaluations of a backward pass); tune
    ``rtol``/``atol`` by it. With ``context_dim > 0`` the context ``c``
    enters every layer's gate and shift; use :meth:`condition` to bind it.
    ``adjoint=True`` is the deprecated spelling of ``gradient="adjoint"``.

    Under ``torch.jit`` tracing (``JitTrace_ELBO``, a traced ``Predictive``) an adaptive solve cannot be
    recorded: the trace would replay one run's steps whatever the field becomes. There the flow solves on
    a fixed grid of Dormand–Prince steps instead, ``traced_steps`` of them (default ``None``: the attempted
    steps of the last adaptive solve, ``nfe / 6``, but at least :data:`TRACED_MIN_STEPS`), and warns once
    that this count is frozen into the trace. Its accuracy is then not controlled by ``rtol``/``atol``:
    as training bends the field, raise ``traced_steps`` or use the untraced ELBO.

    References: Chen et al., "Neural Ordinary Differential Equations",
    NeurIPS 2018; Grathwohl et al., "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models", ICLR 2019; Zhuang et al.,
    "Adaptive Checkpoint Adjoint Method for Gradient Estimation in Neural
    ODE", ICML 2020.
    """

    _sign = 1  # det J = exp(∫ tr ∂f/∂z dt) > 0: a flow map preserves orientation
    traced_steps: int | None = None  # fixed-grid steps under torch.jit tracing (class docstring)
    _adaptive_steps: int | None = None  # attempted steps of the last adaptive solve
    _warned_traced = False

    def __init__(
        self,
        dim: int,
        hidden_dims: Iterable[int] = (64, 64),
        context_dim: int = 0,
        *,
        trace: str = "auto",
        noise: str = "rademacher",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        t1: float = 1.0,
        gradient: str | None = None,
        adjoint: bool | None = None,
        trace_weight: float = 1.0,
        exact_trace_max_dim: int = 10,
        activation: str = "tanh",
        options: Mapping | None = None,
    ):
        super().__init__(dim)
        checked = check_options(
            hidden_dims,
            context_dim,
            trace=trace,
            noise=noise,
            solver=solver,
            rtol=rtol,
            atol=atol,
            t1=t1,
            gradient=gradient,
            adjoint=adjoint,
            trace_weight=trace_weight,
            exact_trace_max_dim=exact_trace_max_dim,
            activation=activation,
            options=options,
            _stacklevel=4,
        )
        self.context_dim = checked["context_dim"]
        self.exact_trace_max_dim = checked["exact_trace_max_dim"]
        self.trace = checked["trace"]  # after exact_trace_max_dim: "auto" reads it
        self.noise = checked["noise"]
        self.solver, self.options = checked["solver"], checked["options"]
        self.rtol, self.atol, self.t1 = checked["rtol"], checked["atol"], checked["t1"]
        self.gradient = checked["gradient"]  # after solver and options: it checks them
        self.trace_weight = checked["trace_weight"]
        self.net = ODENet(dim, checked["hidden_dims"], self.context_dim, checked["activation"])
        self.nfe = 0

    @property
    def gradient(self) -> str:
        """``"checkpoint"``, ``"backprop"`` or ``"adjoint"``; see the class docstring."""
        return self._gradient

    @gradient.setter
    def gradient(self, value: str) -> None:
        self._gradient = _check_gradient(value, self.solver, self.options)

    @property
    def adjoint(self) -> bool:
        """Deprecated: ``gradient == "adjoint"``; setting it warns (False means ``"backprop"``), use ``gradient``.

        Reading it does not warn: ``torch.jit.trace_module`` probes every attribute with ``hasattr``.
        """
        return self.gradient == "adjoint"

    @adjoint.setter
    def adjoint(self, value: bool) -> None:
        _warn_adjoint()
        self.gradient = "adjoint" if value else "backprop"

    @property
    def trace(self) -> str:
        """``"exact"`` or ``"hutchinson"`` (``"auto"`` is resolved when set)."""
        return self._trace

    @trace.setter
    def trace(self, value: str) -> None:
        check_choice(value, TRACES, "trace")
        if value == "auto":
            value = "exact" if self.dim <= self.exact_trace_max_dim else "hutchinson"
        self._trace = value

    def extra_repr(self) -> str:
        ctx = f", context_dim={self.context_dim}" if self.context_dim else ""
        return (
            f"dim={self.dim}{ctx}, trace={self.trace!r}, solver={self.solver!r}, gradient={self.gradient!r}, "
            f"rtol={self.rtol}, atol={self.atol}"
        )

    def is_identity(self) -> bool:
        """The field is identically zero (its last layer's weights, bias and time shift are all zero, as at
        the start), so the flow map is exactly the identity and ``log|det J| = 0``."""
        last = self.net.layers[-1]
        return not any(bool(p.detach().any()) for p in (last.linear.weight, last.linear.bias, last.shift.weight))

    def transform(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(f(x; context), log|det J|)``: the protocol of :class:`~.base.ConditionalFlowTransform`."""
        return self.integrate(x, context, reverse=False)

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(f⁻¹(y; context), log|det J|)`` at that point, from one backward solve."""
        return self.integrate(y, context, reverse=True)

    def integrate(self, x: Tensor, context: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """``(z(t₁), ∫₀^{t₁} tr ∂f/∂z dt)`` from ``z(0) = x``; with ``reverse``, ``(z(0), same)`` from ``z(t₁) = x``."""
        x, context = self._broadcast(x, context)  # the protocol's: broadcast batch shape of x and context
        shape = x.shape
        if not x.numel():  # the solver's step-size control divides by the state's norm
            return x.clone(), x.new_zeros(shape[:-1])
        z = x.reshape(-1, self.dim)
        if context is not None:
            context = context.reshape(z.shape[0], self.context_dim)
        eps = None
        if self.trace == "hutchinson":
            eps = torch.randn_like(z) if self.noise == "gaussian" else torch.empty_like(z).bernoulli_(0.5) * 2 - 1
        func = _Dynamics(self.net, context, eps, shared=self.gradient == "backprop")
        start, end = (self.t1, 0.0) if reverse else (0.0, self.t1)
        if torch.jit.is_tracing():
            zs, a = self._fixed_grid(func, z, start, end)
        elif self.solver == "dopri5" and self.gradient != "adjoint":
            params = (*self.net.parameters(), *(() if context is None else (context,)))
            options = {DOPRI5_OPTIONS[k]: v for k, v in self.options.items()}
            y = dopri5(
                func.packed,
                torch.cat([z, z.new_zeros(z.shape[0], 1)], -1),
                start,
                end,
                params,
                rtol=self.rtol,
                atol=self.atol,
                norm=self._error_norm,
                checkpoint=self.gradient == "checkpoint",
                **options,
            )
            zs, a = y[:, :-1], y[:, -1]
        else:
            zs, a = self._torchdiffeq(func, z, start, end, context)
        if not torch.jit.is_tracing():
            self._adaptive_steps = max(1, round(func.nfe / EVALS_PER_STEP))
        self.nfe = func.nfe
        # a(t_end) = ∫_{t_start}^{t_end} tr dt, which is −log|det J| when integrating backwards.
        ladj = -a if reverse else a
        return zs.reshape(shape), ladj.reshape(shape[:-1])

    def _traced_step_count(self) -> int:
        """The fixed grid's step count under tracing; warns once that it is frozen into the trace."""
        n = self.traced_steps or max(self._adaptive_steps or 0, TRACED_MIN_STEPS)
        check_int(n, "traced_steps", 1, example=TRACED_MIN_STEPS, note="or None: the last adaptive solve's count")
        if not self._warned_traced:
            self._warned_traced = True
            warnings.warn(
                f"ContinuousFlow under torch.jit tracing: the adaptive {self.solver!r} solve is replaced by a fixed "
                f"grid of {n} Dormand-Prince steps, frozen into the trace (rtol/atol no longer apply); set "
                "traced_steps on the layer to choose, or use an untraced ELBO",
                stacklevel=2,
            )
        return n

    def _fixed_grid(self, func: _Dynamics, z: Tensor, start: float, end: float) -> tuple[Tensor, Tensor]:
        """``(z(end), ∫ tr dt)`` by equal Dormand–Prince steps: the same ops every call, so it can be traced."""
        n = self._traced_step_count()
        y = torch.cat([z, z.new_zeros(z.shape[0], 1)], -1)
        dt = (end - start) / n
        for i in range(n):
            t = start + i * dt
            y, _ = dopri5_step(func.packed, t, y, func.packed(t, y), dt)
        return y[:, :-1], y[:, -1]

    def _error_norm(self, r: Tensor) -> Tensor:
        """The step-size control's norm of ``error / tolerance`` over ``[z, a]``: torchdiffeq's, with the weight."""
        return torch.maximum(rms_norm(r[:, :-1]), self.trace_weight * rms_norm(r[:, -1]))

    def _torchdiffeq(self, func: _Dynamics, z: Tensor, start: float, end: float, context: Tensor | None):
        times = torch.tensor([start, end], dtype=z.dtype, device=z.device)
        options = dict(self.options)
        if self.trace_weight != 1 and self.solver not in torchdiffeq_fixed_grid_methods():
            w = self.trace_weight
            options["norm"] = lambda s: torch.maximum(rms_norm(s[0]), w * rms_norm(s[1]))
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.solver, options=options)
        state = (z, z.new_zeros(z.shape[0]))
        if self.gradient == "adjoint":
            params = tuple(self.net.parameters())
            if context is not None and context.requires_grad:
                params += (context,)
            zs, a = odeint_adjoint(func, state, times, adjoint_params=params, **kwargs)
        else:
            zs, a = odeint(func, state, times, **kwargs)
        return zs[-1], a[-1]


def check_options(
    hidden_dims: Iterable[int] = (64, 64),
    context_dim: int = 0,
    *,
    trace: str = "auto",
    noise: str = "rademacher",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t1: float = 1.0,
    gradient: str | None = None,
    adjoint: bool | None = None,
    trace_weight: float = 1.0,
    exact_trace_max_dim: int = 10,
    activation: str = "tanh",
    options: Mapping | None = None,
    _stacklevel: int = 3,
) -> dict:
    """:class:`ContinuousFlow`'s options (all but ``dim``) checked without building its network, normalized:
    ``gradient`` resolved (``adjoint`` folded into it, with a ``DeprecationWarning``), numbers as floats,
    ``hidden_dims`` a tuple, ``options`` a dict. A preset checks its options here before any model is seen."""
    if adjoint is not None:
        _warn_adjoint(_stacklevel)
        if adjoint and gradient not in (None, "adjoint"):
            raise ValueError(f"gradient={gradient!r} contradicts adjoint=True (drop adjoint, use gradient= alone)")
        gradient = "adjoint" if adjoint else gradient
    options = dict(options or {})
    check_choice(solver, METHODS, "solver")
    if solver in torchdiffeq_fixed_grid_methods() and not {"step_size", "grid_constructor"} & options.keys():
        raise ValueError(
            f"solver={solver!r} takes fixed steps: pass options={{'step_size': ...}}, "
            f"or use an adaptive solver such as 'dopri5'"
        )
    return dict(
        hidden_dims=check_hidden_dims(hidden_dims),
        context_dim=check_nonneg_int(context_dim, "context_dim", note="0: no context"),
        exact_trace_max_dim=check_nonneg_int(exact_trace_max_dim, "exact_trace_max_dim", example=10),
        trace=check_choice(trace, TRACES, "trace"),
        noise=check_choice(noise, NOISES, "noise"),
        solver=solver,
        options=options,
        rtol=check_positive_float(rtol, "rtol", example=1e-5),
        atol=check_positive_float(atol, "atol", example=1e-5),
        t1=check_positive_float(t1, "t1"),
        gradient=_check_gradient("backprop" if gradient is None else gradient, solver, options),
        trace_weight=check_positive_float(trace_weight, "trace_weight"),
        activation=check_choice(activation, SMOOTH_ACTIVATIONS, "activation"),
    )


def _check_gradient(value: str, solver: str, options: Mapping) -> str:
    check_choice(value, GRADIENTS, "gradient")
    if value == "checkpoint" and solver != "dopri5":
        raise ValueError(f"gradient='checkpoint' needs solver='dopri5', got solver={solver!r}")
    if solver == "dopri5" and value != "adjoint" and not options.keys() <= DOPRI5_OPTIONS.keys():
        raise ValueError(
            f"options {sorted(options.keys() - DOPRI5_OPTIONS.keys())} are not taken by dopri5 with "
            f"gradient={value!r}; allowed: {sorted(DOPRI5_OPTIONS)}"
        )
    return value


def _warn_adjoint(stacklevel: int = 3) -> None:
    warnings.warn(
        "ContinuousFlow's adjoint flag is deprecated: use gradient='adjoint' (adjoint=True) or "
        "gradient='backprop' (adjoint=False)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def __getattr__(name: str):
    """``ConditionedFlow``: the deprecated name of :class:`~.base.Conditioned`, the shared bound view."""
    if name == "ConditionedFlow":
        warnings.warn(
            "vi_flows.transforms.continuous.ConditionedFlow is deprecated: use vi_flows.transforms.base.Conditioned "
            "(what ContinuousFlow.condition(context) returns)",
            DeprecationWarning,
            stacklevel=2,
        )
        return Conditioned
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
