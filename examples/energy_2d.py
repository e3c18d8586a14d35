"""Figure 3 of Rezende & Mohamed (2015): flow guides fitted to the 2-D test energies, beside the truth.

For each energy U1-U4 (known log Z, so KL(q||p) = log Z - ELBO is exact up to
Monte-Carlo error) fit AutoNormal, AutoPlanar with K = 2, 8, 32 layers, AutoIAF
and (full run only) AutoCNF; print the KL table and save a grid of densities.

    python examples/energy_2d.py            # 24 fits of 3000 steps (CNF 800): estimated 15-30 min on 2 cores
    python examples/energy_2d.py --quick    # seconds: U1 only, 100 steps, no K=2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from vi_flows import AutoCNF, AutoIAF, AutoPlanar, diagnose, fit  # noqa: E402
from vi_flows.energies import LOG_Z, energy_model, log_density  # noqa: E402

LIM, GRID = 4.0, 120


def guides(quick: bool) -> dict:
    """name -> (factory, steps)."""
    steps = 100 if quick else 3000
    out = {"AutoNormal": (AutoNormal, steps)}
    if not quick:
        out["Planar K=2"] = (lambda m: AutoPlanar(m, num_flows=2), steps)
    out |= {
        "Planar K=8": (lambda m: AutoPlanar(m, num_flows=8), steps),
        "Planar K=32": (lambda m: AutoPlanar(m, num_flows=32), steps),
        "IAF": (lambda m: AutoIAF(m, num_flows=4, hidden_dims=(32, 32)), steps),
    }
    if not quick:
        out["CNF"] = (lambda m: AutoCNF(m, hidden_dims=(32, 32), rtol=1e-4, atol=1e-4), 800)
    return out


def density_on_grid(guide, zz: torch.Tensor) -> torch.Tensor:
    """q(z) on grid points ``zz`` (n, 2): AutoNormal is a product of Normals over the site ``z``."""
    with torch.no_grad():
        if hasattr(guide, "get_posterior"):
            return guide.get_posterior().log_prob(zz).exp()
        loc, scale = guide.locs.z, guide.scales.z
        return torch.distributions.Normal(loc, scale).log_prob(zz).sum(-1).exp()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="U1 only, 100 steps (a smoke test)")
    parser.add_argument("--out", default=".", help="folder for energy_2d.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads only add overhead

    energies = ["U1"] if args.quick else ["U1", "U2", "U3", "U4"]
    family = guides(args.quick)
    axis = torch.linspace(-LIM, LIM, GRID)
    zz = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(
        len(energies), len(family) + 1, figsize=(2.2 * (len(family) + 1), 2.2 * len(energies)), squeeze=False
    )
    rows = []
    for i, name in enumerate(energies):
        model = energy_model(name)
        panels = {f"true {name}": log_density(name, zz).exp()}
        for label, (make, steps) in family.items():
            pyro.clear_param_store()
            guide = make(model)
            start = time.perf_counter()
            particles = 4 if args.quick else 8
            fit(model, guide, num_steps=steps, num_particles=particles, seed=args.seed, progress=False, tol=None)
            seconds = time.perf_counter() - start
            diag = diagnose(model, guide, num_samples=1000 if args.quick else 10000, seed=args.seed)
            rows.append(
                {
                    "energy": name,
                    "guide": label,
                    "steps": steps,
                    "seconds": round(seconds, 1),
                    "KL(q||p)": round(LOG_Z[name] - diag.elbo, 3),
                    "k_hat": round(diag.khat, 2),
                }
            )
            panels[label] = density_on_grid(guide, zz)
        for ax, (title, density) in zip(axes[i], panels.items()):
            ax.imshow(density.reshape(GRID, GRID), extent=(-LIM, LIM, -LIM, LIM), origin="lower", cmap="viridis")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "energy_2d.png", dpi=90)
    plt.close(fig)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    print(f"KL(q||p) = log Z - ELBO; densities in {(out / 'energy_2d.png').resolve()}")
    return table


if __name__ == "__main__":
    main()
