"""posteriordb ``kidiq-kidscore_momiq``: child's test score on mother's IQ (uncentred predictor).

Stan::

    parameters { vector[2] beta; real<lower=0> sigma; }
    model {
      sigma ~ cauchy(0, 2.5);
      kid_score ~ normal(beta[1] + beta[2] * mom_iq, sigma);
    }

``beta`` has Stan's implicit flat prior; ``sigma ~ cauchy(0, 2.5)`` on ``sigma > 0`` is a half-Cauchy (Stan's
truncation to (0, ∞) only changes the normalising constant, log 2). The uncentred ``mom_iq`` (≈ 100) makes
intercept and slope strongly correlated.
"""

from __future__ import annotations

import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from . import floats, stan_data

POSTERIOR = "kidiq-kidscore_momiq"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """``kid_score`` and ``mom_iq`` (N = 434); ``mom_hs`` and the ``*_new`` prediction inputs are unused."""
    raw = stan_data(folder)
    return {"kid_score": floats(raw["kid_score"]), "mom_iq": floats(raw["mom_iq"])}


def model(kid_score: torch.Tensor, mom_iq: torch.Tensor) -> None:
    """Flat prior on ``beta``, half-Cauchy(2.5) on ``sigma``; normal likelihood of ``kid_score``."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (2,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5)))
    with pyro.plate("data", kid_score.shape[0]):
        pyro.sample("kid_score", dist.Normal(beta[..., 0] + beta[..., 1] * mom_iq, sigma), obs=kid_score)


def stan_log_density(params: dict[str, torch.Tensor], kid_score: torch.Tensor, mom_iq: torch.Tensor) -> torch.Tensor:
    """Stan's model block, each ``~`` without its constants (``cauchy``: ``−log(1 + (σ/2.5)²)``)."""
    beta, sigma = params["beta"], params["sigma"]
    target = -torch.log1p((sigma / 2.5) ** 2)
    for n in range(kid_score.shape[0]):
        mu = beta[0] + beta[1] * mom_iq[n]
        target = target - torch.log(sigma) - 0.5 * ((kid_score[n] - mu) / sigma) ** 2
    return target
