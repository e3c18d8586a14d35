"""Adaptive Dormand–Prince 5(4) with an adaptive-checkpoint backward (ACA, Zhuang et al. 2020).

``dopri5(f, y, t0, t1, params)`` solves ``dy/dt = f(t, y)`` from ``t0`` to ``t1``. With
``checkpoint=True`` the solve records no graph: it keeps the state at the start of every accepted
step, and the backward re-runs each step with autograd and back-propagates through it, last step
first. That is the exact gradient of the discrete solution (the one plain backprop through the same
steps gives) at the memory of one step's graph.

torchdiffeq reports accepted steps (``callback_accept_step``) but re-running one step needs its private
``_runge_kutta_step`` or a whole ``odeint`` call, many times the cost of the step's own evaluations, and
its step loop alone costs more than the evaluations of a small CNF (``docs/benchmarks.md``, speed).
Hence this small solver.

The step-size rule is torchdiffeq's; the error estimate uses Dormand and Prince's own embedded 4th-order
weights (torchdiffeq's are Shampine's): a few more evaluations for a slightly smaller error.

Shapes: ``y (n, k)`` (any shape works; the norm reduces over all of it), ``f(t, y)`` shaped like ``y``.

Reference: Zhuang et al., "Adaptive Checkpoint Adjoint Method for Gradient Estimation in Neural ODE",
ICML 2020; Hairer, Nørsett & Wanner, "Solving Ordinary Differential Equations I", II.4-II.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["dopri5", "rms_norm"]

Field = Callable[[Tensor, Tensor], Tensor]
Norm = Callable[[Tensor], Tensor]

# Dormand–Prince 5(4): nodes, stage weights, 5th-order weights (= the 7th stage's row: FSAL), and
# 5th minus embedded 4th-order weights (the error estimate, 7 stages).
C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
E = (
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)
SAFETY, GROW, SHRINK = 0.9, 10.0, 0.2


def rms_norm(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _combine(y: Tensor, dt: float, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``y + dt Σ wᵢ kᵢ`` (zero weights skipped), one ``add`` per term: at a CNF's batch of 8 a step's cost is
    its number of ops, in the solve and again in its backward."""
    out = y
    for w, k in zip(weights, ks):
        if w:
            out = torch.add(out, k, alpha=dt * w)
    return out


def step(f: Field, t: float, y: Tensor, k1: Tensor, dt: float) -> tuple[Tensor, list[Tensor]]:
    """One Dormand–Prince step from ``(t, y)`` with ``k1 = f(t, y)``: ``(y(t + dt), [k1 … k6])``."""
    ks = [k1]
    for c, row in zip(C, A):
        ks.append(f(t + c * dt, _combine(y, dt, row, ks)))
    return _combine(y, dt, B, ks), ks


def _error_ratio(f: Field, t: float, y: Tensor, y1: Tensor, ks: list[Tensor], dt: float, rtol, atol, norm) -> tuple:
    k7 = f(t + dt, y1)
    with torch.no_grad():  # step-size control only
        err = _combine(torch.zeros_like(y), dt, E, [*ks, k7])
        return norm(err / (atol + rtol * torch.maximum(y.abs(), y1.abs()))).item(), k7


def _solve(f: Field, y: Tensor, t0: float, t1: float, rtol, atol, norm, first_step, max_steps, steps) -> Tensor:
    """Adaptive steps from ``t0`` to exactly ``t1``; appends ``(t, dt, y)`` of each accepted step to ``steps``."""
    t, k1 = t0, f(t0, y)
    # The whole span first (as zuko): one step for a weak field (a CNF starts at f ≡ 0, where torchdiffeq's
    # Hairer start falls back to 1e-6), and about the same total count on strong ones (docs/benchmarks.md).
    sign = 1.0 if t1 > t0 else -1.0
    dt = sign * abs(t1 - t0 if first_step is None else first_step)
    for _ in range(max_steps):
        if sign * (t1 - t) <= 0:
            return y
        last = abs(dt) >= abs(t1 - t)
        if last:
            dt = t1 - t
        y1, ks = step(f, t, y, k1, dt)
        ratio, k7 = _error_ratio(f, t, y, y1, ks, dt, rtol, atol, norm)
        if not math.isfinite(ratio):
            if not (torch.isfinite(y).all() and torch.isfinite(k1).all()):
                raise RuntimeError(f"dopri5: non-finite state or field at t={t:.6g}")
            ratio = math.inf  # the trial step overflowed: reject it and shrink
        if ratio <= 1:
            if steps is not None:
                steps.append((t, dt, y))
            t, y, k1 = t1 if last else t + dt, y1, k7
        factor = GROW if ratio == 0 else min(GROW, max(SAFETY * ratio**-0.2, 1.0 if ratio <= 1 else SHRINK))
        # (inf ** -0.2 = 0, so an overflowed trial step shrinks by SHRINK)
        dt = dt * factor
        if t + dt == t:
            raise RuntimeError(f"dopri5: step size underflow at t={t:.6g}")
    raise RuntimeError(f"dopri5: more than max_steps={max_steps} steps")


class _Checkpointed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, t0, t1, rtol, atol, norm, first_step, max_steps, y, *params):
        steps = []
        out = _solve(f, y, t0, t1, rtol, atol, norm, first_step, max_steps, steps)
        ctx.f, ctx.times, ctx.num_params = f, [(t, dt) for t, dt, _ in steps], len(params)
        # saved, not kept on ctx: autograd checks them for in-place changes and frees them after backward
        ctx.save_for_backward(*params, *(state for _, _, state in steps))
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the re-run steps would not carry a second derivative
            raise RuntimeError(
                "gradient='checkpoint' gives first-order gradients only; use gradient='backprop' for "
                "higher-order derivatives (create_graph=True, hessians)"
            )
        saved = ctx.saved_tensors
        params, states = saved[: ctx.num_params], saved[ctx.num_params :]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[9:]) if need]
        totals = [None] * len(wanted)
        for (t, dt), y in zip(reversed(ctx.times), reversed(states)):
            with torch.enable_grad():
                y = y.detach().requires_grad_()
                y1, _ = step(ctx.f, t, y, ctx.f(t, y), dt)
                grads = torch.autograd.grad(y1, (y, *wanted), grad, allow_unused=True)
            grad = grads[0]
            totals = [a if b is None else (b if a is None else a + b) for a, b in zip(totals, grads[1:])]
        it = iter(totals)
        return (None,) * 8 + (grad, *(next(it) if need else None for need in ctx.needs_input_grad[9:]))


def dopri5(
    f: Field,
    y: Tensor,
    t0: float,
    t1: float,
    params: Sequence[Tensor] = (),
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    norm: Norm = rms_norm,
    first_step: float | None = None,
    max_steps: int = 10_000,
    checkpoint: bool = True,
) -> Tensor:
    """``y(t₁)`` of ``dy/dt = f(t, y)``, ``y(t₀) = y``, by adaptive Dormand–Prince steps.

    A step is accepted when ``norm(err / (atol + rtol max(|y|, |y_next|))) <= 1``. ``params``: every
    tensor ``f`` reads that needs a gradient (they become inputs of the backward). ``checkpoint=False``:
    autograd records the solve as it runs (plain backprop; same steps, same values).

    Defaults: ``rtol = atol = 1e-5``, those of :class:`~.continuous.ContinuousFlow` (FFJORD's);
    ``norm=rms_norm``, torchdiffeq's; ``first_step=None``, the whole span (zuko's start); ``max_steps``
    10 000, to stop a stiff or diverging field with an error rather than hang; ``checkpoint=True``, the
    memory of one step instead of the whole solve.
    """
    t0, t1 = float(t0), float(t1)
    if not y.numel():
        return y.clone()
    params = tuple({id(p): p for p in params}.values())  # a tensor listed twice would get its gradient twice
    recording = torch.is_grad_enabled() and (y.requires_grad or any(p.requires_grad for p in params))
    if checkpoint and recording:
        return _Checkpointed.apply(f, t0, t1, rtol, atol, norm, first_step, max_steps, y, *params)
    with torch.set_grad_enabled(recording):
        return _solve(f, y, t0, t1, rtol, atol, norm, first_step, max_steps, None)
