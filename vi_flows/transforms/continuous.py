"""Continuous normalizing flow (Chen et al. 2018; Grathwohl et al. 2019, FFJORD).

``dz/dt = f(z, t)`` and ``d log|det ∂z(t)/∂z(0)| / dt = tr ∂f/∂z`` are integrated
together (by :func:`._ode.dopri5`, or :func:`torchdiffeq.odeint` for other solvers
and the adjoint); the flow map is ``x = z(0) ↦ y = z(t₁)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from ._ode import dopri5, rms_norm
from ._ode import step as dopri5_step
from .base import ACTIVATIONS, Conditioned, FlowTransform, check_hidden_dims

__all__ = ["ConcatSquash", "ConditionedFlow", "ContinuousFlow", "ODENet"]

# the field must be smooth for the adaptive solver and the trace: a subset of the shared names
SMOOTH_ACTIVATIONS = {name: ACTIVATIONS[name] for name in ("tanh", "softplus", "silu")}
TRACES = ("auto", "exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
GRADIENTS = ("checkpoint", "backprop", "adjoint")
# torchdiffeq's names of the options our own dopri5 (checkpoint and backprop modes) takes.
DOPRI5_OPTIONS = {"first_step": "first_step", "max_num_steps": "max_steps"}
# scipy_solver leaves torch (no gradients); every other torchdiffeq method is allowed.
METHODS = tuple(m for m in SOLVERS if m != "scipy_solver")
# Under torch.jit tracing the solve runs on a fixed grid of at least this many steps (a field that starts at
# zero takes one adaptive step, too few once training bends it).
TRACED_MIN_STEPS = 8
# Field evaluations per attempted Dormand–Prince step (6 with FSAL), to read a solve's step count from its nfe.
EVALS_PER_STEP = 6


def _choice(value, allowed, name: str):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class ConcatSquash(nn.Module):
    r"""``h ↦ (W h + b) ⊙ σ(A s + a) + B s`` with ``s = (t, context)`` (FFJORD's ConcatSquashLinear).

    Shapes: ``h (..., d_in)``, ``s (..., d_s)`` -> ``(..., d_out)``.
    """

    def __init__(self, d_in: int, d_out: int, d_s: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(d_s, d_out)
        self.shift = nn.Linear(d_s, d_out, bias=False)

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        return self.linear(h) * torch.sigmoid(self.gate(s)) + self.shift(s)


class ODENet(nn.Module):
    r"""The vector field ``f(z, t, c)``: an MLP of :class:`ConcatSquash` layers.

    Time (and the context ``c``) gate and shift every layer rather than being
    one more input column, so the field can change character along ``t`` at a
    cost of ``O(width)`` per layer; this is FFJORD's default layer. The last
    layer starts at zero, so ``f ≡ 0`` and the flow starts as the identity.
    """

    def __init__(self, dim: int, hidden_dims: Iterable[int], context_dim: int = 0, activation: str = "tanh"):
        super().__init__()
        widths = (dim, *hidden_dims, dim)
        self.layers = nn.ModuleList(ConcatSquash(a, b, 1 + context_dim) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = SMOOTH_ACTIVATIONS[activation]()
        last = self.layers[-1]
        for p in (last.linear.weight, last.linear.bias, last.shift.weight):
            nn.init.zeros_(p)

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        s = t.to(z).expand(*z.shape[:-1], 1)
        if context is not None:
            s = torch.cat([s, context], -1)
        h = z
        for layer in self.layers[:-1]:
            h = self.activation(layer(h, s))
        return self.layers[-1](h, s)


# From this dimension on, one vmap-ed reverse pass beats d separate VJPs. Forward + backward of a solve
# (widths (64, 64), 20 evaluations, one CPU thread), VJPs vs vmap: batch 256: d=2 40 vs 55 ms, d=5 73 vs 69,
# d=10 122 vs 96; batch 16: d=2 24 vs 40, d=5 37 vs 40, d=10 63 vs 40.
JACREV_MIN_DIM = 5


def vjp_trace(dz: Tensor, z: Tensor, create_graph: bool) -> Tensor:
    """``tr ∂dz/∂z`` per row from ``d`` vector-Jacobian products, one per diagonal entry."""
    div = torch.zeros_like(dz[:, 0])
    for i in range(z.shape[-1]):
        (row,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        div = div + row[:, i]
    return div


def jacrev_trace(net: ODENet, t: Tensor, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(f, tr ∂f/∂z)`` per row from the full per-row Jacobian, ``vmap(jacrev(f))``."""

    def f(zi: Tensor, ci: Tensor | None) -> tuple[Tensor, Tensor]:
        out = net(t, zi, ci)
        return out, out

    jac, dz = torch.func.vmap(torch.func.jacrev(f, has_aux=True), in_dims=(0, None if context is None else 0))(
        z, context
    )
    return dz, jac.diagonal(dim1=-2, dim2=-1).sum(-1)


def _activation_slope(activation: nn.Module, pre: Tensor, out: Tensor) -> Tensor:
    """``σ'(pre)`` of a :data:`SMOOTH_ACTIVATIONS` module, given ``out = σ(pre)``."""
    if isinstance(activation, nn.Tanh):
        return 1 - out * out
    if isinstance(activation, nn.Softplus):
        return torch.sigmoid(activation.beta * pre)
    if isinstance(activation, nn.SiLU):
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    raise TypeError(f"no closed-form slope for activation {type(activation).__name__}")


def forward_mode_trace(net: ODENet, t: Tensor, z: Tensor, context: Tensor | None, eps: Tensor | None):
    """``(f, tr ∂f/∂z)`` (``eps`` None) or ``(f, εᵀ (∂f/∂z) ε)`` by pushing tangents through the layers by hand.

    Plain tensor ops only, no nested autograd: what ``torch.jit.trace`` can record (a traced
    ``autograd.grad`` replays saved parameters as constants and fails; ``torch.func`` cannot be traced).
    The tangents are ``I`` (``d`` columns, exact trace) or ``ε`` (one column, Hutchinson): the same
    values as :func:`vjp_trace` and :func:`hutchinson_trace`, to rounding.
    """
    s = t.to(z).expand(*z.shape[:-1], 1)
    if context is not None:
        s = torch.cat([s, context], -1)
    if eps is None:
        tangent = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device).expand(*z.shape, z.shape[-1])
    else:
        tangent = eps.unsqueeze(-1)
    h = z
    for i, layer in enumerate(net.layers):
        gate = torch.sigmoid(layer.gate(s))
        pre = layer.linear(h) * gate + layer.shift(s)
        tangent = (layer.linear.weight @ tangent) * gate.unsqueeze(-1)
        if i == len(net.layers) - 1:
            h = pre
            break
        h = net.activation(pre)
        tangent = _activation_slope(net.activation, pre, h).unsqueeze(-1) * tangent
    if eps is None:
        return h, tangent.diagonal(dim1=-2, dim2=-1).sum(-1)
    return h, (tangent.squeeze(-1) * eps).sum(-1)


def hutchinson_trace(dz: Tensor, z: Tensor, eps: Tensor, create_graph: bool) -> Tensor:
    """``εᵀ (∂dz/∂z) ε`` per row from one vector-Jacobian product; unbiased for ``E[εεᵀ] = I``."""
    (vjp,) = torch.autograd.grad(dz, z, eps, create_graph=create_graph)
    return (vjp * eps).sum(-1)


class _Dynamics:
    """``d/dt (z, a) = (f(z, t, c), tr ∂f/∂z)`` for one solve, with its context and probe ``ε`` bound.

    A fresh object per solve keeps ``ε`` fixed through the solve and through
    the backward that re-evaluates it later (adjoint solve or checkpointed
    steps), even if other solves ran in between.
    """

    def __init__(self, net: ODENet, context: Tensor | None, eps: Tensor | None):
        self.net, self.context, self.eps = net, context, eps
        self.needs_grad = any(p.requires_grad for p in net.parameters()) or (
            context is not None and context.requires_grad
        )
        self.nfe = 0

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """torchdiffeq's form: ``(z, a) ↦ (f, tr ∂f/∂z)``."""
        return self.field(t, state[0])

    def packed(self, t: float, y: Tensor) -> Tensor:
        """:func:`dopri5`'s form: the state ``[z, a]`` of shape ``(n, d + 1)`` in one tensor."""
        dz, div = self.field(y.new_full((), t), y[:, :-1])  # new_full: no host-to-device copy
        return torch.cat([dz, div.unsqueeze(-1)], -1)

    def field(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        graph = torch.is_grad_enabled() and (z.requires_grad or self.needs_grad)
        if not graph:
            # A state made under no_grad may be a view that "requires grad" through its base.
            z = z.detach()
        if torch.jit.is_tracing():  # neither autograd.grad nor torch.func can be recorded by the tracer
            return forward_mode_trace(self.net, t, z, self.context, self.eps)
        if self.eps is None and (z.shape[-1] >= JACREV_MIN_DIM or torch.is_inference_mode_enabled()):
            with torch.set_grad_enabled(graph):  # torch.func differentiates whatever the outer grad mode
                return jacrev_trace(self.net, t, z, self.context)
        if torch.is_inference_mode_enabled():  # autograd cannot run here; torch.func can
            dz, vjp = torch.func.vjp(lambda zi: self.net(t, zi, self.context), z)
            return dz, (vjp(self.eps)[0] * self.eps).sum(-1)
        # The VJPs need autograd even under torch.no_grad(); the result is detached then.
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            dz = self.net(t, z, self.context)
            if self.eps is None:
                div = vjp_trace(dz, z, graph)
            else:
                div = hutchinson_trace(dz, z, self.eps, graph)
        if not graph:
            dz, div = dz.detach(), div.detach()
        return dz, div


class ContinuousFlow(FlowTransform):
    r"""``y = z(t₁)``, ``dz/dt = f(z, t)``, ``z(0) = x``: a continuous normalizing flow.

    ``log|det ∂y/∂x| = ∫₀^{t₁} tr ∂f/∂z(z(t), t) dt`` (instantaneous change of
    variables) is integrated with ``z``. The inverse integrates ``t₁ → 0`` and
    returns the log-determinant from the same solve.

    The solve and its gradient (``gradient``):

    * ``"backprop"`` (default): autograd records the solve and back-propagates
      through it. ``solver="dopri5"`` runs this package's own solver
      (:func:`._ode.dopri5`): torchdiffeq's step loop costs about 1 ms per step
      on a CPU thread, more than a small CNF's evaluations. Other solvers run
      in ``torchdiffeq.odeint`` (``options`` go to it).
    * ``"checkpoint"`` (``dopri5`` only): the adaptive checkpoint adjoint
      (Zhuang et al. 2020, as zuko): the solve records no graph and keeps the
      state at the start of each accepted step; the backward re-runs each step
      with autograd, last first. The same steps and values as ``"backprop"``
      and its gradient to rounding, with the memory of one step's graph instead
      of the whole solve's, for 1.4-1.5x its time (the steps run twice).
    * ``"adjoint"`` (or ``adjoint=True``): ``torchdiffeq.odeint_adjoint``, O(1)
      memory in the number of steps, gradients from a backward adjoint solve
      (a different discretization, accurate to the tolerances).

    Step-size control (own ``dopri5``): torchdiffeq's (RMS norm of the error
    over ``z`` and over the log-determinant, the larger one), starting with
    one step over ``[0, t₁]`` (zuko's start: 7 evaluations for the initial
    flow ``f ≡ 0``, where torchdiffeq's took 44); ``options`` takes
    ``first_step`` and ``max_num_steps``. ``trace_weight`` (also for
    torchdiffeq's adaptive solvers) multiplies the log-determinant's error in
    that control (zuko instead scales the log-determinant *state* by 1e-2,
    which relaxes only its absolute tolerance); below 1 the steps grow past what the
    tolerances allow for ``log|det J|``: on strongly non-linear fields (d = 2
    to 100, tolerances 1e-3 and 1e-5) 1e-2 cut the evaluations by 15-55% and
    multiplied the error of ``log|det J|`` by 2-40, so the default is 1.

    ``f`` is an :class:`ODENet` (ConcatSquash MLP; its last layer starts at
    zero, so the flow starts as the identity and a guide from its base).

    The trace:

    * ``"exact"``: ``d`` vector-Jacobian products per evaluation of ``f``
      (``vmap``-ed into one pass from ``d = 5`` on, where that is faster).
    * ``"hutchinson"``: ``εᵀ(∂f/∂z)ε`` with one ``ε`` per point drawn per solve
      and held fixed through it (FFJORD), Rademacher or Gaussian (``noise``).
      One VJP per evaluation; ``log|det J|`` is then an unbiased *estimate*
      (Rademacher in d=1 is exact) whose variance grows with ``d``.
    * ``"auto"``: exact when ``dim <= exact_trace_max_dim`` (default 10), else
      Hutchinson. A solve with its backward (batch 256, widths (64, 64), one CPU
      thread) costs 1.3x Hutchinson's at d=2, 2.3x at d=5, 2.9x at d=10, 4.5x at
      d=20 and 7.6x at d=40, while the estimator's variance grows with ``d``:
      up to d=10 removing that noise from the ELBO gradient costs at most 3x.

    ``nfe`` is the number of evaluations of ``f`` in the last solve (either
    direction, not counting the evaluations of a backward pass); tune
    ``rtol``/``atol`` by it. With ``context_dim > 0`` the context ``c``
    enters every layer's gate and shift; use :meth:`condition` to bind it.

    Shapes: ``x (..., dim)``; ``log|det J|`` has shape ``x.shape[:-1]``.

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
        adjoint: bool = False,
        trace_weight: float = 1.0,
        exact_trace_max_dim: int = 10,
        activation: str = "tanh",
        options: Mapping | None = None,
    ):
        super().__init__(dim)
        hidden = check_hidden_dims(hidden_dims)
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim must be an integer >= 0, got {context_dim!r}")
        if isinstance(exact_trace_max_dim, bool) or not isinstance(exact_trace_max_dim, int) or exact_trace_max_dim < 0:
            raise ValueError(f"exact_trace_max_dim must be an integer >= 0, got {exact_trace_max_dim!r}")
        options = dict(options or {})
        _choice(solver, METHODS, "solver")
        if issubclass(SOLVERS[solver], FixedGridODESolver) and not {"step_size", "grid_constructor"} & options.keys():
            raise ValueError(
                f"solver={solver!r} takes fixed steps: pass options={{'step_size': ...}}, "
                f"or use an adaptive solver such as 'dopri5'"
            )
        if adjoint:
            if gradient not in (None, "adjoint"):
                raise ValueError(f"gradient={gradient!r} contradicts adjoint=True (the same as gradient='adjoint')")
            gradient = "adjoint"
        elif gradient is None:
            gradient = "backprop"
        self.context_dim = context_dim
        self.exact_trace_max_dim = exact_trace_max_dim
        self.trace = trace
        self.noise = _choice(noise, NOISES, "noise")
        self.solver = solver
        self.options = options
        self.rtol = _positive(rtol, "rtol")
        self.atol = _positive(atol, "atol")
        self.t1 = _positive(t1, "t1")
        self.gradient = gradient  # after solver and options: it checks them
        self.trace_weight = _positive(trace_weight, "trace_weight")
        self.net = ODENet(dim, hidden, context_dim, _choice(activation, SMOOTH_ACTIVATIONS, "activation"))
        self.nfe = 0

    @property
    def gradient(self) -> str:
        """``"checkpoint"``, ``"backprop"`` or ``"adjoint"``; see the class docstring."""
        return self._gradient

    @gradient.setter
    def gradient(self, value: str) -> None:
        _choice(value, GRADIENTS, "gradient")
        if value == "checkpoint" and self.solver != "dopri5":
            raise ValueError(f"gradient='checkpoint' needs solver='dopri5', got solver={self.solver!r}")
        if self.solver == "dopri5" and value != "adjoint" and not self.options.keys() <= DOPRI5_OPTIONS.keys():
            raise ValueError(
                f"options {sorted(self.options.keys() - DOPRI5_OPTIONS.keys())} are not taken by dopri5 with "
                f"gradient={value!r}; allowed: {sorted(DOPRI5_OPTIONS)}"
            )
        self._gradient = value

    @property
    def adjoint(self) -> bool:
        """``gradient == "adjoint"`` (the older switch; setting it False means ``"backprop"``)."""
        return self.gradient == "adjoint"

    @adjoint.setter
    def adjoint(self, value: bool) -> None:
        self.gradient = "adjoint" if value else "backprop"

    @property
    def trace(self) -> str:
        """``"exact"`` or ``"hutchinson"`` (``"auto"`` is resolved when set)."""
        return self._trace

    @trace.setter
    def trace(self, value: str) -> None:
        _choice(value, TRACES, "trace")
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
        """``(f(x; context), log|det J|)``; the conditional-layer protocol of :meth:`FlowTransform.condition`."""
        return self.integrate(x, context, reverse=False)

    def invert(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(f⁻¹(y; context), log|det J|)`` at that point, from one backward solve."""
        return self.integrate(y, context, reverse=True)

    def _call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.integrate(x, self._no_context(), reverse=False)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_and_ladj(y)[0]

    def _inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.integrate(y, self._no_context(), reverse=True)

    def _no_context(self) -> None:
        if self.context_dim:
            raise ValueError(
                f"this ContinuousFlow has context_dim={self.context_dim}: call .condition(context) "
                "and use the transform it returns"
            )

    def integrate(self, x: Tensor, context: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """``(z(t₁), ∫₀^{t₁} tr ∂f/∂z dt)`` from ``z(0) = x``; with ``reverse``, ``(z(0), same)`` from ``z(t₁) = x``."""
        shape = x.shape
        if not x.numel():  # the solver's step-size control divides by the state's norm
            return x.clone(), x.new_zeros(shape[:-1])
        z = x.reshape(-1, self.dim)
        if context is not None:
            context = _broadcast_context(context, shape[:-1]).reshape(z.shape[0], self.context_dim)
        eps = None
        if self.trace == "hutchinson":
            eps = torch.randn_like(z) if self.noise == "gaussian" else torch.empty_like(z).bernoulli_(0.5) * 2 - 1
        func = _Dynamics(self.net, context, eps)
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
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"traced_steps must be an integer >= 1 or None, got {n!r}")
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
        if self.trace_weight != 1 and not issubclass(SOLVERS[self.solver], FixedGridODESolver):
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


def _broadcast_context(context: Tensor, batch_shape: torch.Size) -> Tensor:
    try:
        ok = torch.broadcast_shapes(context.shape[:-1], batch_shape) == batch_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"context batch shape {tuple(context.shape[:-1])} must broadcast to the input's batch shape "
            f"{tuple(batch_shape)}"
        )
    return context.expand(*batch_shape, context.shape[-1])


# The bound view used to be its own class here; it is the shared one now.
ConditionedFlow = Conditioned
