"""The quick-start demo: flow guides against AutoNormal on two problems.

1. Rezende & Mohamed's 2-D energy U3, where log Z is known, so the table shows
   KL(q‖p) = log Z − ELBO exactly (up to Monte-Carlo error of the ELBO).
2. Eight schools (centered), the classic funnel where mean-field VI fails.

For each guide it prints steps, seconds, the ELBO, the importance-weighted
bound and PSIS k-hat, and saves a PNG of the fitted energy densities. The fits
are shared by two processes where there are two cores, longest first.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

from .diagnostics import KHAT_GOOD, KHAT_OK, diagnose
from .energies import LOG_Z, energy_model, log_density
from .families import FAMILIES
from .training import fit
from .validate import check_positive_int

__all__ = ["demo_row", "eight_schools", "run_demo"]

SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y: torch.Tensor = SCHOOLS_Y, sigma: torch.Tensor = SCHOOLS_SIGMA) -> None:
    """Rubin's eight schools, centered parameterization (Gelman et al., BDA3 §5.5)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _guides(quick: bool, problem: str) -> dict[str, tuple[Callable, int | None]]:
    """name -> (guide factory, steps) for ``problem``. Every guide with its defaults; steps ``None``: ``fit``'s default.

    ``quick`` caps every fit (the CNF, which solves an ODE per step, harder). The CNF runs on the energy only:
    with ``fit``'s defaults it is the one flow under k̂ 0.7 there (1800 steps, 95–101 s of one core), and
    on the 10-d funnel it would add 82 s (past the demo's 3 minutes) for k̂ 0.88 (docs/benchmarks.md,
    posteriors-defaults).
    """
    names = ("planar", "iaf", "nsf") + (("cnf",) if problem == PROBLEMS[0] else ())
    flows = {FAMILIES[name].guide: (100 if name == "cnf" else 500) if quick else None for name in names}
    return {"AutoNormal": (AutoNormal, 500 if quick else None), **{g.__name__: (g, n) for g, n in flows.items()}}


PROBLEMS = ("energy U3", "eight schools")
ENERGY = "U3"
#: The demo's guides, longest fit first (full demo, s: CNF 95–101, NSF 29–62, Planar 15–25, Normal 6–20, IAF
#: 10–21): two worker processes taking the fits in this order finish together (longest-processing-time-first
#: list scheduling).
LONGEST_FIRST = ("AutoCNF", "AutoNSF", "AutoPlanar", "AutoNormal", "AutoIAF")


def _problem(problem: str) -> tuple[Callable, float | None]:
    """``(model, exact log Z or None)``."""
    if problem == PROBLEMS[0]:
        return energy_model(ENERGY), LOG_Z[ENERGY]
    return eight_schools, None


def _rows(quick: bool) -> list[tuple[str, str]]:
    """Every ``(problem, guide)`` fit of the demo, in the table's order."""
    return [(problem, name) for problem in PROBLEMS for name in _guides(quick, problem)]


def _jobs(quick: bool) -> list[tuple[str, str]]:
    """:func:`_rows`, longest fit first (for one guide, eight schools' fit is the longer)."""
    return sorted(_rows(quick), key=lambda job: (LONGEST_FIRST.index(job[1]), -PROBLEMS.index(job[0])))


def _job(problem: str, name: str, quick: bool, seed: int, progress: bool) -> tuple[dict, torch.Tensor | None]:
    """One fit: its table row and, for the energy, its log density on the picture's grid.

    Runs in a worker process of its own when the demo has two cores, so it returns tensors, not guides.
    """
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    row, guide = demo_row(problem, name, quick, seed, progress)
    return row, (_panel(guide) if problem == PROBLEMS[0] else None)


def demo_row(problem: str, name: str, quick: bool = False, seed: int = 0, progress: bool = False) -> tuple[dict, Any]:
    """One row of the demo's table, and the fitted guide: guide ``name`` fitted to ``problem`` with its defaults."""
    model, log_z = _problem(problem)
    make, steps = _guides(quick, problem)[name]
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
    return row, guide


GRID_LIM, GRID_N = 4.0, 200


def _grid() -> torch.Tensor:
    """The picture's ``GRID_N²`` points of ``[−GRID_LIM, GRID_LIM]²``, shape ``(GRID_N², 2)``."""
    axis = torch.linspace(-GRID_LIM, GRID_LIM, GRID_N)
    return torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)


def _panel(guide) -> torch.Tensor:
    """A fitted energy guide's log density on :func:`_grid`."""
    zz = _grid()
    with torch.no_grad():
        if hasattr(guide, "get_posterior"):
            return guide.get_posterior().log_prob(zz)
        loc = torch.stack([guide.locs.z[0], guide.locs.z[1]])  # AutoNormal: independent Normals
        scale = torch.stack([guide.scales.z[0], guide.scales.z[1]])
        return dist.Normal(loc, scale).log_prob(zz).sum(-1)


def _plot(panels: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim, n = GRID_LIM, GRID_N
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    for ax, (name, logp) in zip(axes, panels.items()):
        ax.imshow(logp.exp().reshape(n, n), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fit_all(
    jobs: list[tuple[str, str]], quick: bool, seed: int, progress: bool, workers: int
) -> list[tuple[dict, torch.Tensor | None]]:
    """``jobs``, in ``workers`` processes (``spawn``: safe with torch's thread pools) or in this one; results in
    the jobs' order."""
    if workers < 2:
        return [_job(problem, name, quick, seed, progress) for problem, name in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Two bars redrawn from two processes garble each other: the workers fit quietly.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job, problem, name, quick, seed, False) for problem, name in jobs]
        return [future.result() for future in futures]


def run_demo(
    quick: bool = False, seed: int = 0, out: str | Path = ".", progress: bool = True, workers: int | None = None
) -> pd.DataFrame:
    """Fit the guides of :func:`_guides` to U3 and eight schools; print the table; save ``demo_densities.png``.

    ``workers``: processes sharing the fits, longest first (default: 2 where the machine has 2 cores or more).
    """
    workers = min(2, os.cpu_count() or 1) if workers is None else check_positive_int(workers, "workers")
    jobs = _jobs(quick)
    done = dict(zip(jobs, _fit_all(jobs, quick, seed, progress, workers)))
    table = pd.DataFrame([done[row][0] for row in _rows(quick)])
    panels = {f"true {ENERGY}": log_density(ENERGY, _grid())}
    panels.update({name: done[problem, name][1] for problem, name in _rows(quick) if problem == PROBLEMS[0]})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "demo_densities.png"
    _plot(panels, png)
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print()
        print(table.to_string(index=False, na_rep=""))
    print(
        "\nEvery guide and fit with its defaults. KL(q||p) = log Z - ELBO (exact log Z of the energy)."
        f" k_hat < {KHAT_GOOD}: the guide is close enough for importance sampling; {KHAT_GOOD}-{KHAT_OK}: usable"
        f" with PSIS; > {KHAT_OK}: unreliable (Yao et al. 2018)."
    )
    print(f"Fitted densities: {png.resolve()}")
    if not math.isfinite(float(table["ELBO"].min())):
        raise RuntimeError("a guide ended with a non-finite ELBO")
    return table
