"""The report of a run folder: what ``fit`` writes after the fit and what ``fit`` and ``diagnose`` print."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ._cli_folder import (
    CORE,
    FILES,
    PSIS_DRAWS,
    REPORT,
    FitError,
    Plan,
    UsageError,
    _describe,
    _effective,
    _saved_settings,
    _world_size,
)

if TYPE_CHECKING:
    import pandas as pd


def _report(args, plan: Plan, model, guide, result, device) -> None:
    """posterior.nc, posterior_psis.nc where valid, summary.csv and diagnostics.json; printed unless --quiet."""
    from .diagnostics import diagnose, khat_threshold, save_inference_data, summary, to_inference_data

    out = plan.out
    try:
        (out / PSIS_DRAWS).unlink(missing_ok=True)  # an earlier report's: never left beside other draws
        diag = diagnose(model, guide, num_samples=max(args.samples, 2), seed=args.seed)
        idata = to_inference_data(model, guide, num_samples=max(args.samples, 2), seed=args.seed)
        save_inference_data(idata, out / "posterior.nc")
        draws = {"posterior.nc": "guide", **_write_corrected(idata, out, args.seed)}
        table = summary(idata)
        table.to_csv(out / "summary.csv")
    except Exception as e:
        raise FitError(
            f"the fit finished and {out} holds guide.pt, elbo.csv and elbo.png, but its report failed: "
            f"{_describe(e)} (`vi-flows diagnose {out}` reads what is there)"
        ) from e
    record = {k: _finite_or_none(v) for k, v in diag.summary().items()}
    record["khat_threshold"] = khat_threshold(diag.num_samples)
    record["draws"] = draws
    record["run"] = {
        "model": args.model,
        "data": _effective(args, "data"),
        "guide": args.guide,
        "flows": args.flows,
        "max_steps": args.steps,
        "steps": result.num_steps,
        "trained": result.num_steps - plan.start,
        "converged": result.converged,
        "seconds": round(result.elapsed, 3),
        "lr": args.lr,
        "particles": args.particles,
        "anneal": args.anneal,
        "tails": _effective(args, "tails"),
        "tail_average": args.tail_average,
        "seed": args.seed,
        "device": str(device) if device is not None else None,
        "nproc": _world_size(args),
    }
    resumes = (_saved_settings(out)[0] or {}).get("resumes")
    if resumes:
        record["run"]["resumes"] = resumes
    with open(out / "diagnostics.json", "w") as f:
        json.dump(record, f, indent=2)
    if not args.quiet:
        print(report(record, table, result.history))
        print(f"Run folder: {out.resolve()}")


def _write_corrected(idata, out: Path, seed: int) -> dict[str, str]:
    """posterior_psis.nc where k-hat says PSIS-corrected draws are valid: ``{file: "psis-resampled"}``, else ``{}``.

    The decision is :func:`~vi_flows.diagnostics.psis_resample`'s, on the very weights of posterior.nc.
    """
    from .diagnostics import UnreliableWeightsError, psis_resample, save_inference_data

    try:
        corrected = psis_resample(idata, seed=seed)
    except UnreliableWeightsError:
        return {}
    save_inference_data(corrected, out / PSIS_DRAWS)
    return {PSIS_DRAWS: "psis-resampled"}


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def report(record: dict, table: pd.DataFrame, history: pd.DataFrame, max_rows: int = 20) -> str:
    """The text both ``fit`` and ``diagnose`` print."""
    import pandas as pd

    run = record.get("run", {})
    khat = record.get("khat")
    lines = [
        _headline(run),
        f"  ELBO         {record['elbo']:12.4f} ± {record['elbo_se']:.4f}   "
        f"(mean of last 100 steps during fit: {history['elbo'].tail(100).mean():.4f})",
        f"  IWAE bound   {record['iwae']:12.4f}   (K = {record['num_samples']})",
        f"  Pareto k-hat {'undefined' if khat is None else format(khat, '12.3f')}   {_verdict(record)}",
        f"  IS ESS       {record['ess']:12.1f}   ({100 * record['ess_frac']:.1f}% of draws)",
        *_draws_lines(record),
        "Posterior summary (az.summary of the guide's draws):",
    ]
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        lines += ["  " + line for line in table.head(max_rows).to_string().splitlines()]
    if len(table) > max_rows:
        lines.append(f"  ... {len(table) - max_rows} more rows in summary.csv")
    return "\n".join(lines)


def _verdict(record: dict) -> str:
    """k-hat's verdict in one line at the record's number of draws, with the scale that applies there."""
    from .diagnostics import khat_reading, khat_scale

    khat, draws = record.get("khat"), record["num_samples"]
    word = khat_reading(math.nan if khat is None else khat, draws)
    return f"{'unreliable' if word == 'bad' else word} ({khat_scale(draws)})"


def _draws_lines(record: dict) -> list[str]:
    """Which draws the run folder holds, from diagnostics.json's ``draws`` (none for runs written before it)."""
    draws = record.get("draws")
    if draws is None:
        return []
    if PSIS_DRAWS in draws:
        what = f"posterior.nc's draws resampled with the smoothed weights (worth about {record['ess']:.0f} draws)"
        return [f"  PSIS draws   {PSIS_DRAWS}: {what}"]
    why = "k-hat says reweighting cannot correct the guide; posterior.nc holds the guide's draws, uncorrected"
    return [f"  PSIS draws   none written: {why}"]


def _headline(run: dict) -> str:
    steps, max_steps = run.get("steps"), run.get("max_steps")
    if run.get("trained") == 0 and isinstance(steps, int) and isinstance(max_steps, int):  # a --resume with no step
        why = f"the run already had {steps} >= --steps {max_steps}" if steps >= max_steps else "it had converged"
        done = f"{steps} steps (none trained by this --resume: {why};"
    else:
        done = f"{steps} of {max_steps} steps ({'converged' if run.get('converged') else 'did not converge'},"
    return f"Model {run.get('model')}  guide {run.get('guide')}  {done} {run.get('seconds')} s)"


# ---- diagnose -------------------------------------------------------------------------------------------------------


def diagnose_command(args: argparse.Namespace) -> None:
    import pandas as pd

    from .training import CheckpointError, _load_checkpoint

    folder = Path(args.run_dir)
    if not folder.is_dir():
        raise UsageError(f"RUN_DIR: no such folder {str(folder)!r}")
    if any(not (folder / name).exists() for name in CORE):
        missing = [name for name in FILES if name != PSIS_DRAWS and not (folder / name).exists()]  # optional
        raise UsageError(f"RUN_DIR: {str(folder)!r} is not a vi-flows run folder; missing {missing}")
    try:
        state = _load_checkpoint(folder / "guide.pt")
    except CheckpointError as e:
        raise UsageError(str(e).removeprefix("resume: ")) from e
    try:
        history = pd.read_csv(folder / "elbo.csv")
    except Exception as e:
        raise FitError(f"cannot read {folder / 'elbo.csv'}: {_describe(e)}") from e
    missing = [name for name in REPORT if not (folder / name).exists()]
    if missing:
        print(_partial_report(folder, state, history, missing))
        return
    print(_full_report(folder, history))
    print(f"guide.pt: step {state['step']}, {len(state['params'])} parameter tensors (loaded with weights_only=True)")


def _full_report(folder: Path, history) -> str:
    import pandas as pd

    from .diagnostics import load_inference_data

    try:
        with open(folder / "diagnostics.json") as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{folder / 'diagnostics.json'}, line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        table = pd.read_csv(folder / "summary.csv", index_col=0)
        idata = load_inference_data(folder / "posterior.nc")
    except Exception as e:
        raise FitError(f"cannot read the run folder: {_describe(e)}") from e
    posterior = idata["posterior"]
    return (
        f"{report(record, table, history)}\n"
        f"posterior.nc: groups {', '.join(idata.groups())}; {posterior.sizes['chain']} chain x "
        f"{posterior.sizes['draw']} draws of {', '.join(posterior.data_vars)}"
    )


def _partial_report(folder: Path, state: dict, history, missing: list[str]) -> str:
    """What a folder whose report failed still tells: the settings, the ELBO history and the checkpoint."""
    settings = _saved_settings(folder)[0] or {}
    tail = history["elbo"].tail(100)
    return "\n".join(
        [
            f"Model {settings.get('model')}  guide {settings.get('guide')}  {state['step']} steps",
            f"  ELBO during fit (mean of last {len(tail)} steps): {tail.mean():.4f}",
            f"guide.pt: step {state['step']}, {len(state['params'])} parameter tensors (loaded with weights_only=True)",
            f"Report files missing: {', '.join(missing)} (fit's report step failed or did not run; "
            "`vi-flows fit ... --resume` with the same --out writes them)",
        ]
    )
