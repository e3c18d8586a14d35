"""posteriordb ``bball_drive_event_0-hmm_drive_0``: a two-state HMM (none / drive) on basketball tracking data.

The Stan program (``model.stan``, model block; the Viterbi ``generated quantities`` do not touch the density)::

    data { int K; int N; array[N] real u; array[N] real v; matrix<lower=0>[K, K] alpha; }
    parameters { simplex[K] theta1; simplex[K] theta2; positive_ordered[K] phi; positive_ordered[K] lambda; }
    transformed parameters { array[K] simplex[K] theta;  theta[1] = theta1;  theta[2] = theta2; }
    model {
      for (k in 1:K) target += dirichlet_lpdf(theta[k] | alpha[k, :]');
      target += normal_lpdf(phi[1] | 0, 1);     target += normal_lpdf(phi[2] | 3, 1);
      target += normal_lpdf(lambda[1] | 0, 1);  target += normal_lpdf(lambda[2] | 3, 1);
      gamma[1, k] = exponential_lpdf(u[1] | phi[k]) + exponential_lpdf(v[1] | lambda[k]);
      gamma[t, k] = log_sum_exp_j(gamma[t - 1, j] + log(theta[j, k])
                                  + exponential_lpdf(u[t] | phi[k]) + exponential_lpdf(v[t] | lambda[k]));
      target += log_sum_exp(gamma[N]);
    }

The data's ``alpha = [[4, 2], [2, 4]]``: row ``k`` is the Dirichlet prior of transition row ``theta[k]``, so
``theta1``/``theta2`` get proper ``Dirichlet`` sites (exactly the ``target +=`` terms). ``phi`` and ``lambda``
are exponential *rates*, flat on the positive ordered cone times the normal terms; the ordering breaks the label
symmetry. posteriordb tags this posterior multimodal; its reference draws sit in one mode, with ``lambda`` ~ 0.03 /
0.08 (``lambda[2]`` far below its prior location 3: the hoop distances ``v`` are 5-49) and nearly absorbing states
(``theta1[1]`` ~ 0.99, ``theta2[2]`` ~ 0.96).
"""

from __future__ import annotations

import json
import math
import pathlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .hmm_example import forward_log_marginal

POSTERIOR = "bball_drive_event_0-hmm_drive_0"


def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Stan's data: ``K``, ``N`` (long scalars), ``u``, ``v`` (float32, length ``N``), ``alpha`` (float32, K x K)."""
    raw = json.loads((pathlib.Path(folder) / "data.json").read_text())
    return {
        "K": torch.tensor(raw["K"], dtype=torch.long),
        "N": torch.tensor(raw["N"], dtype=torch.long),
        "u": torch.tensor(raw["u"], dtype=torch.float32),
        "v": torch.tensor(raw["v"], dtype=torch.float32),
        "alpha": torch.tensor(raw["alpha"], dtype=torch.float32),
    }


def _ordered_rates(name: str, k: int, loc1: float, loc2: float) -> torch.Tensor:
    """A flat positive-ordered site plus ``target += normal_lpdf(x[1] | loc1, 1) + normal_lpdf(x[2] | loc2, 1)``."""
    x = pyro.sample(name, dist.ImproperUniform(constraints.positive_ordered_vector, (), (k,)))
    pyro.factor(
        f"{name}_prior", dist.Normal(loc1, 1.0).log_prob(x[..., 0]) + dist.Normal(loc2, 1.0).log_prob(x[..., 1])
    )
    return x


def model(K: torch.Tensor, N: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> None:
    """Dirichlet transition rows, ordered exponential rates with normal terms, forward-algorithm factor."""
    k = int(K)
    if k != 2 or int(N) != u.shape[-1] or int(N) != v.shape[-1]:
        raise ValueError(f"the Stan program needs K == 2 and N == len(u) == len(v); got K={k}, N={int(N)}")
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
    phi = _ordered_rates("phi", k, 0.0, 3.0)
    lam = _ordered_rates("lambda", k, 0.0, 3.0)
    log_trans = torch.stack([theta1, theta2], dim=-2).log()
    log_emit = dist.Exponential(phi.unsqueeze(-2)).log_prob(u.unsqueeze(-1)) + dist.Exponential(
        lam.unsqueeze(-2)
    ).log_prob(v.unsqueeze(-1))  # (*batch, N, K)
    pyro.factor("forward", forward_log_marginal(log_emit, log_trans))


def _normal_lpdf(x: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """Stan's ``normal_lpdf`` with all its constants."""
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def _exponential_lpdf(y: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Stan's ``exponential_lpdf(y | beta)`` with rate ``beta``: ``log(beta) - beta * y``."""
    return torch.log(beta) - beta * y


def _dirichlet_lpdf(theta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Stan's ``dirichlet_lpdf`` with all its constants."""
    return torch.lgamma(a.sum()) - torch.lgamma(a).sum() + ((a - 1) * torch.log(theta)).sum()


def _log_sum_exp(xs: list[torch.Tensor]) -> torch.Tensor:
    """Stan's ``log_sum_exp`` of an array of reals."""
    return torch.logsumexp(torch.stack(xs), dim=0)


def stan_log_density(
    params: dict[str, torch.Tensor],
    K: torch.Tensor,
    N: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """The Stan model block with its literal triple loop (0-based indices), on constrained parameters.

    In double precision, as Stan computes: in float32 the sequential sums drift by ~1e-2 over ``N = 416`` steps.
    """
    n, k_states = int(N), int(K)
    u, v, alpha = u.double(), v.double(), alpha.double()
    theta = [params["theta1"].double(), params["theta2"].double()]
    phi, lam = params["phi"].double(), params["lambda"].double()
    target = sum(_dirichlet_lpdf(theta[k], alpha[k, :]) for k in range(k_states))
    target = target + _normal_lpdf(phi[0], 0, 1) + _normal_lpdf(phi[1], 3, 1)
    target = target + _normal_lpdf(lam[0], 0, 1) + _normal_lpdf(lam[1], 3, 1)
    gamma = [[None] * k_states for _ in range(n)]
    for k in range(k_states):
        gamma[0][k] = _exponential_lpdf(u[0], phi[k]) + _exponential_lpdf(v[0], lam[k])
    for t in range(1, n):
        for k in range(k_states):
            acc = [
                gamma[t - 1][j]
                + torch.log(theta[j][k])
                + _exponential_lpdf(u[t], phi[k])
                + _exponential_lpdf(v[t], lam[k])
                for j in range(k_states)
            ]
            gamma[t][k] = _log_sum_exp(acc)
    return target + _log_sum_exp(gamma[n - 1])
