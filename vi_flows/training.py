"""A training loop around Pyro's SVI: progress, early stopping, NaN guard, exact checkpoints.

One step is Pyro's ``SVI.step`` written out (``loss_and_grads``, optimizer,
``zero_grads``), so the gradients can be checked before the optimizer touches
the parameters.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import pickle
import random
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import PyroLRScheduler, PyroOptim
from tqdm.auto import tqdm

from . import distributed as _distributed
from .stopping import make_rule

if TYPE_CHECKING:
    import pandas as pd  # imported by fit when it builds the history: it takes a second to import

__all__ = ["FitResult", "Tempered", "anneal_beta", "fit"]

_FORMAT = "vi_flows.fit/1"
#: The default optimizer's lr falls to ``lr · DEFAULT_LR_DECAY`` by the last step (see ``fit(lr_decay=...)``).
DEFAULT_LR_DECAY = 0.1
_COLUMNS = ("step", "elbo", "elapsed", "lr", "grad_norm", "beta")

Callback = Callable[[int, float, Any], "bool | None"]


@dataclass(repr=False)
class FitResult:
    """What :func:`fit` returns.

    ``history`` has one row per step: ``step`` (1-based), ``elbo`` (= −loss,
    one Monte-Carlo estimate), ``elapsed`` (seconds since the start of the
    fit, summed over resumed runs), ``lr`` (of the first parameter's
    optimizer), ``grad_norm`` (2-norm of all unconstrained gradients,
    before any clipping) and ``beta`` (the annealing factor on ``log p``,
    1 unless ``fit(anneal=...)``).
    """

    guide: Any
    history: pd.DataFrame
    converged: bool
    num_steps: int
    elapsed: float

    def __repr__(self) -> str:
        tail = self.history["elbo"].tail(100)
        return (
            f"FitResult(num_steps={self.num_steps}, converged={self.converged}, "
            f"elbo={tail.mean():.6g} (mean of last {len(tail)}), elapsed={self.elapsed:.3g}s)"
        )

    def plot(self, ax=None, path: str | os.PathLike | None = None):
        """Draw the ELBO per step and its running mean; save to ``path`` if given. Returns the Axes."""
        if ax is None:
            if path is None:
                import matplotlib.pyplot as plt

                _, ax = plt.subplots()
            else:  # no pyplot: works on any backend and leaves no open figure behind
                from matplotlib.figure import Figure

                ax = Figure().subplots()
        step, elbo = self.history["step"], self.history["elbo"]
        ax.plot(step, elbo, lw=0.5, alpha=0.4, label="ELBO")
        ax.plot(step, elbo.rolling(max(1, len(elbo) // 50), min_periods=1).mean(), label="running mean")
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO")
        ax.legend()
        if path is not None:
            ax.figure.savefig(path)
        return ax


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 2000,
    optim: PyroOptim | None = None,
    lr: float = 1e-2,
    loss: ELBO | None = None,
    num_particles: int = 1,
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
    **kwargs,
) -> FitResult:
    """Maximize the ELBO of ``guide`` for ``model(*args, **kwargs)`` by SVI.

    Args:
        num_steps: total number of steps, counting those of a resumed run.
        optim: a Pyro optimizer; a :class:`~pyro.optim.PyroLRScheduler` is
            stepped after every step (``ReduceLROnPlateau`` gets that step's
            loss). Default ``pyro.optim.Adam({"lr": lr})``: Adam's update is
            already bounded by about ``3·lr`` per element, and ClippedAdam's
            absolute clip (10) would turn it into sign descent on models whose
            typical gradients exceed 10 (many observations).
        lr: learning rate of the default optimizer (unused when ``optim`` is given).
        loss: a Pyro ELBO; default ``Trace_ELBO(num_particles, vectorize_particles=num_particles > 1)``.
        seed: ``pyro.set_rng_seed(seed)`` before anything else; equal seeds give
            equal trajectories. Distributed: the parameters are created under
            ``seed`` on every rank (then rank 0's are broadcast) and each rank
            then draws from ``seed + rank``.
        progress: tqdm bar with step, mean ELBO of the last ``log_every`` steps,
            steps/s; off when stderr is not a terminal, and on every rank but 0.
        callbacks: each called after every step as ``cb(step, elbo, guide)``;
            one returning True stops the fit (``converged`` stays False).
            Distributed: called on every rank; a stop (or an error) on any rank
            stops all of them at that step (one more small all-reduce per step).
        tol, patience, window: when to stop before ``num_steps``
            (:mod:`vi_flows.stopping`). ``"auto"`` (default): once the steps
            left could not gain 0.1 nat even at the optimistic end (+2 se) of
            the ELBO's linear trend over the last ``5 · window`` steps, checked
            every ``window`` steps: a noisy ELBO that still climbs is never taken
            for a plateau. A number: Stan's ADVI rule, a relative change ``< tol``
            of the window mean, ``patience`` windows in a row (on an ELBO of
            −1e4 a relative 1e-3 is 10 nats). ``None`` runs all ``num_steps``.
        lr_decay: exponential decay of the default optimizer's lr to
            ``lr · lr_decay`` at the last step (``γ = lr_decay^(1/(num_steps − 1))``
            per step, by :class:`pyro.optim.ExponentialLR`). ``"auto"`` (default):
            0.1 with the default optimizer, none with ``optim=``. Adam moves every
            parameter by about ``lr`` per step even where the gradient is pure
            noise; the decay lets the fit settle: from an exact start, 500 steps
            at ``lr = 1e-2`` ended at KL 0.21 (planar) and 0.048 (IAF) without it,
            0.010 with it (``tests/test_start_and_defaults.py``).
        checkpoint: path written atomically every ``checkpoint_every`` steps and
            at the end: parameters, optimizer state, step, history and RNG
            states (of every rank), loadable with ``torch.load(path, weights_only=True)``.
            Distributed: written by rank 0 only.
        resume: a checkpoint to continue from; the run then reproduces the
            uninterrupted one exactly (same arguments assumed; distributed: the
            same number of ranks, else each rank is reseeded). The model and
            guide must be constructed as for the original run; the guide is
            called once to create its parameters, which are then overwritten.
            Distributed: only rank 0 reads the file and broadcasts it.
        device: move tensors in ``args``/``kwargs`` and batches (also inside
            tuples, lists, dicts) there first; autoguides create their
            parameters where the model's values live. Distributed: ``"cuda"``
            means ``cuda:LOCAL_RANK`` and selects the NCCL backend.
        log_every: steps between progress-bar refreshes.
        batches: an iterable of minibatches (e.g. a ``DataLoader``, with a
            ``DistributedSampler`` when distributed), cycled for as many epochs
            as the steps need; step ``k`` calls ``model(*batch, **kwargs)``
            (``model(**batch, **kwargs)`` for a dict, ``model(batch, **kwargs)``
            for anything else but a tuple or list), and so the guide. The model
            must scale its likelihood by ``N / len(batch)``, e.g. with
            ``pyro.plate("data", N, subsample=batch_indices)``. A sampler's
            ``set_epoch(epoch)`` is called before each epoch. Excludes ``args``.
            Formerly ``data=``, still accepted (with a ``FutureWarning``) when
            the model has no parameter named ``data`` and the value is not a
            tensor; otherwise ``data=`` is the model's keyword argument, as in
            Pyro's tutorials' ``def model(data)``.
        distributed: data-parallel over a ``torch.distributed`` process group
            (see :mod:`vi_flows.distributed`): ``None`` turns it on when the
            process was launched by torchrun or a group is initialized;
            ``True`` requires it; ``False`` never. Gradients (and the loss) are
            averaged over the ranks after each backward, so every rank keeps
            identical parameters, and ``history["elbo"]`` is the global mean.
            A rank that raises makes every rank raise (the others with
            :class:`~vi_flows.distributed.RankError` carrying its message).
        anneal: train on the tempered target ``β_t log p(x, z)`` with
            ``β_t = min(1, 0.01 + (t − 1)/anneal)`` at step ``t`` (Rezende &
            Mohamed 2015, §6.1; ``0``: off), i.e. the ELBO ``E_q[β_t log p − log q]``.
            A broad, flattened target first lets the flow cover every mode
            before the full one sharpens them: on the 2-D energies U1, U3, U4
            it took ``AutoPlanar(32)`` from KL 0.29/0.14/0.21 to 0.035/0.017/0.017
            (``docs/benchmarks.md``). ``history["elbo"]`` is the tempered ELBO
            while ``history["beta"] < 1``, and the convergence test waits for
            ``β = 1``. The model's every site is scaled (``poutine.scale``).
        estimator: the objective and its gradient (:mod:`vi_flows.objectives`), exclusive with ``loss``:
            ``"elbo"`` (``None``, the default): Pyro's ``Trace_ELBO`` with ``num_particles``;
            ``"stl"``: :class:`~vi_flows.objectives.STL_ELBO`, the same ELBO with the sticking-the-landing
            path gradient for AutoFlow guides (Roeder et al. 2017): zero variance at the exact posterior,
            1.2-2.6x the cost of a step; not the default because far from the optimum it raises the
            variance (10x measured) and on the 2-D energy U3 from a poor start AutoNSF and AutoRealNVP
            diverged with it (ELBO falling from −4 to −17 and to −3,000) where the plain gradient
            converged; other guides get the plain gradient;
            ``"iwelbo"``: :class:`~vi_flows.objectives.IWELBO`, the importance-weighted bound with
            ``K = num_particles >= 2`` vectorized particles and DReG gradients (Tucker et al. 2019).
            ``history["elbo"]`` is then one estimate of that bound, ``log (1/K) Σ_k w_k``, which lies
            between the ELBO and ``log p(x)``, not of the ELBO.

    Raises:
        FloatingPointError: a non-finite loss or gradient, naming the step, the
            parameters and (for the loss) the sites with a non-finite
            ``log_prob`` in one fresh trace. The parameters and optimizer keep
            their values from the step before; no checkpoint is written.
        KeyboardInterrupt: re-raised after the current step finishes and a
            final checkpoint is written (a second Ctrl-C interrupts at once,
            leaving the last checkpoint).

    Every step reads the loss and gradient norm on the host, to check them
    before the optimizer step; this costs one device sync per step, as does
    ``SVI.step`` itself (and Pyro's ``Trace_ELBO`` already reads each site's
    ``log_prob`` sum).
    """
    _check_args(num_steps, lr, num_particles, tol, patience, window, lr_decay, checkpoint_every, log_every)
    if isinstance(anneal, bool) or not isinstance(anneal, int) or anneal < 0:
        raise ValueError(f"anneal must be an integer >= 0 (steps until beta = 1; 0: off), got {anneal!r}")
    tempered = Tempered(model) if anneal else None
    optim = _make_optim(optim, lr, lr_decay, num_steps)
    loss = _make_loss(loss, num_particles, estimator)
    batches = _minibatches(model, batches, kwargs)
    if batches is not None and (args or not isinstance(batches, Iterable)):
        got = f"{len(args)} positional arguments" if args else type(batches).__name__
        raise ValueError(f"batches must be an iterable of batches and excludes positional arguments, got {got}")
    callbacks = tuple(callbacks)
    if device is not None:
        device = _check_device(device)
    ctx = _distributed.init(device) if _distributed.resolve(distributed) else None
    if ctx is not None:
        device = ctx.device
    main = ctx is None or ctx.main
    if device is not None:
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
    batches = None if batches is None else _Batches(batches, device)
    plateau = isinstance(optim, PyroLRScheduler) and issubclass(
        optim.pt_scheduler_constructor, torch.optim.lr_scheduler.ReduceLROnPlateau
    )

    # Setup. Distributed, an error on one rank is exchanged at the next collective and raised on all of them.
    state, error = None, None
    try:
        if main and checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
            raise ValueError(f"checkpoint must be a path in an existing directory, got {os.fspath(checkpoint)!r}")
        if seed is not None:
            pyro.set_rng_seed(seed)
        if resume is not None and optim.optim_objs:  # PyroOptim hands saved state only to parameters it has not seen
            raise ValueError("optim has already stepped; resume needs a fresh optimizer (or optim=None)")
        if main and resume is not None:
            state = _load_checkpoint(resume)
    except Exception as e:
        if ctx is None:
            raise
        error = e
    if ctx is not None:
        ctx.agree(error, "before the first step")
        state = ctx.broadcast_object(state) if resume is not None else None

    history = {c: [] for c in _COLUMNS}
    start = 0 if state is None else state["step"]
    params, signature = [], None
    try:
        if batches is not None:
            batches.seek(start)
        if state is not None or ctx is not None:
            first_args, first_kwargs = (args, kwargs) if batches is None else batches.peek(kwargs)
            params = _create_params(model, guide, first_args, first_kwargs)
        if state is not None:
            history = state["history"]
            history.setdefault("beta", [1.0] * len(history["step"]))  # checkpoints written before annealing existed
            _load_params(state["params"], resume, params)
            optim.set_state(state["optim"])
        store = pyro.get_param_store()
        signature = [(store.param_name(p), tuple(p.shape), str(p.dtype)) for p in params]
    except Exception as e:
        if ctx is None:
            raise
        error = e
    sync = None
    if ctx is not None:
        signatures = ctx.agree(error, "creating the parameters", signature)
        if any(s != signatures[0] for s in signatures):
            raise ValueError(f"the ranks created different parameters (name, shape, dtype): {signatures}")
        ctx.broadcast_(params)
        sync = _distributed.GradientSync(ctx, params)
    _seed_stream(state, seed, ctx, start)

    stopper = make_rule(tol, window, patience, num_steps)
    converged = False
    if stopper is not None and state is not None:
        replay = zip(history["step"], history["elbo"], history["beta"])
        converged = any([stopper.update(s, e) for s, e, b in replay if b == 1.0])

    def save(step: int) -> None:
        rngs = None if ctx is None else ctx.gather_object(_get_rng_state())  # on every rank: a collective
        if main:
            _save_atomic(_checkpoint_state(step, optim, history, rngs), checkpoint)

    elapsed0 = history["elapsed"][-1] if history["elapsed"] else 0.0
    done, saved, in_step, agreed_interrupt = start, start, False, False
    pending = None  # distributed: an error to tell the other ranks at the next collective
    t0 = time.perf_counter()
    bar = tqdm(total=num_steps, initial=start, disable=None if progress and main else True, unit="step", desc="fit")
    try:
        with _DeferredInterrupt() as interrupt, bar:
            for step in range(start + 1, num_steps + 1 if not converged else 0):
                in_step = True
                beta = anneal_beta(step, anneal)
                model_t = model
                if tempered is not None:
                    tempered.beta = beta
                    model_t = tempered
                if sync is None:
                    step_args, step_kwargs = (args, kwargs) if batches is None else batches.next(kwargs)
                    loss_value, grad_norm = _svi_step(step, loss, optim, model_t, guide, step_args, step_kwargs)
                else:  # an interrupt on any rank is agreed in the step's all-reduce: all complete it, then stop
                    loss_value, grad_norm, agreed_interrupt = _distributed_step(
                        step, loss, optim, model_t, guide, args, kwargs, batches, sync, pending, interrupt.requested
                    )
                lr_used = _current_lr(optim)
                if plateau:
                    optim.step(loss_value)
                elif isinstance(optim, PyroLRScheduler):
                    optim.step()
                elbo = -loss_value
                row = (step, elbo, time.perf_counter() - t0 + elapsed0, lr_used, grad_norm, beta)
                for column, value in zip(_COLUMNS, row):
                    history[column].append(value)
                done, in_step = step, False
                converged = stopper is not None and beta == 1.0 and stopper.update(step, elbo)
                stop = False
                try:
                    for cb in callbacks:
                        stop = bool(cb(step, elbo, guide)) or stop
                except Exception as e:
                    if ctx is None:
                        raise
                    pending = e
                if ctx is not None and callbacks:  # a stop or error on any rank ends every rank at this step
                    failed, stop = ctx.any(pending is not None, stop)
                    if failed:
                        ctx.agree(pending, f"in a callback at step {step}")
                if checkpoint is not None and step % checkpoint_every == 0:
                    pending = _guarded(save, step, ctx, pending)
                    saved = step
                if not bar.disable and (step % log_every == 0 or step == num_steps):
                    bar.set_postfix(elbo=f"{np.mean(history['elbo'][-log_every:]):.6g}", refresh=False)
                    bar.update(step - bar.n)
                if (interrupt.requested and sync is None) or agreed_interrupt:
                    raise KeyboardInterrupt
                if stop or converged:  # converged is the same on every rank: the ELBO is the global one
                    break
    except KeyboardInterrupt:
        if checkpoint is not None and not in_step and saved != done and (ctx is None or agreed_interrupt):
            save(done)
        raise
    if checkpoint is not None and saved != done:
        pending = _guarded(save, done, ctx, pending)
    if ctx is not None:
        ctx.agree(pending, f"after step {done}")
    import pandas as pd

    frame = pd.DataFrame(history, columns=list(_COLUMNS))
    elapsed = history["elapsed"][-1] if history["elapsed"] else 0.0
    return FitResult(guide=guide, history=frame, converged=converged, num_steps=done, elapsed=elapsed)


def _guarded(save, step: int, ctx, pending):
    """Run ``save(step)``; distributed, keep its error for the next collective instead of leaving the others waiting."""
    try:
        save(step)
    except Exception as e:
        if ctx is None:
            raise
        return pending or e
    return pending


def _seed_stream(state, seed: int | None, ctx, start: int) -> None:
    """Set the random stream for the steps: the checkpoint's, or ``seed + rank``."""
    if ctx is None:
        if state is not None:
            _set_rng_state(state["rng"])
        return
    ranks = None if state is None else state.get("rng_ranks")
    if ranks is not None and len(ranks) == ctx.world_size:
        _set_rng_state(ranks[ctx.rank])
    elif seed is not None:
        pyro.set_rng_seed(seed + ctx.rank + ctx.world_size * start)  # start > 0: resumed on another number of ranks
    else:  # torch's default seed is the same in every process: the ranks would draw the same minibatches
        pyro.set_rng_seed(random.SystemRandom().randrange(2**31))


# ---- arguments ------------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def anneal_beta(step: int, anneal: int) -> float:
    """``β`` at 1-based ``step``: ``min(1, 0.01 + (step − 1)/anneal)`` (Rezende & Mohamed 2015, §6.1).

    Constant 1 when ``anneal = 0``.
    """
    return min(1.0, 0.01 + (step - 1) / anneal) if anneal else 1.0


class Tempered:
    """``model`` with every site's log-density scaled by ``beta`` (set before each step)."""

    def __init__(self, model: Callable):
        self.model, self.beta = model, 1.0

    def __call__(self, *args, **kwargs):
        with poutine.scale(scale=self.beta):
            return self.model(*args, **kwargs)


def _check_args(num_steps, lr, num_particles, tol, patience, window, lr_decay, checkpoint_every, log_every) -> None:
    for name, value in [
        ("num_steps", num_steps),
        ("num_particles", num_particles),
        ("patience", patience),
        ("window", window),
        ("checkpoint_every", checkpoint_every),
        ("log_every", log_every),
    ]:
        _check_positive_int(name, value)
    if not _is_real(lr) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if tol is not None and tol != "auto" and (not _is_real(tol) or not 0 < tol < math.inf):
        raise ValueError(f"tol must be 'auto', a positive finite number or None, got {tol!r}")
    if lr_decay is not None and lr_decay != "auto" and (not _is_real(lr_decay) or not 0 < lr_decay <= 1):
        raise ValueError(f"lr_decay must be 'auto', a number in (0, 1] or None, got {lr_decay!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _make_optim(optim, lr: float, lr_decay: float | str | None, num_steps: int) -> PyroOptim:
    if lr_decay == "auto":
        lr_decay = DEFAULT_LR_DECAY if optim is None else None
    if optim is None:
        if lr_decay is None:
            return pyro.optim.Adam({"lr": lr})
        gamma = lr_decay ** (1 / max(num_steps - 1, 1))
        return pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "gamma": gamma})
    if not isinstance(optim, PyroOptim):
        raise ValueError(f"optim must be a pyro.optim optimizer (PyroOptim) or None, got {type(optim).__name__}")
    if lr_decay is not None:
        raise ValueError(f"lr_decay applies to the default optimizer only; with optim given, got lr_decay={lr_decay!r}")
    return optim


def _check_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device or its name (e.g. 'cuda'), got {device!r}") from None


def _make_loss(loss, num_particles: int, estimator: str | None = None) -> ELBO:
    choices = ("elbo", "stl", "iwelbo")
    if estimator is not None and (not isinstance(estimator, str) or estimator not in choices):
        raise ValueError(f"estimator must be one of {list(choices)} or None (= 'elbo'), got {estimator!r}")
    if loss is None:
        from .objectives import IWELBO, STL_ELBO

        if estimator == "iwelbo":
            if num_particles < 2:
                raise ValueError(f"estimator='iwelbo' needs num_particles >= 2 (K of the bound), got {num_particles}")
            return IWELBO(num_particles=num_particles)
        elbo = STL_ELBO if estimator == "stl" else Trace_ELBO
        return elbo(num_particles=num_particles, vectorize_particles=num_particles > 1)
    if estimator is not None:
        raise ValueError(f"estimator={estimator!r} and loss= are exclusive: estimator picks the loss; pass one of them")
    if not isinstance(loss, ELBO):
        raise ValueError(f"loss must be a pyro.infer.ELBO instance or None, got {type(loss).__name__}")
    if num_particles != 1:
        raise ValueError(f"num_particles applies to the default loss only; with loss given, got {num_particles!r}")
    return loss


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# ---- one step -------------------------------------------------------------------------------------------------------


def _svi_step(step: int, loss: ELBO, optim: PyroOptim, model, guide, args, kwargs) -> tuple[float, float]:
    """``SVI.step`` with the gradients checked before the optimizer runs. Returns (loss, gradient norm)."""
    with poutine.trace(param_only=True) as capture:
        loss_value = torch_item(loss.loss_and_grads(model, guide, *args, **kwargs))
    return _apply_step(step, loss_value, _traced_params(capture), optim, model, guide, args, kwargs)


def _distributed_step(step, loss, optim, model, guide, args, kwargs, batches, sync, pending, interrupt):
    """One step whose gradients and loss are averaged across ranks, with the flags of every rank.

    Returns (global loss, gradient norm, whether any rank was interrupted). An
    interrupt is agreed in this step's all-reduce and the step is completed on
    every rank before they stop: discarding it instead would leave each rank's
    random stream past the draws of a step the checkpoint does not hold, and
    the resumed run would redo that step with other draws. Raises on every
    rank if one failed, now or (``pending``) after the step before. Times the
    step and its all-reduce for :class:`~vi_flows.distributed.SyncTiming`.
    """
    error, loss_value = pending, math.nan
    start = time.perf_counter()
    if error is None:
        try:
            if batches is not None:
                args, kwargs = batches.next(kwargs)
            with poutine.trace(param_only=True) as capture:
                loss_value = torch_item(loss.loss_and_grads(model, guide, *args, **kwargs))
            new = sync.unknown(_traced_params(capture))
            if new:
                names = [pyro.get_param_store().param_name(p) for p in new]
                raise ValueError(f"a distributed fit needs all parameters at step 1; step {step} created {names}")
        except Exception as e:
            error = e
    reduce_start = time.perf_counter()
    loss_value, failed, interrupt = sync(loss_value, error is not None, interrupt)
    reduce_end = time.perf_counter()
    if failed:
        zero_grads(sync.params)
        sync.ctx.agree(error, f"at step {step}")
    outcome = _apply_step(step, loss_value, sync.params, optim, model, guide, args, kwargs)
    sync.timing.add(reduce_end - reduce_start, time.perf_counter() - start)
    return (*outcome, interrupt)


def _traced_params(capture) -> list[torch.Tensor]:
    return list({site["value"].unconstrained(): None for site in capture.trace.nodes.values()})


def _apply_step(step: int, loss_value: float, params, optim: PyroOptim, model, guide, args, kwargs):
    grad_norm = _grad_norm([p.grad for p in params if p.grad is not None])
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        _guard(step, loss_value, params, model, guide, args, kwargs, _current_lr(optim))
    optim(params)
    zero_grads(params)
    return loss_value, grad_norm


def _minibatches(model: Callable, batches: Iterable | None, kwargs: dict) -> Iterable | None:
    """``batches``, or ``kwargs["data"]`` popped as its deprecated alias when it cannot be the model's argument.

    ``data=`` was fit's name for the minibatches, which hid the model's own ``data``
    (Pyro's tutorials' ``def model(data)``). It stays the model's whenever the
    model has a parameter of that name or the value is a tensor.
    """
    if "data" not in kwargs or isinstance(kwargs["data"], torch.Tensor) or _takes_keyword(model, "data"):
        return batches
    if batches is not None:
        raise ValueError("batches= and data= were both given; data= is the former name of batches=")
    warnings.warn("fit(data=...) for minibatches is deprecated: pass them as batches=...", FutureWarning, stacklevel=3)
    return kwargs.pop("data")


def _takes_keyword(model: Callable, name: str) -> bool:
    """Whether ``model`` (for a module: its ``forward``) has a parameter ``name`` that a keyword argument can fill."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or a C extension: no signature to read
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)


class _Batches:
    """The steps' arguments from an iterable of minibatches, cycled epoch after epoch.

    Calls ``sampler.set_epoch(epoch)`` before each epoch when ``data`` has
    one (``DistributedSampler`` reshuffles by it). Batches are drawn under
    ``torch.random.fork_rng``: loading leaves the global stream alone, so
    the batch of step ``k`` does not depend on the model's draws, and
    :meth:`seek` finds it again after a resume.
    """

    def __init__(self, data: Iterable, device: torch.device | None):
        self.data, self.device = data, device
        self.epoch, self._it, self._fresh, self._peeked = 0, None, False, None

    def seek(self, done: int) -> None:
        """Position after ``done`` steps."""
        skip = done
        if hasattr(self.data, "__len__") and len(self.data) > 0:
            self.epoch, skip = divmod(done, len(self.data))
        for _ in range(skip):
            self._raw()

    def peek(self, kwargs: dict) -> tuple[tuple, dict]:
        if self._peeked is None:
            self._peeked = self._raw()
        return self._as_args(self._peeked, kwargs)

    def next(self, kwargs: dict) -> tuple[tuple, dict]:
        batch = self._raw() if self._peeked is None else self._peeked
        self._peeked = None
        return self._as_args(batch, kwargs)

    def _raw(self):
        with torch.random.fork_rng(devices=[]):
            while True:
                if self._it is None:
                    sampler = getattr(self.data, "sampler", None)
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(self.epoch)
                    self._it, self._fresh = iter(self.data), True
                try:
                    batch = next(self._it)
                except StopIteration:
                    if self._fresh:
                        raise ValueError(f"batches must yield batches, got none in epoch {self.epoch}") from None
                    self._it, self.epoch = None, self.epoch + 1
                    continue
                self._fresh = False
                return batch

    def _as_args(self, batch, kwargs: dict) -> tuple[tuple, dict]:
        if self.device is not None:
            batch = _to_device(batch, self.device)
        if isinstance(batch, dict):
            return (), {**kwargs, **batch}
        if isinstance(batch, (tuple, list)):
            return tuple(batch), kwargs
        return (batch,), kwargs


def _current_lr(optim: PyroOptim) -> float:
    first = next(iter(optim.optim_objs.values()), None)
    if first is None:
        return math.nan
    return getattr(first, "optimizer", first).param_groups[0]["lr"]


def _grad_norm(grads: list[torch.Tensor]) -> float:
    """2-norm of all gradients, one host read; a third of ``get_total_norm``'s cost for a few small tensors."""
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def _guard(step: int, loss_value: float, params, model, guide, args, kwargs, lr: float = math.nan) -> None:
    """Raise FloatingPointError for a non-finite step; the optimizer has not run yet.

    After step 1 the parameters are the optimizer's work, so the message suggests a
    10x smaller ``lr`` (the usual cause, e.g. lr = 1e3); at step 1 they are the initial ones.
    """
    store = pyro.get_param_store()
    bad = [store.param_name(p) for p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    if math.isfinite(loss_value) and not bad:
        return  # finite gradients whose squared norm overflowed
    zero_grads(params)
    parts = []
    if not math.isfinite(loss_value):
        parts.append(f"non-finite loss ({loss_value}) at step {step}; {_bad_sites(model, guide, args, kwargs)}")
    if bad:
        parts.append(f"non-finite gradient at step {step} in parameters: {', '.join(bad)}")
    parts.append(f"the parameters keep their values from step {step - 1}")
    if step > 1:
        smaller = f" (lr={lr / 10:.3g})" if math.isfinite(lr) else ""
        parts.append(f"the optimizer's steps led here: try lowering lr by 10x{smaller}")
    raise FloatingPointError("; ".join(parts))


def _bad_sites(model, guide, args, kwargs) -> str:
    """Sites whose log_prob is non-finite in one fresh draw of guide and model (it may not reproduce the step)."""
    try:
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
            found = []
            for who, trace in (("guide", guide_trace), ("model", model_trace)):
                trace.compute_log_prob()
                for name, site in trace.nodes.items():
                    if site["type"] == "sample" and not torch.isfinite(site["log_prob"]).all():
                        found.append(f"{who} site {name!r}")
    except Exception as e:  # a diagnostic must not hide the error it explains
        return f"a diagnostic trace failed ({type(e).__name__}: {e})"
    if not found:
        return "a fresh trace of model and guide has finite log_prob at every site"
    return "non-finite log_prob in a fresh trace at " + ", ".join(found)


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag read between steps, so the fit stops where its state can be saved.

    Only in the main thread and over Python's default handler; the first
    signal restores that handler, so a second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- checkpoints ----------------------------------------------------------------------------------------------------


def _checkpoint_state(step: int, optim: PyroOptim, history: dict, rngs: list | None = None) -> dict:
    """The parameters saved are those the optimizer has stepped: the model's and guide's.

    Distributed, ``rng`` is rank 0's state and ``rng_ranks`` every rank's.
    """
    store = pyro.get_param_store()
    state = {
        "format": _FORMAT,
        "step": step,
        "params": {store.param_name(p): p.detach() for p in optim.optim_objs if store.param_name(p) is not None},
        "optim": optim.get_state(),
        "history": history,
        "rng": _get_rng_state() if rngs is None else rngs[0],
    }
    if rngs is not None:
        state["rng_ranks"] = rngs
    return state


def _save_atomic(obj, path) -> None:
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, not fit's, or made for another model or guide."""


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


def _create_params(model, guide, args, kwargs) -> list[torch.Tensor]:
    """Create the guide's (and model's) parameters with one blocked run; return them (unconstrained), sorted by name."""
    with poutine.block(), poutine.trace(param_only=True) as capture:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    store = pyro.get_param_store()
    return sorted(_traced_params(capture), key=store.param_name)


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
        raise CheckpointError(f"{where} this model and guide create parameters it lacks: {missing}")
    with torch.no_grad():
        for name, value in saved.items():
            current[name].copy_(value)


def _get_rng_state() -> dict:
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [key, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "random": [version, list(internal), gauss_next],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    key, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
