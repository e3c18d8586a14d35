"""The ``fit`` and ``diagnose`` subcommands (the parser is in :mod:`vi_flows.cli`).

``fit`` loads the model and its data, builds the guide named by ``--guide`` (:mod:`vi_flows.families`),
trains it into a run folder (:mod:`vi_flows._cli_folder`: its files, ``--resume`` and ``--overwrite``) and
writes the report (:mod:`vi_flows._cli_report`, which ``diagnose`` re-reads).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ._cli_folder import (  # noqa: F401  (re-exported: the names cli.py and older callers use)
    CORE,
    DEFAULTS,
    FILES,
    PREPARED,
    PSIS_DRAWS,
    RECORDED,
    REFUSED,
    REPORT,
    SETTINGS,
    FitError,
    Plan,
    UsageError,
    _claims_folder,
    _describe,
    _fail,
    _load_data,
    _prepared,
    _speaks,
    check_data_shapes,
    claim_folder,
    data_shape_record,
    plan_run,
    prepare,
    prepared_env,
    record_resume,
)
from ._cli_report import _report, diagnose_command, report  # noqa: F401
from .families import FAMILIES
from .validate import discrete_site_advice


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
    guide = _make_guide(args.guide, bound, args.flows, args.tails)
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
                tail_average=args.tail_average,
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


def _write_history(result, out: Path) -> None:
    """elbo.csv and elbo.png, beside guide.pt, before the report: a failing report must not lose them."""
    try:
        result.history.to_csv(out / "elbo.csv", index=False)
        result.plot(path=out / "elbo.png")
    except Exception as e:
        raise FitError(f"the fit finished ({out / 'guide.pt'}) but writing its history failed: {_describe(e)}") from e


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
            raise FitError(discrete_site_advice(site["name"], site["fn"]))


def _make_guide(name: str, model, flows: int | None, tails: bool = True):
    """The guide of ``--guide NAME`` (:data:`vi_flows.families.FAMILIES`), with ``flows`` layers when given.

    ``normal`` stays Pyro's ``AutoNormal`` (the registry's plain Gaussian is ``AutoFlow`` without layers):
    the command line has always fitted it, and the run folders it wrote resume only with it.
    """
    if name == "normal":
        from pyro.infer.autoguide import AutoNormal

        return AutoNormal(model)
    cls = FAMILIES[name].guide
    return cls(model, tails=tails) if flows is None else cls(model, num_flows=flows, tails=tails)
