"""Faithful Pyro ports of ten posteriordb posteriors, for scoring guides against gold-standard draws.

The posteriors live in ``<repo>/../shared/posteriordb`` (override with the ``VI_FLOWS_POSTERIORDB`` environment
variable). Users do not have that folder: :data:`ROOT` is then ``None``, :func:`available` is ``False`` and every
benchmark or test that needs it skips.

Contract of each port module ``benchmarks/pdb/<short>.py`` (every port follows it exactly)::

    POSTERIOR = "earnings-earn_height"          # the posteriordb folder name

    def load_data(folder: pathlib.Path) -> dict[str, torch.Tensor]:
        # the model's keyword arguments, read from folder / "data.json" (float32 tensors; integer data used
        # as indices as torch.long); any Stan ``transformed data`` may be computed here or in the model

    def model(**data) -> None:
        # the Pyro model: ONE latent site per Stan parameter, with Stan's parameter name and Stan's shape
        # (real -> (), vector[K] -> (K,), matrix[R, C] -> (R, C), as the site's event shape: use .to_event),
        # the same support (biject_to(site support) maps R^k onto Stan's constrained space) and the same
        # priors; Stan's implicit flat priors stay flat:
        #     pyro.sample(name, dist.ImproperUniform(support, (), event_shape))
        # It must also run on batched latent values (``vi_flows.diagnose`` and vectorized particles put a plate
        # left of the model's plates): index parameters from the right, ``beta[..., 0]``.

    def stan_log_density(params: dict[str, torch.Tensor], **data) -> torch.Tensor:
        # an independent transcription of the Stan ``model`` block, as literally as Stan reads it (loops are
        # fine), on constrained values ``params[name]`` of Stan's shape; it may differ from the Pyro model's
        # log joint by a constant only (Stan's ``~`` drops constants; ``target +=`` keeps them)

Keyword names of the data must not collide with the arguments of ``vi_flows.fit`` / ``vi_flows.diagnose``
(``data``, ``seed``, ``num_steps``, ``num_samples``, ``device``, ...): the harness calls
``fit(model, guide, **data)`` and refuses a port whose keywords collide.

Import this package as ``benchmarks.pdb`` (repository root on ``sys.path``), never as a bare ``pdb``: that is the
standard library's debugger, which ``doctest`` and pytest import.

This package provides :data:`ROOT`, :data:`PORTS` (short name -> module, imported lazily), :func:`available`,
:func:`load` (model, data, reference draws) and :func:`flatten` (site arrays -> Stan's scalar names).
``ImproperUniform.sample`` raises and every default init strategy of Pyro's autoguides and NUTS calls it, so
:func:`load` returns the model wrapped by :func:`initializable`, which swaps each ``ImproperUniform`` site for
the equal-density :class:`Flat` (whose ``sample`` gives a fixed feasible point). Ports keep ``ImproperUniform``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import pathlib
import types
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from pyro.distributions import ImproperUniform
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to

ENV = "VI_FLOWS_POSTERIORDB"
SHORT_NAMES = (
    "earnings",
    "kidiq",
    "kidiq_interaction",
    "mesquite",
    "nes",
    "sblrc",
    "arma",
    "gp_pois_regr",
    "hmm_example",
    "bball_drive",
)


def _root() -> pathlib.Path | None:
    """``$VI_FLOWS_POSTERIORDB`` if set, else ``<repo>/../shared/posteriordb``; None when that folder is absent."""
    env = os.environ.get(ENV)
    path = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[3] / "shared" / "posteriordb"
    return path if path.is_dir() else None


ROOT: pathlib.Path | None = _root()


class _LazyPorts(Mapping):
    """Ordered mapping short name -> port module, imported on first access (a missing module raises KeyError).

    Lazy so that one port still being written, or failing to import, does not break the other nine.
    """

    def __init__(self, names: tuple[str, ...]):
        self._names = names
        self._cache: dict[str, types.ModuleType] = {}

    def __getitem__(self, short: str) -> types.ModuleType:
        if short not in self._names:
            raise KeyError(short)
        if short not in self._cache:
            try:
                self._cache[short] = importlib.import_module(f"{__name__}.{short}")
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{short}":
                    raise
                raise KeyError(f"port {short!r} not written yet") from e
        return self._cache[short]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, short: object) -> bool:
        return short in self._names


PORTS: Mapping[str, types.ModuleType] = _LazyPorts(SHORT_NAMES)


class Flat(ImproperUniform):
    """Stan's implicit flat prior: zero ``log_prob`` on ``support``, and a ``sample`` that returns a fixed point of it.

    Pyro's ``ImproperUniform.sample`` raises, but every default init strategy calls ``.sample()`` on each site
    (``init_to_median`` and ``init_to_feasible`` of the autoguides, ``init_to_uniform`` of NUTS), so a model with
    ``ImproperUniform`` sites fails before its first step. ``Flat.sample`` returns ``biject_to(support)(0)`` (the
    point ``init_to_feasible`` would pick), which is not a draw from the improper prior: only for initialisation.
    """

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        transform = biject_to(self.support)
        shape = torch.Size(sample_shape) + self.batch_shape + transform.inverse_shape(self.event_shape)
        return transform(torch.zeros(shape))

    def expand(self, batch_shape, _instance=None) -> Flat:
        return Flat(self.support, torch.Size(batch_shape), self.event_shape)


class _FlatToFeasible(Messenger):
    """Swaps each ``ImproperUniform`` site distribution for the equal-density :class:`Flat`."""

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if type(fn) is ImproperUniform:
            msg["fn"] = Flat(fn.support, fn.batch_shape, fn.event_shape)


def initializable(model: Callable) -> Callable:
    """``model`` with its ``ImproperUniform`` sites made :class:`Flat`: same log density, default inits work."""
    return _FlatToFeasible()(model)


def available() -> bool:
    """True when the posteriordb folder is present (benchmarks and tests skip otherwise)."""
    return ROOT is not None


def folder(short: str) -> pathlib.Path:
    """The posteriordb folder of the port ``short``."""
    if ROOT is None:
        raise FileNotFoundError(f"posteriordb not found (set {ENV} or put it at ../shared/posteriordb)")
    return ROOT / PORTS[short].POSTERIOR


def stan_data(path: pathlib.Path) -> dict:
    """The raw ``data.json`` of a posteriordb folder: Stan's data block as JSON values."""
    with open(path / "data.json") as f:
        return json.load(f)


def floats(values) -> torch.Tensor:
    """A float32 tensor of JSON numbers (Stan ``real``/``vector``/``matrix`` data)."""
    return torch.tensor(values, dtype=torch.float32)


def load_reference(path: pathlib.Path) -> dict[str, np.ndarray]:
    """``reference_draws.json`` as ``{Stan scalar name: float64 array of draws}``."""
    with open(path / "reference_draws.json") as f:
        return {k: np.asarray(v, dtype=np.float64) for k, v in json.load(f).items()}


def load(short: str) -> tuple[Callable, dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """``(model, data, reference)`` of the port ``short``: call ``model(**data)``; reference as in :func:`flatten`.

    The model is :func:`initializable`: its flat priors accept the default init strategies of guides and NUTS.
    """
    port, path = PORTS[short], folder(short)
    return initializable(port.model), port.load_data(path), load_reference(path)


def scalar_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """Stan's scalar names of a site of ``shape``, row-major, 1-based: ``beta[1]``, ``theta[1,2]``; ``()`` -> name."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i + 1) for i in idx)}]" for idx in itertools.product(*map(range, shape))]


def flatten(samples: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Site draws ``{name: (S, *site_shape)}`` -> ``{Stan scalar name: (S,) float64 array}``."""
    out: dict[str, np.ndarray] = {}
    for name, value in samples.items():
        array = np.asarray(torch.as_tensor(value).detach().cpu().double().numpy())
        shape = array.shape[1:]
        flat = array.reshape(array.shape[0], -1)
        out.update(zip(scalar_names(name, shape), flat.T))
    return out


def site_shapes(names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Site shapes from Stan scalar names (inverse of :func:`scalar_names`): ``beta[1], beta[2]`` -> ``(2,)``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key in names:
        name, _, index = key.partition("[")
        idx = tuple(int(i) for i in index.rstrip("]").split(",")) if index else ()
        old = shapes.get(name, (0,) * len(idx))
        shapes[name] = tuple(max(a, b) for a, b in zip(old, idx))
    return shapes


def unflatten(
    draws: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: Stan scalar names -> ``{site: tensor (S, *shape)}`` of ``dtype`` for ``shapes``."""
    out = {}
    for name, shape in shapes.items():
        columns = [np.asarray(draws[k]) for k in scalar_names(name, tuple(shape))]
        stacked = np.stack(columns, axis=-1).reshape(len(columns[0]), *shape)
        out[name] = torch.as_tensor(stacked, dtype=dtype)
    return out
