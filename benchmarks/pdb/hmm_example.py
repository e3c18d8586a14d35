"""posteriordb ``hmm_example-hmm_example``: a two-state Gaussian HMM, hidden states summed out (forward algorithm).

The Stan program (``model.stan``, model block; the Viterbi ``generated quantities`` do not touch the density)::

    parameters { simplex[K] theta1; simplex[K] theta2; positive_ordered[K] mu; }
    transformed parameters { array[K] simplex[K] theta;  theta[1] = theta1;  theta[2] = theta2; }
    model {
      target += normal_lpdf(mu[1] | 3, 1);
      target += normal_lpdf(mu[2] | 10, 1);
      gamma[1, k] = normal_lpdf(y[1] | mu[k], 1);
      gamma[t, k] = log_sum_exp_j(gamma[t - 1, j] + log(theta[j, k]) + normal_lpdf(y[t] | mu[k], 1));
      target += log_sum_exp(gamma[N]);
    }

So ``theta1``, ``theta2`` (rows of the transition matrix, from-state -> to-state) have Stan's implicit flat prior
on the simplex, ``mu`` is flat on the positive ordered cone times the two normal terms, and the first hidden state
has no initial distribution (each state weighted 1, not 1/K). ``theta`` is deterministic: not a latent site.
The ordering of ``mu`` removes label switching; the program only works for ``K = 2``.

:func:`forward_log_marginal` (shared with ``bball_drive``) runs the forward recursion as a log-depth tree of
log-space matrix products (Pyro's ``DiscreteHMM`` trick): ~20x faster than a Python loop over time for NUTS.
"""

from __future__ import annotations

import json
import math
import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

POSTERIOR = "hmm_example-hmm_example"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Stan's data: ``N`` and ``K`` (long scalars) and the observations ``y`` (float32, length ``N``)."""
    raw = json.loads((pathlib.Path(folder) / "data.json").read_text())
    return {
        "N": torch.tensor(raw["N"], dtype=torch.long),
        "K": torch.tensor(raw["K"], dtype=torch.long),
        "y": torch.tensor(raw["y"], dtype=torch.float32),
    }


def _logmatmulexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) @ exp(b))`` over the last two dims, stably."""
    return torch.logsumexp(a.unsqueeze(-1) + b.unsqueeze(-3), dim=-2)


def forward_log_marginal(log_emit: torch.Tensor, log_trans: torch.Tensor) -> torch.Tensor:
    """Stan's forward algorithm: ``log sum_z prod_t emit[t, z_t] prod_t trans[z_{t-1}, z_t]``, no initial weights.

    ``log_emit``: ``(*batch, N, K)`` emission log densities; ``log_trans``: ``(*batch, K, K)``, row = from-state.
    Returns ``(*batch,)``. The ``N - 1`` step matrices ``trans[j, k] * emit[t, k]`` are multiplied pairwise in
    ``ceil(log2 N)`` vectorized rounds (matrix products are associative), then the first step's ``gamma[1]`` is
    folded in and all end states summed.
    """
    steps = log_trans.unsqueeze(-3) + log_emit[..., 1:, None, :]  # (*batch, N - 1, K, K)
    while steps.shape[-3] > 1:
        n = steps.shape[-3]
        paired = _logmatmulexp(steps[..., 0 : n - 1 : 2, :, :], steps[..., 1:n:2, :, :])
        steps = torch.cat([paired, steps[..., n - 1 :, :, :]], dim=-3) if n % 2 else paired
    gamma1 = log_emit[..., 0, :]
    if steps.shape[-3] == 0:  # N == 1
        return torch.logsumexp(gamma1, dim=-1)
    return torch.logsumexp(gamma1.unsqueeze(-1) + steps[..., 0, :, :], dim=(-2, -1))


def model(N: torch.Tensor, K: torch.Tensor, y: torch.Tensor) -> None:
    """Flat simplex transition rows, flat positive-ordered means with two normal ``target +=`` terms, forward factor."""
    k = int(K)
    if k != 2 or int(N) != y.shape[-1]:
        raise ValueError(f"the Stan program needs K == 2 and N == len(y); got K={k}, N={int(N)}, len(y)={len(y)}")
    theta1 = pyro.sample("theta1", dist.ImproperUniform(constraints.simplex, (), (k,)))
    theta2 = pyro.sample("theta2", dist.ImproperUniform(constraints.simplex, (), (k,)))
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.positive_ordered_vector, (), (k,)))
    pyro.factor("mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[..., 0]) + dist.Normal(10.0, 1.0).log_prob(mu[..., 1]))
    log_trans = torch.stack([theta1, theta2], dim=-2).log()
    log_emit = dist.Normal(mu.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))  # (*batch, N, K)
    pyro.factor("forward", forward_log_marginal(log_emit, log_trans))


def _normal_lpdf(x: torch.Tensor, loc: float | torch.Tensor, scale: float) -> torch.Tensor:
    """Stan's ``normal_lpdf`` with all its constants."""
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def _log_sum_exp(xs: list[torch.Tensor]) -> torch.Tensor:
    """Stan's ``log_sum_exp`` of an array of reals."""
    return torch.logsumexp(torch.stack(xs), dim=0)


def stan_log_density(
    params: dict[str, torch.Tensor], N: torch.Tensor, K: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The Stan model block with its literal triple loop (0-based indices), on constrained ``theta1, theta2, mu``.

    In double precision, as Stan computes: in float32 the sequential sums drift by ~1e-4 over ``N = 100`` steps.
    """
    n, k_states, y = int(N), int(K), y.double()
    theta = [params["theta1"].double(), params["theta2"].double()]
    mu = params["mu"].double()
    target = _normal_lpdf(mu[0], 3, 1) + _normal_lpdf(mu[1], 10, 1)
    gamma = [[None] * k_states for _ in range(n)]
    for k in range(k_states):
        gamma[0][k] = _normal_lpdf(y[0], mu[k], 1)
    for t in range(1, n):
        for k in range(k_states):
            acc = [gamma[t - 1][j] + torch.log(theta[j][k]) + _normal_lpdf(y[t], mu[k], 1) for j in range(k_states)]
            gamma[t][k] = _log_sum_exp(acc)
    return target + _log_sum_exp(gamma[n - 1])
