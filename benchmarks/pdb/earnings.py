"""posteriordb ``earnings-earn_height``: earnings on height, on the raw (dollar, inch) scale.

Stan::

    parameters { vector[2] beta; real<lower=0> sigma; }
    model { earn ~ normal(beta[1] + beta[2] * height, sigma); }

``beta`` and ``sigma`` have Stan's implicit flat priors (improper; ``sigma`` flat on (0, ∞)). The posterior is
far from unit scale: intercept ≈ −61,000 ± 9,700, slope ≈ 1,260 ± 144, sigma ≈ 18,900 ± 390.
"""

from __future__ import annotations

import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from . import floats, stan_data

POSTERIOR = "earnings-earn_height"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """``earn`` and ``height`` (N = 1,192) from ``data.json``; ``male`` is unused by this model."""
    raw = stan_data(folder)
    return {"earn": floats(raw["earn"]), "height": floats(raw["height"])}


def model(earn: torch.Tensor, height: torch.Tensor) -> None:
    """Flat priors on ``beta`` (R²) and ``sigma`` (0, ∞); normal likelihood of ``earn``."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (2,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", earn.shape[0]):
        pyro.sample("earn", dist.Normal(beta[..., 0] + beta[..., 1] * height, sigma), obs=earn)


def stan_log_density(params: dict[str, torch.Tensor], earn: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Stan's model block: ``earn ~ normal(...)`` without its constant ``−½ log 2π`` per observation."""
    beta, sigma = params["beta"], params["sigma"]
    target = torch.zeros(())
    for n in range(earn.shape[0]):
        mu = beta[0] + beta[1] * height[n]
        target = target - torch.log(sigma) - 0.5 * ((earn[n] - mu) / sigma) ** 2
    return target
