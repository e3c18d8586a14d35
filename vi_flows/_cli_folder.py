"""The run folder of ``vi-flows fit``: its files, its settings, and the checks that keep a run from being lost.

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

A folder that holds a run is never overwritten without ``--overwrite``; ``--resume`` takes the run's
settings and refuses a change that cannot take effect (:data:`REFUSED`). Under ``--nproc N`` the launcher
checks and claims the folder once (:func:`prepare`) before it starts the ranks; rank 0 alone writes files
and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .families import FAMILIES

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
    "particles": "auto",  # fit's: 8 vectorized draws per step where the model vectorizes them, else 1
    "anneal": 0,
    "tails": True,
    "tail_average": True,
    "samples": 4000,  # past diagnostics.MIN_DRAWS_FOR_KHAT: k-hat reads against diagnostics.KHAT_OK
    "seed": 0,
    "device": None,
}
#: On ``--resume``, a given option that differs from the run's is refused, for this reason.
REFUSED = {
    "guide": "the guide family makes the parameters",
    "flows": "the number of flow layers makes the parameters",
    "lr": "the optimizer's saved state holds the learning rate",
    "anneal": "the annealing schedule is part of the objective the history was trained on",
    "tails": "the tails layer makes parameters",
    "tail_average": "the checkpoint holds the averaging sums only when the run averaged from its start",
    "seed": "a resumed run continues the checkpoint's random state, which the seed only started",
}
#: On ``--resume``, these take effect; those that change the training are recorded in run.json's ``resumes``.
RECORDED = ("data", "particles", "device", "nproc")
#: What a run.json written before an option existed means by its absence: the behaviour of that version.
LEGACY: dict[str, Callable[[dict], Any]] = {
    "particles": lambda saved: 1,
    "tails": lambda saved: saved.get("guide", DEFAULTS["guide"]) == "iaf",  # AutoIAF alone had them
    "tail_average": lambda saved: False,
}


class UsageError(Exception):
    """Bad arguments, input files or run folder: exit code 2."""


class FitError(Exception):
    """The model or the fit failed: exit code 1."""


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
    given_tails = args.tails
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
        _check_tails(args, given_tails)
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
            setattr(args, name, saved.get(name, LEGACY[name](saved) if name in LEGACY else default))
    _check_flows(args)
    _check_tails(args, given_tails)
    for name, why in REFUSED.items():
        known = name in saved or name in LEGACY
        if name in given and known and _effective(args, name) != _effective_saved(saved, name):
            raise UsageError(
                f"--resume: --{name.replace('_', '-')} {given[name]} differs from the run's "
                f"{_effective_saved(saved, name)} "
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
    if args.flows is not None and _default_flows(args.guide) is None:
        raise UsageError(f"--flows applies to flow-layer guides (planar, radial, iaf, ...), not {args.guide}")


def _check_tails(args: argparse.Namespace, given: bool | None) -> None:
    if args.guide == "normal" and given is not None:
        raise UsageError("--tails/--no-tails apply to flow guides (planar, radial, iaf, ...), not normal (AutoNormal)")


def _effective(args: argparse.Namespace, name: str):
    """The value an option has in effect: ``--flows`` unset is the guide's default, ``--data`` an absolute path."""
    value = getattr(args, name)
    if name == "flows":
        return _default_flows(args.guide) if value is None else value
    if name == "data" and value is not None:
        return os.path.abspath(value)
    if name == "tails" and args.guide == "normal":
        return None  # AutoNormal has no flow to end
    return value


def _effective_saved(saved: dict, name: str):
    value = saved.get(name, LEGACY[name](saved) if name in LEGACY else None)
    if name == "flows" and value is None:
        return _default_flows(saved.get("guide", DEFAULTS["guide"]))
    if name == "tails" and saved.get("guide", DEFAULTS["guide"]) == "normal":
        return None
    return value


def _default_flows(guide: str) -> int | None:
    """The guide class's ``num_flows`` default (None for normal and cnf, which have no flow layers)."""
    return FAMILIES[guide].guide_num_flows


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
        "tails": _effective(args, "tails"),
        "tail_average": args.tail_average,
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


def _load_data(args: argparse.Namespace, load_data) -> dict:
    try:
        return load_data(args.data) if args.data else {}
    except ValueError as e:
        raise UsageError(str(e)) from e
