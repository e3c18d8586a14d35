"""Rezende & Mohamed's 2-D energies U1–U4: KL(q‖p), PSIS k̂ and ms/step of each guide at the same budget.

``KL(q‖p) = log Z − ELBO`` with the ELBO from ``--draws`` guide draws and ``log Z`` from
:data:`vi_flows.energies.LOG_Z`. Writes ``energies.json``, ``energies.md`` and ``energies.png`` (rows: targets,
columns: guides; histograms of guide draws on [−4, 4]²) to ``--out``.

    python benchmarks/energies.py            # full run
    python benchmarks/energies.py --quick    # CI smoke run

``--anneal T`` trains on the tempered target ``p_β ∝ exp(−β U)`` with ``β_t = min(1, 0.01 + t/T)`` (Rezende &
Mohamed 2015, sec. 6.1) and evaluates at ``β = 1``; ``--late-particles N`` uses ``N`` particles for the last
``--late-fraction`` of the steps. Guide names beyond ``_common.make_guide``'s: ``vi:iaf<K>``, ``vi:realnvp<K>``,
``vi:sylvester<K>``, ``vi:nsf<K>`` (``K`` layers), ``vi:planar<K>-random`` (``AutoPlanar(start="random")``)
and ``vi:cnf`` with ``--cnf-tol``.
"""

from __future__ import annotations

import os
import re
import sys
import time

import numpy as np
import torch
from pyro.infer import Predictive

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import vi_flows  # noqa: E402
from vi_flows import diagnose  # noqa: E402
from vi_flows.energies import LOG_Z, energy_model, log_density  # noqa: E402

GUIDES = [
    "pyro:normal",
    "pyro:mvn",
    "pyro:iaf",
    "pyro:planar2",
    "pyro:planar8",
    "pyro:planar32",
    "vi:planar2",
    "vi:planar8",
    "vi:planar32",
    "vi:radial32",
    "vi:iaf",
    "vi:cnf",
]
QUICK_GUIDES = ["pyro:normal", "pyro:planar2", "vi:planar2", "vi:radial4"]
LIM = 4.0


def make_guide(name: str, model, **options):
    """:func:`_common.make_guide`, plus ``vi:{iaf,realnvp,sylvester,nsf}<K>`` and ``vi:planar<K>-random``."""
    m = re.fullmatch(r"vi:planar(\d+)-random", name)
    if m is not None:
        return vi_flows.AutoPlanar(model, int(m[1]), start="random", init_scale=options.pop("init_scale", 1.0))
    m = re.fullmatch(r"vi:(iaf|realnvp|sylvester|nsf)(\d+)", name)
    if m is None:
        return C.make_guide(name, model, **options)
    families = {"iaf": "AutoIAF", "realnvp": "AutoRealNVP", "sylvester": "AutoSylvester", "nsf": "AutoNSF"}
    cls = getattr(vi_flows, families[m[1]])
    return cls(model, num_flows=int(m[2]), init_scale=options.pop("init_scale", 1.0), **options)


def run(args) -> dict:
    targets = ["U1", "U2"] if args.quick else args.targets
    guides = QUICK_GUIDES if args.quick else args.guides
    budget = dict(num_steps=args.steps, num_particles=args.particles, lr=args.lr, lr_final=args.lr_final)
    budget.update(anneal=args.anneal, late_particles=args.late_particles, late_fraction=args.late_fraction)
    rows, pictures = [], {}
    for target in targets:
        model = energy_model(target)
        for name in guides:
            options = {}
            if name == "vi:cnf":  # the FFJORD default 1e-5 costs ~10x the steps' time; 1e-3 keeps log q exact to ~1e-3
                options = dict(rtol=args.cnf_tol, atol=args.cnf_tol)
            guide = make_guide(name, model, **options)
            t0 = time.perf_counter()
            fit = C.train(model, guide, seed=args.seed, **budget)
            d = diagnose(model, guide, num_samples=args.draws, seed=args.seed + 1)
            z = Predictive(model, guide=guide, num_samples=args.draws, return_sites=["z"], parallel=True)()["z"]
            pictures[(target, name)] = z.detach().reshape(-1, 2).cpu().numpy()
            row = {
                "target": target,
                "guide": name,
                "kl": LOG_Z[target] - d.elbo,
                "kl_se": d.elbo_se,
                "khat": d.khat,
                "ms_per_step": fit["ms_per_step"],
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"{target} {name:14s} KL {row['kl']:.4f} ± {d.elbo_se:.4f}  k̂ {d.khat:.2f}  "
                f"{row['ms_per_step']:.2f} ms/step  ({row['seconds']:.0f} s)",
                flush=True,
            )
    return {
        "machine": C.machine(),
        "budget": budget,
        "draws": args.draws,
        "cnf_tol": args.cnf_tol,
        "rows": rows,
        "pictures": pictures,
        "targets": targets,
        "guides": guides,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, guides = result["targets"], result["guides"]
    cols = len(guides) + 1
    fig, axes = plt.subplots(len(targets), cols, figsize=(1.6 * cols, 1.6 * len(targets)), squeeze=False)
    grid = torch.linspace(-LIM, LIM, 200)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1)
    kl = {(r["target"], r["guide"]): r["kl"] for r in result["rows"]}
    for i, target in enumerate(targets):
        axes[i, 0].imshow(log_density(target, zz).exp().numpy(), extent=(-LIM, LIM, -LIM, LIM), origin="lower")
        axes[i, 0].set_ylabel(target)
        for j, name in enumerate(guides, start=1):
            z = result["pictures"][(target, name)]
            axes[i, j].hist2d(z[:, 0], z[:, 1], bins=80, range=[[-LIM, LIM], [-LIM, LIM]])
            axes[i, j].set_xlabel(f"KL {kl[(target, name)]:.2f}", fontsize=7)
    for j, title in enumerate(["exp(−U)", *guides]):
        axes[0, j].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(result: dict) -> str:
    """Rows: guides; columns: KL and k̂ per target, and the median ms/step over targets."""
    out = []
    for name in result["guides"]:
        row = {"guide": name}
        rs = [r for r in result["rows"] if r["guide"] == name]
        for r in rs:
            row[f"KL {r['target']}"] = r["kl"]
            row[f"k̂ {r['target']}"] = r["khat"]
        row["ms/step"] = float(np.median([r["ms_per_step"] for r in rs]))
        out.append(row)
    cols = ["guide"] + [f"{s} {t}" for t in result["targets"] for s in ("KL", "k̂")] + ["ms/step"]
    return C.markdown_table(out, cols, {c: ".3f" if c.startswith("KL") else ".2f" for c in cols[1:]})


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lr-final", type=float, default=1e-3)
    p.add_argument("--draws", type=int, default=None, help="guide draws for ELBO and k̂ (default 10000)")
    p.add_argument("--cnf-tol", type=float, default=1e-3)
    p.add_argument("--anneal", type=int, default=0, help="β_t = min(1, 0.01 + t/ANNEAL) on log p (0: no annealing)")
    p.add_argument("--late-particles", type=int, default=None, help="particles for the last --late-fraction of steps")
    p.add_argument("--late-fraction", type=float, default=0.25)
    p.add_argument("--guides", nargs="+", default=GUIDES)
    p.add_argument("--targets", nargs="+", default=list(LOG_Z), choices=list(LOG_Z))
    args = p.parse_args(argv)
    if args.anneal < 0:
        p.error(f"--anneal must be >= 0 (0: no annealing), got {args.anneal}")
    if not 0 < args.late_fraction <= 1:
        p.error(f"--late-fraction must be in (0, 1], got {args.late_fraction}")
    args.steps = args.steps or (30 if args.quick else 2000)
    args.draws = args.draws or (500 if args.quick else 10000)
    C.setup(args)
    result = run(args)
    C.save_json({k: v for k, v in result.items() if k != "pictures"}, os.path.join(args.out, "energies.json"))
    md = table(result)
    with open(os.path.join(args.out, "energies.md"), "w") as f:
        f.write(md + "\n")
    plot(result, os.path.join(args.out, "energies.png"))
    print(md)
    return result


if __name__ == "__main__":
    main()
