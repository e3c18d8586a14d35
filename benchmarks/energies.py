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

``--defaults`` measures what a user gets untuned: every guide of :data:`_common.DEFAULT_GUIDES` (Pyro's
``AutoNormal``/``AutoMultivariateNormal``/``AutoIAFNormal`` and each vi_flows family) is built as ``AutoX(model)``
and trained by ``vi_flows.fit(model, guide, seed=..., progress=False)`` alone (``--quick`` adds
``num_steps=30``). It writes ``energies_defaults.{json,md,png}`` and, with ``--docs``, the block
``energies-defaults``; the training options (``--steps``, ``--particles``, ``--lr``, ...) are refused with it.

    python benchmarks/energies.py --defaults --docs    # fit's defaults, all guides and targets
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
from vi_flows.families import FAMILIES  # noqa: E402

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
    layered = [n for n, f in FAMILIES.items() if f.guide_num_flows is not None and n not in ("planar", "radial")]
    m = re.fullmatch(rf"vi:({'|'.join(layered)})(\d+)", name)
    if m is None:
        return C.make_guide(name, model, **options)
    cls = FAMILIES[m[1]].guide
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


def run_defaults(args) -> dict:
    """``--defaults``: each guide ``AutoX(model)``, trained by ``vi_flows.fit`` with its defaults only."""
    targets = ["U1", "U2"] if args.quick else args.targets
    quick_steps = DEFAULTS_QUICK_STEPS if args.quick else None
    rows, pictures = [], {}
    for target in targets:
        model = energy_model(target)
        for name in args.guides:
            row = {"target": target, "guide": name}
            try:
                guide = C.make_default_guide(name, model)
                fit = C.fit_defaults(model, guide, seed=args.seed, quick_steps=quick_steps)
                d = diagnose(model, guide, num_samples=args.draws, seed=args.seed + 1)
                z = Predictive(model, guide=guide, num_samples=args.draws, return_sites=["z"], parallel=True)()["z"]
            except (ValueError, RuntimeError, FloatingPointError) as e:  # a diverged fit is a result, not a crash
                row.update(kl=float("nan"), failed=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
                pictures[(target, name)] = np.empty((0, 2))
                rows.append(row)
                print(f"{target} {name:14s} FAILED {row['failed']}", flush=True)
                continue
            pictures[(target, name)] = z.detach().reshape(-1, 2).cpu().numpy()
            row.update(
                kl=LOG_Z[target] - d.elbo,
                kl_se=d.elbo_se,
                elbo=d.elbo,
                iwae=d.iwae,
                khat=d.khat,
                steps=fit["steps"],
                converged=fit["converged"],
                ms_per_step=fit["ms_per_step"],
                seconds=fit["seconds"],
            )
            rows.append(row)
            print(
                f"{target} {name:14s} KL {row['kl']:.4f} ± {d.elbo_se:.4f}  k̂ {d.khat:.2f}  "
                f"{fit['steps']} steps  {fit['ms_per_step']:.2f} ms/step  ({fit['seconds']:.0f} s)",
                flush=True,
            )
    return {
        "machine": C.machine(),
        "defaults": True,
        "budget": {"fit": "defaults", "num_steps": quick_steps},
        "draws": args.draws,
        "rows": rows,
        "pictures": pictures,
        "targets": targets,
        "guides": args.guides,
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


def table_defaults(result: dict) -> str:
    """``--defaults``: rows guides; KL and k̂ per target, the steps ``fit`` ran (min–max) and its seconds (sum)."""
    out = []
    for name in result["guides"]:
        rs = [r for r in result["rows"] if r["guide"] == name]
        row = {"guide": name, "steps": C.steps_range(rs), "s": sum(r.get("seconds", 0.0) for r in rs)}
        for r in rs:
            row[f"KL {r['target']}"] = r["kl"]
            row[f"k̂ {r['target']}"] = r.get("khat")
        out.append(row)
    cols = ["guide"] + [f"{s} {t}" for t in result["targets"] for s in ("KL", "k̂")] + ["steps", "s"]
    fmt = {c: ".3f" if c.startswith("KL") else ".2f" for c in cols[1:-2]}
    return C.markdown_table(out, cols, fmt | {"s": ".0f"})


DOCS_ABOUT = (
    "Rezende & Mohamed's energies with the envelope (z₁/4)⁸ (`vi_flows.energies`). Every guide gets the same "
    "budget ({steps} steps, {particles} vectorized particles, Adam lr {lr} decayed exponentially to {lr_final}, "
    "seed 0, Gaussian bases starting at scale 1; Pyro's flow guides have a fixed N(0, I) base). **KL** = KL(q‖p) = "
    "log Z − ELBO, the ELBO from {draws:,} guide draws (its Monte-Carlo s.e., 0.002–0.05, is in `energies.json`) and "
    "log Z from `LOG_Z`; **k̂**: PSIS Pareto shape of the same draws' weights (negative: a light upper tail); "
    "**ms/step**: median over the targets of each fit's median step time (rough: `speed.py` has the side-by-side "
    "timings). Guides by `_common.make_guide` name: `pyro:planarK` is `AutoNormalizingFlow(iterated(K, planar))`, "
    "`vi:planarK` `AutoPlanar(K)`, `vi:nsf4` `AutoNSF(num_flows=4)`, `vi:cnf` `AutoCNF` (dopri5 at rtol = atol = "
    "1e-3)."
)


def docs_text(result: dict) -> str:
    """The ``energies`` block of ``docs/benchmarks.md``."""
    b = result["budget"]
    about = DOCS_ABOUT.format(
        steps=b["num_steps"], particles=b["num_particles"], lr=b["lr"], lr_final=b["lr_final"], draws=result["draws"]
    )
    guides = "" if result["guides"] == GUIDES else " --guides " + " ".join(result["guides"])
    if b.get("anneal"):
        about += f" Trained on the annealed target (`--anneal {b['anneal']}`)."
    parts = [
        "## 2-D energies U1–U4 (`benchmarks/energies.py`)",
        f"```bash\npython benchmarks/energies.py{guides} --docs\n```",
        about,
        C.conditions(result["machine"]),
        table(result),
    ]
    if result.get("note"):
        parts.append(f"Note: {result['note']}.")
    return "\n\n".join(parts)


def docs_text_defaults(result: dict) -> str:
    """The ``energies-defaults`` block of ``docs/benchmarks.md``."""
    guides = "" if result["guides"] == C.DEFAULT_GUIDES else " --guides " + " ".join(result["guides"])
    if result["budget"]["num_steps"] is not None:  # --quick runs its own two targets
        guides = " --quick" + guides
    elif result["targets"] != list(LOG_Z):
        guides += " --targets " + " ".join(result["targets"])
    about = (
        f"{C.DEFAULTS_ABOUT} **KL** and **k̂** as in the `energies` block, from {result['draws']:,} guide draws "
        "(ELBO, IWAE bound and the KL's s.e. are in `energies_defaults.json`); **steps**: the steps `fit` ran "
        "(min–max over the targets; the stopping rule can end a fit before 2000); **s**: wall seconds of the "
        "`fit` calls summed over the targets, the automatic start included. `vi:normal` is `AutoFlow(model)`, the "
        "Gaussian base alone; `pyro:iaf` is `AutoIAFNormal(model)`."
    )
    failed = [f"{r['guide']} on {r['target']}: {r['failed']}" for r in result["rows"] if r.get("failed")]
    parts = [
        "## 2-D energies U1–U4 with `fit`'s defaults (`benchmarks/energies.py --defaults`)",
        f"```bash\npython benchmarks/energies.py --defaults{guides} --docs\n```",
        about,
        C.conditions(result["machine"]),
        table_defaults(result),
    ]
    if failed:
        parts.append("Failed fits (–): " + "; ".join(failed) + ".")
    return "\n\n".join(parts)


DEFAULTS_QUICK_GUIDES = ["pyro:normal", "vi:normal", "vi:planar"]
DEFAULTS_QUICK_STEPS = 30  # --quick --defaults: fit(num_steps=30), the one departure from fit's defaults
TRAINING_OPTIONS = ["steps", "particles", "lr", "lr_final", "anneal", "late_particles", "late_fraction", "cnf_tol"]


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
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md (block energies)")
    p.add_argument(
        "--defaults",
        action="store_true",
        help="each guide AutoX(model) trained by vi_flows.fit's defaults only (energies_defaults.*, block "
        "energies-defaults); --quick adds num_steps=30",
    )
    args = p.parse_args(argv)
    if args.defaults:
        return main_defaults(p, args)
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
    if args.docs:
        C.update_docs("energies", docs_text(result))
    return result


def main_defaults(p, args) -> dict:
    """``--defaults``: its own guides, outputs ``energies_defaults.*`` and docs block ``energies-defaults``."""
    C.refuse_with_defaults(p, args, TRAINING_OPTIONS)
    if args.guides == p.get_default("guides"):
        args.guides = DEFAULTS_QUICK_GUIDES if args.quick else C.DEFAULT_GUIDES
    unknown = [g for g in args.guides if g not in C.DEFAULT_GUIDES]
    if unknown:
        p.error(f"--defaults: unknown guide(s) {unknown}; choose from {' '.join(C.DEFAULT_GUIDES)}")
    args.draws = args.draws or (500 if args.quick else 10000)
    C.setup(args)
    result = run_defaults(args)
    C.save_json({k: v for k, v in result.items() if k != "pictures"}, os.path.join(args.out, "energies_defaults.json"))
    md = table_defaults(result)
    with open(os.path.join(args.out, "energies_defaults.md"), "w") as f:
        f.write(md + "\n")
    plot(result, os.path.join(args.out, "energies_defaults.png"))
    print(md)
    if args.docs:
        C.update_docs("energies-defaults", docs_text_defaults(result))
    return result


if __name__ == "__main__":
    main()
