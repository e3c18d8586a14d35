"""``vi-flows`` command line: ``demo``, ``fit`` and ``diagnose``.

Exit codes: 0 success; 1 the fit (or the model) failed, with a one-line message
saying why; 2 a usage error (bad option, model or data file that cannot be
loaded, a run folder that is not one). ``--traceback`` shows the full error.
"""

from __future__ import annotations

import argparse
import sys

from .families import FAMILIES, NAMES

#: ``--guide`` choices: the flow families' canonical names (:data:`vi_flows.families.NAMES`).
GUIDES = NAMES


def _flows_help() -> str:
    """``--flows``' help: each flow-layer guide's default number of layers, from the registry."""
    by_default: dict[int, list[str]] = {}
    for name, family in FAMILIES.items():
        if family.guide_num_flows is not None:
            by_default.setdefault(family.guide_num_flows, []).append(name)
    defaults = ", ".join(f"{'/'.join(names)}: {k}" for k, names in by_default.items())
    return f"flow layers ({defaults})"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _particles(text: str) -> int | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}") from None


def _non_negative_int(text: str) -> int:
    if text.strip() == "0":
        return 0
    return _positive_int(text)


RESUME_HELP = """\
A run folder that already holds a run is never overwritten: give --resume to continue it or --overwrite to
replace it. With --resume, options not given take the run's values (run.json), except --nproc (default 1).
Taking effect: --steps (the total, counting the run's steps), --particles, --samples, --device, --nproc and
--data (same names and shapes); changes to --data, --particles, --device and --nproc are recorded in run.json
and diagnostics.json (another --nproc reseeds the ranks: the run no longer reproduces an uninterrupted one).
Refused, naming the run's value: --guide, --flows, --tails and the data's shapes (they make the parameters),
--lr (the optimizer's saved state holds it), --anneal (part of the objective), --tail-average (the checkpoint
holds the sums) and --seed (the checkpoint's random state continues). A run.json written before --tails and
--tail-average existed resumes as it was made: no averaging, tails for iaf only. A checkpoint whose parameters
this model and guide do not create is refused.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vi-flows", description="Normalizing-flow variational inference for Pyro.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit flow guides to a 2-D energy and eight schools; print diagnostics")
    demo.add_argument("--quick", action="store_true", help="a quarter of the steps (for smoke tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=".", help="folder for demo_densities.png (default: current folder)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = sub.add_parser(
        "fit",
        help="fit a guide to a model function; write posterior.nc, summary.csv, diagnostics.json, elbo.csv/png",
        description="Fit a guide to MODULE:FUNCTION called as FUNCTION(**data) and write a run folder.",
        epilog=RESUME_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("model", metavar="MODULE:FUNCTION", help="path/to/file.py:model or package.module:model")
    fit.add_argument("--guide", choices=GUIDES, help="guide family (default: iaf)")
    fit.add_argument("--steps", type=_positive_int, help="maximum SVI steps, counting a resumed run's (default: 2000)")
    fit.add_argument("--data", help=".csv (columns), .json (object) or .npz (arrays): keyword arguments of the model")
    fit.add_argument("--flows", type=_positive_int, help=_flows_help())
    fit.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: 0.01)")
    fit.add_argument(
        "--particles",
        type=_particles,
        help="ELBO draws per step, or auto: 8 vectorized where the model vectorizes them, else 1 (default: auto)",
    )
    fit.add_argument(
        "--anneal",
        type=_non_negative_int,
        metavar="STEPS",
        help="temper log p by min(1, 0.01 + t/STEPS) (0: off, the default)",
    )
    fit.add_argument(
        "--tails",
        action=argparse.BooleanOptionalAction,
        help="end the flow with a learned heavy-tails layer (default: on; flow guides only)",
    )
    fit.add_argument(
        "--tail-average",
        action=argparse.BooleanOptionalAction,
        help="a converged fit ends at the mean of its last flat iterates (default: on)",
    )
    fit.add_argument("--samples", type=_positive_int, help="guide draws for the report (default 4000)")
    fit.add_argument("--device", help="torch device for the data and guide, e.g. cuda (default: cpu)")
    fit.add_argument("--seed", type=int, help="random seed (default: 0)")
    fit.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help="data-parallel processes on this machine (re-launches itself through torch.distributed.run)",
    )
    fit.add_argument("--out", default="vi_flows_run", help="run folder (default: ./vi_flows_run)")
    fit.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (see below)")
    fit.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (without it, fit refuses to)"
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar and no report")
    fit.add_argument("--traceback", action="store_true", help="show the full traceback of an error")

    diagnose = sub.add_parser("diagnose", help="re-read a run folder written by fit and print its report")
    diagnose.add_argument("run_dir", metavar="RUN_DIR")
    diagnose.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code.

    A closed stdout (``vi-flows ... | head``) ends it quietly with 141 (128 + SIGPIPE), as a Unix
    tool killed by SIGPIPE would; a Ctrl-C outside the fit's own handling ends it with one line and 130.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe must raise where it is caught
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 128 + 13
    except KeyboardInterrupt:
        print("vi-flows: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (2) or the help (0)
        return int(e.code or 0)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(quick=args.quick, seed=args.seed, out=args.out, progress=not args.quiet)
        return 0
    from . import _cli_run

    if args.command == "fit" and args.nproc > 1:
        from .distributed import launched

        if not launched():
            return _relaunch(args, sys.argv[1:] if argv is None else list(argv))
    return _cli_run.run(args)


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """``fit --nproc N``: check and claim the run folder here, once, then start N ranks through torchrun.

    The ranks print their own one-line errors (rank 0 only); an interrupt is said here, once.
    """
    from . import _cli_run
    from .distributed import relaunch

    refused = _cli_run.prepare(args)
    if refused is not None:
        return refused
    with _cli_run.prepared_env(args):
        code = relaunch(args.nproc, ["--module", "vi_flows"], argv, quiet=(1, 2, 130))
    if code == 130:
        print(_cli_run.interrupted_line(args), file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream): nothing left to flush
        pass
