"""A training loop around Pyro's SVI: progress, early stopping, NaN guard, exact checkpoints.

One step is Pyro's ``SVI.step`` written out (``loss_and_grads``, optimizer,
``zero_grads``), so the gradients can be checked before the optimizer touches
the parameters.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import PyroLRScheduler, PyroOptim
from tqdm.auto import tqdm

__all__ = ["fit", "FitResult"]

_FORMAT = "vi_flows.fit/1"
_COLUMNS = ("step", "elbo", "elapsed", "lr", "grad_norm")

Callback = Callable[[int, float, Any], "bool | None"]


@dataclass(repr=False)
class FitResult:
    """What :func:`fit` returns.

    ``history`` has one row per step: ``step`` (1-based), ``elbo`` (= −loss,
    one Monte-Carlo estimate), ``elapsed`` (seconds since the start of the
    fit, summed over resumed runs), ``lr`` (of the first parameter's
    optimizer) and ``grad_norm`` (2-norm of all unconstrained gradients,
    before any clipping).
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


class _Convergence:
    """Stan-ADVI-style stopping rule on means of the ELBO over windows of ``window`` steps.

    Converged once ``|m_k − m_{k−1}| / |m_{k−1}| < tol`` for ``patience``
    consecutive windows. Windows end at multiples of ``window`` (absolute
    step numbers), so replaying the history after a resume gives the same state.
    """

    def __init__(self, tol: float, window: int, patience: int):
        self.tol, self.window, self.patience = tol, window, patience
        self._sum, self._prev, self._calm = 0.0, None, 0

    def update(self, step: int, elbo: float) -> bool:
        self._sum += elbo
        if step % self.window:
            return False
        mean, self._sum = self._sum / self.window, 0.0
        prev, self._prev = self._prev, mean
        if prev is None:
            return False
        change = abs(mean - prev) / abs(prev) if prev else math.inf
        self._calm = self._calm + 1 if change < self.tol else 0
        return self._calm >= self.patience


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
    tol: float | None = 1e-3,
    patience: int = 3,
    window: int = 100,
    lr_decay: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    log_every: int = 10,
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
            equal trajectories.
        progress: tqdm bar with step, mean ELBO of the last ``log_every`` steps,
            steps/s; off when stderr is not a terminal.
        callbacks: each called after every step as ``cb(step, elbo, guide)``;
            one returning True stops the fit (``converged`` stays False).
        tol, patience, window: stop once the mean ELBO over a window of
            ``window`` steps changes by a relative ``< tol`` from the previous
            window, ``patience`` windows in a row (Stan's ADVI rule; its 0.01
            stops while the ELBO still climbs by nats on small models, 1e-3
            stops within ~0.1 nat of the plateau at lr 1e-2). ``tol=None``
            runs all ``num_steps``. An ELBO whose noise is large next to
            ``|ELBO|`` may never pass the test.
        lr_decay: exponential decay of the default optimizer's lr to
            ``lr · lr_decay`` at the last step (``γ = lr_decay^(1/(num_steps − 1))``
            per step, by :class:`pyro.optim.ExponentialLR`).
        checkpoint: path written atomically every ``checkpoint_every`` steps and
            at the end: parameters, optimizer state, step, history and RNG
            states, loadable with ``torch.load(path, weights_only=True)``.
        resume: a checkpoint to continue from; the run then reproduces the
            uninterrupted one exactly (same arguments assumed). The model and
            guide must be constructed as for the original run; the guide is
            called once to create its parameters, which are then overwritten.
        device: move tensors in ``args``/``kwargs`` (also inside tuples,
            lists, dicts) there first; autoguides create their parameters
            where the model's values live.
        log_every: steps between progress-bar refreshes.

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
    optim = _make_optim(optim, lr, lr_decay, num_steps)
    loss = _make_loss(loss, num_particles)
    if checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
        raise ValueError(f"checkpoint must be a path in an existing directory, got {os.fspath(checkpoint)!r}")
    callbacks = tuple(callbacks)
    if device is not None:
        device = _check_device(device)
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    plateau = isinstance(optim, PyroLRScheduler) and issubclass(
        optim.pt_scheduler_constructor, torch.optim.lr_scheduler.ReduceLROnPlateau
    )

    history = {c: [] for c in _COLUMNS}
    stopper = None if tol is None else _Convergence(tol, window, patience)
    converged = False
    start = 0
    if resume is not None:
        history, start = _resume(resume, model, guide, args, kwargs, optim)
        if stopper is not None:
            converged = any([stopper.update(s, e) for s, e in zip(history["step"], history["elbo"])])

    def save(step: int) -> None:
        _save_atomic(_checkpoint_state(step, optim, history), checkpoint)

    elapsed0 = history["elapsed"][-1] if history["elapsed"] else 0.0
    done, saved, in_step = start, start, False
    t0 = time.perf_counter()
    bar = tqdm(total=num_steps, initial=start, disable=None if progress else True, unit="step", desc="fit")
    try:
        with _DeferredInterrupt() as interrupt, bar:
            for step in range(start + 1, num_steps + 1 if not converged else 0):
                in_step = True
                loss_value, grad_norm = _svi_step(step, loss, optim, model, guide, args, kwargs)
                lr_used = _current_lr(optim)
                if plateau:
                    optim.step(loss_value)
                elif isinstance(optim, PyroLRScheduler):
                    optim.step()
                elbo = -loss_value
                row = (step, elbo, time.perf_counter() - t0 + elapsed0, lr_used, grad_norm)
                for column, value in zip(_COLUMNS, row):
                    history[column].append(value)
                done, in_step = step, False
                converged = stopper is not None and stopper.update(step, elbo)
                stop = False
                for cb in callbacks:
                    stop = bool(cb(step, elbo, guide)) or stop
                if checkpoint is not None and step % checkpoint_every == 0:
                    save(step)
                    saved = step
                if not bar.disable and (step % log_every == 0 or step == num_steps):
                    bar.set_postfix(elbo=f"{np.mean(history['elbo'][-log_every:]):.6g}", refresh=False)
                    bar.update(step - bar.n)
                if interrupt.requested:
                    raise KeyboardInterrupt
                if stop or converged:
                    break
    except KeyboardInterrupt:
        if checkpoint is not None and not in_step and saved != done:
            save(done)
        raise
    if checkpoint is not None and saved != done:
        save(done)
    frame = pd.DataFrame(history, columns=list(_COLUMNS))
    elapsed = history["elapsed"][-1] if history["elapsed"] else 0.0
    return FitResult(guide=guide, history=frame, converged=converged, num_steps=done, elapsed=elapsed)


# ---- arguments ------------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
    if tol is not None and (not _is_real(tol) or not 0 < tol < math.inf):
        raise ValueError(f"tol must be a positive finite number or None, got {tol!r}")
    if lr_decay is not None and (not _is_real(lr_decay) or not 0 < lr_decay <= 1):
        raise ValueError(f"lr_decay must be a number in (0, 1] or None, got {lr_decay!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _make_optim(optim, lr: float, lr_decay: float | None, num_steps: int) -> PyroOptim:
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


def _make_loss(loss, num_particles: int) -> ELBO:
    if loss is None:
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
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
    params = list({site["value"].unconstrained(): None for site in capture.trace.nodes.values()})
    grad_norm = _grad_norm([p.grad for p in params if p.grad is not None])
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        _guard(step, loss_value, params, model, guide, args, kwargs)
    optim(params)
    zero_grads(params)
    return loss_value, grad_norm


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


def _guard(step: int, loss_value: float, params, model, guide, args, kwargs) -> None:
    """Raise FloatingPointError for a non-finite step; the optimizer has not run yet."""
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


def _checkpoint_state(step: int, optim: PyroOptim, history: dict) -> dict:
    """The parameters saved are those the optimizer has stepped: the model's and guide's."""
    store = pyro.get_param_store()
    return {
        "format": _FORMAT,
        "step": step,
        "params": {store.param_name(p): p.detach() for p in optim.optim_objs if store.param_name(p) is not None},
        "optim": optim.get_state(),
        "history": history,
        "rng": _get_rng_state(),
    }


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


def _resume(path, model, guide, args, kwargs, optim: PyroOptim) -> tuple[dict, int]:
    """Load a checkpoint into the param store, optimizer and RNGs; return its history and step."""
    if optim.optim_objs:  # PyroOptim hands saved state only to parameters it has not seen yet
        raise ValueError("optim has already stepped; resume needs a fresh optimizer (or optim=None)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"resume must be a checkpoint written by fit, got {os.fspath(path)!r}")
    _load_params(model, guide, args, kwargs, state["params"])
    optim.set_state(state["optim"])
    _set_rng_state(state["rng"])  # last: everything above may draw random numbers
    return state["history"], state["step"]


def _load_params(model, guide, args, kwargs, saved: dict) -> None:
    """Create the guide's (and model's) parameters with one blocked run, then overwrite them in place."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    current = dict(pyro.get_param_store().named_parameters())
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise ValueError(f"resume: the checkpoint has parameters that this model and guide do not create: {unknown}")
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
