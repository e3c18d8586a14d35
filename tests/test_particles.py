"""fit's particles: vectorized where the model allows it, one at a time where it does not (training/particles.py).

Bayesian linear regression with known noise has an exact Gaussian posterior: prior ``w ~ N(0, I)``,
``y = X w + N(0, σ²)``, posterior precision ``I + XᵀX / σ²``.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from vi_flows import AutoFlow, fit

N, D, SIGMA, K = 30, 3, 0.5, 4
gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=gen)
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + SIGMA * torch.randn(N, generator=gen)
EXACT_SD = torch.linalg.inv(torch.eye(D) + X.T @ X / SIGMA**2).diagonal().sqrt()


def mm_model(X, y):
    """Not vectorized: ``torch.mm`` refuses the particles' extra dimension."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with pyro.plate("data", N):
        pyro.sample("obs", dist.Normal(torch.mm(X, w.unsqueeze(-1)).squeeze(-1), SIGMA), obs=y)


def summed_model(X, y):
    """Broadcasts without an error, but vectorized its loss is another number (1642 nats against 34 per particle)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    mean = (X * w.unsqueeze(-2)).sum(-1)
    pyro.factor("lik", dist.Normal(mean, SIGMA).log_prob(y).sum())


def vectorized_model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with pyro.plate("data", N):
        pyro.sample("obs", dist.Normal((X * w).sum(-1), SIGMA), obs=y)  # w: (particles, 1, D) or (D,)


def _fitted_sd(model, **options) -> torch.Tensor:
    pyro.clear_param_store()
    guide = AutoFlow(model)  # the exact (Laplace) start: only a wrong gradient can move it far
    fit(model, guide, X, Y, num_steps=400, seed=0, progress=False, **options)
    return guide.get_posterior(X, Y).variance.sqrt()


@pytest.mark.parametrize("model", [mm_model, summed_model], ids=["raises", "silently-wrong"])
def test_unvectorized_model_runs_its_particles_one_at_a_time(model):
    with pytest.warns(UserWarning, match="does not run vectorized over particles"):
        sd = _fitted_sd(model, num_particles=K)
    # the exact sd to 15 %: the fit's noise after 400 steps at 4 particles (≈ 5 %) with room to spare
    torch.testing.assert_close(sd, EXACT_SD, rtol=0.15, atol=0)


def test_the_check_is_what_keeps_a_silently_wrong_model_right():
    """The same model with a user's vectorized loss (left as given) ends far from the exact sd (measured 0.6×)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = _fitted_sd(summed_model, loss=Trace_ELBO(num_particles=K, vectorize_particles=True))
    assert ((sd / EXACT_SD - 1).abs() > 0.3).all(), sd / EXACT_SD


def test_a_vectorized_model_keeps_its_vectorized_particles_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sd = _fitted_sd(vectorized_model, num_particles=K)
    torch.testing.assert_close(sd, EXACT_SD, rtol=0.15, atol=0)


def test_iwelbo_on_an_unvectorized_model_says_what_to_do():
    with pytest.raises(ValueError, match="vectorized particles.*estimator='stl' or 'elbo'"):
        _fitted_sd(mm_model, num_particles=K, estimator="iwelbo")
