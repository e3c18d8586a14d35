"""Bayesian logistic regression on real data (scikit-learn's breast cancer set) with a posterior predictive check.

30 standardized features, 569 patients: a 31-dimensional posterior. Fits
AutoNormal and AutoIAF on a training split, compares ELBO and k-hat, and
scores held-out patients with the posterior predictive probability
``p(y* = 1 | x*, data) = E_q[sigmoid(x*ᵀβ + α)]`` (accuracy and log score).

    python examples/logistic_regression.py           # ~1 min on 2 cores
    python examples/logistic_regression.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal

from vi_flows import AutoIAF, diagnose, fit


def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """``y_i ~ Bernoulli(sigmoid(α + x_iᵀβ))``, ``α, β_j ~ N(0, 1)`` on standardized features."""
    alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("patients", x.shape[0]):
        # (x * beta).sum(-1), not x @ beta: it broadcasts when beta carries batch dims (vectorized draws)
        pyro.sample("y", dist.Bernoulli(logits=alpha + (x * beta).sum(-1)), obs=y)


def load(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, sd = x_tr.mean(0), x_tr.std(0)
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.get_default_dtype())  # noqa: E731
    return as_tensor((x_tr - mean) / sd), as_tensor(y_tr), as_tensor((x_te - mean) / sd), as_tensor(y_te)


@torch.no_grad()
def predictive_probability(guide, x_tr, y_tr, x_te, num_samples: int = 500) -> torch.Tensor:
    """``E_q[sigmoid(α + x*ᵀβ)]`` per held-out row, by Monte Carlo over ``num_samples`` guide draws."""
    draws = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["alpha", "beta"])(x_tr, y_tr)
    alpha = draws["alpha"].reshape(num_samples, 1)
    beta = draws["beta"].reshape(num_samples, -1)
    return torch.sigmoid(alpha + beta @ x_te.T).mean(0)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 steps per guide (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load(args.seed)
    steps = 300 if args.quick else 3000
    guides = {"AutoNormal": AutoNormal, "AutoIAF(2)": lambda m: AutoIAF(m, num_flows=2, hidden_dims=(64, 64))}
    rows = []
    for name, make in guides.items():
        pyro.clear_param_store()
        guide = make(model)
        start = time.perf_counter()
        fit(model, guide, x_tr, y_tr, num_steps=steps, lr=1e-2, seed=args.seed, progress=False, tol=None)
        diag = diagnose(model, guide, x_tr, y_tr, num_samples=1000 if args.quick else 4000, seed=args.seed)
        p = predictive_probability(guide, x_tr, y_tr, x_te, 200 if args.quick else 1000).clamp(1e-6, 1 - 1e-6)
        log_score = (y_te * p.log() + (1 - y_te) * (-p).log1p()).mean()
        rows.append(
            {
                "guide": name,
                "seconds": round(time.perf_counter() - start, 1),
                "ELBO": round(diag.elbo, 2),
                "k_hat": round(diag.khat, 2),
                "test accuracy": round(float(((p > 0.5) == (y_te > 0.5)).float().mean()), 3),
                "test log score": round(float(log_score), 3),
            }
        )
    table = pd.DataFrame(rows)
    print(f"{len(y_tr)} training / {len(y_te)} held-out patients, {x_tr.shape[1]} features")
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
