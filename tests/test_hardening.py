"""Hardening: property tests of the transforms, numerical robustness of fits, clear errors for bad input.

Property tests draw a dimension, a batch shape, parameters and points with
hypothesis and check, in float64: the round trip ``f⁻¹(f(x)) = x``, the
log-determinant against ``slogdet`` of the brute-force Jacobian, the inverse's
log-determinant against the forward one, and additivity over a composition.
Example counts are small (the whole file runs in about 20 s).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.flow_checks import brute_force_ladj
from vi_flows import AutoCNF, AutoIAF, AutoPlanar, fit
from vi_flows.energies import energy_model
from vi_flows.transforms import (
    Affine,
    ComposeFlow,
    InverseAutoregressive,
    Planar,
    PlanarStack,
    Radial,
    RadialStack,
)

PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

dims = st.integers(1, 4)
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.1, 1.0, 3.0])  # parameter scale: near identity, typical, strongly bent


def _randomize(t: torch.nn.Module, scale: float, gen: torch.Generator) -> torch.nn.Module:
    """Overwrite every parameter with N(0, scale²) draws: constrained layers must stay invertible anyway."""
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return t


def _build(kind: str, d: int, scale: float, gen: torch.Generator):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    if kind == "planar":
        t = Planar(d)
    elif kind == "planar_stack":
        t = PlanarStack(d, num_flows=3)
    elif kind == "radial":
        t = Radial(d)
    elif kind == "radial_stack":
        t = RadialStack(d, num_flows=3)
    elif kind == "iaf":
        t = InverseAutoregressive(d, hidden_dims=(3 * d + 1,))
    else:
        loc = torch.randn(d, generator=gen, dtype=torch.float64)
        tril = torch.randn(d, d, generator=gen, dtype=torch.float64).tril()
        tril.diagonal().copy_(tril.diagonal().abs() + 0.5)
        return Affine(loc, scale_tril=tril)
    t = t.double()
    # IAF's MADE weights at scale 3 make σ ≈ 0 somewhere: a legal but numerically singular layer
    return _randomize(t, min(scale, 1.0) if kind == "iaf" else scale, gen)


KINDS = ["planar", "planar_stack", "radial", "radial_stack", "iaf", "affine"]


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(d=dims, batch=batch_shapes, seed=seeds, scale=scales)
def test_invertibility_and_log_det(kind, d, batch, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    t = _build(kind, d, scale, gen)
    x = torch.randn(*batch, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, ladj = t.call_and_ladj(x)
        assert y.shape == x.shape and ladj.shape == x.shape[:-1]
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        x_back, ladj_back = t.inverse_and_ladj(y.clone())  # a fresh tensor: not served by the cache
    # Round trip: float64 with Newton to machine precision for planar; 1e-8 leaves room for IAF's d-step
    # back-substitution, whose error grows like 1/σ per coordinate.
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ladj_back, ladj, atol=1e-8, rtol=1e-8)
    expected = brute_force_ladj(lambda v: t.call_and_ladj(v)[0], x)
    torch.testing.assert_close(ladj, expected, atol=1e-8, rtol=1e-7)


@PROPERTY
@given(d=dims, batch=batch_shapes, seed=seeds, scale=scales)
def test_log_det_adds_over_a_composition(d, batch, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    parts = [_build(k, d, scale, gen) for k in ("planar", "radial", "iaf", "affine")]
    flow = ComposeFlow(parts, dim=d)
    x = torch.randn(*batch, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, ladj = flow.call_and_ladj(x)
        h, total = x, torch.zeros(batch, dtype=torch.float64)
        for p in parts:
            h, part = p.call_and_ladj(h)
            total = total + part
        torch.testing.assert_close(y, h)
        torch.testing.assert_close(ladj, total)
        torch.testing.assert_close(flow.inv(y.clone()), x, atol=1e-8, rtol=1e-8)


# ---- numerical robustness --------------------------------------------------------------------------------------------


def _finite_or_guarded(run):
    """Either the fit's ELBO stays finite, or it stops with the NaN guard's message (never a silent NaN)."""
    try:
        result = run()
    except FloatingPointError as e:
        assert "the parameters keep their values" in str(e)
        return None
    assert np.isfinite(result.history["elbo"]).all()
    return result


def test_64_stacked_planar_layers_train_and_invert():
    pyro.clear_param_store()
    model = energy_model("U1")
    guide = AutoPlanar(model, num_flows=64)
    result = _finite_or_guarded(lambda: fit(model, guide, num_steps=60, num_particles=4, seed=0, progress=False))
    assert result is not None  # 64 layers of float32 must not need the guard at all
    flow = guide.flow
    with torch.no_grad():
        z = guide.get_posterior().sample((200,))
        ladj = flow.log_abs_det_jacobian(flow.inv(z.clone()), z.clone())
        back = flow(flow.inv(z.clone()))
    assert torch.isfinite(ladj).all()
    # float32 through 64 Newton-inverted layers and back: 1e-3 is ~1e4 ulps, far from any real failure
    torch.testing.assert_close(back, z, atol=1e-3, rtol=1e-3)


def test_cnf_on_a_stiff_target():
    # scales 1e-2 and 1e2 in one posterior: the ODE the CNF must learn is stiff
    def stiff():
        pyro.sample("a", dist.Normal(0.0, 1e-2))
        pyro.sample("b", dist.Normal(0.0, 1e2))

    pyro.clear_param_store()
    guide = AutoCNF(stiff, hidden_dims=(16,), rtol=1e-3, atol=1e-3)
    _finite_or_guarded(lambda: fit(stiff, guide, num_steps=15, seed=0, progress=False, tol=None))


@pytest.mark.parametrize("make", [AutoPlanar, AutoIAF], ids=["planar", "iaf"])
def test_float32_latents_of_scale_1e4(make):
    y = torch.tensor([1.2e4, 0.9e4, 1.1e4])

    def model(y):
        z = pyro.sample("z", dist.Normal(0.0, 1e4))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(z, 1e3), obs=y)

    pyro.clear_param_store()
    guide = make(model)
    result = _finite_or_guarded(lambda: fit(model, guide, y, num_steps=100, lr=0.05, seed=0, progress=False))
    if result is not None:
        assert guide.loc.dtype == torch.float32


def test_nan_guard_stops_with_its_message():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("overflow", -torch.exp(1e4 * z.abs()))  # -inf in float32 for any |z| > 0.009

    pyro.clear_param_store()
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1.*keep their values"):
        fit(model, AutoPlanar(model, num_flows=2), num_steps=5, seed=0, progress=False)


# ---- bad input: ValueError naming the argument -------------------------------------------------------------------


def _model_with_latent():
    pyro.sample("z", dist.Normal(0.0, 1.0))


def _model_without_latent():
    pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


def _model_with_discrete():
    k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
    pyro.sample("y", dist.Normal(k.float(), 1.0), obs=torch.tensor(0.5))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: fit(_model_with_latent, AutoPlanar(_model_with_latent), num_steps=-3), ["num_steps", "-3"]),
        (lambda: fit(_model_with_latent, AutoPlanar(_model_with_latent), lr=math.nan), ["lr", "nan"]),
        (lambda: AutoPlanar(_model_with_latent, num_flows=0), ["num_flows", "0"]),
        (lambda: AutoIAF(_model_with_latent, hidden_dims=(0,)), ["hidden_dims"]),
        (lambda: AutoPlanar(_model_with_latent, base="diagonal"), ["base", "'diagonal'"]),
        (lambda: AutoCNF(_model_with_latent, solver="euler-ish"), ["solver"]),
        (lambda: AutoCNF(_model_with_latent, gradient="exact"), ["gradient", "'exact'"]),
        (lambda: AutoPlanar(_model_without_latent)(), ["no latent"]),
        (lambda: AutoPlanar(_model_with_discrete)(), ["'k'", "discrete"]),
        (lambda: Planar(3)(torch.zeros(4, 2)), ["last dimension 3", "(4, 2)"]),
        (lambda: PlanarStack(2, num_flows=-1), ["num_flows"]),
    ],
    ids=["steps", "lr", "flows", "hidden", "base", "solver", "gradient", "no-latent", "discrete", "shape", "stack"],
)
def test_bad_input_raises_value_error_naming_it(call, words):
    pyro.clear_param_store()
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)


# ---- nothing lost ------------------------------------------------------------------------------------------------


def test_a_crash_mid_run_leaves_the_last_checkpoint_and_resume_continues_it(tmp_path):
    def model():
        pyro.sample("z", dist.Normal(1.0, 2.0))

    def crash_at_25(step, elbo, guide):
        if step == 25:
            raise RuntimeError("simulated crash")

    path = tmp_path / "ckpt.pt"
    pyro.clear_param_store()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            model,
            AutoPlanar(model, num_flows=2),
            num_steps=40,
            seed=3,
            progress=False,
            tol=None,
            checkpoint=path,
            checkpoint_every=10,
            callbacks=[crash_at_25],
        )
    state = torch.load(path, weights_only=True)  # intact, and no pickled code needed to read it
    assert state["step"] == 20
    pyro.clear_param_store()
    resumed = fit(model, AutoPlanar(model, num_flows=2), num_steps=40, seed=3, progress=False, tol=None, resume=path)
    pyro.clear_param_store()
    straight = fit(model, AutoPlanar(model, num_flows=2), num_steps=40, seed=3, progress=False, tol=None)
    # exact resume: the crashed-and-resumed run is the uninterrupted one, step for step
    np.testing.assert_array_equal(resumed.history["elbo"], straight.history["elbo"])
