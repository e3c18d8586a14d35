""":func:`fit`: its keywords checked and turned into a step object and a plan, then the loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.optim import PyroOptim

from ..validate import check_bool
from .anneal import Schedule
from .averaging import TailAverage
from .batches import Inputs
from .checkpoint import Checkpoints
from .loop import Plan, prepare, run
from .options import _check_args, _check_device, _make_loss, _make_optim
from .particles import check_particles
from .result import FitResult
from .steps import make_step
from .stopping import GainRule, make_rule

Callback = Callable[[int, float, Any], "bool | None"]


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 2000,
    optim: PyroOptim | None = None,
    lr: float = 1e-2,
    loss: ELBO | None = None,
    num_particles: int | str = "auto",
    seed: int | None = None,
    progress: bool = True,
    callbacks: Iterable[Callback] = (),
    tol: float | str | None = "auto",
    patience: int = 3,
    window: int = 100,
    lr_decay: float | str | None = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    log_every: int = 10,
    batches: Iterable | None = None,
    distributed: bool | None = None,
    anneal: int = 0,
    estimator: str | None = None,
    tail_average: bool = True,
    **kwargs,
) -> FitResult:
    """Maximize the ELBO of ``guide`` for ``model(*args, **kwargs)`` by SVI, guarding every step; see docs/guides.md.

    Args:
        num_steps: total steps, a resumed run's included; 2000, the budget of docs/benchmarks.md.
        optim: a Pyro optimizer, a ``PyroLRScheduler`` stepped every step; default Adam (:func:`.options._make_optim`).
        lr: the default optimizer's lr; 1e-2, Adam's step per parameter in units of the start's scale (docs/guides.md).
        loss: a Pyro ELBO; default ``Trace_ELBO(num_particles, vectorize_particles=num_particles > 1)``.
        num_particles: draws per step, vectorized (one at a time where the model is not: :mod:`.particles`);
            ``"auto"``: 8 where the model vectorizes them (about the cost of one), else 1; distributed, 1 per rank.
        seed: ``pyro.set_rng_seed(seed)`` first: equal seeds, equal runs; distributed, rank ``r`` then ``seed + r``.
        progress: a tqdm bar, shown on rank 0 and when stderr is a terminal only.
        callbacks: each called as ``cb(step, elbo, guide)`` after every step; one returning True stops the fit.
        tol, patience, window: early stopping, ``"auto"``: < 0.1 nat left to gain; a number: Stan's rule; None: off.
            See :mod:`vi_flows.training.stopping`.
        lr_decay: the default lr falls exponentially to ``lr · lr_decay``; ``"auto"``: 0.1, none with ``optim``.
        checkpoint: path written atomically every ``checkpoint_every`` steps and at the end (:mod:`.checkpoint`).
        checkpoint_every: steps between checkpoints; 500, a quarter of a default run.
        resume: a checkpoint to continue from; the run then reproduces the uninterrupted one exactly.
        device: where ``args``, ``kwargs`` and batches go first; distributed, ``"cuda"`` is ``cuda:LOCAL_RANK``.
        log_every: steps between progress-bar refreshes; 10 keeps the bar's cost negligible.
        batches: minibatches (a ``DataLoader``), cycled; excludes ``args``; formerly ``data=`` (:mod:`.batches`).
        distributed: data-parallel over ``torch.distributed`` (:mod:`vi_flows.distributed`); None: when launched so.
        anneal: steps to ``β = 1`` of the target ``β_t log p`` (:mod:`.anneal`, Rezende & Mohamed 2015); 0: off.
        estimator: ``"elbo"`` (None), ``"stl"`` or ``"iwelbo"`` (:func:`.options._make_loss`); exclusive with ``loss``.
        tail_average: a fit stopped by ``tol="auto"`` ends at the mean of the iterates over the steps the rule judged
            flat, not at the last one (:mod:`.averaging`): closer means (docs/guides.md). Needs that rule; False: the
            last iterate.
        **kwargs: keyword arguments of ``model`` and ``guide``.

    Raises:
        FloatingPointError: a non-finite loss or gradient, naming the step, parameters and sites (:mod:`.guard`);
            the parameters keep their values from the step before.
        KeyboardInterrupt: after the current step and a final checkpoint (a second Ctrl-C: at once).
        ValueError: a bad argument, or a checkpoint that cannot be resumed (``CheckpointError``).
    """
    _check_args(num_steps, lr, num_particles, tol, patience, window, lr_decay, checkpoint_every, log_every)
    check_bool(tail_average, "tail_average")
    schedule = Schedule(model, anneal)
    optim = _make_optim(optim, lr, lr_decay, num_steps)
    built_loss, loss = loss is None, _make_loss(loss, num_particles, estimator)
    inputs = Inputs(model, args, kwargs, batches)
    callbacks = tuple(callbacks)
    device = None if device is None else _check_device(device)
    step = make_step(distributed, device, loss, optim, schedule.model, guide, inputs)
    checkpoints = None if checkpoint is None else Checkpoints(checkpoint, checkpoint_every)
    stopper = make_rule(tol, window, patience, num_steps)
    averager = TailAverage(window) if tail_average and isinstance(stopper, GainRule) else None
    plan = Plan(num_steps, optim, guide, schedule, stopper, callbacks, checkpoints, log_every, progress, averager)
    prepared = prepare(step, plan, model, inputs.to(step.device), seed, resume)
    if built_loss:  # a user's own loss is left as given
        check_particles(loss, step, model, guide, inputs.peek(), auto=num_particles == "auto")
    return run(step, plan, *prepared)
