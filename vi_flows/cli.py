"""``vi-flows`` command line."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vi-flows", description="Normalizing-flow variational inference for Pyro.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit flow guides to a 2-D energy and eight schools; print diagnostics")
    demo.add_argument("--quick", action="store_true", help="a quarter of the steps (for smoke tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=".", help="folder for demo_densities.png (default: current folder)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(quick=args.quick, seed=args.seed, out=args.out, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
