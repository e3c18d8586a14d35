"""Every flow transform of vi_flows, built one way, for the shared contract suite (``test_transform_contract``).

``CASES`` is the single list: a new transform is one line. Each :class:`Case` names the public object it
exercises (``subject``: a name from ``vi_flows.transforms.__all__`` or a public conditional class), builds a
small instance (d = 1..5, few layers) and says how far from the initialization its parameters are moved,
so that the checks see a non-trivial map rather than the identity most layers start as.

Kinds (derived, not declared): ``continuous`` (a :class:`ContinuousFlow` anywhere in it), ``conditioned``
(``context_dim > 0``: the contract runs on ``t.condition(context)``), else ``plain``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions.transforms import AffineTransform

from vi_flows.transforms import (
    Affine,
    AffineCoupling,
    AffineInverseAutoregressive,
    ComposeFlow,
    ConditionalComposeFlow,
    ContinuousFlow,
    InverseAutoregressive,
    InvertibleLinear,
    MaskedAutoregressive,
    Permute,
    Planar,
    PlanarStack,
    Radial,
    RadialStack,
    Reverse,
    SinhArcsinh,
    SplineCoupling,
    Sylvester,
    affine_iaf_stack,
    coupling_stack,
    iaf_stack,
    maf_stack,
    spline_stack,
    stack,
)

# Where the conditional planar/radial/Sylvester layers may live: beside their functional cores (the
# transforms package) or, before that move, in vi_flows.amortized. Their public constructors are the same.
CONDITIONAL_HOMES = (
    "vi_flows.transforms",
    "vi_flows.transforms.planar",
    "vi_flows.transforms.radial",
    "vi_flows.transforms.sylvester",
    "vi_flows.amortized",
)


def public_class(name: str):
    for home in CONDITIONAL_HOMES:
        try:
            module = importlib.import_module(home)
        except ImportError:
            continue
        obj = getattr(module, name, None)
        if obj is not None:
            return obj
    raise ImportError(f"{name} is in none of {CONDITIONAL_HOMES}")


ConditionalPlanar = public_class("ConditionalPlanar")
ConditionalRadial = public_class("ConditionalRadial")
ConditionalSylvester = public_class("ConditionalSylvester")

# A CNF solved this tightly (dopri5, float64) carries a global error of ~100x the tolerance in z and in
# log|det J| (measured 1e-7 to 3e-7 at 1e-8, tests/test_continuous.py); CNF_GLOBAL bounds it.
CNF_TOL = 1e-8
CNF_GLOBAL = 100 * CNF_TOL


# every float64 comparison of a CNF is within the solver's global error (two solves, or a solve and the
# Jacobian of the discretized solution map, each off by up to CNF_GLOBAL)
CNF_ATOL = {"inv_atol": CNF_GLOBAL, "ladj_atol": CNF_GLOBAL, "batch_atol": CNF_GLOBAL}


def _cnf_kwargs(dtype: torch.dtype) -> dict:
    # float32 cannot resolve 1e-8 (its ulp is 1.2e-7): the step-size control would never accept a step.
    # 1e-5 is ContinuousFlow's default.
    tol = CNF_TOL if dtype == torch.float64 else 1e-5
    return {"trace": "exact", "rtol": tol, "atol": tol}


def _affine(tril: bool):
    """Affine holds tensors, not parameters: build them in the requested dtype, with a fixed generator."""

    def make(dtype: torch.dtype) -> Affine:
        g = torch.Generator().manual_seed(11)
        loc = torch.randn(4, generator=g, dtype=torch.float64)
        if not tril:
            scale = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
            return Affine(loc.to(dtype), scale=scale.to(dtype))
        m = torch.randn(4, 4, generator=g, dtype=torch.float64).tril()
        m.diagonal().copy_(m.diagonal().abs() + 0.5)  # |L_ii| >= 0.5: well conditioned
        m[1, 1] *= -1  # a negative diagonal entry: log|det| takes the absolute value
        return Affine(loc.to(dtype), scale_tril=m.to(dtype))

    return make


def _planar_coupling() -> list:
    """A plain layer and a conditional one: the ConditionalComposeFlow binds only the second."""
    return [Planar(3), AffineCoupling(3, (6,), 2)]


@dataclass(frozen=True)
class Case:
    """One transform in the contract suite.

    ``make()`` (or ``make(dtype)``, for those that need it) builds it; ``.to(dtype)`` follows.
    ``perturb = (mode, std)``: every parameter is overwritten by (``"set"``) or shifted by (``"add"``)
    ``N(0, std²)`` draws, from a fixed generator. ``x_scale``: the spread of the test points.
    ``inv_atol``: float64 round-trip tolerance (``None``: the default, see the suite).
    ``ladj_atol``: float64 tolerance of ``log|det J|`` against ``slogdet`` of the brute-force Jacobian.
    ``static_params``: parameters that get no gradient by construction, e.g. weights masked to zero.
    ``init_grads``: as built (before any perturbation) every parameter already gets a non-zero gradient:
    the layer does not start as an exact identity (gated IAF), or its start is designed to (planar's ``u``).
    """

    id: str
    subject: str
    make: Callable[..., nn.Module]
    perturb: tuple[str, float] = ("add", 0.0)
    x_scale: float = 1.0
    inv_atol: float | None = None
    ladj_atol: float | None = None
    batch_atol: float | None = None
    static_params: tuple[str, ...] = field(default_factory=tuple)
    init_grads: bool = False

    def construct(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        """As the constructor leaves it (after the caller's seed), converted to ``dtype``."""
        takes_dtype = len(inspect.signature(self.make).parameters) == 1
        return (self.make(dtype) if takes_dtype else self.make()).to(dtype)

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
        """Seeded, converted to ``dtype``, parameters perturbed (``perturb``) from a fixed generator."""
        torch.manual_seed(seed)
        t = self.construct(dtype)
        mode, std = self.perturb
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in t.parameters():
                draw = std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                p.copy_(draw) if mode == "set" else p.add_(draw)
        return t

    @property
    def kind(self) -> str:
        t = self.construct()
        if any(isinstance(m, ContinuousFlow) for m in _all_parts(t)):
            return "continuous"
        return "conditioned" if getattr(t, "context_dim", 0) else "plain"


def _all_parts(t):
    yield t
    if isinstance(t, nn.Module):
        yield from t.modules()
    yield from getattr(t, "parts", ())


C = Case
A1, A3 = ("add", 0.1), ("add", 0.3)  # shift the initialization (identity-started layers: splines, MAF, couplings)
S5, S7, S10 = ("set", 0.5), ("set", 0.7), ("set", 1.0)  # overwrite it (layers whose start is a special point)
# Planar, radial and Sylvester inverses are Newton or root solves: 1e-10 in float64 (their per-file tests')
NEWTON = {"inv_atol": 1e-10}
L3 = (10,)  # MADE's hidden widths must be >= d (3 * 3 + 1 is its default)
CASES: list[Case] = [
    # ---- plain ---------------------------------------------------------------------------------------------
    C("affine-diag", "Affine", _affine(False)),
    C("affine-tril", "Affine", _affine(True)),
    C("permute", "Permute", lambda: Permute(4, [2, 0, 3, 1])),
    C("reverse", "Reverse", lambda: Reverse(3)),
    C("linear", "InvertibleLinear", lambda: InvertibleLinear(4), A3),
    # d = 1: the strictly triangular parts of L and U are empty (their 1x1 entries are masked out)
    C("linear-d1", "InvertibleLinear", lambda: InvertibleLinear(1), A3, static_params=("lower", "upper")),
    C("planar", "Planar", lambda: Planar(3), S10, 2.0, **NEWTON, init_grads=True),
    C("planar-stack", "PlanarStack", lambda: PlanarStack(3, 3), S7, 2.0, **NEWTON, init_grads=True),
    C("radial", "Radial", lambda: Radial(3), S10, 2.0, **NEWTON),
    C("radial-stack", "RadialStack", lambda: RadialStack(3, 3), S7, 2.0, **NEWTON),
    C("sylvester", "Sylvester", lambda: Sylvester(3, num_householder=2), S7, 2.0, **NEWTON),
    C("sinh-arcsinh", "SinhArcsinh", lambda: SinhArcsinh(3), A3, 2.0, init_grads=True),
    C("iaf", "InverseAutoregressive", lambda: InverseAutoregressive(3), S7, init_grads=True),
    # d = 1: MADE masks every input weight, so m and s are the output biases alone
    C("iaf-d1", "InverseAutoregressive", lambda: InverseAutoregressive(1), S7, static_params=("arn",), init_grads=True),
    C("maf", "MaskedAutoregressive", lambda: MaskedAutoregressive(3), A3),
    C("affine-iaf", "AffineInverseAutoregressive", lambda: AffineInverseAutoregressive(3), A3),
    C("coupling", "AffineCoupling", lambda: AffineCoupling(4, (8,)), A3, 2.0),
    C("coupling-swap", "AffineCoupling", lambda: AffineCoupling(4, (8, 8), swap=True), A3, 2.0),
    C("coupling-il", "AffineCoupling", lambda: AffineCoupling(4, (8,), interleave=True), A3, 2.0),
    C("coupling-il-swap", "AffineCoupling", lambda: AffineCoupling(4, (8,), swap=True, interleave=True), A3, 2.0),
    C("spline", "SplineCoupling", lambda: SplineCoupling(4, (8,)), A3, 3.0),
    C("spline-swap", "SplineCoupling", lambda: SplineCoupling(4, (8, 8), bins=5, swap=True), A3, 3.0),
    C("spline-halves", "SplineCoupling", lambda: SplineCoupling(4, (8,), bound=3.0, interleave=False), A3, 3.0),
    C("spline-d1", "SplineCoupling", lambda: SplineCoupling(1, (8,)), A3, 3.0),
    C("compose", "ComposeFlow", lambda: ComposeFlow([Planar(3), Reverse(3), AffineTransform(0.5, 2.0), Radial(3)]), S5),
    C("stack", "stack", lambda: stack(lambda: Sylvester(3), 2, dim=3, permute=True), S5, 2.0, **NEWTON),
    C("iaf-stack", "iaf_stack", lambda: iaf_stack(3, 2, L3), S5, init_grads=True),
    C("maf-stack", "maf_stack", lambda: maf_stack(3, 2, L3), A3),
    C("affine-iaf-stack", "affine_iaf_stack", lambda: affine_iaf_stack(2, 2, (4,)), A3),
    C("coupling-stack", "coupling_stack", lambda: coupling_stack(4, 3, (8,)), A3, 2.0),
    C("spline-stack", "spline_stack", lambda: spline_stack(4, 3, (8,)), A1, 3.0),
    # ---- conditioned ---------------------------------------------------------------------------------------
    C("iaf-ctx", "InverseAutoregressive", lambda: InverseAutoregressive(3, L3, 2), S7, init_grads=True),
    C("maf-ctx", "MaskedAutoregressive", lambda: MaskedAutoregressive(3, L3, 2), A3),
    C("affine-iaf-ctx", "AffineInverseAutoregressive", lambda: AffineInverseAutoregressive(3, L3, 2), A3),
    C("coupling-ctx", "AffineCoupling", lambda: AffineCoupling(4, (8,), 2), A3, 2.0),
    C("spline-ctx", "SplineCoupling", lambda: SplineCoupling(3, (8,), context_dim=2), A3, 3.0),
    C("cond-planar", "ConditionalPlanar", lambda: ConditionalPlanar(3, 3, 2), S5, 2.0, **NEWTON, init_grads=True),
    C("cond-radial", "ConditionalRadial", lambda: ConditionalRadial(3, 3, 2), S5, 2.0, **NEWTON),
    C("cond-sylvester", "ConditionalSylvester", lambda: ConditionalSylvester(3, 2, 2, 2), S5, 2.0, **NEWTON),
    C("cond-compose", "ConditionalComposeFlow", lambda: ConditionalComposeFlow(_planar_coupling()), S5),
    C("iaf-stack-ctx", "iaf_stack", lambda: iaf_stack(3, 2, L3, 2), S5, init_grads=True),
    C("maf-stack-ctx", "maf_stack", lambda: maf_stack(3, 2, L3, 2), A3),
    C("affine-iaf-stack-ctx", "affine_iaf_stack", lambda: affine_iaf_stack(3, 2, L3, 2), A3),
    C("coupling-stack-ctx", "coupling_stack", lambda: coupling_stack(3, 2, (6,), 2), A3, 2.0),
    C("spline-stack-ctx", "spline_stack", lambda: spline_stack(3, 2, (6,), context_dim=2), A1, 3.0),
    # ---- continuous: dopri5 at 1e-8 with the exact trace; every check is within the solver's error ----------
    C("cnf", "ContinuousFlow", lambda dt: ContinuousFlow(2, (8, 8), **_cnf_kwargs(dt)), S5, **CNF_ATOL),
    C("cnf-ctx", "ContinuousFlow", lambda dt: ContinuousFlow(2, (8,), 2, **_cnf_kwargs(dt)), S5, **CNF_ATOL),
]

# Names in vi_flows.transforms.__all__ that are not transforms to build: each with the reason.
NOT_BUILT = {
    "FlowTransform": "the abstract base: every case is one (call_and_ladj raises NotImplementedError)",
    "rq_spline": "the elementwise spline function, not a transform: every SplineCoupling case runs it",
}
