"""NeuTra-HMC: fit a flow guide, then run NUTS in the flow's warped space (Hoffman et al. 2019).

Neal's funnel and the centered eight schools have geometry NUTS cannot
adapt one step size to: the neck needs tiny steps, the mouth large ones, and
the sampler diverges or crawls. A flow guide ``q = T_# N(0, I)`` fitted by VI
learns most of that shape; NUTS on the pulled-back density
``p(T(z)) |det ∂T/∂z|`` (:class:`pyro.infer.reparam.NeuTraReparam`) then sees
something close to a standard normal. Every vi_flows guide works there: they
are ``AutoContinuous`` guides whose ``get_transform()`` is the whole map
``ε ↦ z`` (base Gaussian included) and ``get_base_dist()`` is ``N(0, I)``.

Reported per sampler: divergent transitions after warmup, the smallest bulk
ESS over all scalar latents (ArviZ) and that ESS per second of NUTS
(warmup included; the VI fit is timed separately).

    python examples/neutra.py            # funnel, ~2 min on one core
    python examples/neutra.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam

from vi_flows import AutoIAF, AutoPlanar, AutoRealNVP, fit
from vi_flows.demo import eight_schools


def funnel(d: int = 10) -> None:
    """Neal's funnel: ``y ~ N(0, 3)``, ``x_i | y ~ N(0, e^{y/2})``, ``i < d``."""
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    with pyro.plate("dim", d - 1):
        pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))


MODELS: dict[str, Callable] = {"funnel (d=10)": funnel, "eight schools (centered)": eight_schools}

GUIDES: dict[str, Callable] = {
    "AutoIAF": lambda m: AutoIAF(m, num_flows=2, hidden_dims=(32, 32)),
    "AutoRealNVP": lambda m: AutoRealNVP(m, num_flows=4, hidden_dims=(32, 32)),
    "AutoPlanar": lambda m: AutoPlanar(m, num_flows=16),
}


def bulk_ess(draws: dict[str, torch.Tensor]) -> float:
    """Smallest ArviZ bulk ESS over every scalar of every site (one chain)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        columns = [v.reshape(v.shape[0], -1).numpy() for v in draws.values()]
        x = np.concatenate(columns, axis=1)
        return float(min(arviz.ess(x[None, :, j], method="bulk") for j in range(x.shape[1])))


def run_nuts(
    model: Callable, num_warmup: int, num_samples: int, seed: int, guide=None, max_tree_depth: int = 10
) -> dict:
    """NUTS on ``model``, or on its NeuTra warp by a fitted ``guide``; constrained draws and diagnostics."""
    pyro.set_rng_seed(seed)
    neutra = None
    if guide is not None:
        for p in guide.parameters():
            p.requires_grad_(False)  # NUTS differentiates the potential with respect to z only
        neutra = NeuTraReparam(guide)
        model = neutra.reparam(model)
    mcmc = MCMC(
        NUTS(model, max_tree_depth=max_tree_depth),
        num_samples=num_samples,
        warmup_steps=num_warmup,
        disable_progbar=True,
    )
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples()
    if neutra is not None:
        (latent,) = samples.values()
        # draws' batch dim must sit left of the model's plates
        samples = {k: v.squeeze(1) for k, v in neutra.transform_sample(latent.unsqueeze(-2)).items()}
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    ess = bulk_ess(samples)
    return dict(divergences=divergences, min_bulk_ess=ess, nuts_s=seconds, ess_per_s=ess / seconds, samples=samples)


def compare(
    model: Callable,
    fit_steps: int,
    num_warmup: int,
    num_samples: int,
    seed: int = 0,
    guides=GUIDES,
    max_tree_depth: int = 10,
) -> pd.DataFrame:
    """Plain NUTS, then NUTS after each guide's warp, on one model."""
    plain = run_nuts(model, num_warmup, num_samples, seed, max_tree_depth=max_tree_depth)
    rows = [dict(sampler="NUTS", fit_s=0.0, **_public(plain))]
    for name, make in guides.items():
        pyro.clear_param_store()
        guide = make(model)
        start = time.perf_counter()
        fit(model, guide, num_steps=fit_steps, lr=1e-2, num_particles=8, seed=seed, progress=False, tol=None)
        fit_s = time.perf_counter() - start
        result = run_nuts(model, num_warmup, num_samples, seed, guide=guide, max_tree_depth=max_tree_depth)
        rows.append(dict(sampler=f"NeuTra {name}", fit_s=fit_s, **_public(result)))
    return pd.DataFrame(rows)


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "samples"}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    parser.add_argument("--model", choices=["funnel", "eight_schools", "both"], default="funnel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("pyro").setLevel(logging.WARNING)
    fit_steps, warmup, samples, depth = (50, 20, 20, 4) if args.quick else (1500, 300, 500, 10)
    names = list(MODELS) if args.model == "both" else [list(MODELS)[0 if args.model == "funnel" else 1]]
    tables = []
    for name in names:
        table = compare(MODELS[name], fit_steps, warmup, samples, args.seed, max_tree_depth=depth)
        table.insert(0, "model", name)
        tables.append(table)
    out = pd.concat(tables, ignore_index=True)
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(out.to_string(index=False))
    return out


if __name__ == "__main__":
    main()
