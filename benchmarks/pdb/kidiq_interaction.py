"""posteriordb ``kidiq_with_mom_work-kidscore_interaction_c``: centred interaction regression.

Stan::

    transformed data {
      c_mom_hs = mom_hs - mean(mom_hs);  c_mom_iq = mom_iq - mean(mom_iq);  inter = c_mom_hs .* c_mom_iq;
    }
    parameters { vector[4] beta; real<lower=0> sigma; }
    model { kid_score ~ normal(beta[1] + beta[2] * c_mom_hs + beta[3] * c_mom_iq + beta[4] * inter, sigma); }

``beta`` and ``sigma`` have Stan's implicit flat priors. The transformed data are computed in :func:`model` and,
separately, in :func:`stan_log_density`, so that each reads as its Stan counterpart.
"""

from __future__ import annotations

import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from . import floats, stan_data

POSTERIOR = "kidiq_with_mom_work-kidscore_interaction_c"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """``kid_score``, ``mom_hs``, ``mom_iq`` (N = 434); ``mom_work`` is unused by this model."""
    raw = stan_data(folder)
    return {k: floats(raw[k]) for k in ("kid_score", "mom_hs", "mom_iq")}


def model(kid_score: torch.Tensor, mom_hs: torch.Tensor, mom_iq: torch.Tensor) -> None:
    """Flat priors on ``beta`` (R⁴) and ``sigma`` (0, ∞); normal likelihood on centred predictors."""
    c_mom_hs = mom_hs - mom_hs.mean()
    c_mom_iq = mom_iq - mom_iq.mean()
    inter = c_mom_hs * c_mom_iq
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (4,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    b = beta.unbind(-1)
    mu = b[0] + b[1] * c_mom_hs + b[2] * c_mom_iq + b[3] * inter
    with pyro.plate("data", kid_score.shape[0]):
        pyro.sample("kid_score", dist.Normal(mu, sigma), obs=kid_score)


def stan_log_density(
    params: dict[str, torch.Tensor], kid_score: torch.Tensor, mom_hs: torch.Tensor, mom_iq: torch.Tensor
) -> torch.Tensor:
    """Stan's transformed data and model block; ``~ normal`` without its constant ``−½ log 2π`` per observation."""
    N = kid_score.shape[0]
    c_mom_hs = mom_hs - sum(mom_hs[n] for n in range(N)) / N
    c_mom_iq = mom_iq - sum(mom_iq[n] for n in range(N)) / N
    beta, sigma = params["beta"], params["sigma"]
    target = torch.zeros(())
    for n in range(N):
        inter = c_mom_hs[n] * c_mom_iq[n]
        mu = beta[0] + beta[1] * c_mom_hs[n] + beta[2] * c_mom_iq[n] + beta[3] * inter
        target = target - torch.log(sigma) - 0.5 * ((kid_score[n] - mu) / sigma) ** 2
    return target
