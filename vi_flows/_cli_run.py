"""The ``fit`` and ``diagnose`` subcommands (the parser is in :mod:`vi_flows.cli`).

A run folder holds:

- ``guide.pt``: the checkpoint :func:`vi_flows.fit` writes (parameters, optimizer state, history, RNG
  states); ``torch.load(path, weights_only=True)`` reads it without executing pickled code;
- ``posterior.nc``: :func:`vi_flows.to_inference_data` as netCDF-4 (h5netcdf engine);
- ``summary.csv``: ``az.summary`` of the posterior draws;
- ``diagnostics.json``: ELBO ± s.e., IWAE bound, PSIS k-hat, ESS and the run's settings;
- ``elbo.csv`` / ``elbo.png``: the ELBO per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import pandas as pd

FILES = ("guide.pt", "posterior.nc", "summary.csv", "diagnostics.json", "elbo.csv", "elbo.png")


class UsageError(Exception):
    """Bad arguments or input files: exit code 2."""


class FitError(Exception):
    """The model or the fit failed: exit code 1."""


def run(args: argparse.Namespace) -> int:
    command = {"fit": fit_command, "diagnose": diagnose_command}[args.command]
    try:
        command(args)
        return 0
    except UsageError as e:
        return _fail(args, e, 2, "error")
    except FitError as e:
        return _fail(args, e, 1, "fit failed" if args.command == "fit" else "error")
    except Exception as e:  # a bug of ours or an unforeseen input: still one line unless --traceback
        return _fail(args, FitError(f"{_describe(e)} (rerun with --traceback for details)"), 1, "error")
    except KeyboardInterrupt:
        where = Path(args.out) / "guide.pt" if args.command == "fit" else None
        tail = f"; the last checkpoint is {where}, continue with --resume" if where and where.exists() else ""
        print(f"vi-flows {args.command}: interrupted{tail}", file=sys.stderr)
        return 130


def _fail(args, error: Exception, code: int, label: str) -> int:
    if args.traceback:
        cause = error.__cause__ or error.__context__ or error
        traceback.print_exception(type(cause), cause, cause.__traceback__)
    print(f"vi-flows {args.command}: {label}: {error}", file=sys.stderr)
    return code


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---- fit ------------------------------------------------------------------------------------------------------------


def fit_command(args: argparse.Namespace) -> None:
    import pyro
    import torch

    from .diagnostics import diagnose, save_inference_data, summary, to_inference_data
    from .io import check_model_arguments, load_data, load_model
    from .training import fit

    try:
        model = load_model(args.model)
        data = load_data(args.data) if args.data else {}
        check_model_arguments(model, data)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.flows is not None and args.guide in ("normal", "cnf"):
        raise UsageError(f"--flows applies to flow-layer guides (planar, radial, iaf, ...), not {args.guide}")
    device = _device(args.device)
    if device is not None:
        data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {str(out)!r} ({e.strerror})") from e
    checkpoint = out / "guide.pt"
    if args.resume and not checkpoint.exists():
        raise UsageError(f"--resume: no checkpoint {str(checkpoint)!r} to continue from")

    pyro.clear_param_store()
    _preflight(model, data)
    guide = _make_guide(args.guide, model, args.flows)
    try:
        result = fit(
            model,
            guide,
            num_steps=args.steps,
            lr=args.lr,
            num_particles=args.particles,
            anneal=args.anneal or 0,
            seed=args.seed,
            progress=not args.quiet,
            checkpoint=checkpoint,
            resume=checkpoint if args.resume else None,
            **data,
        )
    except (KeyboardInterrupt, UsageError):
        raise
    except FloatingPointError as e:  # the NaN guard's message names the step, parameters and sites
        raise FitError(str(e)) from e
    except Exception as e:
        raise FitError(_describe(e)) from e

    from .distributed import is_main

    if not is_main():  # under --nproc only rank 0 reports and writes the run folder
        return
    try:
        diag = diagnose(model, guide, num_samples=max(args.samples, 2), seed=args.seed, **data)
        idata = to_inference_data(model, guide, num_samples=max(args.samples, 2), seed=args.seed, **data)
        save_inference_data(idata, out / "posterior.nc")
        table = summary(idata)
        table.to_csv(out / "summary.csv")
        result.history.to_csv(out / "elbo.csv", index=False)
        result.plot(path=out / "elbo.png")
    except Exception as e:
        raise FitError(f"the fit finished but its report failed: {_describe(e)}") from e
    record = {k: _finite_or_none(v) for k, v in diag.summary().items()}
    record["run"] = {
        "model": args.model,
        "data": os.path.abspath(args.data) if args.data else None,
        "guide": args.guide,
        "flows": args.flows,
        "max_steps": args.steps,
        "steps": result.num_steps,
        "converged": result.converged,
        "seconds": round(result.elapsed, 3),
        "lr": args.lr,
        "particles": args.particles,
        "anneal": args.anneal or 0,
        "seed": args.seed,
        "device": str(device) if device is not None else None,
    }
    with open(out / "diagnostics.json", "w") as f:
        json.dump(record, f, indent=2)
    if not args.quiet:
        print(report(record, table, result.history))
        print(f"Run folder: {out.resolve()}")


def _device(name: str | None):
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device must be a torch device name such as cpu or cuda, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _preflight(model, data: dict) -> None:
    """One blocked run of the model: it must run, and sample at least one latent site, all continuous."""
    import torch
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    try:
        with poutine.block(), torch.no_grad():
            trace = prune_subsample_sites(poutine.trace(model).get_trace(**data))
    except Exception as e:
        raise FitError(f"model(**data) raised {_describe(e)}") from e
    latent = [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("_deterministic")
    ]
    if not latent:
        raise FitError(
            "the model samples no latent site (every pyro.sample is observed or there is none), so there is "
            "nothing to infer"
        )
    for site in latent:
        if site["fn"].support.is_discrete:
            raise FitError(
                f"latent site {site['name']!r} is discrete ({type(site['fn']).__name__}); vi-flows fit guides "
                "continuous latents only: marginalize it out of the model"
            )


def _make_guide(name: str, model, flows: int | None):
    from pyro.infer.autoguide import AutoNormal

    from . import guides

    if name == "normal":
        return AutoNormal(model)
    if name == "cnf":
        return guides.AutoCNF(model)
    families = {
        "planar": guides.AutoPlanar,
        "radial": guides.AutoRadial,
        "iaf": guides.AutoIAF,
        "realnvp": guides.AutoRealNVP,
        "sylvester": guides.AutoSylvester,
        "nsf": guides.AutoNSF,
    }
    cls = families[name]
    return cls(model) if flows is None else cls(model, num_flows=flows)


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---- report ---------------------------------------------------------------------------------------------------------


def report(record: dict, table: pd.DataFrame, history: pd.DataFrame, max_rows: int = 20) -> str:
    """The text both ``fit`` and ``diagnose`` print."""
    run = record.get("run", {})
    khat = record.get("khat")
    stopped = "converged" if run.get("converged") else "did not converge"
    lines = [
        f"Model {run.get('model')}  guide {run.get('guide')}  {run.get('steps')} of {run.get('max_steps')} steps "
        f"({stopped}, {run.get('seconds')} s)",
        f"  ELBO         {record['elbo']:12.4f} ± {record['elbo_se']:.4f}   "
        f"(mean of last 100 steps during fit: {history['elbo'].tail(100).mean():.4f})",
        f"  IWAE bound   {record['iwae']:12.4f}   (K = {record['num_samples']})",
        f"  Pareto k-hat {'undefined' if khat is None else format(khat, '12.3f')}   {record.get('reading')} "
        "(< 0.5 good, 0.5-0.7 ok, > 0.7 unreliable)",
        f"  IS ESS       {record['ess']:12.1f}   ({100 * record['ess_frac']:.1f}% of draws)",
        "Posterior summary (az.summary of the guide's draws):",
    ]
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        lines += ["  " + line for line in table.head(max_rows).to_string().splitlines()]
    if len(table) > max_rows:
        lines.append(f"  ... {len(table) - max_rows} more rows in summary.csv")
    return "\n".join(lines)


# ---- diagnose -------------------------------------------------------------------------------------------------------


def diagnose_command(args: argparse.Namespace) -> None:
    import torch

    from .diagnostics import load_inference_data

    folder = Path(args.run_dir)
    if not folder.is_dir():
        raise UsageError(f"RUN_DIR: no such folder {str(folder)!r}")
    missing = [name for name in FILES if not (folder / name).exists()]
    if missing:
        raise UsageError(f"RUN_DIR: {str(folder)!r} is not a complete vi-flows run folder; missing {missing}")
    try:
        with open(folder / "diagnostics.json") as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{folder / 'diagnostics.json'}, line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        table = pd.read_csv(folder / "summary.csv", index_col=0)
        history = pd.read_csv(folder / "elbo.csv")
        idata = load_inference_data(folder / "posterior.nc")
        state = torch.load(folder / "guide.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise FitError(f"cannot read the run folder: {_describe(e)}") from e
    posterior = idata["posterior"]
    print(report(record, table, history))
    print(
        f"posterior.nc: groups {', '.join(idata.groups())}; {posterior.sizes['chain']} chain x "
        f"{posterior.sizes['draw']} draws of {', '.join(posterior.data_vars)}"
    )
    print(f"guide.pt: step {state['step']}, {len(state['params'])} parameter tensors (loaded with weights_only=True)")
