"""posteriordb ``sblrc-blr``: Bayesian linear regression with a very narrow posterior (sds ≈ 0.001).

Stan::

    parameters { vector[D] beta; real<lower=0> sigma; }
    model {
      target += normal_lpdf(beta | 0, 10);
      target += normal_lpdf(sigma | 0, 10);
      target += normal_lpdf(y | X * beta, sigma);
    }

``target +=`` keeps every constant. ``normal_lpdf(sigma | 0, 10)`` on ``sigma > 0`` is a half-normal(10) up to
Stan's missing truncation constant log 2, so the Pyro model's log joint is Stan's plus exactly log 2.
"""

from __future__ import annotations

import math
import pathlib

import pyro
import pyro.distributions as dist
import torch

from . import floats, stan_data

POSTERIOR = "sblrc-blr"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """``X`` (N × D = 100 × 5) and ``y`` (N)."""
    raw = stan_data(folder)
    return {"X": floats(raw["X"]), "y": floats(raw["y"])}


def model(X: torch.Tensor, y: torch.Tensor) -> None:
    """Normal(0, 10) on each ``beta``, half-normal(10) on ``sigma``; normal likelihood of ``y``."""
    D = X.shape[-1]
    beta = pyro.sample("beta", dist.Normal(torch.zeros(D), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(10.0)))
    mu = (X * beta).sum(-1)  # X @ beta; a batched beta (..., 1, D) has its 1 in the data plate's slot: (..., N)
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def _normal_lpdf(y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Stan's ``normal_lpdf`` of one value, constants included."""
    return -0.5 * math.log(2 * math.pi) - torch.log(sigma) - 0.5 * ((y - mu) / sigma) ** 2


def stan_log_density(params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stan's model block term by term, with its constants (``target +=``)."""
    beta, sigma = params["beta"], params["sigma"]
    N, D = X.shape
    ten, zero = torch.tensor(10.0), torch.tensor(0.0)
    target = sum(_normal_lpdf(beta[d], zero, ten) for d in range(D))
    target = target + _normal_lpdf(sigma, zero, ten)
    for n in range(N):
        mu = sum(X[n, d] * beta[d] for d in range(D))
        target = target + _normal_lpdf(y[n], mu, sigma)
    return target
