"""posteriordb ``gp_pois_regr-gp_regr``: GP regression hyper-parameters under the exact marginal likelihood.

The Stan program (``model.stan``)::

    parameters { real<lower=0> rho; real<lower=0> alpha; real<lower=0> sigma; }
    model {
      matrix[N, N] cov = gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep_vector(sigma, N));
      matrix[N, N] L_cov = cholesky_decompose(cov);
      rho ~ gamma(25, 4);  alpha ~ normal(0, 2);  sigma ~ normal(0, 1);
      y ~ multi_normal_cholesky(rep_vector(0, N), L_cov);
    }

Despite the data name, the likelihood is Gaussian (the data's Poisson counts ``k`` are unused). Note that ``sigma``
is added to the diagonal as is: it is the noise *variance*, not a standard deviation. ``gamma(25, 4)`` is
shape/rate; ``alpha`` and ``sigma`` are half-normal (Stan drops the truncation's ``log 2``, a constant).
"""

from __future__ import annotations

import json
import math
import pathlib

import pyro
import pyro.distributions as dist
import torch

POSTERIOR = "gp_pois_regr-gp_regr"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Stan's data: ``N`` (long), inputs ``x`` and outputs ``y`` (float32, length ``N``); ``k`` is not model data."""
    raw = json.loads((pathlib.Path(folder) / "data.json").read_text())
    return {
        "N": torch.tensor(raw["N"], dtype=torch.long),
        "x": torch.tensor(raw["x"], dtype=torch.float32),
        "y": torch.tensor(raw["y"], dtype=torch.float32),
    }


def covariance(x: torch.Tensor, rho: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``gp_exp_quad_cov(x, alpha, rho) + diag(sigma)``, batched over the parameters' leading dims."""
    rho, alpha, sigma = (p[..., None, None] for p in (rho, alpha, sigma))
    sq_dist = (x[:, None] - x[None, :]) ** 2
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return alpha**2 * torch.exp(-sq_dist / (2 * rho**2)) + sigma * eye


def model(N: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """Gamma length scale, half-normal amplitude and noise variance; zero-mean multivariate normal ``y``."""
    if int(N) != y.shape[-1] or int(N) != x.shape[-1]:
        raise ValueError(f"N={int(N)} but x, y have {x.shape[-1]}, {y.shape[-1]} entries")
    rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    scale_tril = torch.linalg.cholesky(covariance(x, rho, alpha, sigma))
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=scale_tril), obs=y)


def _normal_lpdf(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """Stan's ``normal_lpdf`` with all its constants."""
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def _gamma_lpdf(x: torch.Tensor, shape: float, rate: float) -> torch.Tensor:
    """Stan's ``gamma_lpdf`` (shape, rate)."""
    return shape * math.log(rate) - math.lgamma(shape) + (shape - 1) * torch.log(x) - rate * x


def _multi_normal_cholesky_lpdf(y: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Stan's ``multi_normal_cholesky_lpdf``: ``-|L^-1 (y - mean)|^2 / 2 - sum log diag L - N log(2 pi) / 2``."""
    z = torch.linalg.solve_triangular(chol, (y - mean).unsqueeze(-1), upper=False).squeeze(-1)
    return -0.5 * (z**2).sum() - torch.log(torch.diagonal(chol)).sum() - 0.5 * y.shape[-1] * math.log(2 * math.pi)


def stan_log_density(
    params: dict[str, torch.Tensor], N: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The Stan model block, the covariance built entry by entry as Stan defines ``gp_exp_quad_cov``; in double."""
    rho, alpha, sigma = (params[k].double() for k in ("rho", "alpha", "sigma"))
    x, y, n = x.double(), y.double(), int(N)
    cov = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            cov[i, j] = alpha**2 * torch.exp(-((x[i] - x[j]) ** 2) / (2 * rho**2))
        cov[i, i] = cov[i, i] + sigma
    chol = torch.linalg.cholesky(cov)
    target = _gamma_lpdf(rho, 25, 4) + _normal_lpdf(alpha, 0, 2) + _normal_lpdf(sigma, 0, 1)
    return target + _multi_normal_cholesky_lpdf(y, torch.zeros(n, dtype=cov.dtype), chol)
