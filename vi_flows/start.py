"""Where a guide starts: a Gaussian ``N(μ₀, L₀L₀ᵀ)`` chosen from the model alone.

:func:`pathfinder` follows the L-BFGS path from the initial point towards the
mode of ``log p(x, z)`` (unconstrained ``z``), fits a Gaussian at points along
it (mean the point, covariance the inverse of the Hessian of ``−log p`` with
its eigenvalues made positive), estimates each one's ELBO with a few draws and
keeps the best (Zhang, Carpenter, Gelman, Vehtari, "Pathfinder: Parallel
quasi-Newton variational inference", JMLR 2022; here with exact Hessians,
which at ``d ≤`` :data:`MAX_DENSE_DIM` cost ``d`` gradient passes each).

- On a posterior with a mode and a positive-definite Hessian the best point
  is the mode (polished by Newton steps) and the Gaussian is the Laplace
  approximation: on a Gaussian posterior, the exact posterior.
- On a funnel (centred eight schools) the path runs into the neck, where the
  density grows without bound; the Gaussians there are too narrow for the
  funnel's mouth and their ELBO is poor, so an earlier point along the path is
  kept, and the start cannot blow up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["INITS", "MAX_DENSE_DIM", "Start", "laplace", "pathfinder"]

#: The guides' ``init=`` choices: search the start, Laplace only, or none (``init_loc_fn``, ``init_scale``).
INITS = ("auto", "laplace", None)

#: Largest latent dimension for a dense start: each Hessian costs ``d`` gradient passes and the
#: start's scale is a ``d × d`` factor. Above it the guide starts at ``init_loc_fn`` with ``init_scale``.
MAX_DENSE_DIM = 200
#: L-BFGS iterations along the path; each line search halves its step at most MAX_HALVINGS times.
PATH_STEPS = 200
MAX_HALVINGS = 40
#: Curvature pairs kept by L-BFGS (as Pathfinder and Stan's L-BFGS default).
HISTORY = 6
#: The path ends after 3 iterations in a row that lower ``−log p`` by less than this (relative): float32 rounding.
STALL = 1e-7
#: Gaussians scored along the path (evenly spaced, the last point always included).
NUM_CANDIDATES = 6
#: Draws per ELBO estimate: enough to rank Gaussians whose ELBOs differ by nats (Pathfinder uses 5); each costs
#: one run of the model.
NUM_DRAWS = 16
#: Nats: a paired ELBO comparison less precise than this cannot call a tie in favour of the Laplace start.
TIE_SE = 1.0
#: Eigenvalues of the Hessian below this fraction of the largest (in absolute value) are raised to it,
#: so that a flat or indefinite direction gets a broad, finite scale instead of an infinite one.
EIGEN_FLOOR = 1e-8

LogJoint = Callable[[Tensor], Tensor]


@dataclass
class Start:
    """``N(loc, scale_tril scale_trilᵀ)``, its estimated ELBO, and how it was found."""

    loc: Tensor
    scale_tril: Tensor
    elbo: float
    how: str


def laplace(log_joint: LogJoint, z0: Tensor, steps: int = PATH_STEPS) -> Start | None:
    """The Laplace approximation at the MAP: ``N(ẑ, H⁻¹)``; None when there is no mode with ``H`` positive definite."""
    polished = _polished_mode(log_joint, _lbfgs_path(log_joint, z0, steps)[-1])
    if polished is None:
        return None
    mode, tril = polished
    return Start(mode, tril.to(mode.dtype), math.nan, "laplace")


def pathfinder(log_joint: LogJoint, z0: Tensor, *, steps: int = PATH_STEPS, seed: int = 0) -> Start | None:
    """The best-ELBO Gaussian along the L-BFGS path from ``z0`` (see the module docstring); None if none is finite."""
    path = _lbfgs_path(log_joint, z0, steps)
    picks = sorted({round(i * (len(path) - 1) / max(NUM_CANDIDATES - 1, 1)) for i in range(NUM_CANDIDATES)})
    points = [path[i] for i in picks]
    polished = _polished_mode(log_joint, path[-1])
    last = len(points) - 1
    if polished is not None:
        points[-1] = polished[0]
    gen = torch.Generator(device=z0.device).manual_seed(seed)
    eps = torch.randn((NUM_DRAWS, z0.numel()), generator=gen, device=z0.device, dtype=torch.float64)
    scored = []
    for k, point in enumerate(points):
        # at the polished mode Newton has factored the Hessian already
        tril = polished[1] if k == last and polished is not None else _gaussian_at(log_joint, point)
        if tril is not None:
            scored.append((k, point, tril, _elbo_terms(log_joint, point, tril, eps)))
    scored = [s for s in scored if torch.isfinite(s[3]).all()]
    if not scored:
        return None
    best = max(scored, key=lambda s: s[3].mean().item())
    if polished is not None and scored[-1][0] == last and best is not scored[-1]:
        # A mode exists: keep its (Newton-polished) Laplace approximation when another point is no better
        # beyond noise (2 standard errors of the paired difference on common draws), provided the comparison
        # is precise at all (se < TIE_SE): a funnel's mode has a finite density but heavy-tailed ELBO terms.
        diff = best[3] - scored[-1][3]
        se = diff.std().item() / math.sqrt(len(diff))
        if diff.mean().item() < 2 * se and se < TIE_SE:
            best = scored[-1]
    k, point, tril, terms = best
    how = "laplace" if k == last and polished is not None else f"path point {picks[k]} of {len(path) - 1}"
    return Start(point, tril.to(point.dtype), terms.mean().item(), how)


def _polished_mode(log_joint: LogJoint, point: Tensor) -> tuple[Tensor, Tensor] | None:
    """The mode near ``point`` after Newton polish and the Cholesky factor (float64) of ``H⁻¹`` there.

    None where ``H`` is not positive definite (no mode: a saddle, a funnel's neck, a flat direction).
    """
    mode, chol, info = _newton(lambda z: -_try(log_joint, z), point)
    if info != 0 or not torch.isfinite(mode).all():
        return None
    tril, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol))
    return (mode, tril) if int(info) == 0 and torch.isfinite(tril).all() else None


def _lbfgs_path(log_joint: LogJoint, z0: Tensor, steps: int) -> list[Tensor]:
    """The iterates of L-BFGS on ``−log p`` from ``z0`` (included), with a backtracking line search.

    Written out rather than ``torch.optim.LBFGS``: its strong-Wolfe search stalls at the first trial point
    where the density underflows or the model rejects the point (an ARMA whose MA coefficient leaves
    (−1, 1) has a log density of −1e20 there); here such a step is simply halved.
    """
    z, (value, grad) = z0.detach().clone(), _value_and_grad(log_joint, z0)
    path = [z.clone()]
    if not math.isfinite(value):
        return path
    pairs: list[tuple[Tensor, Tensor]] = []
    stalls = 0
    for _ in range(steps):
        direction = -_two_loop(grad, pairs)
        slope = float(grad @ direction)
        if not slope < 0:  # not a descent direction: restart from the gradient
            pairs, direction = [], -grad
            slope = float(grad @ direction)
        t = 1.0 if pairs else min(1.0, 1.0 / max(float(grad.abs().sum()), 1e-12))
        for _ in range(MAX_HALVINGS):
            new_value, new_grad = _value_and_grad(log_joint, z + t * direction)
            if math.isfinite(new_value) and new_value <= value + 1e-4 * t * slope and torch.isfinite(new_grad).all():
                break
            t *= 0.5
        else:
            break  # no decrease along the direction: at a mode (to rounding) or stuck
        step, change = t * direction, new_grad - grad
        if float(step @ change) > 1e-10:
            pairs = (pairs + [(step, change)])[-HISTORY:]
        stalls = stalls + 1 if value - new_value <= STALL * max(1.0, abs(value)) else 0
        z, value, grad = z + step, new_value, new_grad
        path.append(z.clone())
        if float(grad.abs().max()) < 1e-6 or stalls >= 3:
            break
    return path


def _two_loop(grad: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``H grad`` for the L-BFGS inverse-Hessian estimate ``H`` of the pairs ``(s, y)`` (Nocedal & Wright, Alg. 7.4)."""
    q, alphas = grad.clone(), []
    for s, y in reversed(pairs):
        alpha = float(s @ q) / float(y @ s)
        q = q - alpha * y
        alphas.append(alpha)
    if pairs:
        s, y = pairs[-1]
        q = q * (float(s @ y) / float(y @ y))
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        beta = float(y @ q) / float(y @ s)
        q = q + (alpha - beta) * s
    return q


def _value_and_grad(log_joint: LogJoint, z: Tensor) -> tuple[float, Tensor]:
    """``(−log p(z), −∇ log p(z))``; ``(inf, nan)`` where the model rejects ``z`` or is not finite there."""
    z = z.detach().clone().requires_grad_()
    value = -_try(log_joint, z)
    if not torch.isfinite(value) or not value.requires_grad:
        return math.inf, torch.full_like(z, math.nan)
    (grad,) = torch.autograd.grad(value, z)
    return float(value.detach()), grad


def _try(log_joint: LogJoint, z: Tensor) -> Tensor:
    """``log_joint(z)``, or nan where the model rejects ``z`` (a distribution's argument validation, a failed solve)."""
    try:
        return log_joint(z)
    except (ValueError, RuntimeError):
        return torch.tensor(math.nan)


def _gaussian_at(log_joint: LogJoint, point: Tensor) -> Tensor | None:
    """Cholesky factor (float64) of ``H⁻¹`` at ``point``, or of ``|H|⁻¹`` (eigenvalues floored) where ``H`` is not
    positive definite; None where the Hessian is not finite."""
    hess = _hessian(lambda z: -_try(log_joint, z), point)
    if hess is None:
        return None
    hess = 0.5 * (hess + hess.T)
    chol, info = torch.linalg.cholesky_ex(hess)
    if int(info) == 0:  # a local mode: the Laplace covariance exactly, however ill-conditioned
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol))
        return chol if int(info) == 0 and torch.isfinite(chol).all() else None
    values, vectors = torch.linalg.eigh(hess)
    values = values.abs()
    values = values.clamp_min(max(values.max().item() * EIGEN_FLOOR, 1e-12))
    cov = (vectors / values) @ vectors.T
    chol, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
    return chol if int(info) == 0 and torch.isfinite(chol).all() else None


def _hessian(f: LogJoint, point: Tensor) -> Tensor | None:
    """The Hessian of ``f`` at ``point`` in float64 (evaluated in float64 where the model allows it).

    A float32 Hessian of a regression with a raw-scale intercept loses the small eigenvalues (condition
    numbers of 1e9 and more); the model's float32 data mixed with a float64 ``z`` promote to float64.
    """
    for dtype in (torch.float64, point.dtype):
        z = point.to(dtype)
        if not torch.isfinite(f(z)):  # e.g. a float32 matmul in the model refuses a float64 z
            continue
        try:
            hess = torch.autograd.functional.hessian(f, z, strict=True).double()
        except (RuntimeError, TypeError, ValueError):
            continue
        return hess if torch.isfinite(hess).all() else None
    return None


def _elbo_terms(log_joint: LogJoint, loc: Tensor, tril: Tensor, eps: Tensor) -> Tensor:
    """``log p(z_i) + H[q]`` at ``z_i = loc + tril eps_i``, float64: their mean is the ELBO of ``N(loc, LLᵀ)``."""
    d = loc.numel()
    entropy = tril.diagonal().log().sum().item() + 0.5 * d * (1.0 + math.log(2 * math.pi))
    with torch.no_grad():
        values = [_try(log_joint, (loc.double() + tril @ e).to(loc.dtype)).double() for e in eps]
    return torch.stack(values) + entropy


def _newton(neg_log_joint, mode: Tensor, steps: int = 3) -> tuple[Tensor, Tensor, int]:
    """Polish an L-BFGS mode by Newton steps ``z ← z − H⁻¹∇``, each kept only if it lowers the objective.

    L-BFGS in float32 stops far from the mode of an ill-conditioned posterior (4 posterior sds on a
    regression whose Hessian has condition number 1e9); on a Gaussian posterior one Newton step is
    exact. Stops once the predicted decrease ``∇ᵀH⁻¹∇ / 2`` is below 1e-8 nats. ``H`` is factored in
    float64. Returns the mode, the Cholesky factor of ``H`` there and its info (nonzero: not positive
    definite).
    """

    def factor(z: Tensor) -> tuple[Tensor, int]:
        hess = _hessian(neg_log_joint, z)
        if hess is None:
            return torch.full((z.numel(), z.numel()), math.nan, dtype=torch.float64), 1
        chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
        bad = int(info.item()) or not bool(torch.isfinite(chol).all())
        return chol, int(bad)

    value = neg_log_joint(mode).detach()
    chol, info = factor(mode)
    for _ in range(steps):
        if info != 0:
            break
        z = mode.clone().requires_grad_()
        value_z = neg_log_joint(z)
        if not (torch.isfinite(value_z) and value_z.requires_grad):
            break
        (grad,) = torch.autograd.grad(value_z, z)
        step = torch.cholesky_solve(grad.double().unsqueeze(-1), chol).squeeze(-1)
        if (grad.double() @ step).item() < 2e-8:
            break
        candidate = mode - step.to(mode.dtype)
        new_value = neg_log_joint(candidate).detach()
        if not (torch.isfinite(new_value) and new_value <= value):
            break
        mode, value = candidate, new_value
        chol, info = factor(mode)
    return mode, chol, info
