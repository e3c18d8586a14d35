"""posteriordb ``mesquite-logmesquite_logvolume``: log weight of mesquite bushes on log canopy volume.

Stan::

    transformed data {
      log_weight = log(weight);  log_canopy_volume = log(diam1 .* diam2 .* canopy_height);
    }
    parameters { vector[2] beta; real<lower=0> sigma; }
    model { log_weight ~ normal(beta[1] + beta[2] * log_canopy_volume, sigma); }

``beta`` and ``sigma`` have Stan's implicit flat priors. N = 46, so the flat prior on ``sigma`` matters.
"""

from __future__ import annotations

import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from . import floats, stan_data

POSTERIOR = "mesquite-logmesquite_logvolume"
_COLUMNS = ("weight", "diam1", "diam2", "canopy_height")


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """``weight``, ``diam1``, ``diam2``, ``canopy_height`` (N = 46); the other columns are unused."""
    raw = stan_data(folder)
    return {k: floats(raw[k]) for k in _COLUMNS}


def model(weight: torch.Tensor, diam1: torch.Tensor, diam2: torch.Tensor, canopy_height: torch.Tensor) -> None:
    """Flat priors on ``beta`` (R²) and ``sigma`` (0, ∞); normal likelihood of the log weight."""
    log_weight = torch.log(weight)
    log_canopy_volume = torch.log(diam1 * diam2 * canopy_height)
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (2,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", weight.shape[0]):
        mu = beta[..., 0] + beta[..., 1] * log_canopy_volume
        pyro.sample("log_weight", dist.Normal(mu, sigma), obs=log_weight)


def stan_log_density(
    params: dict[str, torch.Tensor],
    weight: torch.Tensor,
    diam1: torch.Tensor,
    diam2: torch.Tensor,
    canopy_height: torch.Tensor,
) -> torch.Tensor:
    """Stan's transformed data and model block; ``~ normal`` without its constant ``−½ log 2π`` per observation."""
    beta, sigma = params["beta"], params["sigma"]
    target = torch.zeros(())
    for n in range(weight.shape[0]):
        log_weight = torch.log(weight[n])
        log_canopy_volume = torch.log(diam1[n] * diam2[n] * canopy_height[n])
        mu = beta[0] + beta[1] * log_canopy_volume
        target = target - torch.log(sigma) - 0.5 * ((log_weight - mu) / sigma) ** 2
    return target
