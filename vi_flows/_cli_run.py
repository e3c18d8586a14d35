"""The ``fit`` and ``diagnose`` subcommands (the parser is in :mod:`vi_flows.cli`).

A run folder holds:

- ``run.json``: the run's settings (model, data and their shapes, guide, flows, lr, ...), written
  before the first step, and the settings changed by each ``--resume``;
- ``guide.pt``: the checkpoint :func:`vi_flows.fit` writes (parameters, optimizer state, history, RNG
  states); ``torch.load(path, weights_only=True)`` reads it without executing pickled code;
- ``elbo.csv`` / ``elbo.png``: the ELBO per step, written as soon as the fit ends;
- ``posterior.nc``: :func:`vi_flows.to_inference_data` as netCDF-4 (h5netcdf engine): the guide's draws;
- ``posterior_psis.nc``: those draws resampled with their PSIS-smoothed weights
  (:func:`vi_flows.diagnostics.psis_resample`), written only where k-hat says the correction is valid;
- ``summary.csv``: ``az.summary`` of the posterior draws;
- ``diagnostics.json``: ELBO ± s.e., IWAE bound, PSIS k-hat, ESS, which draws were written and the run's
  settings.

The last three or four are the report, computed after the history is safe on disk: a report that
fails leaves a folder that ``diagnose`` still reads and ``fit --resume`` completes.

Under ``--nproc N`` the launcher checks and claims the folder once (:func:`prepare`) before it
starts the ranks; rank 0 alone writes files and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: The report's PSIS-resampled draws: only where k-hat says they are valid, so not in REPORT.
PSIS_DRAWS = "posterior_psis.nc"
FILES = ("guide.pt", "posterior.nc", PSIS_DRAWS, "summary.csv", "diagnostics.json", "elbo.csv", "elbo.png")
SETTINGS = "run.json"
#: What a fit leaves even when its report fails; a folder without them is not a run.
CORE = ("guide.pt", "elbo.csv")
REPORT = ("posterior.nc", "summary.csv", "diagnostics.json")
_FORMAT = "vi_flows.cli.run/1"
#: Set by the ``--nproc`` launcher once it has checked and claimed the run folder (the value: its absolute path).
PREPARED = "VI_FLOWS_RUN_PREPARED"

#: Values of the options that ``--resume`` takes from the run when they are not given (the parser's are None).
DEFAULTS: dict[str, Any] = {
    "data": None,
    "guide": "iaf",
    "flows": None,
    "steps": 2000,
    "lr": 1e-2,
    "particles": 1,
    "anneal": 0,
    "samples": 4000,  # k-hat reads against 0.7 from 2155 draws on (diagnostics.MIN_DRAWS_FOR_KHAT)
    "seed": 0,
    "device": None,
}
#: On ``--resume``, a given option that differs from the run's is refused, for this reason.
REFUSED = {
    "guide": "the guide family makes the parameters",
    "flows": "the number of flow layers makes the parameters",
    "lr": "the optimizer's saved state holds the learning rate",
    "anneal": "the annealing schedule is part of the objective the history was trained on",
    "seed": "a resumed run continues the checkpoint's random state, which the seed only started",
}
#: On ``--resume``, these take effect; those that change the training are recorded in run.json's ``resumes``.
RECORDED = ("data", "particles", "device", "nproc")


class UsageError(Exception):
    """Bad arguments, input files or run folder: exit code 2."""


class FitError(Exception):
    """The model or the fit failed: exit code 1."""


def run(args: argparse.Namespace) -> int:
    """Run ``fit`` or ``diagnose``; return the exit code, having printed one line for a failure."""
    command = {"fit": fit_command, "diagnose": diagnose_command}[args.command]
    try:
        command(args)
        return 0
    except BrokenPipeError:  # stdout closed early (``| head``): cli.main exits quietly
        raise
    except UsageError as e:
        return _fail(args, e, 2, "error")
    except FitError as e:
        return _fail(args, e, 1, "fit failed" if args.command == "fit" else "error")
    except Exception as e:  # a bug of ours or an unforeseen input: still one line unless --traceback
        return _fail(args, FitError(f"{_describe(e)} (rerun with --traceback for details)"), 1, "error")
    except KeyboardInterrupt:
        if _speaks() and not (args.command == "fit" and _prepared(args)):  # under --nproc the launcher says it
            print(interrupted_line(args), file=sys.stderr)
        return 130


def interrupted_line(args: argparse.Namespace) -> str:
    """The one line for a Ctrl-C: where the last checkpoint is, for ``--resume``."""
    where = Path(args.out) / "guide.pt" if args.command == "fit" else None
    tail = f"; the last checkpoint is {where}, continue with --resume" if where and where.exists() else ""
    return f"vi-flows {args.command}: interrupted{tail}"


def _fail(args, error: Exception, code: int, label: str) -> int:
    if not _speaks():  # under --nproc every rank fails alike (the others' errors name the failing rank's)
        return code
    if args.traceback:
        cause = error.__cause__ or error.__context__ or error
        traceback.print_exception(type(cause), cause, cause.__traceback__)
    print(f"vi-flows {args.command}: {label}: {error}", file=sys.stderr)
    return code


def _speaks() -> bool:
    """Whether this process prints: outside torchrun, or its rank 0."""
    return os.environ.get("RANK", "0") == "0"


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---- the run folder: settings, resume and overwrite -----------------------------------------------------------------


@dataclass
class Plan:
    """What ``fit`` is about to do with its ``--out`` folder."""

    out: Path
    saved: dict | None = None  # the run's settings (resume only)
    source: str = SETTINGS  # the file they were read from (diagnostics.json in folders older than run.json)
    start: int = 0  # the checkpoint's step (resume only)
    changes: dict = field(default_factory=dict)  # option: [run's value, new value], for run.json's resumes
    existing: list[str] = field(default_factory=list)  # run files already in the folder


def plan_run(args: argparse.Namespace, data_shapes: dict | None) -> Plan:
    """Fill in ``args``' unset options (the run's on ``--resume``, else the defaults) and check the folder.

    Read-only: refuses (UsageError, one line) a folder that holds a run unless
    ``--resume`` or ``--overwrite``, a damaged or foreign checkpoint, and on
    ``--resume`` a changed option that cannot take effect (:data:`REFUSED`) or
    data of other shapes. ``data_shapes`` None: not loaded yet (checked later).
    """
    from .training import CheckpointError, _load_checkpoint

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} is a file, not a folder")
    plan = Plan(out, existing=[n for n in (SETTINGS, *FILES) if (out / n).exists()])
    if not args.resume:
        for name, value in DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        trained = [name for name in plan.existing if name != SETTINGS]  # run.json alone: a fit that saved nothing
        if trained and not args.overwrite and _claims_folder(args):
            raise UsageError(
                f"--out: {str(out)!r} already holds a run ({_describe_run(out, trained)}); continue it with "
                "--resume, or replace it with --overwrite"
            )
        _check_flows(args)
        return plan
    checkpoint = out / "guide.pt"
    if not checkpoint.exists():
        raise UsageError(f"--resume: no checkpoint {str(checkpoint)!r} to continue from")
    try:
        plan.start = int(_load_checkpoint(checkpoint)["step"])
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    plan.saved, plan.source = _saved_settings(out)
    given = {name: getattr(args, name) for name in DEFAULTS if getattr(args, name) is not None}
    saved = plan.saved or {}
    for name, default in DEFAULTS.items():
        if name not in given:
            setattr(args, name, saved.get(name, default))
    _check_flows(args)
    for name, why in REFUSED.items():
        if name in given and name in saved and _effective(args, name) != _effective_saved(saved, name):
            raise UsageError(
                f"--resume: --{name} {given[name]} differs from the run's {_effective_saved(saved, name)} "
                f"({out / plan.source}): {why}; start a new run instead (--overwrite or another --out)"
            )
    if data_shapes is not None:
        check_data_shapes(plan, data_shapes)
    current = {"nproc": _world_size(args), **{n: _effective(args, n) for n in RECORDED if n != "nproc"}}
    plan.changes = {n: [saved[n], current[n]] for n in RECORDED if n in saved and saved[n] != current[n]}
    return plan


def check_data_shapes(plan: Plan, shapes: dict) -> None:
    """On ``--resume``, refuse data whose names or shapes differ from the run's: they fix the model's."""
    before = (plan.saved or {}).get("data_shapes")
    if before is None or before == shapes:
        return
    where = f"({plan.out / SETTINGS})"
    if sorted(before) != sorted(shapes):
        raise UsageError(f"--resume: the data has {sorted(shapes)}, the run's had {sorted(before)} {where}")
    name = next(n for n in before if before[n] != shapes[n])
    raise UsageError(
        f"--resume: data {name!r} is {_shape_text(shapes[name])}, the run's was {_shape_text(before[name])} {where}; "
        "the data's shapes fix the model's, start a new run instead (--overwrite or another --out)"
    )


def claim_folder(plan: Plan, args: argparse.Namespace, data_shapes: dict) -> None:
    """A new run: create ``--out``, remove the old run's files on ``--overwrite``, write run.json (before step 1).

    A resumed run's folder is left alone here: :func:`record_resume` updates run.json
    once the run has steps that the changed options trained.
    """
    if args.resume:
        return
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {str(plan.out)!r} ({e.strerror})") from e
    if args.overwrite:
        for name in plan.existing:
            (plan.out / name).unlink()
    _write_json_atomic(plan.out / SETTINGS, _settings(args, data_shapes))


def record_resume(plan: Plan, args: argparse.Namespace, data_shapes: dict) -> None:
    """After a resumed fit that trained (its checkpoint is past ``plan.start``): its --steps and changes in run.json.

    Called however the fit ended (an interrupt or an error can follow trained, saved steps);
    a refused resume (another model's checkpoint) trains nothing and leaves run.json as it was.
    """
    from .training import CheckpointError, _load_checkpoint

    try:
        step = _load_checkpoint(plan.out / "guide.pt")["step"]
    except CheckpointError:
        return
    if step <= plan.start:
        return
    record = dict(plan.saved) if (plan.saved or {}).get("format") == _FORMAT else _settings(args, data_shapes)
    if plan.changes:
        record["resumes"] = [*record.get("resumes", []), {"step": plan.start, "changed": plan.changes}]
        for name, (_, new) in plan.changes.items():
            record[name] = new
    record["steps"] = args.steps
    _write_json_atomic(plan.out / SETTINGS, record)


def prepare(args: argparse.Namespace) -> int | None:
    """The ``--nproc`` launcher's share of ``fit``: check and claim the run folder once, before starting the ranks.

    Returns an exit code when it refuses (having printed one line), else None; the caller then
    starts the ranks with :data:`PREPARED` set (:func:`prepared_env`), and they leave the folder
    alone until rank 0 writes its results.
    """
    from .io import load_data

    try:
        plan = plan_run(args, None)
        shapes = data_shape_record(_load_data(args, load_data))
        if args.resume:
            check_data_shapes(plan, shapes)
        claim_folder(plan, args, shapes)
    except UsageError as e:
        return _fail(args, e, 2, "error")
    return None


def _world_size(args: argparse.Namespace) -> int:
    """The number of processes of this fit: torchrun's WORLD_SIZE in a rank, ``--nproc`` in the launcher."""
    return int(os.environ.get("WORLD_SIZE", args.nproc))


@contextlib.contextmanager
def prepared_env(args: argparse.Namespace) -> Iterator[None]:
    """:data:`PREPARED` set to ``--out`` while the launcher starts and waits for the ranks (they inherit it)."""
    old = os.environ.get(PREPARED)
    os.environ[PREPARED] = str(Path(args.out).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PREPARED, None)
        else:
            os.environ[PREPARED] = old


def _prepared(args: argparse.Namespace) -> bool:
    """Whether the ``--nproc`` launcher has checked and claimed this run's folder."""
    return os.environ.get(PREPARED) == str(Path(args.out).resolve())


def _claims_folder(args: argparse.Namespace) -> bool:
    """Whether this process checks and writes the run folder: not if the launcher did, else rank 0."""
    return not _prepared(args) and _speaks()


def _check_flows(args: argparse.Namespace) -> None:
    if args.flows is not None and args.guide in ("normal", "cnf"):
        raise UsageError(f"--flows applies to flow-layer guides (planar, radial, iaf, ...), not {args.guide}")


def _effective(args: argparse.Namespace, name: str):
    """The value an option has in effect: ``--flows`` unset is the guide's default, ``--data`` an absolute path."""
    value = getattr(args, name)
    if name == "flows":
        return _default_flows(args.guide) if value is None else value
    if name == "data" and value is not None:
        return os.path.abspath(value)
    return value


def _effective_saved(saved: dict, name: str):
    value = saved.get(name)
    if name == "flows" and value is None:
        return _default_flows(saved.get("guide", DEFAULTS["guide"]))
    return value


@functools.cache
def _default_flows(guide: str) -> int | None:
    """The guide class's ``num_flows`` default (None for normal and cnf, which have no flow layers)."""
    import inspect

    if guide in ("normal", "cnf"):
        return None
    return inspect.signature(_guide_class(guide)).parameters["num_flows"].default


def _settings(args: argparse.Namespace, data_shapes: dict) -> dict:
    """run.json of a new run: the settings in effect, and the data's shapes."""
    return {
        "format": _FORMAT,
        "model": args.model,
        "data": _effective(args, "data"),
        "data_shapes": data_shapes,
        "guide": args.guide,
        "flows": _effective(args, "flows"),
        "steps": args.steps,
        "lr": args.lr,
        "particles": args.particles,
        "anneal": args.anneal,
        "samples": args.samples,
        "seed": args.seed,
        "device": args.device,
        "nproc": _world_size(args),
    }


def _saved_settings(out: Path) -> tuple[dict | None, str]:
    """run.json, or for a run folder written before it existed the settings in diagnostics.json; and which."""
    for name in (SETTINGS, "diagnostics.json"):
        try:
            with open(out / name) as f:
                record = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--resume: cannot read {out / name} ({e})") from None
        if name == SETTINGS:
            return record, name
        old = dict(record.get("run", {}))
        old["steps"] = old.pop("max_steps", None)
        return {k: v for k, v in old.items() if k in DEFAULTS or k == "model"}, name
    return None, SETTINGS


def _describe_run(out: Path, existing: list[str]) -> str:
    from .training import CheckpointError, _load_checkpoint

    if "guide.pt" in existing:
        try:
            return f"guide.pt at step {_load_checkpoint(out / 'guide.pt')['step']}"
        except CheckpointError:
            pass
    return ", ".join(existing)


def data_shape_record(data: dict) -> dict:
    """``{name: [shape..., dtype]}`` of the data: what run.json keeps to check a resumed run's data."""
    import torch

    def describe(value):
        if isinstance(value, torch.Tensor):
            return [list(value.shape), str(value.dtype).removeprefix("torch.")]
        return [[], type(value).__name__]

    return {name: describe(value) for name, value in sorted(data.items())}


def _shape_text(record: list) -> str:
    shape, dtype = record
    return f"{dtype} of shape {tuple(shape)}"


def _write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` through a temporary file: another rank reading it never sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- fit ------------------------------------------------------------------------------------------------------------


def fit_command(args: argparse.Namespace) -> None:
    import pyro
    import torch

    from .distributed import is_main
    from .io import check_model_arguments, load_data, load_model
    from .training import CheckpointError, fit

    plan = plan_run(args, None)  # before loading anything: a refused folder costs nothing
    try:
        model = load_model(args.model)
        data = _load_data(args, load_data)
        check_model_arguments(model, data)
    except ValueError as e:
        raise UsageError(str(e)) from e
    shapes = data_shape_record(data)
    if args.resume:
        check_data_shapes(plan, shapes)
    device = _device(args.device)
    if device is not None:
        data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    # The data are bound to the model, so its keyword arguments reach it whatever their names (data, seed, lr, ...).
    bound = functools.partial(model, **data) if data else model
    pyro.clear_param_store()
    _preflight(bound)
    if _claims_folder(args):
        claim_folder(plan, args, shapes)
    guide = _make_guide(args.guide, bound, args.flows)
    checkpoint = plan.out / "guide.pt"
    try:
        with _one_line_warnings(), _recording_resume(plan, args, shapes):
            result = fit(
                bound,
                guide,
                num_steps=args.steps,
                lr=args.lr,
                num_particles=args.particles,
                anneal=args.anneal,
                seed=args.seed,
                progress=not args.quiet,
                checkpoint=checkpoint,
                resume=checkpoint if args.resume else None,
            )
    except (KeyboardInterrupt, UsageError):
        raise
    except CheckpointError as e:  # made for another model or guide
        raise UsageError(str(e)) from e
    except FloatingPointError as e:  # the NaN guard's message names the step, parameters and sites
        raise FitError(str(e)) from e
    except Exception as e:
        raise FitError(_describe(e)) from e

    if not is_main():  # under --nproc only rank 0 reports and writes the run folder
        return
    _write_history(result, plan.out)
    trained = result.num_steps - plan.start
    if args.resume and trained == 0:
        print(f"vi-flows fit: {_nothing_trained(plan.start, args.steps)}", file=sys.stderr)
    _report(args, plan, bound, guide, result, device)


def _nothing_trained(steps: int, max_steps: int) -> str:
    if steps >= max_steps:
        return f"the run already has {steps} steps (>= --steps {max_steps}); nothing was trained"
    return f"the run had already converged at step {steps}; nothing was trained"


def _load_data(args: argparse.Namespace, load_data) -> dict:
    try:
        return load_data(args.data) if args.data else {}
    except ValueError as e:
        raise UsageError(str(e)) from e


def _write_history(result, out: Path) -> None:
    """elbo.csv and elbo.png, beside guide.pt, before the report: a failing report must not lose them."""
    try:
        result.history.to_csv(out / "elbo.csv", index=False)
        result.plot(path=out / "elbo.png")
    except Exception as e:
        raise FitError(f"the fit finished ({out / 'guide.pt'}) but writing its history failed: {_describe(e)}") from e


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


@contextlib.contextmanager
def _recording_resume(plan: Plan, args: argparse.Namespace, data_shapes: dict) -> Iterator[None]:
    """Around a resumed fit, in the process that writes the folder: :func:`record_resume` however it ends."""
    from .distributed import is_main

    try:
        yield
    finally:
        if args.resume and is_main() and _speaks():
            record_resume(plan, args, data_shapes)


class _one_line_warnings:
    """Show :class:`~vi_flows.distributed.SlowSyncWarning` as one ``vi-flows fit: warning: ...`` line."""

    def __enter__(self):
        from .distributed import SlowSyncWarning

        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SlowSyncWarning):
                print(f"vi-flows fit: warning: {message}", file=sys.stderr)
            else:
                self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._show


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


def _preflight(model) -> None:
    """One blocked run of the model: it must run, and sample at least one latent site, all continuous."""
    import torch
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    try:
        with poutine.block(), torch.no_grad():
            trace = prune_subsample_sites(poutine.trace(model).get_trace())
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


def _guide_class(name: str):
    from . import guides

    return {
        "planar": guides.AutoPlanar,
        "radial": guides.AutoRadial,
        "iaf": guides.AutoIAF,
        "realnvp": guides.AutoRealNVP,
        "sylvester": guides.AutoSylvester,
        "nsf": guides.AutoNSF,
        "cnf": guides.AutoCNF,
    }[name]


def _make_guide(name: str, model, flows: int | None):
    from pyro.infer.autoguide import AutoNormal

    if name == "normal":
        return AutoNormal(model)
    cls = _guide_class(name)
    return cls(model) if flows is None else cls(model, num_flows=flows)


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---- report ---------------------------------------------------------------------------------------------------------


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
    """k-hat's verdict in one line: good / ok / unreliable, read by the diagnostics module's thresholds at
    the record's number of draws, and the scale that applies there."""
    from .diagnostics import _khat_scale, _reading

    khat, draws = record.get("khat"), record["num_samples"]
    reading = _reading(math.nan if khat is None else khat, draws)
    word = "unreliable" if reading == "bad" else reading
    return f"{word} ({_khat_scale(draws)})"


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
