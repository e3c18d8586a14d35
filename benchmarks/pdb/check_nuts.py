"""Sanity check of the posteriordb ports: a short Pyro NUTS run on a port against its reference draws.

A port whose log density matches the Stan transcription can still be wrong in both (a misread data field, a
swapped transition matrix); NUTS on the Pyro model landing on the reference posterior rules that out. Per
posterior it prints each scalar's NUTS and reference mean/sd, then ``max |mean_nuts - mean_ref| / sd_ref``, the
range of ``sd_nuts / sd_ref``, divergences, wall and CPU time. A few hundred draws give a Monte Carlo error of
~0.1 sd on the means, so values up to ~0.3 are agreement. The time box counts CPU seconds of this process (with one
torch thread that is the wall time of an idle machine; on a shared one the wall time can be several times more).

Usage (from the repository root; skips cleanly when ``../shared/posteriordb`` is absent)::

    python benchmarks/pdb/check_nuts.py arma hmm_example --warmup 200 --draws 300 --time-limit 240
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # import as benchmarks.pdb, never bare pdb

from benchmarks import pdb  # noqa: E402


class _TimeUp(Exception):
    """Raised from the MCMC hook when a run exceeds its time limit."""


def _time_box(limit_s: float):
    """An MCMC ``hook_fn`` that aborts the run once it has used ``limit_s`` CPU seconds."""
    start = time.process_time()

    def hook(kernel, params, stage, i):
        if time.process_time() - start > limit_s:
            raise _TimeUp(f"{stage} iteration {i}")

    return hook


def run_nuts(short: str, warmup: int, draws: int, seed: int, limit_s: float, target_accept: float) -> dict:
    """NUTS on the port ``short``: its flattened draws, the reference, divergences and times (or where it stopped)."""
    model, data, reference = pdb.load(short)
    pyro.set_rng_seed(seed)
    kernel = NUTS(model, target_accept_prob=target_accept, init_strategy=init_to_median, max_plate_nesting=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    mcmc = MCMC(kernel, draws, warmup, num_chains=1, hook_fn=_time_box(limit_s), disable_progbar=True)
    try:
        mcmc.run(**data)
    except _TimeUp as e:
        return {"short": short, "timed_out": str(e), "cpu_s": time.process_time() - cpu_start}
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    divergences = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return {
        "short": short,
        "draws": pdb.flatten(mcmc.get_samples()),
        "reference": reference,
        "wall_s": wall,
        "cpu_s": cpu,
        "divergences": divergences,
    }


def compare(draws: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[list[str], float, float, float]:
    """Per-scalar lines and the summaries: max standardized mean error, min and max sd ratio."""
    lines, errors, ratios = [], [], []
    for name, ref in reference.items():
        got = draws[name]
        error = abs(got.mean() - ref.mean()) / ref.std()
        ratio = got.std() / ref.std()
        errors.append(error)
        ratios.append(ratio)
        lines.append(
            f"  {name:12s} nuts {got.mean():10.4g} ± {got.std():<9.3g} ref {ref.mean():10.4g} ± {ref.std():<9.3g}"
            f" |Δmean|/sd {error:5.2f}  sd ratio {ratio:4.2f}"
        )
    return lines, max(errors), min(ratios), max(ratios)


def main(argv: list[str] | None = None) -> int:
    """Run the check on each named port; exit 0 (and say so) when posteriordb is absent."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ports", nargs="*", help=f"short names (default: all of {', '.join(pdb.SHORT_NAMES)})")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=240.0, help="CPU seconds per posterior before giving up")
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not pdb.available():
        print(f"skip: posteriordb not found (set {pdb.ENV} or put it at ../shared/posteriordb)")
        return 0
    torch.set_num_threads(args.threads)
    summary = []
    for short in args.ports or pdb.SHORT_NAMES:
        try:
            pdb.PORTS[short]
        except KeyError as e:
            print(f"{short}: skip ({e})")
            continue
        result = run_nuts(short, args.warmup, args.draws, args.seed, args.time_limit, args.target_accept)
        if "timed_out" in result:
            print(f"{short}: skip, over {args.time_limit:.0f} s (stopped at {result['timed_out']})")
            summary.append(f"{short:18s} timed out after {result['cpu_s']:.0f} s CPU")
            continue
        lines, error, lo, hi = compare(result["draws"], result["reference"])
        print(
            f"{short} ({pdb.PORTS[short].POSTERIOR}): {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU, "
            f"{result['divergences']} divergences"
        )
        print("\n".join(lines))
        summary.append(
            f"{short:18s} max |Δmean|/sd_ref {error:5.2f}  sd ratio {lo:4.2f}-{hi:4.2f}  "
            f"divergences {result['divergences']:3d}  wall {result['wall_s']:4.0f} s  CPU {result['cpu_s']:4.0f} s"
        )
    print(f"\nsummary (NUTS {args.warmup} warmup + {args.draws} draws, seed {args.seed}):")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
