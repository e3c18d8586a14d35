"""Before replaying ``S`` draws: one plain run of guide and model, and the particle plate.

The plain (one-draw, unvectorized) run gives the shapes of one draw, ``max_plate_nesting`` (the deepest
plate or batch rank, so the particle plate ``pyro.plate("_num_samples", S)`` can sit at
``dim = -(max_plate_nesting + 1)``, left of every model dim) and the plates that subsample. A model that
subsamples is replayed on its full data (:func:`_full_data`): diagnostics of one random minibatch, whose
likelihood is scaled by ``N / b``, are far noisier than the data set's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import SubsampleMessenger

from ..validate import check_continuous_site
from .sites import _sample_sites, _subsampled_plates

#: The plate the vectorized replay draws its ``S`` particles in, at ``dim = -(max_plate_nesting + 1)``.
PARTICLE_PLATE = "_num_samples"


def _check_num_samples(num_samples: int, minimum: int = 2) -> int:
    """``num_samples`` if an integer >= ``minimum`` (2 by default: a standard error needs two draws), else raise."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(f"num_samples must be an integer >= {minimum}, got {num_samples!r}")
    return num_samples


def _describe(e: BaseException, limit: int = 160) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters, for one-line warnings."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _full_data() -> Iterator[None]:
    """Inside, every ``pyro.plate`` uses all its indices: ``subsample_size`` and ``subsample`` are ignored.

    A messenger cannot do this: ``pyro.plate`` keeps ``subsample_size`` in a local variable and raises when
    the indices a handler returns have another length. So ``SubsampleMessenger._subsample`` (the static
    method every plate calls on entry) is swapped for one that drops both arguments, and restored on exit.
    Like Pyro's handler stack, this is process-wide state while it is active.
    """
    original = SubsampleMessenger.__dict__["_subsample"]

    def full(name, size=None, subsample_size=None, subsample=None, use_cuda=None, device=None):
        if size is None:  # an unsized plate has nothing to subsample
            return original.__func__(name, size, subsample_size, subsample, use_cuda, device)
        return original.__func__(name, size, None, None, use_cuda, device)

    SubsampleMessenger._subsample = staticmethod(full)
    try:
        yield
    finally:
        SubsampleMessenger._subsample = original


@dataclass
class _Plain:
    """One plain (unvectorized) run of guide and model: the shapes of one draw and the plate depth."""

    guide_trace: Any
    model_trace: Any
    max_plate_nesting: int
    subsampled: list[str]


def _plate_depth(guide_trace, model_trace) -> int:
    """The deepest plate or batch rank among both traces' sample sites; rejects discrete latents."""
    depth = 0
    for trace, who in ((model_trace, "model"), (guide_trace, "guide")):
        for site in _sample_sites(trace):
            if not site["is_observed"]:
                check_continuous_site(site["name"], site["fn"], owner=f"diagnostics ({who})")
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
            depth = max(depth, len(site["fn"].batch_shape), *dims)
    return depth


def _inspect(model, guide, args, kwargs, max_plate_nesting: int | None) -> _Plain:
    """One plain replay: initializes a fresh autoguide, rejects discrete latents, finds ``max_plate_nesting``
    (the given one, or the deepest plate / batch rank seen) and the plates that subsample.

    Runs under ``fork_rng`` so it leaves the random stream exactly as it found it.
    """
    with torch.random.fork_rng(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    depth = _plate_depth(guide_trace, model_trace)
    if max_plate_nesting is not None:
        if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
            raise ValueError(f"max_plate_nesting must be None or an integer >= 0, got {max_plate_nesting!r}")
        depth = max_plate_nesting
    return _Plain(guide_trace, model_trace, depth, _subsampled_plates(guide_trace, model_trace))


def _plan(model, guides: list, args, kwargs, max_plate_nesting: int | None) -> tuple[list[_Plain], bool]:
    """Plain runs of each guide, and whether the draws run on the full data.

    A model that subsamples a plate is evaluated on all of it (diagnostics of one random minibatch mislead:
    its likelihood is scaled by N/b, so the weights are far noisier than the full data's). Where the model
    cannot run on all indices (it indexes the data with its own minibatch), one minibatch it is, with a warning.
    """
    plains = [_inspect(model, g, args, kwargs, max_plate_nesting) for g in guides]
    plates = sorted({p for plain in plains for p in plain.subsampled})
    if not plates:
        return plains, False
    try:
        with _full_data():
            return [_inspect(model, g, args, kwargs, max_plate_nesting) for g in guides], True
    except Exception as e:
        warnings.warn(
            f"the model subsamples plate {', '.join(plates)} and cannot run on all its indices ({_describe(e)}); "
            "ELBO, k-hat and LOO are from one minibatch, not the data set: for full-data numbers index the data "
            "with the plate's own indices (`with pyro.plate(name, N, subsample_size=b) as idx: ... x[idx]`) "
            "or pass a model without subsampling",
            stacklevel=4,
        )
        return plains, False


def _vectorize(fn, num_samples: int, max_plate_nesting: int):
    """``fn`` run inside :data:`PARTICLE_PLATE` of size ``num_samples``, left of every plate of the model."""

    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_samples, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return vectorized


def _check_guides(guide, many: bool) -> list:
    """The guide(s) as a list: one, or with ``many`` a list of independent fits (one chain each)."""
    if isinstance(guide, (list, tuple)) and not many:
        raise ValueError(
            f"guide must be a single Pyro guide here (lists of fits go to to_inference_data), got {guide!r}"
        )
    guides = list(guide) if isinstance(guide, (list, tuple)) else [guide]
    if not guides or not all(callable(g) for g in guides):
        raise ValueError(f"guide must be a callable Pyro guide or a non-empty list of them, got {guide!r}")
    return guides
