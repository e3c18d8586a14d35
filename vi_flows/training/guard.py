"""The NaN guard: a step whose loss or gradient is not finite raises before the optimizer runs.

The message names the step, the parameters with a non-finite gradient and (for the
loss) the sites with a non-finite ``log_prob`` in one fresh trace, so the failure
points at its cause instead of at the NaN parameters it would otherwise leave behind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer.util import zero_grads


def _grad_norm(grads: list[torch.Tensor]) -> float:
    """2-norm of all gradients, ``‖g‖ = (Σ_i ‖g_i‖²)^½``, in one host read (a third of ``get_total_norm``'s cost)."""
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
    raise FloatingPointError("; ".join(parts + _advice(step, lr)))


@contextlib.contextmanager
def invalid_values(step: int, lr: float = math.nan) -> Iterator[None]:
    """A distribution's argument check failing on a NaN or inf raised as the guard's FloatingPointError.

    Parameters that the optimizer made huge but finite give a finite gradient, then a non-finite draw
    at the next step, which a distribution's ``validate_args`` refuses (ValueError, "found invalid
    values") before any loss exists: the same failure, named as the guard names it.
    """
    try:
        yield
    except ValueError as e:
        if "found invalid values" not in str(e):
            raise
        cause = f"non-finite value at step {step}: {str(e).splitlines()[0]}"
        raise FloatingPointError("; ".join([cause, *_advice(step, lr)])) from e


def _advice(step: int, lr: float) -> list[str]:
    """Where the parameters stand, and after step 1 (they are the optimizer's work) a 10x smaller lr."""
    parts = [f"the parameters keep their values from step {step - 1}"]
    if step > 1:
        smaller = f" (lr={lr / 10:.3g})" if math.isfinite(lr) else ""
        parts.append(f"the optimizer's steps led here: try lowering lr by 10x{smaller}")
    return parts


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
