"""The defaults that make a fit right without tuning: the automatic start, the scale-free parameters, the stop rule.

Exact posteriors (conjugate linear-Gaussian models) are the references; tolerances carry their reasons.
"""

from __future__ import annotations

import math
import random

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

from vi_flows import AutoFlow, AutoIAF, AutoPlanar, fit
from vi_flows.start import laplace, pathfinder
from vi_flows.stopping import GAIN_TOL, GainRule, RelativeRule, make_rule

# A linear regression with a conjugate Gaussian prior and known noise: the posterior is N(m, V) exactly.
_G = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=_G) * torch.tensor([1.0, 30.0, 0.05]) + torch.tensor([0.0, 100.0, 0.0])
Y = X @ torch.tensor([1.0, -0.02, 40.0]) + 0.5 * torch.randn(40, generator=_G)
PRIOR_SD, NOISE = 100.0, 0.5


def regression(x, y, scale: float = 1.0):
    """``w/scale`` has the regression's posterior: ``scale`` rescales the latent only."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), PRIOR_SD * scale).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((x * (w / scale)).sum(-1), NOISE), obs=y)


def exact_posterior(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, covariance of ``w`` and ``log p(y)``, in float64."""
    x, y = X.double(), Y.double()
    prec = x.T @ x / NOISE**2 + torch.eye(3, dtype=torch.float64) / PRIOR_SD**2
    cov = torch.linalg.inv(prec)
    mean = cov @ x.T @ y / NOISE**2
    marginal = dist.MultivariateNormal(
        torch.zeros(len(y), dtype=torch.float64),
        PRIOR_SD**2 * x @ x.T + NOISE**2 * torch.eye(len(y), dtype=torch.float64),
    )
    return mean * scale, cov * scale**2, float(marginal.log_prob(y))


def _elbo(model, guide, num: int = 20000, **kwargs) -> float:
    with torch.no_grad(), pyro.poutine.block():
        loss = pyro.infer.Trace_ELBO(num_particles=num, vectorize_particles=True, max_plate_nesting=1)
        return -loss.loss(model, guide, **kwargs)


def test_auto_start_is_the_exact_posterior_of_an_ill_conditioned_regression():
    """Laplace = the posterior for a linear-Gaussian model; the predictors' scales span 1e3 (condition ~1e9)."""
    mean, cov, _ = exact_posterior()
    guide = AutoFlow(regression)
    guide(X, Y)
    assert guide.start_info == "laplace"
    sd = cov.diagonal().sqrt()
    # float32 model and mode: 1e-3 posterior sds is far below any error that matters and far above rounding
    assert ((guide.loc.double() - mean) / sd).abs().max() < 1e-3
    tril = guide._affine_args()["scale_tril"].double()
    torch.testing.assert_close(tril @ tril.T / (sd[:, None] * sd), cov / (sd[:, None] * sd), atol=1e-3, rtol=1e-3)


def test_a_laplace_start_on_a_gaussian_posterior_is_kept():
    """Started at the exact posterior (KL = 0), 500 steps of the default fit must not walk away: KL stays < 0.02.

    Without the default lr decay the same fit ended at KL 0.048 (IAF) and 0.21 (planar).

    The KL is ``log p(y) − ELBO`` with 20,000 draws (Monte-Carlo sd of the estimate ≈ 0.01 nats at this KL).
    """
    _, _, log_z = exact_posterior()
    pyro.clear_param_store()
    guide = AutoIAF(regression, hidden_dims=(16,))
    fit(regression, guide, X, Y, num_steps=500, seed=0, progress=False)
    kl = log_z - _elbo(regression, guide, x=X, y=Y)
    assert kl < 0.02


@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_scale_free_trajectory(scale):
    """Rescaling the latent by 10^k leaves what the optimizer sees (standardized parameters) the same.

    Same seed, same draws: the trajectories of ``loc_unit`` agree to float32 rounding accumulated over 20
    Adam steps (2e-3 of a posterior sd), where an unpreconditioned guide's would differ by orders of magnitude.
    The planar layers are bent first so that the gradients are not mere noise around an exact start, which
    Adam's normalization would amplify into rounding-driven trajectories.
    """
    trajectories = {}
    for s in (1.0, scale):
        pyro.clear_param_store()
        guide = AutoPlanar(regression, 2, init="laplace")
        guide(X, Y, scale=s)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same bent layers in both runs (they act on the noise: no units)
            for p in guide.flow.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        seen = []
        fit(
            regression,
            guide,
            X,
            Y,
            scale=s,
            num_steps=20,
            seed=1,
            progress=False,
            tol=None,
            callbacks=[lambda step, elbo, g, seen=seen: seen.append(g.loc_unit.detach().clone())],
        )
        trajectories[s] = torch.stack(seen)
    assert trajectories[1.0].abs().max() > 1e-3  # it moved
    torch.testing.assert_close(trajectories[scale], trajectories[1.0], atol=2e-3, rtol=0)


def funnel():
    """Neal's funnel, d = 4: no mode (the density grows without bound down the neck)."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(3), torch.exp(v / 2)).to_event(1))


def test_funnel_start_does_not_blow_up():
    """No mode: Laplace refuses, the path's best Gaussian is finite and broad in v, and the fit runs."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(funnel, init="auto")
    guide()
    assert guide.start_info != "laplace"
    loc, sd = guide.loc.detach(), guide.scale.detach()
    assert torch.isfinite(loc).all() and torch.isfinite(sd).all()
    assert loc[0] > -6.0 and 0.1 < sd[0] < 10.0  # v: not down the neck (v → −∞), not a point, not unbounded
    result = fit(funnel, guide, num_steps=300, seed=0, progress=False)
    assert math.isfinite(result.history["elbo"].tail(50).mean())

    def log_joint(z):
        return guide._log_joint(z, (), {})

    # The funnel's only mode is far down the neck (v = −13.5 for d = 4): Laplace alone would start there.
    assert laplace(log_joint, torch.zeros(4)).loc[0] < -10


def test_pathfinder_start_survives_points_the_model_rejects():
    """A model that raises (validation) at extreme points: the path halves its step there instead of failing."""

    def picky(z):
        if z.abs().max() > 3:
            raise ValueError("Expected parameter scale to satisfy the constraint")
        return -0.5 * ((z - 2.0) ** 2).sum() * 100

    start = pathfinder(picky, torch.zeros(2))
    torch.testing.assert_close(start.loc, torch.full((2,), 2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(start.scale_tril.diagonal(), torch.full((2,), 0.1), atol=1e-4, rtol=0)


def test_user_start_wins():
    """init_loc_fn or init_scale given: no pre-fit; the guide starts exactly there."""
    value = torch.tensor([0.5, -1.0, 2.0])
    guide = AutoFlow(regression, init_loc_fn=init_to_value(values={"w": value}), init_scale=0.3)
    guide(X, Y)
    torch.testing.assert_close(guide.loc, value)
    torch.testing.assert_close(guide.scale, torch.full((3,), 0.3))


# ---------------------------------------------------------------------------------------------- stopping
def _feed(rule, elbos) -> int | None:
    for step, e in enumerate(elbos, 1):
        if rule.update(step, e):
            return step
    return None


def test_gain_rule_waits_while_a_noisy_elbo_still_climbs():
    """ELBO climbing 0.5 nat per 100 steps under noise sd 5: the rule must not stop (2000 steps)."""
    rng = random.Random(0)
    elbos = [-1000 + 0.005 * t + rng.gauss(0, 5) for t in range(2000)]
    assert _feed(GainRule(GAIN_TOL, 100, 2000), elbos) is None


def test_gain_rule_stops_on_a_flat_precise_elbo_and_the_old_rule_stops_early_on_a_large_one():
    rng = random.Random(1)
    flat = [-50 + rng.gauss(0, 1e-4) for _ in range(2000)]
    assert _feed(GainRule(GAIN_TOL, 100, 2000), flat) == 1000  # the first check: half of num_steps
    # |ELBO| = 1e4 climbing 2 nats per 100 steps: a relative 1e-3 (10 nats) stops it, the gain rule does not
    climbing = [-1e4 + 0.02 * t + rng.gauss(0, 1) for t in range(2000)]
    assert _feed(RelativeRule(1e-3, 100, 3), climbing) is not None
    assert _feed(make_rule("auto", 100, 3, 2000), climbing) is None
    assert make_rule(None, 100, 3, 2000) is None
