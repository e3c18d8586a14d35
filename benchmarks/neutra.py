"""NeuTra-HMC benchmark: NUTS plain vs NUTS in the warped space of AutoIAF / AutoRealNVP / AutoPlanar.

Models: Neal's funnel (d = 10) and the centered eight schools. Per sampler: divergences after warmup,
smallest bulk ESS over all scalar latents (ArviZ), and that ESS per second of NUTS (warmup included); the
VI fit (``num_particles=8``, Adam 1e-2) is timed separately. One chain, one CPU thread.

    python benchmarks/neutra.py            # full: 1500 fit steps, 300 warmup + 500 draws
    python benchmarks/neutra.py --quick    # CI smoke test
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import conditions, machine, parser, save_json, setup, update_docs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("neutra_example", os.path.join(ROOT, "examples", "neutra.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(out: pd.DataFrame, fit_steps: int, warmup: int, samples: int, depth: int, info: dict | None = None) -> str:
    """The ``neutra`` block of ``docs/benchmarks.md`` (``info``: the run's :func:`_common.machine` record)."""
    lines = [
        "## NeuTra-HMC (`benchmarks/neutra.py`)",
        "",
        "```bash",
        f"python benchmarks/neutra.py --fit-steps {fit_steps} --warmup {warmup} --samples {samples} --docs",
        "```",
        "",
        f"One chain, {warmup} warmup + {samples} draws, max tree depth {depth}; flow guides fitted for "
        f"{fit_steps} steps (8 particles, Adam 1e-2). `min bulk ESS` is the smallest ArviZ bulk ESS over all scalar "
        "latents; `ESS/s` divides it by the NUTS time (warmup included, VI fit excluded); `fit s`: the VI fit.",
        "",
    ]
    if info:
        lines += [conditions(info) + " Times on a shared machine move by about ±30 %.", ""]
    lines += [
        "| model | sampler | divergences | min bulk ESS | NUTS s | ESS/s | fit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out.to_dict("records"):
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['divergences']} | {r['min_bulk_ess']:.0f} | {r['nuts_s']:.0f} "
            f"| {r['ess_per_s']:.2f} | {r['fit_s']:.0f} |"
        )
    lines += [
        "",
        f"One seed and {samples} draws: ESS values this small are themselves uncertain by tens of percent, so "
        "read the table for orders of magnitude, not for ranks between close rows. Longer VI fits give better "
        "warps; the budget here is small.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--fit-steps", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=500)
    args = p.parse_args(argv)
    setup(args)
    ex = _example()
    fit_steps, warmup, samples, depth = (
        (50, 20, 20, 4) if args.quick else (args.fit_steps, args.warmup, args.samples, 10)
    )
    tables = []
    for name, model in ex.MODELS.items():
        table = ex.compare(model, fit_steps, warmup, samples, args.seed, max_tree_depth=depth)
        table.insert(0, "model", name)
        tables.append(table)
        print(table.to_string(index=False), flush=True)
    out = pd.concat(tables, ignore_index=True)
    tag = "-quick" if args.quick else ""
    save_json(
        dict(
            machine=machine(),
            budget=dict(fit_steps=fit_steps, warmup=warmup, samples=samples, max_tree_depth=depth),
            rows=out.to_dict("records"),
        ),
        os.path.join(args.out, f"neutra{tag}.json"),
    )
    if args.docs:
        update_docs("neutra", render(out, fit_steps, warmup, samples, depth, machine()))
    return out


if __name__ == "__main__":
    main()
