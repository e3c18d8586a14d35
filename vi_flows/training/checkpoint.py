"""Checkpoints of :func:`~vi_flows.fit`: written atomically, with every random stream, read back safely.

A checkpoint holds the parameters, the optimizer state, the step, the history and
the RNG states (torch, CUDA, NumPy, ``random``; distributed: every rank's), so that a
resumed run reproduces the uninterrupted one exactly. It holds tensors and plain data
only, loadable with ``torch.load(path, weights_only=True)``: no pickled code runs on load.

Resuming assumes the same arguments, and a model and guide constructed as for the
original run: the guide is called once to create its parameters, which are then
overwritten. Distributed, rank 0 alone writes and reads the file (then broadcasts it);
resumed on another number of ranks, each rank is reseeded instead. A step that fails
the NaN guard writes no checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.optim import PyroOptim

from ..transforms.tails import SinhArcsinh

_FORMAT = "vi_flows.fit/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, not fit's, or made for another model or guide."""


@dataclass(frozen=True)
class Checkpoints:
    """Where and how often :func:`~vi_flows.fit` writes its checkpoint.

    ``every`` steps and at the end. Default 500, a quarter of fit's default 2000 steps: a
    crash loses at most a quarter of a default run, and the writes stay rare.
    """

    path: str | os.PathLike
    every: int = 500

    def check_dir(self) -> None:
        """Fail before the first step rather than at the first save."""
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise ValueError(f"checkpoint must be a path in an existing directory, got {os.fspath(self.path)!r}")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(
        self, step: int, optim: PyroOptim, history: dict, rngs: list | None = None, average: dict | None = None
    ) -> None:
        _save_atomic(_checkpoint_state(step, optim, history, rngs, average), self.path)


def stepped_params(optim: PyroOptim) -> dict[str, torch.Tensor]:
    """The parameters ``optim`` has stepped (the model's and guide's, unconstrained), by param-store name."""
    store = pyro.get_param_store()
    named = ((store.param_name(p), p) for p in optim.optim_objs)
    return {name: p for name, p in named if name is not None}


def _checkpoint_state(
    step: int, optim: PyroOptim, history: dict, rngs: list | None = None, average: dict | None = None
) -> dict:
    """The parameters saved are those the optimizer has stepped: the model's and guide's.

    Distributed, ``rng`` is rank 0's state and ``rng_ranks`` every rank's. ``average``: the tail average's sums
    (:mod:`.averaging`); a checkpoint without them (older, or ``tail_average=False``) resumes without averaging.
    """
    state = {
        "format": _FORMAT,
        "step": step,
        "params": {name: p.detach() for name, p in stepped_params(optim).items()},
        "optim": optim.get_state(),
        "history": history,
        "rng": _get_rng_state() if rngs is None else rngs[0],
        "average": average,
    }
    if rngs is not None:
        state["rng_ranks"] = rngs
    return state


def _save_atomic(obj, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename: a crash leaves the old file or the new one."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_checkpoint(path) -> dict:
    """Read a checkpoint of :func:`fit` (tensors and plain data only: ``weights_only=True``).

    Raises :class:`CheckpointError` with one line naming the file and what is wrong with it,
    instead of torch's zip-reader or unpickler messages (the latter suggests ``weights_only=False``,
    which would run whatever code a foreign file pickled).
    """
    where = f"resume: {os.fspath(path)!r}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{where} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{where} {_unreadable(path, e)}") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{where} is not a vi_flows checkpoint (a torch file, but not one fit wrote)")
    return state


def _unreadable(path, error: Exception) -> str:
    """Why torch could not load ``path``: empty, damaged (a zip archive torch cannot read), or not a torch file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "is empty (damaged); resume from another copy or start the run again"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "is not a vi_flows checkpoint (not a file torch.save wrote)"
    if isinstance(error, pickle.UnpicklingError):
        return "is not a vi_flows checkpoint (it holds objects other than tensors and plain data)"
    return "is damaged (truncated or corrupted: torch cannot read its zip archive); resume from another copy"


#: Name endings of :class:`~vi_flows.transforms.SinhArcsinh`'s parameters, read from the layer itself: every guide's
#: last layer by default, absent from checkpoints written before that default.
_TAILS_PARAMS = tuple(f".{name}" for name, _ in SinhArcsinh(1).named_parameters())


def _load_params(saved: dict, path, params: list[torch.Tensor]) -> None:
    """Overwrite the parameters of the param store in place with ``saved``, the checkpoint ``path``'s.

    ``params`` are those this model and guide create. A checkpoint of another model or guide (a
    parameter more or less, or of another shape) raises :class:`CheckpointError` naming the first
    difference, before anything is overwritten: a layer added by a larger ``num_flows`` would
    otherwise train on from its initial values beside the restored ones.
    """
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    where = f"resume: {os.fspath(path)!r} was made for another model or guide:"
    for name, value in saved.items():
        if name in current and value.shape != current[name].shape:
            raise CheckpointError(
                f"{where} parameter {name!r} has shape {tuple(value.shape)} there and {tuple(current[name].shape)} here"
            )
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise CheckpointError(f"{where} it has parameters that this model and guide do not create: {unknown}")
    missing = sorted({store.param_name(p) for p in params} - set(saved))
    if missing:
        tails = all(name.endswith(_TAILS_PARAMS) for name in missing)
        hint = "; saved before every guide ended with a tails layer: build the guide with tails=False" if tails else ""
        raise CheckpointError(f"{where} this model and guide create parameters it lacks: {missing}{hint}")
    with torch.no_grad():
        for name, value in saved.items():
            current[name].copy_(value)


# ---- random streams -------------------------------------------------------------------------------------------------


def _get_rng_state() -> dict:
    """Every stream a model may draw from, as tensors and plain data (NumPy's key array as an int64 tensor)."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [key, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "random": [version, list(internal), gauss_next],
    }


def _set_rng_state(state: dict) -> None:
    """Restore the streams :func:`_get_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    key, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
