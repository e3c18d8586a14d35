"""One step of :func:`~vi_flows.fit`, in this process or data-parallel: the interface the loop runs over.

A step is Pyro's ``SVI.step`` written out (``loss_and_grads``, optimizer,
``zero_grads``), so the NaN guard can check the loss and gradients before the
optimizer touches the parameters. Reading them on the host costs one device sync
per step, as does ``SVI.step`` itself.

:class:`LocalStep` and :class:`DistributedStep` share one interface, so the loop has
no distributed branches: the latter averages the gradients across ranks, agrees
every rank's errors, interrupts and callback stops at the collectives, and keeps an
error met between collectives (a failed save) until the next one, where every rank
raises instead of leaving the others waiting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import PyroOptim

from .. import distributed as _distributed
from .batches import Inputs
from .checkpoint import _get_rng_state, _set_rng_state
from .guard import _grad_norm, _guard, invalid_values
from .options import _current_lr


def _traced_params(capture) -> list[torch.Tensor]:
    return list({site["value"].unconstrained(): None for site in capture.trace.nodes.values()})


def _create_params(model, guide, args, kwargs) -> list[torch.Tensor]:
    """Create the guide's (and model's) parameters with one blocked run; return them (unconstrained), sorted by name."""
    with poutine.block(), poutine.trace(param_only=True) as capture:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    store = pyro.get_param_store()
    return sorted(_traced_params(capture), key=store.param_name)


def _svi_step(step: int, loss: ELBO, optim: PyroOptim, model, guide, args, kwargs) -> tuple[float, float]:
    """``SVI.step`` with the gradients checked before the optimizer runs. Returns (loss, gradient norm)."""
    with poutine.trace(param_only=True) as capture, invalid_values(step, _current_lr(optim)):
        loss_value = torch_item(loss.loss_and_grads(model, guide, *args, **kwargs))
    return _apply_step(step, loss_value, _traced_params(capture), optim, model, guide, args, kwargs)


def _apply_step(step: int, loss_value: float, params, optim: PyroOptim, model, guide, args, kwargs):
    grad_norm = _grad_norm([p.grad for p in params if p.grad is not None])
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        _guard(step, loss_value, params, model, guide, args, kwargs, _current_lr(optim))
    optim(params)
    zero_grads(params)
    return loss_value, grad_norm


def _ask(callbacks, step: int, elbo: float, guide) -> bool:
    """Call every callback (all of them, even after one says stop); whether any returned True."""
    stop = False
    for cb in callbacks:
        stop = bool(cb(step, elbo, guide)) or stop
    return stop


class LocalStep:
    """The step in this process alone. Errors raise where they happen; the interface's exchanges are no-ops.

    Setup: :meth:`attempt` runs a piece of it, :meth:`agree` settles its errors,
    :meth:`share` hands rank 0's objects to every rank, :meth:`bind` takes the
    parameters, :meth:`seed` sets the steps' random streams. Steps: the step is
    called, then :meth:`callbacks`, :meth:`guarded` saves, :meth:`interrupted`;
    :meth:`finish` settles the errors left after the last step.
    """

    #: Whether the parameters are created before step 1 even without a resume (distributed: to broadcast them).
    creates_params = False
    main = True

    def __init__(self, loss: ELBO, optim: PyroOptim, model: Callable, guide: Callable, inputs: Inputs, device=None):
        self.loss, self.optim, self.model, self.guide, self.inputs = loss, optim, model, guide, inputs
        self.device = device

    def attempt(self, fn: Callable):
        return fn()

    def agree(self, where: str, payload=None) -> list:
        return [payload]

    def share(self, obj):
        return obj

    def bind(self, params: list[torch.Tensor], signature) -> None:
        pass

    def seed(self, state: dict | None, seed: int | None, start: int) -> None:
        """The checkpoint's random streams on a resume; else those ``seed`` set at the start."""
        if state is not None:
            _set_rng_state(state["rng"])

    def __call__(self, step: int, interrupt) -> tuple[float, float]:
        """Run step ``step``; return (loss, gradient norm)."""
        args, kwargs = self.inputs.next()
        return _svi_step(step, self.loss, self.optim, self.model, self.guide, args, kwargs)

    def callbacks(self, callbacks, step: int, elbo: float, guide) -> bool:
        return _ask(callbacks, step, elbo, guide)

    def guarded(self, fn: Callable, *args) -> None:
        fn(*args)

    def interrupted(self, interrupt) -> bool:
        """Whether to stop for a Ctrl-C, checked after the step's callbacks and checkpoint."""
        return interrupt.requested

    def can_save_interrupted(self) -> bool:
        """Whether a checkpoint may be written while a KeyboardInterrupt propagates."""
        return True

    def rng_states(self) -> list | None:
        """Every rank's random streams, for a checkpoint (None: this process's only, read at the save)."""
        return None

    def finish(self, done: int) -> None:
        pass


class DistributedStep(LocalStep):
    """The step of one rank of a data-parallel fit (see :mod:`vi_flows.distributed`).

    Gradients and loss are averaged across ranks in one all-reduce per step
    (:class:`~vi_flows.distributed.GradientSync`), which also carries each rank's
    failure and interrupt flags. An interrupt on any rank is agreed there and every
    rank completes the step before stopping: discarding it instead would leave each
    rank's random stream past the draws of a step the checkpoint does not hold. A
    rank that raises makes every rank raise (the others with
    :class:`~vi_flows.distributed.RankError`). Checkpoints hold every rank's random
    streams and are written by rank 0. The parameters are created under ``seed`` on
    every rank and given rank 0's values; each rank then draws from ``seed + rank``.
    ``history["elbo"]`` is the global mean, so the stopping rule agrees on every rank.
    """

    creates_params = True

    def __init__(self, ctx: _distributed.Context, *args, **kwargs):
        super().__init__(*args, device=ctx.device, **kwargs)
        self.ctx, self.main, self.sync = ctx, ctx.main, None
        self.pending: BaseException | None = None  # an error to tell the other ranks at the next collective
        self.agreed_interrupt = False

    def attempt(self, fn: Callable):
        try:
            return fn()
        except Exception as e:
            self.pending = e
            return None

    def agree(self, where: str, payload=None) -> list:
        error, self.pending = self.pending, None
        return self.ctx.agree(error, where, payload)

    def share(self, obj):
        return self.ctx.broadcast_object(obj)

    def bind(self, params: list[torch.Tensor], signature) -> None:
        """Check every rank made the same parameters, give them rank 0's values, and set up the all-reduce."""
        signatures = self.agree("creating the parameters", signature)
        if any(s != signatures[0] for s in signatures):
            raise ValueError(f"the ranks created different parameters (name, shape, dtype): {signatures}")
        self.ctx.broadcast_(params)
        self.sync = _distributed.GradientSync(self.ctx, params)

    def seed(self, state: dict | None, seed: int | None, start: int) -> None:
        """This rank's streams from the checkpoint if it has one per rank, else from ``seed + rank``."""
        ranks = None if state is None else state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.ctx.world_size:
            _set_rng_state(ranks[self.ctx.rank])
        elif seed is not None:  # start > 0: resumed on another number of ranks
            pyro.set_rng_seed(seed + self.ctx.rank + self.ctx.world_size * start)
        else:  # torch's default seed is the same in every process: the ranks would draw the same minibatches
            pyro.set_rng_seed(random.SystemRandom().randrange(2**31))

    def __call__(self, step: int, interrupt) -> tuple[float, float]:
        """Run step ``step`` on every rank; raises on all if one failed, now or (a pending error) before."""
        error, loss_value, args, kwargs = self.pending, math.nan, (), {}
        start = time.perf_counter()
        if error is None:
            try:
                args, kwargs = self.inputs.next()
                with poutine.trace(param_only=True) as capture, invalid_values(step, _current_lr(self.optim)):
                    loss_value = torch_item(self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs))
                new = self.sync.unknown(_traced_params(capture))
                if new:
                    names = [pyro.get_param_store().param_name(p) for p in new]
                    raise ValueError(f"a distributed fit needs all parameters at step 1; step {step} created {names}")
            except Exception as e:
                error = e
        reduce_start = time.perf_counter()
        loss_value, failed, self.agreed_interrupt = self.sync(loss_value, error is not None, interrupt.requested)
        reduce_end = time.perf_counter()
        if failed:
            zero_grads(self.sync.params)
            self.ctx.agree(error, f"at step {step}")
        outcome = _apply_step(step, loss_value, self.sync.params, self.optim, self.model, self.guide, args, kwargs)
        self.sync.timing.add(reduce_end - reduce_start, time.perf_counter() - start)
        return outcome

    def callbacks(self, callbacks, step: int, elbo: float, guide) -> bool:
        """Callbacks on every rank; a stop or an error on any rank ends every rank at this step."""
        stop = False
        try:
            stop = _ask(callbacks, step, elbo, guide)
        except Exception as e:
            self.pending = e
        if callbacks:  # one more small all-reduce per step, only when there are callbacks
            failed, stop = self.ctx.any(self.pending is not None, stop)
            if failed:
                self.agree(f"in a callback at step {step}")
        return stop

    def guarded(self, fn: Callable, *args) -> None:
        """Run ``fn``; keep its error for the next collective instead of leaving the others waiting."""
        try:
            fn(*args)
        except Exception as e:
            self.pending = self.pending or e

    def interrupted(self, interrupt) -> bool:
        return self.agreed_interrupt

    def can_save_interrupted(self) -> bool:
        return self.agreed_interrupt  # all ranks are past the same step, and the save gathers from each

    def rng_states(self) -> list:
        return self.ctx.gather_object(_get_rng_state())  # on every rank: a collective

    def finish(self, done: int) -> None:
        self.agree(f"after step {done}")


def make_step(distributed: bool | None, device, loss, optim, model, guide, inputs: Inputs) -> LocalStep:
    """:class:`DistributedStep` when ``distributed`` resolves to on (joining the group), else :class:`LocalStep`."""
    if _distributed.resolve(distributed):
        return DistributedStep(_distributed.init(device), loss, optim, model, guide, inputs)
    return LocalStep(loss, optim, model, guide, inputs, device)
