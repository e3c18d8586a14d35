"""posteriordb ``nes1976-nes``: party identification on ideology, race, age group, education, gender, income.

Stan::

    transformed data {
      for (n in 1:N) { age30_44[n] = age_discrete[n] == 2; age45_64[n] = age_discrete[n] == 3;
                       age65up[n] = age_discrete[n] == 4; }
    }
    parameters { vector[9] beta; real<lower=0> sigma; }
    model {
      partyid7 ~ normal(beta[1] + beta[2] * real_ideo + beta[3] * race_adj + beta[4] * age30_44
                        + beta[5] * age45_64 + beta[6] * age65up + beta[7] * educ1 + beta[8] * gender
                        + beta[9] * income, sigma);
    }

``beta`` and ``sigma`` have Stan's implicit flat priors. N = 1,184.
"""

from __future__ import annotations

import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from . import floats, stan_data

POSTERIOR = "nes1976-nes"
_REALS = ("partyid7", "real_ideo", "race_adj", "educ1", "gender", "income")


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Stan's data: six ``vector[N]`` columns (float32) and ``array[N] int age_discrete`` (long); ``year`` unused."""
    raw = stan_data(folder)
    data = {k: floats(raw[k]) for k in _REALS}
    data["age_discrete"] = torch.tensor(raw["age_discrete"], dtype=torch.long)
    return data


def _design(real_ideo, race_adj, age_discrete, educ1, gender, income) -> torch.Tensor:
    """The (N, 9) design matrix: intercept, the predictors and the three age-group indicators (transformed data)."""
    age = [(age_discrete == k).to(real_ideo.dtype) for k in (2, 3, 4)]
    columns = [torch.ones_like(real_ideo), real_ideo, race_adj, *age, educ1, gender, income]
    return torch.stack(columns, dim=-1)


def model(partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete) -> None:
    """Flat priors on ``beta`` (R⁹) and ``sigma`` (0, ∞); normal likelihood of ``partyid7``."""
    X = _design(real_ideo, race_adj, age_discrete, educ1, gender, income)
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (9,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    mu = (X * beta).sum(-1)  # X @ beta; a batched beta (..., 1, 9) has its 1 in the data plate's slot: (..., N)
    with pyro.plate("data", partyid7.shape[0]):
        pyro.sample("partyid7", dist.Normal(mu, sigma), obs=partyid7)


def stan_log_density(
    params: dict[str, torch.Tensor], partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete
) -> torch.Tensor:
    """Stan's transformed data and model block, row by row; ``~ normal`` without its ``−½ log 2π`` per row."""
    beta, sigma = params["beta"], params["sigma"]
    target = torch.zeros(())
    for n in range(partyid7.shape[0]):
        age30_44 = float(age_discrete[n] == 2)
        age45_64 = float(age_discrete[n] == 3)
        age65up = float(age_discrete[n] == 4)
        mu = (
            beta[0]
            + beta[1] * real_ideo[n]
            + beta[2] * race_adj[n]
            + beta[3] * age30_44
            + beta[4] * age45_64
            + beta[5] * age65up
            + beta[6] * educ1[n]
            + beta[7] * gender[n]
            + beta[8] * income[n]
        )
        target = target - torch.log(sigma) - 0.5 * ((partyid7[n] - mu) / sigma) ** 2
    return target
