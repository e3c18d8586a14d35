"""Loading what the command line fits: a model function and a data file.

Data files become keyword arguments of the model, one per column or array:

- ``.csv``: a header row of names, then numbers; each column is a 1-D float tensor
  (``torch.get_default_dtype()``), blank lines skipped.
- ``.json``: one object; a number stays a Python ``int``/``float``, a (nested) list of
  numbers becomes a float tensor.
- ``.npz``: each array becomes a tensor; floating arrays take the default float
  dtype, integer and boolean arrays keep theirs (``int64``/``bool``: use them as
  indices); 0-d arrays become Python numbers.

Names must be Python identifiers, and every value must be finite: NaN or inf
(a missing value, usually) is refused, naming the place it was found.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["load_data", "load_model", "check_model_arguments"]

DATA_SUFFIXES = (".csv", ".json", ".npz")


# ---- model ----------------------------------------------------------------------------------------------------------


def load_model(spec: str) -> Callable:
    """The function named by ``spec``: ``path/to/file.py:function`` or ``package.module:function``.

    A file is executed as a fresh module with its folder put first on ``sys.path``
    (as ``python file.py`` does): it is trusted code.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"model must be MODULE:FUNCTION (a .py file or a module name, then a colon), got {spec!r}")
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ValueError(f"model must be MODULE:FUNCTION with FUNCTION a Python name, got {spec!r}")
    module = _load_file(where) if where.endswith(".py") or os.sep in where else _import(where)
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise ValueError(f"model: {where!r} has no function {name!r}; it defines {', '.join(defined) or 'none'}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"model: {where}:{name} is a {type(fn).__name__}, not a function")
    return fn


def _load_file(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"model: no such file {path!r}")
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "_vi_flows_model_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"model: running {path!r} raised {_describe(e)}") from e
    return module


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ValueError(f"model: no module named {name!r} (neither a .py file nor importable)") from None
        raise ValueError(f"model: importing {name!r} raised {_describe(e)}") from e
    except Exception as e:
        raise ValueError(f"model: importing {name!r} raised {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """``Type: message``; a SyntaxError's ``str`` already ends in ``(file, line N)``: it is not added again."""
    return f"{type(e).__name__}: {e}"


def check_model_arguments(model: Callable, data: dict[str, Any]) -> None:
    """Refuse data names the model does not take, and model parameters without a default the data lacks."""
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(data) - named) if not takes_any else []
    if unknown:
        verb = "is not a parameter" if len(unknown) == 1 else "are not parameters"
        raise ValueError(
            f"data: {', '.join(map(repr, unknown))} {verb} of model{sig}; data columns are passed as keyword arguments"
        )
    missing = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in data
    ]
    if missing:
        raise ValueError(f"data: model{sig} needs {', '.join(map(repr, missing))}, which the data does not provide")


# ---- data -----------------------------------------------------------------------------------------------------------


def load_data(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.csv``, ``.json`` or ``.npz`` file into ``{name: value}`` keyword arguments (see the module doc).

    Raises ValueError naming the file and, for text files, the line and column of the problem.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"data must be a {', '.join(DATA_SUFFIXES)} file, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"data: no such file {path!r}")
    data = {".csv": _read_csv, ".json": _read_json, ".npz": _read_npz}[suffix](path)
    for name in data:
        if not name.isidentifier():
            raise ValueError(f"data: {path}: name {name!r} is not a Python identifier, so it cannot be a keyword")
    return data


def _read_text(path: str, encoding: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"data: {path}, line {line}: not UTF-8 text ({e.reason})") from None


def _read_csv(path: str) -> dict[str, torch.Tensor]:
    text = _read_text(path, "utf-8-sig")
    rows = []
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ValueError(f"data: {path}, line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError(f"data: {path} is empty; expected a header row of names")
    header_line, header = rows[0]
    names = [h.strip() for h in header]
    for col, name in enumerate(names, start=1):
        if not name.isidentifier():
            raise ValueError(f"data: {path}, line {header_line}, column {col}: header {name!r} is not a Python name")
    if len(set(names)) != len(names):
        raise ValueError(f"data: {path}, line {header_line}: repeated column names in {names}")
    columns: list[list[float]] = [[] for _ in names]
    for line, row in rows[1:]:
        if len(row) != len(names):
            raise ValueError(f"data: {path}, line {line}: {len(row)} fields, but the header has {len(names)}")
        for col, (name, cell) in enumerate(zip(names, row), start=1):
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(
                    f"data: {path}, line {line}, column {col} ({name!r}): cannot read {cell.strip()!r} as a number"
                ) from None
            if not math.isfinite(value):
                raise ValueError(
                    f"data: {path}, line {line}, column {col} ({name!r}): {cell.strip()}; values must be finite "
                    "(drop or impute missing values)"
                )
            columns[col - 1].append(value)
    if len(rows) == 1:
        raise ValueError(f"data: {path} has a header but no rows")
    dtype = torch.get_default_dtype()
    return {name: torch.tensor(values, dtype=dtype) for name, values in zip(names, columns)}


def _read_json(path: str) -> dict[str, Any]:
    text = _read_text(path, "utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"data: {path}, line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"data: {path} must hold one JSON object {{name: value}}, got a {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            raise ValueError(f"data: {path}: {name!r} is {value!r}; values must be numbers or lists of numbers")
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError(f"data: {path}: {name!r} is {value}; values must be finite")
            out[name] = value
            continue
        try:
            tensor = torch.tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"data: {path}: {name!r} must be a number or a rectangular list of numbers ({e})"
            ) from None
        _check_finite(tensor, f"data: {path}: {name!r}")
        out[name] = tensor
    return out


def _read_npz(path: str) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"data: {path} is not a readable .npz archive (not a zip file; write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"data: {path} is not a readable .npz archive ({e})") from None
    except ValueError as e:  # object arrays need pickle, which is refused
        raise ValueError(f"data: {path}: {e}") from None
    out = {}
    for name, a in arrays.items():
        if a.dtype.kind == "f":
            value = torch.as_tensor(a, dtype=torch.get_default_dtype())
            _check_finite(value, f"data: {path}: array {name!r}")
        elif a.dtype.kind in "iub":
            value = torch.as_tensor(a.astype(bool if a.dtype.kind == "b" else np.int64))
        else:
            raise ValueError(f"data: {path}: array {name!r} has dtype {a.dtype}; only numbers are allowed")
        out[name] = value.item() if value.dim() == 0 else value
    return out


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = tensor[index].item()
        raise ValueError(f"{what} has {value} at index {index}; values must be finite (drop or impute missing values)")
