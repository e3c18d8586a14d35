"""The contract every flow transform follows, checked on every transform in ``tests/transform_factory.CASES``.

For each case (plain, conditioned through ``condition(context)``, continuous):

* ``log|det J|`` equals ``slogdet`` of the brute-force Jacobian (float64, several batch dims), and points of
  a batch do not interact;
* ``call_and_ladj`` agrees with the Transform API (``t(x)``, ``log_abs_det_jacobian``, ``inv``,
  ``inverse_and_ladj``), cached and uncached;
* the inverse undoes the map both ways (every layer has one; an unbound conditional layer raises the
  documented ``ValueError`` instead);
* float32 and float64 in give the same dtype out, and gradients reach every parameter (and the context)
  in both directions and are finite;
* ``state_dict`` saved and loaded into a fresh instance reproduces the outputs exactly;
* batch shapes ``()``, ``(5,)``, ``(2, 3)``: each point of a batch maps as it does alone, and a context
  broadcasts against the batch.

Seeds are fixed (the factory's generators, ``torch.manual_seed`` per build); each tolerance says why.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
from collections import Counter

import pytest
import torch
from torch.autograd.functional import jacobian

import vi_flows.transforms as transforms
from tests.transform_factory import CASES, NOT_BUILT, Case
from vi_flows.transforms.base import FlowTransform

IDS = [c.id for c in CASES]
CASE = pytest.mark.parametrize("case", CASES, ids=IDS)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
# Brute-force Jacobians run on a (2, 3) batch: two batch dimensions, six points.
BATCH = (2, 3)

# Round trip, float64, when a case gives no inv_atol: closed-form inverses (affine maps, couplings, splines,
# MAF's one pass) and the d-step back-substitutions of IAF are exact to ~1e-15 relative at |x| ≲ 10, so
# 1e-12 is ~1e3 ulps of headroom. It is the tolerance the per-file dtype tests used.
INV_ATOL = 1e-12
# float32: a few ulps (1.2e-7) times |x| and the layers' local condition numbers; the per-file tests'
# 1e-5 (1e-4 for the Newton/root inverses of planar, radial and Sylvester layers and for the CNF, whose
# solver runs at 1e-5 in float32).
INV_ATOL_32_NEWTON = 1e-4
INV_ATOL_32_DEFAULT = 1e-5
# log|det J| against slogdet of the autograd Jacobian, float64: both exact up to rounding (~1e-14 at d <= 5
# for these well-conditioned maps); 1e-9 absolute + 1e-7 relative is the margin of flow_checks.check_ladj.
LADJ_ATOL = 1e-9
# One point alone against the same point in a batch: the same arithmetic, except that BLAS may pick other
# kernels (matrix-vector vs matrix-matrix) and Newton iterations run until the whole batch converges:
# a few ulps, so 1e-12.
BATCH_ATOL = 1e-12


def _newtonish(case: Case) -> bool:
    return case.inv_atol is not None and case.inv_atol > INV_ATOL


def _inv_atol(case: Case, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return case.inv_atol or INV_ATOL
    return INV_ATOL_32_NEWTON if _newtonish(case) else INV_ATOL_32_DEFAULT


def _context_dim(t) -> int:
    return getattr(t, "context_dim", 0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _points(case: Case, t, batch: tuple, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return case.x_scale * torch.randn(*batch, t.dim, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _context(t, batch: tuple, dtype=torch.float64, seed: int = 2) -> torch.Tensor | None:
    c = _context_dim(t)
    return torch.randn(*batch, c, generator=_gen(seed), dtype=torch.float64).to(dtype) if c else None


def _bind(t, context):
    """The transform under test: ``t`` itself, or ``t.condition(context)``."""
    return t if context is None else t.condition(context)


def _setup(case: Case, batch=BATCH, dtype=torch.float64, seed: int = 0):
    t = case.build(dtype, seed)
    ctx = _context(t, batch, dtype)
    return t, _bind(t, ctx), ctx, _points(case, t, batch, dtype)


def _is_static(case: Case, name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in case.static_params)


# ---- the factory is complete ------------------------------------------------------------------------------


def test_every_public_transform_in_all_has_a_case():
    subjects = {c.subject for c in CASES}
    missing = set(transforms.__all__) - set(NOT_BUILT) - subjects
    assert not missing, f"add a line to tests/transform_factory.CASES for: {sorted(missing)}"
    assert set(NOT_BUILT) <= set(transforms.__all__), "stale NOT_BUILT entries"


# Public FlowTransform classes that are no subject of their own: each with the reason.
NOT_SUBJECTS = {
    "FlowTransform": NOT_BUILT["FlowTransform"],
    "ConditionalFlowTransform": "the abstract conditional base: every conditioned layer case is one",
    "Conditioned": "the bound view condition(context) returns: every conditioned case runs through it",
    "Autoregressive": "the shared base of the MADE layers (no map of its own): IAF, MAF and affine IAF cases",
    "ContextHeadStack": "the shared base of the context-head layers: the ConditionalPlanar/Radial/Sylvester cases",
}


def test_every_public_flow_class_has_a_case():
    """Beyond ``__all__``: any public FlowTransform subclass defined in the transforms package or
    ``vi_flows.amortized`` (the conditional planar/radial/Sylvester layers)."""
    names = ["vi_flows.amortized"] + [
        f"vi_flows.transforms.{m.name}" for m in pkgutil.iter_modules(transforms.__path__) if not m.name.startswith("_")
    ]
    found = set()
    for name in names:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, FlowTransform)
                and not attr.startswith("_")
                and obj.__module__.startswith("vi_flows")
            ):
                found.add(obj.__name__)
    missing = found - set(NOT_SUBJECTS) - {c.subject for c in CASES}
    assert not missing, f"add a line to tests/transform_factory.CASES for: {sorted(missing)}"


def test_every_layer_with_a_context_has_a_conditioned_case():
    for subject in {c.subject for c in CASES}:
        obj = getattr(transforms, subject, None)
        if inspect.isclass(obj) and "context_dim" in inspect.signature(obj).parameters:
            kinds = {c.kind for c in CASES if c.subject == subject}
            assert kinds & {"conditioned", "continuous"} and any(
                _context_dim(c.build()) for c in CASES if c.subject == subject
            ), f"{subject} takes context_dim but has no conditioned case"


def test_cases_build_their_subject():
    assert len(set(IDS)) == len(IDS), [i for i, n in Counter(IDS).items() if n > 1]
    kinds = Counter(c.kind for c in CASES)
    assert set(kinds) == {"plain", "conditioned", "continuous"}, kinds
    from tests import transform_factory

    for case in CASES:
        t = case.construct()
        assert isinstance(t, FlowTransform), case.id
        cls = getattr(transforms, case.subject, None) or getattr(transform_factory, case.subject, None)
        assert cls is not None, case.subject
        if inspect.isclass(cls):
            assert isinstance(t, cls), (case.id, type(t).__name__)
        if case.kind == "conditioned":
            assert _context_dim(t) > 0


# ---- log-determinant ---------------------------------------------------------------------------------------


@CASE
def test_ladj_matches_brute_force_jacobian(case):
    t, bound, ctx, x = _setup(case)
    d, n = t.dim, x.shape[:-1].numel()
    y, ladj = bound.call_and_ladj(x)
    assert y.shape == x.shape and ladj.shape == x.shape[:-1] and ladj.dtype == torch.float64
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    assert (y - x).abs().max() > 1e-3, "the map is (nearly) the identity: the checks would see nothing"

    # The Jacobian of the whole batch, (n d) x (n d): the diagonal blocks are each point's Jacobian.
    J = jacobian(lambda v: bound.call_and_ladj(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    J = J.reshape(n, d, n, d)
    blocks = torch.stack([J[i, :, i, :] for i in range(n)])
    expected = torch.linalg.slogdet(blocks)[1].reshape(x.shape[:-1])
    torch.testing.assert_close(ladj, expected, atol=case.ladj_atol or LADJ_ATOL, rtol=1e-7)
    # Points of a batch do not interact: the off-diagonal blocks vanish. Exactly, but for a CNF, whose
    # adaptive steps are chosen from the whole batch's error estimate (solver error, CNF_GLOBAL).
    off = J.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert off.abs().max() <= (case.batch_atol or 0.0), off.abs().max()


@CASE
def test_call_and_ladj_agrees_with_the_transform_api(case):
    t, bound, ctx, x = _setup(case)
    y, ladj = bound.call_and_ladj(x)
    assert bound.log_abs_det_jacobian(x, y) is ladj  # the pair just produced: from the cache
    # Fresh tensors defeat the cache: a second, separate evaluation. The same arithmetic on the same
    # input is deterministic on the CPU, so the values are identical.
    assert torch.equal(bound(x.clone()), y)
    assert torch.equal(bound.log_abs_det_jacobian(x.clone(), y.clone()), ladj)
    x_inv, ladj_inv = bound.inverse_and_ladj(y.clone())
    assert torch.equal(bound.inv(y.clone()), x_inv)
    # log|det J| that the inverse pass returns, against the forward pass at the point it found: they differ
    # by the round trip's error times the log-determinant's slope, within the round-trip tolerance.
    tol = _inv_atol(case, torch.float64)
    torch.testing.assert_close(ladj_inv, bound.log_abs_det_jacobian(x_inv.clone(), y.clone()), atol=tol, rtol=0)


# ---- inverse -----------------------------------------------------------------------------------------------


@CASE
def test_inverse_round_trip(case):
    t, bound, ctx, x = _setup(case)
    tol = _inv_atol(case, torch.float64)
    y, ladj = bound.call_and_ladj(x)
    x_back, ladj_back = bound.inverse_and_ladj(y.clone())  # a fresh tensor: not served by the cache
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    torch.testing.assert_close(ladj_back, ladj, atol=tol, rtol=0)
    # and the other way round, from arbitrary points
    torch.testing.assert_close(bound(bound.inv(x.clone()).clone()), x, atol=tol, rtol=0)


@CASE
def test_context_protocol(case):
    """A conditional layer refuses to run without its context (the documented ValueError, both directions);
    a plain one refuses a context."""
    t = case.build()
    x = _points(case, t, (4,))
    c = _context_dim(t)
    if not c:
        with pytest.raises(ValueError, match="context"):
            t.condition(torch.zeros(4, 2, dtype=torch.float64))
        return
    with pytest.raises(ValueError, match="context"):
        t(x)
    with pytest.raises(ValueError, match="context"):
        t.inv(x)
    with pytest.raises(ValueError, match="context"):
        t.call_and_ladj(x)
    with pytest.raises(ValueError, match="context"):
        t.condition(torch.zeros(4, c + 1, dtype=torch.float64))


# ---- dtypes and gradients ----------------------------------------------------------------------------------


def _check_grads(case, t, x, ctx, strict: bool, where: str):
    for name, p in t.named_parameters():
        assert p.grad is not None, f"{where}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{where}: non-finite gradient for {name}"
        if strict and not _is_static(case, name):
            assert p.grad.abs().sum() > 0, f"{where}: zero gradient for {name}"
    params = list(t.parameters())
    if params:
        assert any(p.grad.abs().sum() > 0 for p in params), where
    for name, v in (("input", x), ("context", ctx)):
        if v is not None:
            assert v.grad is not None and torch.isfinite(v.grad).all(), f"{where}: {name}"
            if strict:
                assert v.grad.abs().sum() > 0, f"{where}: zero gradient for the {name}"


def _dtype_and_gradient_checks(case, t, dtype, strict, inv_atol):
    ctx = _context(t, (6,), dtype)
    if ctx is not None:
        ctx.requires_grad_(True)
    bound = _bind(t, ctx)
    x = _points(case, t, (6,), dtype).requires_grad_(True)
    y, ladj = bound.call_and_ladj(x)
    assert y.dtype == dtype and ladj.dtype == dtype
    assert y.shape == x.shape and ladj.shape == x.shape[:-1]
    (y.square().sum() + ladj.sum()).backward()
    _check_grads(case, t, x, ctx, strict, "sampling direction")
    # and through the density direction, where maximum likelihood trains
    t.zero_grad()
    if ctx is not None:
        ctx.grad = None
    y_in = y.detach().clone().requires_grad_(True)
    x_back, ladj_back = bound.inverse_and_ladj(y_in)
    assert x_back.dtype == dtype and ladj_back.dtype == dtype
    (x_back.square().sum() - ladj_back.sum()).backward()
    _check_grads(case, t, y_in, ctx, strict, "density direction")
    err = (x_back - x).abs().max().item()
    assert err < inv_atol, err
    # the Transform API's inverse too (its own code path: no log-determinant)
    with torch.no_grad():
        err = (bound.inv(y.detach().clone()) - x).abs().max().item()
    assert err < inv_atol, err


# float32 round trip of the perturbed layers: a few ulps (1.2e-7) times |x| <= 10 times the local condition
# number, which the perturbed splines and stacks raise to ~30 (measured: at most 3.2e-5, spline-halves).
PERTURBED_INV_ATOL_32 = 1e-4


@CASE
@DTYPES
def test_dtype_and_gradients(case, dtype):
    # As built (most layers start as the identity): dtype in = dtype out, gradients exist and are finite
    # (non-zero for every parameter where case.init_grads), and the round trip within the per-file tests'
    # tolerances.
    torch.manual_seed(0)
    _dtype_and_gradient_checks(case, case.construct(dtype), dtype, case.init_grads, _inv_atol(case, dtype))
    # Perturbed: every parameter (but those unused by construction), the input and the context get a
    # non-zero gradient.
    tol = _inv_atol(case, dtype) if dtype == torch.float64 else PERTURBED_INV_ATOL_32
    _dtype_and_gradient_checks(case, case.build(dtype), dtype, True, tol)


# ---- state_dict --------------------------------------------------------------------------------------------


def _outputs(bound, x):
    with torch.no_grad():
        y, ladj = bound.call_and_ladj(x.clone())
        x_inv, ladj_inv = bound.inverse_and_ladj(x.clone())
    return y, ladj, x_inv, ladj_inv


@CASE
def test_state_dict_round_trip_into_a_fresh_instance(case):
    t, bound, ctx, x = _setup(case, seed=0)
    fresh = case.build(seed=1)  # other parameters (and, for random initializations, other buffers)
    state = t.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    before = _outputs(_bind(fresh, ctx), x)
    if any(not torch.equal(v, fresh.state_dict()[k]) for k, v in state.items()):
        assert not torch.equal(before[0], _outputs(bound, x)[0]), "the fresh instance should differ before loading"
    fresh.load_state_dict(loaded)
    for got, want in zip(_outputs(_bind(fresh, ctx), x), _outputs(bound, x)):
        assert torch.equal(got, want)


# ---- batch shapes ------------------------------------------------------------------------------------------


@CASE
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=["scalar", "5", "2x3"])
def test_batch_shapes(case, batch):
    t, bound, ctx, x = _setup(case, batch=batch)
    d = t.dim
    tol = case.batch_atol or BATCH_ATOL
    with torch.no_grad():
        y, ladj = bound.call_and_ladj(x)
        x_inv, ladj_inv = bound.inverse_and_ladj(x.clone())
        assert y.shape == x.shape and x_inv.shape == x.shape
        assert ladj.shape == batch and ladj_inv.shape == batch
        # each point alone maps as it does in the batch: the first, a middle and the last one (enough to see
        # the batch laid out right; the brute-force Jacobian test shows that points do not interact)
        flat_ctx = None if ctx is None else ctx.reshape(-1, ctx.shape[-1])
        flat_x = x.reshape(-1, d)
        for i in sorted({0, len(flat_x) // 2, len(flat_x) - 1}):
            xi = flat_x[i]
            alone = _bind(t, None if flat_ctx is None else flat_ctx[i])
            yi, li = alone.call_and_ladj(xi.clone())
            xi_inv, li_inv = alone.inverse_and_ladj(xi.clone())
            assert yi.shape == (d,) and li.shape == ()
            torch.testing.assert_close(yi, y.reshape(-1, d)[i], atol=tol, rtol=0)
            torch.testing.assert_close(li, ladj.reshape(-1)[i], atol=tol, rtol=0)
            torch.testing.assert_close(xi_inv, x_inv.reshape(-1, d)[i], atol=tol, rtol=0)
            torch.testing.assert_close(li_inv, ladj_inv.reshape(-1)[i], atol=tol, rtol=0)
        if ctx is None or not batch:
            return
        # a context broadcasts against the input's batch: one per trailing batch index, and a single one
        for small in (ctx[(0,) * (len(batch) - 1)], ctx.reshape(-1, ctx.shape[-1])[0]):
            y_b, ladj_b = _bind(t, small).call_and_ladj(x.clone())
            y_e, ladj_e = _bind(t, small.expand(*batch, small.shape[-1])).call_and_ladj(x.clone())
            assert y_b.shape == x.shape and ladj_b.shape == batch
            torch.testing.assert_close(y_b, y_e, atol=tol, rtol=0)
            torch.testing.assert_close(ladj_b, ladj_e, atol=tol, rtol=0)


def test_the_abstract_base_raises_not_implemented():
    """``FlowTransform`` itself has no map and no inverse: both directions raise ``NotImplementedError``."""

    class Bare(FlowTransform):
        pass

    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        Bare(2).call_and_ladj(x)
    with pytest.raises(NotImplementedError):
        Bare(2).inv(x)
