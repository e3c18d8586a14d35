"""Code size against the redesign's limits: no function in ``vi_flows/`` over 80 lines, no module over 500.

A function's length is ``end_lineno − lineno + 1`` from :mod:`ast`, docstring and decorators' body
included; a module's is its line count. ``python benchmarks/code_size.py`` prints the longest of each
and exits 1 when a limit is broken; ``tests/test_code_size.py`` asserts the same.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vi_flows"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def module_lines(root: Path = PACKAGE) -> dict[str, int]:
    """``{path relative to the package's parent: line count}`` for every module."""
    return {str(p.relative_to(root.parent)): len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))}


def function_lines(root: Path = PACKAGE) -> dict[str, int]:
    """``{"path:qualified.name": lines}`` for every function and method."""
    sizes = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent)
        sizes.update(_functions(ast.parse(p.read_text()), f"{rel}:"))
    return sizes


def _functions(node: ast.AST, prefix: str) -> dict[str, int]:
    sizes = {}
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sizes[prefix + child.name] = child.end_lineno - child.lineno + 1
            sizes.update(_functions(child, f"{prefix}{child.name}."))
        elif isinstance(child, ast.ClassDef):
            sizes.update(_functions(child, f"{prefix}{child.name}."))
    return sizes


def main() -> int:
    modules, functions = module_lines(), function_lines()
    for title, sizes, limit in (("modules", modules, MAX_MODULE_LINES), ("functions", functions, MAX_FUNCTION_LINES)):
        longest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
        print(f"longest {title} (limit {limit}):")
        for name, n in longest:
            print(f"  {n:5d}  {name}")
    broken = [n for n, v in modules.items() if v > MAX_MODULE_LINES]
    broken += [n for n, v in functions.items() if v > MAX_FUNCTION_LINES]
    print(f"{len(modules)} modules, {len(functions)} functions; over the limits: {broken or 'none'}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
