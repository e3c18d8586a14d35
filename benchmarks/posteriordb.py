"""posteriordb: how close does each guide, fitted with ``vi_flows.fit``'s defaults, come to the true posterior?

Ten posteriordb posteriors (Pyro ports in ``benchmarks/pdb/``) with gold-standard Stan reference draws, read from
``<repo>/../shared/posteriordb`` (or ``$VI_FLOWS_POSTERIORDB``); without that folder the script prints one
"skipped" line and exits 0. Every guide is built with its class's defaults and fitted by
``vi_flows.fit(model, guide, **data, seed=seed, progress=False)`` and nothing else, so the table measures the
defaults (``--quick`` adds ``num_steps=50``). Per posterior and guide, from ``--draws`` guide draws in the
constrained space, per Stan scalar parameter against the reference draws:

- ``|mean_q − mean_ref| / sd_ref`` (the max over parameters is reported),
- ``sd_q / sd_ref`` (min and max),
- the 1-D Wasserstein-1 distance / ``sd_ref`` (max);
- "accurate": max mean error < 0.25 and every sd ratio in [0.8, 1.25];
- PSIS k̂ of the guide's importance weights (``vi_flows.diagnose``), wall seconds and steps of the fit.

A Pyro NUTS run (one chain, ``--nuts-warmup`` + ``--nuts-draws``) is scored the same way, as the anchor for
"wall time to the same accuracy". A failing fit becomes a row with its one-line error; the run continues.
Writes ``posteriordb.json`` and ``posteriordb.md`` to ``--out`` and, unless ``--quick`` or ``--no-docs``,
the block ``posteriordb`` of ``docs/benchmarks.md``.

    python benchmarks/posteriordb.py                                      # everything (long: all guides, NUTS)
    python benchmarks/posteriordb.py --guides vi:iaf,pyro:mvn --posteriors kidiq,sblrc
    python benchmarks/posteriordb.py --quick                              # smoke run: 2 posteriors, 50 steps
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable, Mapping

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoContinuous, AutoIAFNormal, AutoMultivariateNormal
from scipy.stats import wasserstein_distance
from torch.distributions import biject_to

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

import vi_flows  # noqa: E402
from vi_flows.families import FAMILIES, NAMES  # noqa: E402

VI_GUIDES = tuple(f"vi:{name}" for name in NAMES)
GUIDES = VI_GUIDES + ("pyro:mvn", "pyro:iaf", "nuts")
QUICK_POSTERIORS = ("mesquite", "sblrc")
QUICK_STEPS = 50
MEAN_TOL = 0.25  # accurate: max |mean error| / sd_ref below this ...
SD_RANGE = (0.8, 1.25)  # ... and every sd_q / sd_ref inside this range
KHAT_OK = 0.7
SKIPPED = "skipped: ../shared/posteriordb not found"


def ports() -> types.ModuleType:
    """The ``benchmarks.pdb`` package (imported by its full name: a bare ``pdb`` is the standard debugger)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module("benchmarks.pdb")


# ----------------------------------------------------------------------------------------------------------- guides
def _vi_factories() -> dict[str, Callable]:
    return {
        # vi:normal is AutoFlow with no transforms: the diagonal Gaussian base alone
        **{f"vi:{name}": family.guide for name, family in FAMILIES.items()},
        "pyro:mvn": AutoMultivariateNormal,
        "pyro:iaf": AutoIAFNormal,
    }


def make_guide(name: str, model: Callable, tails: bool = True) -> AutoContinuous:
    """The guide ``name`` for ``model``: ``AutoX(model)``, or ``AutoX(model, tails=False)`` (vi_flows guides)."""
    factories = _vi_factories()
    if name not in factories:
        raise ValueError(f"unknown guide {name!r}; choose from {', '.join(GUIDES)}")
    if not tails and name in VI_GUIDES:
        return factories[name](model, tails=False)
    return factories[name](model)


def _check_keywords(data: Mapping) -> None:
    """Refuse data keywords that ``fit`` or ``diagnose`` would take as their own arguments (e.g. ``data``)."""
    taken = set(inspect.signature(vi_flows.fit).parameters) | set(inspect.signature(vi_flows.diagnose).parameters)
    clash = sorted(set(data) & (taken - {"args", "kwargs"}))
    if clash:
        raise ValueError(f"model keyword(s) {clash} collide with vi_flows.fit/diagnose arguments; rename them")


@torch.no_grad()
def guide_draws(guide: AutoContinuous, data: Mapping, num_draws: int, seed: int) -> dict[str, torch.Tensor]:
    """``num_draws`` draws of every latent site from an AutoContinuous guide, constrained: ``(S, *site_shape)``."""
    pyro.set_rng_seed(seed)
    latent = guide.get_posterior(**data).sample((num_draws,))
    out = {}
    for site, unconstrained in guide._unpack_latent(latent):
        out[site["name"]] = biject_to(site["fn"].support)(unconstrained)
    return out


# ----------------------------------------------------------------------------------------------------------- scores
def score(draws: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict:
    """Per-parameter and summary scores of ``draws`` against ``reference`` (both ``{Stan scalar name: (S,)}``).

    Returns ``params`` (per parameter: ``mean_err``, ``sd_ratio``, ``w1``, all standardised by the reference sd)
    and the summaries ``max_mean_err``, ``sd_ratio_min``, ``sd_ratio_max``, ``max_w1`` and ``accurate``.
    """
    missing = sorted(set(reference) - set(draws))
    if missing:
        raise ValueError(f"the draws lack reference parameters {missing[:5]}")
    params = {}
    for name, ref in reference.items():
        q = np.asarray(draws[name], dtype=np.float64)
        sd_ref = ref.std()
        params[name] = {
            "mean_err": float(abs(q.mean() - ref.mean()) / sd_ref),
            "sd_ratio": float(q.std() / sd_ref),
            "w1": float(wasserstein_distance(q, ref) / sd_ref),
        }
    return {"params": params, **summarize(params)}


def summarize(params: Mapping[str, Mapping[str, float]]) -> dict:
    """Max mean error, sd-ratio range, max W1 and the accuracy verdict over the parameters' scores."""
    mean_err = max(p["mean_err"] for p in params.values())
    ratios = [p["sd_ratio"] for p in params.values()]
    lo, hi = min(ratios), max(ratios)
    return {
        "max_mean_err": mean_err,
        "sd_ratio_min": lo,
        "sd_ratio_max": hi,
        "max_w1": max(p["w1"] for p in params.values()),
        "accurate": bool(mean_err < MEAN_TOL and SD_RANGE[0] <= lo and hi <= SD_RANGE[1]),
    }


# ------------------------------------------------------------------------------------------------------------- runs
def fit_guide(name: str, model: Callable, data: Mapping, args: argparse.Namespace) -> dict:
    """Fit guide ``name`` with ``fit``'s defaults; return its draws' site arrays, k̂, seconds and steps."""
    _check_keywords(data)
    pyro.clear_param_store()
    guide = make_guide(name, model, not args.no_tails)
    extra = {"num_steps": QUICK_STEPS} if args.quick else {}
    if args.no_tail_average:
        extra["tail_average"] = False
    t0 = time.perf_counter()
    result = vi_flows.fit(model, guide, **data, seed=args.seed, progress=False, **extra)
    seconds = time.perf_counter() - t0
    diag = vi_flows.diagnose(model, guide, **data, num_samples=args.draws, seed=0)
    draws = guide_draws(guide, data, args.draws, args.seed)
    return {"samples": draws, "khat": diag.khat, "seconds": seconds, "steps": int(result.num_steps)}


def run_nuts(model: Callable, data: Mapping, args: argparse.Namespace) -> dict:
    """One Pyro NUTS chain (``--nuts-warmup`` + ``--nuts-draws``); its draws, wall seconds and total iterations."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    mcmc = MCMC(NUTS(model), num_samples=args.nuts_draws, warmup_steps=args.nuts_warmup, disable_progbar=True)
    t0 = time.perf_counter()
    mcmc.run(**data)
    seconds = time.perf_counter() - t0
    steps = args.nuts_warmup + args.nuts_draws
    return {"samples": mcmc.get_samples(), "khat": None, "seconds": seconds, "steps": steps}


def one_row(pdb: types.ModuleType, short: str, name: str, loaded: tuple, args: argparse.Namespace) -> dict:
    """Fit and score guide ``name`` on posterior ``short``; any exception becomes the row's one-line ``error``."""
    row: dict = {"posterior": short, "guide": name}
    try:
        model, data, reference = loaded
        run = run_nuts(model, data, args) if name == "nuts" else fit_guide(name, model, data, args)
        scores = score(pdb.flatten(run.pop("samples")), reference)
        row.update(run, **scores)
    except Exception as e:  # a failure is a result: record it and go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    status = row.get("error") or f"mean err {row['max_mean_err']:.3f}, {row['seconds']:.1f}s"
    print(f"  {short:18s} {name:13s} {status}", flush=True)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    """All rows: for each posterior, each guide (a posterior that does not load fails all its rows)."""
    pdb = ports()
    rows = []
    for short in args.posteriors:
        try:
            loaded = pdb.load(short)
        except Exception as e:  # e.g. a port still being written
            loaded = e
        for name in args.guides:
            if isinstance(loaded, Exception):
                rows.append({"posterior": short, "guide": name, "error": f"load: {type(loaded).__name__}: {loaded}"})
                continue
            rows.append(one_row(pdb, short, name, loaded, args))
    return rows


# ----------------------------------------------------------------------------------------------------------- output
def guide_summary(rows: list[dict], guides: list[str], posteriors: list[str]) -> list[dict]:
    """Per guide: accurate on n/N, k̂ < 0.7 on n/N, failures, median seconds over its successful fits."""
    out = []
    for name in guides:
        mine = [r for r in rows if r["guide"] == name]
        ok = [r for r in mine if "error" not in r]
        seconds = [r["seconds"] for r in ok]
        good_khat = sum(1 for r in ok if r.get("khat") is not None and r["khat"] < KHAT_OK)
        out.append(
            {
                "guide": name,
                "accurate": sum(r["accurate"] for r in ok),
                "khat_ok": None if name == "nuts" else good_khat,
                "failures": len(mine) - len(ok),
                "median_seconds": float(np.median(seconds)) if seconds else math.nan,
                "of": len(posteriors),
            }
        )
    return out


def table(rows: list[dict]) -> str:
    """One markdown row per posterior × guide."""
    cells = []
    for r in rows:
        ok = "error" not in r
        cells.append(
            {
                "posterior": r["posterior"],
                "guide": r["guide"],
                "max mean err/sd": r.get("max_mean_err"),
                "sd ratio": f"{r['sd_ratio_min']:.2f}–{r['sd_ratio_max']:.2f}" if ok else None,
                "max W1/sd": r.get("max_w1"),
                "k̂": r.get("khat"),
                "accurate": ("✓" if r["accurate"] else "✗") if ok else "fail",
                "seconds": r.get("seconds"),
                "steps": r.get("steps"),
                "error": r.get("error", ""),
            }
        )
    columns = list(cells[0]) if cells else ["posterior", "guide"]
    fmt = {"max mean err/sd": ".3f", "max W1/sd": ".3f", "k̂": ".2f", "seconds": ".1f"}
    return C.markdown_table(cells, columns, fmt)


def summary_lines(summary: list[dict]) -> str:
    """One line per guide: "accurate on n/N, k̂<0.7 on n/N, failures n, median seconds"."""
    lines = []
    for s in summary:
        khat = "k̂ n/a" if s["khat_ok"] is None else f"k̂<0.7 on {s['khat_ok']}/{s['of']}"
        lines.append(
            f"- `{s['guide']}`: accurate on {s['accurate']}/{s['of']}, {khat}, failures {s['failures']}, "
            f"median {s['median_seconds']:.1f} s"
        )
    return "\n".join(lines)


def docs_text(md: str, summary: str, command: str, info: dict | None = None) -> str:
    """The ``posteriordb`` block of ``docs/benchmarks.md``: the command, the per-guide summary and the table."""
    return (
        "## posteriordb: guides fitted with `fit`'s defaults against gold-standard draws "
        "(`benchmarks/posteriordb.py`)\n\n"
        f"```bash\n{command}\n```\n\n"
        f"Accurate: max |mean error| / sd < {MEAN_TOL} and every sd ratio in [{SD_RANGE[0]}, {SD_RANGE[1]}] "
        "(per Stan scalar parameter, constrained space, against posteriordb's reference draws). NUTS is "
        "Pyro's, one chain, scored the same way. **max W1/sd**: largest 1-Wasserstein distance between guide and "
        "reference draws over the parameters, in posterior sds; **k̂**: PSIS Pareto shape; **steps**: where `fit`'s "
        "stopping rule ended.\n\n" + (f"{C.conditions(info)}\n\n" if info else "") + f"{summary}\n\n{md}\n"
    )


def write_outputs(result: dict, args: argparse.Namespace) -> str:
    """JSON and markdown into ``--out``; the docs block unless ``--quick``/``--no-docs``. Returns the markdown."""
    md = table(result["rows"])
    lines = summary_lines(result["summary"])
    C.save_json(result, os.path.join(args.out, "posteriordb.json"))
    with open(os.path.join(args.out, "posteriordb.md"), "w") as f:
        f.write(lines + "\n\n" + md + "\n")
    if not (args.quick or args.no_docs):
        C.update_docs("posteriordb", docs_text(md, lines, result["command"], result.get("machine")))
    return lines + "\n\n" + md


# -------------------------------------------------------------------------------------------------------------- CLI
def _names(text: str | None, allowed: tuple[str, ...], what: str, p: argparse.ArgumentParser) -> list[str] | None:
    """A comma-separated ``--guides``/``--posteriors`` value as a list, checked against ``allowed``."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        p.error(f"unknown {what} {unknown}; choose from {','.join(allowed)}")
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--guides", default=None, help=f"comma-separated (default all: {','.join(GUIDES)})")
    p.add_argument("--posteriors", default=None, help="comma-separated short names (default all ten)")
    p.add_argument("--draws", type=int, default=None, help="guide draws for the scores and k̂ (default 4000)")
    p.add_argument("--nuts-warmup", type=int, default=None, help="NUTS warmup iterations (default 300)")
    p.add_argument("--nuts-draws", type=int, default=None, help="NUTS draws after warmup (default 500)")
    p.add_argument("--no-docs", action="store_true", help="do not write the docs/benchmarks.md block")
    p.add_argument(
        "--no-tail-average",
        action="store_true",
        help="fit(tail_average=False), a study of a default: implies --no-docs (the block holds the defaults)",
    )
    p.add_argument(
        "--no-tails", action="store_true", help="vi_flows guides with tails=False (a study: implies --no-docs)"
    )
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="JSON",
        help="fold the rows of an earlier run's posteriordb.json into this table (this run's rows win; repeatable)",
    )
    args = p.parse_args(argv)
    args.guides = _names(args.guides, GUIDES, "guides", p) or list(GUIDES)
    short_names = ports().SHORT_NAMES
    args.posteriors = _names(args.posteriors, short_names, "posteriors", p)
    args.posteriors = args.posteriors or list(QUICK_POSTERIORS if args.quick else short_names)
    args.draws = args.draws or (200 if args.quick else 4000)
    args.nuts_warmup = args.nuts_warmup or (50 if args.quick else 300)
    args.nuts_draws = args.nuts_draws or (50 if args.quick else 500)
    args.no_docs = args.no_docs or args.no_tail_average or args.no_tails
    return args


def main(argv: list[str] | None = None) -> dict | None:
    if not ports().available():
        print(SKIPPED)
        return None
    args = parse(argv)
    C.setup(args)
    command = "python benchmarks/posteriordb.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = run(args)
    result = {
        "command": command.strip(),
        "machine": C.machine(),
        "seed": args.seed,
        "quick": args.quick,
        "draws": args.draws,
        "nuts": {"warmup": args.nuts_warmup, "draws": args.nuts_draws},
        "guides": args.guides,
        "posteriors": args.posteriors,
        "rows": rows,
        "summary": guide_summary(rows, args.guides, args.posteriors),
    }
    for path in args.merge:
        with open(path) as f:
            result = merge(json.load(f), result)
    print(write_outputs(result, args))
    return result


def merge(old: dict, new: dict) -> dict:
    """``new`` with ``old``'s rows for every (posterior, guide) it did not run; commands listed oldest first."""
    ran = {(r["posterior"], r["guide"]) for r in new["rows"]}
    guides = [g for g in GUIDES if g in {*old["guides"], *new["guides"]}]  # the table's order, however merged
    posteriors = list(dict.fromkeys([*old["posteriors"], *new["posteriors"]]))
    rows = [r for r in old["rows"] if (r["posterior"], r["guide"]) not in ran] + new["rows"]
    rows.sort(key=lambda r: (posteriors.index(r["posterior"]), guides.index(r["guide"])))
    merged = {**new, "guides": guides, "posteriors": posteriors, "rows": rows}
    merged["command"] = "\n".join(dict.fromkeys([*old["command"].splitlines(), *new["command"].splitlines()]))
    merged["summary"] = guide_summary(rows, guides, posteriors)
    return merged


if __name__ == "__main__":
    main()
