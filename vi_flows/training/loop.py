"""The loop of :func:`~vi_flows.fit`: one pass over the steps of a step object, local or distributed alike.

:func:`prepare` gets the run to step 1 (seed, checkpoint, parameters, random
streams); :func:`run` then steps, records the history, asks the stopping rule and
the callbacks, saves checkpoints and handles Ctrl-C. What differs between one
process and many lives in the step object (:mod:`vi_flows.training.steps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
from pyro.optim import PyroOptim
from tqdm.auto import tqdm

from .anneal import Schedule
from .averaging import TailAverage
from .batches import Inputs
from .checkpoint import Checkpoints, _load_checkpoint, _load_params, stepped_params
from .interrupt import _DeferredInterrupt
from .options import _current_lr, _step_scheduler
from .result import _COLUMNS, FitResult
from .steps import LocalStep, _create_params
from .stopping import GainRule, RelativeRule, replay


@dataclass
class Plan:
    """What the loop runs, besides the step object: all fixed before step 1."""

    num_steps: int
    optim: PyroOptim
    guide: Callable
    schedule: Schedule
    stopper: GainRule | RelativeRule | None
    callbacks: tuple = ()
    checkpoints: Checkpoints | None = None
    log_every: int = 10
    progress: bool = True
    averager: TailAverage | None = None


def prepare(step: LocalStep, plan: Plan, model, inputs: Inputs, seed: int | None, resume) -> tuple[int, dict, bool]:
    """Seed, read ``resume``, create and restore the parameters, set the steps' random streams.

    Returns (steps done, history, whether the resumed run had converged). Distributed,
    only rank 0 reads the checkpoint and broadcasts it, and an error on one rank is
    raised on all of them at the next exchange.
    """

    def read() -> dict | None:
        if step.main and plan.checkpoints is not None:
            plan.checkpoints.check_dir()
        if seed is not None:
            pyro.set_rng_seed(seed)
        if resume is not None and plan.optim.optim_objs:  # PyroOptim hands saved state only to new parameters
            raise ValueError("optim has already stepped; resume needs a fresh optimizer (or optim=None)")
        return _load_checkpoint(resume) if step.main and resume is not None else None

    state = step.attempt(read)
    step.agree("before the first step")
    state = step.share(state) if resume is not None else None
    start = 0 if state is None else state["step"]

    def restore():
        inputs.seek(start)
        params, history = [], {c: [] for c in _COLUMNS}
        if state is not None or step.creates_params:
            params = _create_params(model, plan.guide, *inputs.peek())
        if state is not None:
            history = state["history"]
            history.setdefault("beta", [1.0] * len(history["step"]))  # checkpoints written before annealing existed
            _load_params(state["params"], resume, params)
            plan.optim.set_state(state["optim"])
            _resume_average(plan, state, params)
        store = pyro.get_param_store()
        return params, [(store.param_name(p), tuple(p.shape), str(p.dtype)) for p in params], history

    params, signature, history = step.attempt(restore) or ([], None, None)
    step.bind(params, signature)
    step.seed(state, seed, start)
    return start, history, state is not None and replay(plan.stopper, history)


def _resume_average(plan: Plan, state: dict, params: list) -> None:
    """Continue the checkpoint's tail average; without one (an older checkpoint), the resumed run does not average."""
    if plan.averager is None:
        return
    if state.get("average") is None:
        plan.averager = None
        return
    store = pyro.get_param_store()
    plan.averager.load(state["average"], {store.param_name(p): p for p in params})


def _average(averager: TailAverage | None, t: int, optim: PyroOptim, converged: bool) -> bool:
    """Add step ``t``'s parameters to the tail average; at convergence set them to it. Whether they were."""
    if averager is None:
        return False
    params = stepped_params(optim)
    averager.update(t, params)
    return converged and averager.apply(params)


def run(step: LocalStep, plan: Plan, start: int, history: dict, converged: bool) -> FitResult:
    """Steps ``start + 1 .. num_steps``, until the stopping rule or a callback ends them; the :class:`FitResult`.

    A KeyboardInterrupt is re-raised after a final checkpoint, when the state is
    consistent: between steps (and distributed, once every rank agreed on it).
    """
    ckpt, optim, averager = plan.checkpoints, plan.optim, plan.averager

    def save(t: int) -> None:
        rngs = step.rng_states()
        if step.main:
            ckpt.write(t, optim, history, rngs, None if averager is None else averager.state())

    elapsed0 = history["elapsed"][-1] if history["elapsed"] else 0.0
    done, saved, in_step = start, start, False
    averaged = converged and averager is not None and averager.complete  # a resumed run that had converged
    t0 = time.perf_counter()
    hide = None if plan.progress and step.main else True  # None: tqdm shows the bar only on a terminal
    bar = tqdm(total=plan.num_steps, initial=start, disable=hide, unit="step", desc="fit")
    try:
        with _DeferredInterrupt() as interrupt, bar:
            for t in range(start + 1, plan.num_steps + 1 if not converged else 0):
                in_step = True
                beta = plan.schedule.beta(t)
                loss_value, grad_norm = step(t, interrupt)
                lr_used = _current_lr(optim)
                _step_scheduler(optim, loss_value)
                elbo = -loss_value
                row = (t, elbo, time.perf_counter() - t0 + elapsed0, lr_used, grad_norm, beta)
                for column, value in zip(_COLUMNS, row):
                    history[column].append(value)
                done, in_step = t, False
                converged = plan.stopper is not None and beta == 1.0 and plan.stopper.update(t, elbo)
                stop = step.callbacks(plan.callbacks, t, elbo, plan.guide)
                averaged = _average(averager, t, optim, converged)
                if ckpt is not None and ckpt.due(t):
                    step.guarded(save, t)
                    saved = t
                if not bar.disable and (t % plan.log_every == 0 or t == plan.num_steps):
                    bar.set_postfix(elbo=f"{np.mean(history['elbo'][-plan.log_every :]):.6g}", refresh=False)
                    bar.update(t - bar.n)
                if step.interrupted(interrupt):
                    raise KeyboardInterrupt
                if stop or converged:  # distributed, both are the same on every rank: the ELBO is the global one
                    break
    except KeyboardInterrupt:
        if ckpt is not None and not in_step and saved != done and step.can_save_interrupted():
            save(done)
        raise
    if ckpt is not None and saved != done:
        step.guarded(save, done)
    step.finish(done)
    return FitResult.build(plan.guide, history, converged, done, averaged)
