"""Vectorized particles where the model allows them, a loop where it does not.

``Trace_ELBO(num_particles=K, vectorize_particles=True)`` runs the model once on a leftmost batch of
``K`` draws. Users' models are often not written for that (``torch.mm``, ``nn.Linear``, ``x[idx] @ w``,
a ``.sum()`` over everything, an ``unsqueeze`` that puts the particles in a data dimension): they raise,
or silently compute another loss. Before the first step
``fit`` replays two draws vectorized and alone (:func:`vi_flows.diagnostics.replay.vectorization_failure`);
where they disagree it runs the same ``K`` particles one at a time: the same estimator, ``K`` model runs a
step, with one warning saying why.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoGuide

from .steps import DistributedStep


def check_particles(loss: ELBO, step, model, guide, inputs: tuple[tuple, dict], auto: bool) -> None:
    """Before the first step: ``loss`` (one ``fit`` built) vectorizes its particles only where ``model`` runs them so.

    Elsewhere they run one at a time, or, with ``auto`` (``num_particles="auto"``), one per step, as fast as
    before. Data-parallel (:class:`~.steps.DistributedStep`), ``auto`` takes one per rank (the ranks' draws
    already average; ``estimator="iwelbo"`` keeps its 8) and no check runs: the check runs the model outside
    the ranks' exchanges, so an error there on one rank would leave the others waiting.
    """
    from ..diagnostics.replay import vectorization_failure
    from ..objectives import IWELBO

    if isinstance(step, DistributedStep):
        if auto and not isinstance(loss, IWELBO):  # the bound needs its K particles
            loss.num_particles, loss.vectorize_particles = 1, False
        return
    if loss.num_particles < 2 or not getattr(loss, "vectorize_particles", False):
        return
    args, kwargs = inputs
    if isinstance(guide, AutoGuide) and guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)  # as the first step would, drawing the same numbers first
    reason = vectorization_failure(model, guide, args, kwargs)
    if reason is None:
        if loss.max_plate_nesting == math.inf:  # Pyro would guess at the first step, drawing: a resume would not
            with torch.random.fork_rng(), poutine.block():
                loss._guess_max_plate_nesting(model, guide, args, kwargs)
        return
    if isinstance(loss, IWELBO):
        raise ValueError(
            f"estimator='iwelbo' needs {loss.num_particles} vectorized particles and this model does not run them "
            f"({reason}); use estimator='stl' or 'elbo' (their particles can run one at a time) or vectorize the model"
        )
    loss.vectorize_particles = False
    if auto:
        loss.num_particles = 1
        what = "num_particles='auto' takes one per step (pass num_particles=K for K, run one at a time)"
    else:
        what = f"its {loss.num_particles} particles per step run one at a time: the same estimate, slower"
    warnings.warn(f"fit: the model does not run vectorized over particles ({reason}); {what}", stacklevel=3)
