"""The redesign's size limits hold (``benchmarks/code_size.py``): each function and module fits a reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "code_size.py"


def _code_size():
    spec = importlib.util.spec_from_file_location("code_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_function_over_80_lines_and_no_module_over_500():
    cs = _code_size()
    functions, modules = cs.function_lines(), cs.module_lines()
    assert len(modules) > 40 and len(functions) > 500  # the scan found the package
    assert {n: v for n, v in functions.items() if v > cs.MAX_FUNCTION_LINES} == {}
    assert {n: v for n, v in modules.items() if v > cs.MAX_MODULE_LINES} == {}


def test_the_measure_counts_docstrings_and_nested_functions(tmp_path):
    cs = _code_size()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text('def f():\n    """doc\n    more"""\n\n    def g():\n        pass\n    return g\n')
    assert cs.function_lines(pkg) == {"pkg/m.py:f": 7, "pkg/m.py:f.g": 2}
    assert cs.module_lines(pkg) == {"pkg/m.py": 7}
