"""posteriordb ``arma-arma11``: an ARMA(1, 1) time series with unconstrained AR/MA coefficients.

The Stan program (``model.stan``)::

    parameters { real mu; real phi; real theta; real<lower=0> sigma; }
    model {
      mu ~ normal(0, 10);  phi ~ normal(0, 2);  theta ~ normal(0, 2);  sigma ~ cauchy(0, 2.5);
      nu[1] = mu + phi * mu;                     // assume err[0] == 0 (and y[0] == mu)
      err[1] = y[1] - nu[1];
      for (t in 2:T) { nu[t] = mu + phi * y[t - 1] + theta * err[t - 1];  err[t] = y[t] - nu[t]; }
      err ~ normal(0, sigma);
    }

Neither ``phi`` nor ``theta`` is constrained (no stationarity or invertibility bounds); ``sigma`` is half-Cauchy
(Stan drops the truncation's ``log 2``, a constant). The error recursion ``err[t] = r[t] - theta * err[t - 1]`` is
linear, so the Pyro model evaluates it with a log-depth scan instead of a Python loop over the 200 time steps.
"""

from __future__ import annotations

import json
import math
import pathlib

import pyro
import pyro.distributions as dist
import torch

POSTERIOR = "arma-arma11"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Stan's data: ``T`` (number of observations, long) and ``y`` (float32 series of length ``T``)."""
    raw = json.loads((pathlib.Path(folder) / "data.json").read_text())
    return {"T": torch.tensor(raw["T"], dtype=torch.long), "y": torch.tensor(raw["y"], dtype=torch.float32)}


def _linear_scan(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``e[t] = r[t] + a * e[t - 1]`` with ``e[0] = r[0]``, over the last dim, in ``ceil(log2 T)`` vectorized steps.

    Hillis-Steele scan: after the step with offset ``d``, ``e[t]`` sums ``a^s r[t - s]`` for ``s < 2d``.
    ``a`` has the batch shape of ``r`` without the time dim.
    """
    e, coef, d = r, a.unsqueeze(-1), 1
    while d < r.shape[-1]:
        e = torch.cat([e[..., :d], e[..., d:] + coef * e[..., :-d]], dim=-1)
        coef, d = coef * coef, 2 * d
    return e


def arma_errors(y: torch.Tensor, mu: torch.Tensor, phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Stan's ``err`` vector, batched over leading dims of the parameters: shape ``(*batch, T)``."""
    mu, phi = mu.unsqueeze(-1), phi.unsqueeze(-1)
    y_prev = torch.cat([mu.expand(*mu.shape[:-1], 1), y[:-1].expand(*mu.shape[:-1], -1)], dim=-1)
    innovations = y - mu - phi * y_prev  # err without the MA term; nu[1] = mu + phi * mu
    return _linear_scan(innovations, -theta)


def model(T: torch.Tensor, y: torch.Tensor) -> None:
    """ARMA(1, 1): normal priors on ``mu, phi, theta``, half-Cauchy ``sigma``, normal errors."""
    if int(T) != y.shape[-1]:
        raise ValueError(f"T={int(T)} but y has {y.shape[-1]} observations")
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    err = arma_errors(y, mu, phi, theta)
    pyro.factor("err", dist.Normal(0.0, sigma.unsqueeze(-1)).log_prob(err).sum(-1))


def _normal_lpdf(x: torch.Tensor, loc: float | torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Stan's ``normal_lpdf`` with all its constants."""
    scale = torch.as_tensor(scale)
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


def _cauchy_lpdf(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """Stan's ``cauchy_lpdf`` (untruncated: Stan does not renormalize ``<lower=0>`` for a constant-bound ``~``)."""
    return -math.log(math.pi * scale) - torch.log1p(((x - loc) / scale) ** 2)


def stan_log_density(params: dict[str, torch.Tensor], T: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Stan model block, line by line, on constrained scalars ``mu, phi, theta, sigma``; in double, as Stan."""
    mu, phi, theta, sigma = (params[k].double() for k in ("mu", "phi", "theta", "sigma"))
    y = y.double()
    target = _normal_lpdf(mu, 0, 10) + _normal_lpdf(phi, 0, 2) + _normal_lpdf(theta, 0, 2)
    target = target + _cauchy_lpdf(sigma, 0, 2.5)
    nu = [None] * int(T)
    err = [None] * int(T)
    nu[0] = mu + phi * mu
    err[0] = y[0] - nu[0]
    for t in range(1, int(T)):
        nu[t] = mu + phi * y[t - 1] + theta * err[t - 1]
        err[t] = y[t] - nu[t]
    for t in range(int(T)):
        target = target + _normal_lpdf(err[t], 0, sigma)
    return target
