"""fit's arguments checked, and its default optimizer and loss built from them.

Every check raises ``ValueError`` naming the argument, before anything is run.
"""

from __future__ import annotations

import math
import numbers

import pyro
import pyro.optim
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.optim import PyroLRScheduler, PyroOptim

#: The default optimizer's lr falls to ``lr · DEFAULT_LR_DECAY`` by the last step (see ``fit(lr_decay=...)``):
#: Adam moves every parameter by about lr per step even where the gradient is pure noise; a tenth of it by the
#: end lets the fit settle, while the early steps keep the full lr.
DEFAULT_LR_DECAY = 0.1
ESTIMATORS = ("elbo", "stl", "iwelbo")
#: ``num_particles="auto"``: this many vectorized draws per step where the model vectorizes them, else 1
#: (:mod:`.particles`). Vectorized, 8 cost 1.0–1.5× one draw per step on the ten posteriordb posteriors and
#: halved the KL of AutoNSF and AutoPlanar on the energy U3 (docs/benchmarks.md, energies-defaults notes).
AUTO_PARTICLES = 8


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_args(num_steps, lr, num_particles, tol, patience, window, lr_decay, checkpoint_every, log_every) -> None:
    if num_particles != "auto" and (not isinstance(num_particles, numbers.Integral) or num_particles < 1):
        raise ValueError(f"num_particles must be a positive integer or 'auto', got {num_particles!r}")
    for name, value in [
        ("num_steps", num_steps),
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


def _make_optim(optim, lr: float, lr_decay: float | str | None, num_steps: int) -> PyroOptim:
    r"""``optim``, or Adam at ``lr`` decaying by ``γ = lr_decay^{1/(num_steps − 1)}`` per step.

    Adam rather than ClippedAdam: Adam's update is already bounded by about ``3·lr`` per
    element, and ClippedAdam's absolute clip (10) would turn it into sign descent on models
    whose typical gradients exceed 10 (many observations).
    """
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


def _make_loss(loss, num_particles: int | str, estimator: str | None = None) -> ELBO:
    """``loss``, or the estimator ``estimator`` names (:mod:`vi_flows.objectives`) with ``num_particles``.

    ``"elbo"`` (``None``, the default): Pyro's ``Trace_ELBO``. ``"stl"``:
    :class:`~vi_flows.objectives.STL_ELBO`, the same ELBO with the sticking-the-landing path
    gradient for AutoFlow guides (Roeder et al. 2017), of zero variance at the exact posterior
    but costlier per step; not the default because far from the optimum it raises the
    gradient's variance, and from a poor start on the energy U3 AutoNSF and AutoRealNVP
    diverged with it where the plain gradient converged (other guides get the plain gradient).
    ``"iwelbo"``: :class:`~vi_flows.objectives.IWELBO`, the importance-weighted bound
    ``log (1/K) Σ_k w_k`` with ``K = num_particles >= 2`` vectorized particles and DReG
    gradients (Tucker et al. 2019); ``history["elbo"]`` then estimates that bound, which lies
    between the ELBO and ``log p(x)``.
    """
    if estimator is not None and (not isinstance(estimator, str) or estimator not in ESTIMATORS):
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)} or None (= 'elbo'), got {estimator!r}")
    if loss is None:
        from ..objectives import IWELBO, STL_ELBO

        num_particles = AUTO_PARTICLES if num_particles == "auto" else num_particles
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
    if num_particles not in (1, "auto"):
        raise ValueError(f"num_particles applies to the default loss only; with loss given, got {num_particles!r}")
    return loss


def _current_lr(optim: PyroOptim) -> float:
    """The lr of the first parameter's optimizer (NaN before any parameter exists)."""
    first = next(iter(optim.optim_objs.values()), None)
    if first is None:
        return math.nan
    return getattr(first, "optimizer", first).param_groups[0]["lr"]


def _step_scheduler(optim: PyroOptim, loss_value: float) -> None:
    """Step a :class:`~pyro.optim.PyroLRScheduler` once per step; ``ReduceLROnPlateau`` gets the step's loss."""
    if not isinstance(optim, PyroLRScheduler):
        return
    if issubclass(optim.pt_scheduler_constructor, torch.optim.lr_scheduler.ReduceLROnPlateau):
        optim.step(loss_value)
    else:
        optim.step()
