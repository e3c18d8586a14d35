"""STL_ELBO and IWELBO (vi_flows.objectives): unbiased, lower-variance, and wired into fit.

Statistical checks compare Monte-Carlo means with a z-test, ``|m_1 − m_2| / sqrt(se_1² + se_2²)``, per
parameter coordinate; with fixed seeds they are deterministic, and the bound ``Z_MAX = 4.5`` (a two-sided
p-value of 7e-6 per coordinate, so under 4e-3 over the ≤ 460 coordinates of a test) leaves room for the
other seeds a platform's RNG might give, while a bias of a few standard errors fails.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from vi_flows import AutoCNF, AutoFlow, AutoIAF, AutoNSF, AutoPlanar, AutoRadial, AutoRealNVP, AutoSylvester, fit
from vi_flows.distributions import FlowDistribution
from vi_flows.objectives import IWELBO, STL_ELBO, PathGradientDistribution, path_gradient

Z_MAX = 4.5
A = torch.tensor([[1.0, 0.5], [0.2, 1.0], [1.0, -1.0]])
X = torch.tensor([1.0, 2.0, 0.5])
SIGMA = 0.5


def linear_gaussian(x=X):
    """``z ~ N(0, I_2)``, ``x ~ N(A z, σ² I_3)``: a Gaussian posterior and a closed-form evidence."""
    a = A.to(x.dtype)
    z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z @ a.T, SIGMA).to_event(1), obs=x)


def posterior(x=X) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision of ``p(z | x)``."""
    a = A.to(x.dtype)
    precision = torch.eye(2, dtype=x.dtype) + a.T @ a / SIGMA**2
    return torch.linalg.solve(precision, a.T @ x / SIGMA**2), precision


def log_evidence(x=X) -> float:
    a = A.to(x.dtype)
    cov = SIGMA**2 * torch.eye(3, dtype=x.dtype) + a @ a.T
    return dist.MultivariateNormal(torch.zeros(3, dtype=x.dtype), cov).log_prob(x).item()


def _flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    row = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1).double() for p in params])
    for p in params:
        p.grad = None
    return row


def grad_draws(elbo, model, guide, n: int, seed: int, *args) -> torch.Tensor:
    """``n`` independent gradient estimates (rows), over all parameters of the store sorted by name."""
    guide(*args)  # set up, so the parameter list is complete before the first draw
    pyro.set_rng_seed(seed)
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    _flat_grads(params)
    rows = []
    for _ in range(n):
        elbo.loss_and_grads(model, guide, *args)
        rows.append(_flat_grads(params))
    return torch.stack(rows)


def _column(name: str) -> int:
    """Where parameter ``name`` (a scalar) sits in a row of :func:`grad_draws`."""
    offset = 0
    for key, p in sorted(pyro.get_param_store().named_parameters()):
        if key == name:
            return offset
        offset += p.numel()
    raise KeyError(name)


def z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-coordinate z of the difference of the means of independent draws ``a`` and ``b`` (rows)."""
    se2 = a.var(0) / len(a) + b.var(0) / len(b)
    diff = a.mean(0) - b.mean(0)
    return torch.where(se2 > 0, diff / se2.clamp_min(1e-300).sqrt(), diff.abs() * math.inf)


def assert_same_mean(a: torch.Tensor, b: torch.Tensor) -> None:
    z = z_scores(a, b).nan_to_num(0.0)
    assert z.abs().max() < Z_MAX, f"means differ: max |z| = {z.abs().max():.2f} at coordinate {z.abs().argmax()}"
    # The test has power: somewhere the gradient is far from 0 (the guide is not at the optimum).
    signal = a.mean(0).abs() / (a.var(0) / len(a)).sqrt().clamp_min(1e-300)
    assert signal.max() > 5, f"gradient indistinguishable from 0 (max |mean|/se {signal.max():.1f}): test has no power"


def off_optimum(kind: str, model=linear_gaussian):
    """A flow guide away from the posterior: prior median, scale 0.1 (``init=None``), flows bent."""
    if kind == "planar":
        return AutoPlanar(model, num_flows=2, start="random", init=None)
    return AutoNSF(model, num_flows=2, hidden_dims=(8,), init=None)


# ---- sticking the landing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["planar", "nsf"])
def test_stl_gradient_has_the_plain_gradients_mean(kind):
    guide = off_optimum(kind)
    kw = dict(num_particles=8, vectorize_particles=True)
    stl = grad_draws(STL_ELBO(**kw), linear_gaussian, guide, 100, seed=1)
    plain = grad_draws(Trace_ELBO(**kw), linear_gaussian, guide, 100, seed=2)
    assert_same_mean(stl, plain)
    # Not the same estimator: with the same draws the two differ by the score term.
    paired = grad_draws(Trace_ELBO(**kw), linear_gaussian, guide, 5, seed=1)
    assert (paired - stl[:5]).abs().max() > 1e-3


def test_stl_gradient_vanishes_at_the_exact_posterior(float64):
    # A flow-free full-rank Gaussian set to the exact posterior N(mean, Σ), Σ = L Lᵀ: L = diag(σ) L₁ (init_scale 1).
    x = X.double()
    mean, precision = posterior(x)
    chol = torch.linalg.cholesky(torch.linalg.inv(precision))
    guide = AutoFlow(
        linear_gaussian, base="full", init=None, init_loc_fn=init_to_value(values={"z": mean}), init_scale=1.0
    )
    guide(x)
    guide.scale_unit = chol.diag()
    guide.tril_unit = chol / chol.diag().unsqueeze(-1)
    assert torch.allclose(guide.loc, mean) and torch.allclose(guide._affine_args()["scale_tril"], chol)
    stl = grad_draws(STL_ELBO(), linear_gaussian, guide, 30, 0, x)
    plain = grad_draws(Trace_ELBO(), linear_gaussian, guide, 30, 0, x)
    # Every draw: (∇log p − ∇log q)(z) = 0 when q = p(z|x), up to float64 round-off (1e-15 relative).
    assert stl.abs().max() < 1e-10
    assert plain.abs().max() > 0.3  # the score term alone, whose mean is 0 but whose draws are not
    assert plain.abs().mean(0).max() > 0.3


def test_stl_value_is_the_elbo_with_vectorized_particles():
    guide = off_optimum("planar")
    guide()
    losses = []
    for elbo in (
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        STL_ELBO(num_particles=4, vectorize_particles=True),
    ):
        pyro.set_rng_seed(3)
        losses.append(elbo.loss_and_grads(linear_gaussian, guide))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # float32 sums in another order at most


def test_path_gradient_context_marks_only_autoflow_sites():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z @ A.T, s).to_event(1), obs=X)

    guide = AutoGuideList(model)
    guide.append(AutoPlanar(poutine.block(model, expose=["z"]), num_flows=2, init=None))
    guide.append(AutoNormal(poutine.block(model, hide=["z"])))
    with path_gradient():
        trace = poutine.trace(guide).get_trace()
    (latent,) = [name for name in trace.nodes if name.endswith("_latent")]
    assert isinstance(trace.nodes[latent]["fn"], PathGradientDistribution)
    assert not isinstance(trace.nodes["s"]["fn"], PathGradientDistribution)
    outside = poutine.trace(guide).get_trace()
    assert isinstance(outside.nodes[latent]["fn"], FlowDistribution)
    # STL_ELBO and IWELBO both run on the list, with vectorized particles.
    for elbo in (STL_ELBO(num_particles=3, vectorize_particles=True), IWELBO(num_particles=3)):
        assert math.isfinite(elbo.loss_and_grads(model, guide))


FAMILIES = {
    "planar": lambda m: AutoPlanar(m, num_flows=2, start="random", init=None),
    "radial": lambda m: AutoRadial(m, num_flows=2, init=None),
    "iaf": lambda m: AutoIAF(m, num_flows=2, hidden_dims=(8,), init=None),
    "nsf": lambda m: AutoNSF(m, num_flows=2, hidden_dims=(8,), init=None),
    "realnvp": lambda m: AutoRealNVP(m, num_flows=2, hidden_dims=(8,), init=None),
    "sylvester": lambda m: AutoSylvester(m, num_flows=2, init=None),
    "cnf": lambda m: AutoCNF(m, hidden_dims=(8,), rtol=1e-4, atol=1e-4, init=None),
}
# log q of the draw against log q through the inverse: float32 round trips; the CNF's is an ODE solve at 1e-4.
VALUE_TOL = {"cnf": 1e-2}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stl_runs_for_every_family(family):
    guide = FAMILIES[family](linear_gaussian)
    guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    fit(linear_gaussian, guide, num_steps=3, lr=0.05, estimator="stl", num_particles=2, progress=False, tol=None)
    after = dict(pyro.get_param_store().items())
    moved = [k for k in before if not torch.equal(before[k], after[k].detach())]
    assert any("loc_unit" in k for k in moved) and any("flow" in k for k in moved), moved
    # The surrogate's value is log q: that of the draw, and that of the flow's inverse at the draw.
    with path_gradient():
        site = poutine.trace(guide).get_trace().nodes[f"_{type(guide).__name__}_latent"]
    log_q = site["fn"].log_prob(site["value"])
    assert isinstance(site["fn"], PathGradientDistribution)
    assert log_q.requires_grad
    assert torch.equal(log_q.detach(), site["fn"]._cache[1].detach())
    through_inverse = guide.get_posterior().log_prob(site["value"].detach())
    assert torch.allclose(log_q.detach(), through_inverse, atol=VALUE_TOL.get(family, 1e-4))


# ---- importance weighting --------------------------------------------------------------------------------------------


def test_dreg_gradient_has_the_iwae_gradients_mean():
    guide = off_optimum("planar")
    dreg = grad_draws(IWELBO(num_particles=4), linear_gaussian, guide, 150, seed=1)
    iwae = grad_draws(RenyiELBO(alpha=0.0, num_particles=4, vectorize_particles=True), linear_gaussian, guide, 150, 2)
    assert_same_mean(dreg, iwae)


def test_dreg_covers_other_reparameterized_guides():
    # AutoNormal's sites get the STL surrogate inside IWELBO; with the plain log q, w̃² would bias them.
    guide = AutoNormal(linear_gaussian, init_scale=0.3)
    dreg = grad_draws(IWELBO(num_particles=4), linear_gaussian, guide, 150, seed=1)
    iwae = grad_draws(RenyiELBO(alpha=0.0, num_particles=4, vectorize_particles=True), linear_gaussian, guide, 150, 2)
    assert_same_mean(dreg, iwae)


def test_model_parameters_get_the_plain_iwae_gradient():
    def model():
        prior_scale = pyro.param("prior_scale", torch.tensor(2.0), constraint=dist.constraints.positive)
        z = pyro.sample("z", dist.Normal(torch.zeros(2), prior_scale).to_event(1))
        pyro.sample("x", dist.Normal(z @ A.T, SIGMA).to_event(1), obs=X)

    guide = AutoPlanar(model, num_flows=2, start="random", init=None)
    # max_plate_nesting given: neither loss runs the model once to guess it, so both see the same draws.
    dreg = grad_draws(IWELBO(num_particles=4, max_plate_nesting=0), model, guide, 3, seed=5)
    iwae = grad_draws(
        RenyiELBO(alpha=0.0, num_particles=4, max_plate_nesting=0, vectorize_particles=True), model, guide, 3, 5
    )
    i = _column("prior_scale")
    assert torch.allclose(dreg[:, i], iwae[:, i], rtol=1e-5)  # the same estimator on the same draws
    assert (dreg - iwae).abs().max() > 1e-3  # but the guide's is DReG's, not IWAE's


def test_iw_bound_lies_between_the_elbo_and_the_evidence(float64):
    x = X.double()
    mean, precision = posterior(x)
    # A diagonal Gaussian at the posterior mean, 1.5x too wide: weights of moderate variance.
    scale = 1.5 / precision.diag().sqrt().mean().item()
    guide = AutoFlow(linear_gaussian, init_loc_fn=init_to_value(values={"z": mean}), init_scale=scale)
    pyro.set_rng_seed(0)
    gaps, ses = {}, {}
    for k in (1, 8, 512):
        # K = 1: the ELBO, each estimate an average over 64 draws (its mean is the same, its se 8x smaller).
        elbo = Trace_ELBO(num_particles=64, vectorize_particles=True) if k == 1 else IWELBO(num_particles=k)
        bounds = torch.tensor([-elbo.loss(linear_gaussian, guide, x) for _ in range(100)])
        gaps[k], ses[k] = log_evidence(x) - bounds.mean().item(), bounds.std().item() / 10
    # Gaps here: 0.48 ± 0.01, 0.04 ± 0.02, 0.002 ± 0.002; each bound above the one before by > 4 se.
    assert gaps[1] - gaps[8] > 4 * math.hypot(ses[1], ses[8])
    assert gaps[8] - gaps[512] > 0
    assert abs(gaps[512]) < max(0.02, 5 * ses[512])


def test_iw_bound_is_above_the_mean_log_weight_of_its_own_draws():
    guide = off_optimum("planar")
    guide()
    elbo = IWELBO(num_particles=16)
    for seed in range(5):
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            log_w, _, _ = elbo._log_weights(linear_gaussian, guide, (), {})
        assert log_w.shape == (16,)
        bound = torch.logsumexp(log_w, 0) - math.log(16)
        assert bound >= log_w.mean()  # Jensen, draw by draw
        assert bound > log_w.mean() + 1e-3  # not a degenerate equality: the weights vary


# ---- fit(estimator=...) ----------------------------------------------------------------------------------------------


def test_fit_estimators_report_their_bound():
    """``history["elbo"]`` of step 1 is minus the chosen loss's value on fit's first draws."""
    for estimator, loss, k in (("iwelbo", IWELBO(num_particles=8), 8), ("stl", STL_ELBO(), 1), (None, Trace_ELBO(), 1)):
        pyro.clear_param_store()
        result = fit(
            linear_gaussian, AutoPlanar(linear_gaussian, num_flows=2, init=None), num_steps=1, estimator=estimator,
            num_particles=k, progress=False, seed=0,
        )  # fmt: skip
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoPlanar(linear_gaussian, num_flows=2, init=None)
        if k > 1:  # as fit does for vectorized particles: set up, then guess the plate depth on a forked stream
            guide._setup_prototype()
            with torch.random.fork_rng():
                loss._guess_max_plate_nesting(linear_gaussian, guide, (), {})
        expected = -loss.loss_and_grads(linear_gaussian, guide)
        assert result.history["elbo"][0] == pytest.approx(expected, rel=1e-6), estimator


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimator="dreg"), "estimator must be one of \\['elbo', 'stl', 'iwelbo'\\]"),
        (dict(estimator=1), "estimator must be one of"),
        (dict(estimator="stl", loss=Trace_ELBO()), "exclusive"),
        (dict(estimator="iwelbo", num_particles=1), "num_particles >= 2"),
    ],
)
def test_fit_rejects_bad_estimators(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        fit(linear_gaussian, AutoPlanar(linear_gaussian, num_flows=2, init=None), num_steps=1, progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_iwelbo_needs_two_particles():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        IWELBO(num_particles=1)


def _mixes_particles_into_a_plate():
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("n", 3):  # z @ A.T puts the particles left of the plate's dim: not vectorizable
        pyro.sample("x", dist.Normal(z @ A.T, SIGMA), obs=X)


def _needs_a_vector():
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(torch.mv(A, z), SIGMA).to_event(1), obs=X)  # mv: z must be 1-D


@pytest.mark.parametrize("model", [_mixes_particles_into_a_plate, _needs_a_vector])
def test_iwelbo_names_a_model_it_cannot_vectorize(model):
    guide = AutoPlanar(model, num_flows=2, init=None)
    with pytest.raises(ValueError, match="vectorized particles.*estimator='stl'") as info:
        fit(model, guide, num_steps=1, estimator="iwelbo", num_particles=4, progress=False)
    assert "\n" not in str(info.value)
    fit(model, guide, num_steps=2, estimator="stl", progress=False)  # the suggested fallback runs
