"""The quick-start demo: flow guides against AutoNormal on two problems.

1. Rezende & Mohamed's 2-D energy U3, where log Z is known, so the table shows
   KL(q‖p) = log Z − ELBO exactly (up to Monte-Carlo error of the ELBO).
2. Eight schools (centered), the classic funnel where mean-field VI fails.

For each guide it prints steps, seconds, the ELBO, the importance-weighted
bound and PSIS k-hat, and saves a PNG of the fitted energy densities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

from .diagnostics import diagnose
from .energies import LOG_Z, energy_model, log_density
from .families import FAMILIES
from .training import fit

__all__ = ["eight_schools", "run_demo"]

SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y: torch.Tensor = SCHOOLS_Y, sigma: torch.Tensor = SCHOOLS_SIGMA) -> None:
    """Rubin's eight schools, centered parameterization (Gelman et al., BDA3 §5.5)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _guides(quick: bool) -> dict[str, tuple[Callable, int | None]]:
    """name -> (guide factory, steps). Every guide with its defaults; steps ``None``: ``fit``'s default.

    The CNF solves an ODE per step, so it gets a fixed, smaller budget; ``quick`` caps every fit.
    """
    flows = {FAMILIES[name].guide: 500 if quick else None for name in ("planar", "iaf", "nsf")}
    flows[FAMILIES["cnf"].guide] = 100 if quick else 200
    return {"AutoNormal": (AutoNormal, 500 if quick else None), **{g.__name__: (g, n) for g, n in flows.items()}}


def _run(problem: str, model, guides, seed: int, progress: bool, log_z: float | None):
    rows, fitted = [], {}
    for name, (make, steps) in guides.items():
        pyro.clear_param_store()
        guide = make(model)
        start = time.perf_counter()
        budget = {} if steps is None else {"num_steps": steps}
        result = fit(model, guide, seed=seed, progress=progress, **budget)  # fit's defaults: nothing tuned
        seconds = time.perf_counter() - start
        diag = diagnose(model, guide, num_samples=10000, seed=seed)
        row = {
            "problem": problem,
            "guide": name,
            "steps": result.num_steps,
            "seconds": round(seconds, 1),
            "ELBO": round(diag.elbo, 3),
            "IWAE": round(diag.iwae, 3),
            "k_hat": round(diag.khat, 2),
        }
        if log_z is not None:
            row["KL(q||p)"] = round(log_z - diag.elbo, 3)
        rows.append(row)
        fitted[name] = guide
    return rows, fitted


def _plot(fitted: dict, energy: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim, n = 4.0, 200
    axis = torch.linspace(-lim, lim, n)
    zz = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    panels = {f"true {energy}": log_density(energy, zz)}
    with torch.no_grad():
        for name, guide in fitted.items():
            if hasattr(guide, "get_posterior"):
                panels[name] = guide.get_posterior().log_prob(zz)
            else:  # AutoNormal: independent Normals
                loc = torch.stack([guide.locs.z[0], guide.locs.z[1]])
                scale = torch.stack([guide.scales.z[0], guide.scales.z[1]])
                panels[name] = dist.Normal(loc, scale).log_prob(zz).sum(-1)
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    for ax, (name, logp) in zip(axes, panels.items()):
        ax.imshow(logp.exp().reshape(n, n), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(quick: bool = False, seed: int = 0, out: str | Path = ".", progress: bool = True) -> pd.DataFrame:
    """Fit the five guides to U3 and eight schools; print the table; save ``demo_densities.png``."""
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    energy = "U3"
    rows, fitted = _run(f"energy {energy}", energy_model(energy), _guides(quick), seed, progress, LOG_Z[energy])
    school_rows, _ = _run("eight schools", eight_schools, _guides(quick), seed, progress, None)
    table = pd.DataFrame(rows + school_rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "demo_densities.png"
    _plot(fitted, energy, png)
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print()
        print(table.to_string(index=False, na_rep=""))
    print(
        "\nEvery guide and fit with its defaults. KL(q||p) = log Z - ELBO (exact log Z of the energy)."
        " k_hat < 0.5: the guide is close enough for importance sampling; 0.5-0.7: usable with PSIS;"
        " > 0.7: unreliable (Yao et al. 2018)."
    )
    print(f"Fitted densities: {png.resolve()}")
    if not math.isfinite(float(table["ELBO"].min())):
        raise RuntimeError("a guide ended with a non-finite ELBO")
    return table
