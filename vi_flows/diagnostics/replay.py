"""Replaying the model on ``S`` guide draws: vectorized when the model allows, one draw at a time when not.

The vectorized replay runs guide and model once inside ``pyro.plate("_num_samples", S)`` (as
:func:`pyro.infer.importance.vectorized_importance_weights` does) and sums each site's ``log_prob`` per
draw into ``log p(x, z_s)`` and ``log q(z_s)``, shape (S,). Users' models are often not vectorized
(``torch.mm``, ``nn.Linear``, ``x[idx] @ w``, a ``.sum()`` over everything): such a model raises, or
silently computes something else, which a spot check of two draws replayed alone catches. Either way the
diagnostics never fail on it: they fall back to a loop over the same guide draws from the same random
state, one model run per draw, like ``Predictive(parallel=False)``, with one warning saying so.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.util import check_site_shape
from torch import Tensor

from .named import Arrays, _deterministic, _Draws, _log_lik, _named, _observed, _sampled
from .plan import _check_guides, _check_num_samples, _describe, _full_data, _inspect, _Plain, _plan, _vectorize
from .sites import _guide_names, _is_factor, _is_subsample, _Roles, _roles


def _per_draw(log_prob: Tensor, num_samples: int, dim: int) -> Tensor:
    """Sum a site's log-density over everything but the particle dimension ``dim`` (< 0): shape (S,).

    A site without that dimension (or of size 1 there) is the same for every draw: its sum is repeated.
    """
    if log_prob.dim() < -dim or log_prob.shape[dim] == 1:
        return log_prob.sum().expand(num_samples)
    return log_prob.movedim(dim, 0).reshape(num_samples, -1).sum(-1)


def _batched_log_density(trace, names: list[str], num_samples: int, max_plate_nesting: int) -> np.ndarray:
    """Per-draw sum of the ``log_prob`` of the named sites of a vectorized trace: shape (S,), float64."""
    total = torch.zeros(num_samples, dtype=torch.float64)
    for name in names:
        site = trace.nodes[name]
        check_site_shape(site, max_plate_nesting + 1)
        total += _per_draw(site["log_prob"].double().cpu(), num_samples, -(max_plate_nesting + 1))
    return total.numpy()


def _draw_log_density(trace, names: list[str]) -> float:
    """Sum of the ``log_prob`` of the named sites of a one-draw trace, in float64."""
    return float(sum(trace.nodes[n]["log_prob"].double().sum().item() for n in names))


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """torch's CPU (and, once in use, CUDA) generator states: the loop restarts from where the vectorized try did."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    """Restore the generator states :func:`_rng_state` saved."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


# ---- vectorized: all draws in one replay under pyro.plate("_num_samples", S)

_SPOT_RTOL, _SPOT_ATOL = 1e-4, 1e-3  # a model that broadcasts wrongly is off by far more than float32 round-off


def _select_draw(value: Tensor, event_dim: int, s: int, max_plate_nesting: int, shape: torch.Size) -> Tensor:
    """Draw ``s`` of a vectorized site value, shaped as the value of a plain one-draw run (``shape``)."""
    axis = value.dim() - event_dim - (max_plate_nesting + 1)
    if axis >= 0:
        value = value.select(axis, s if value.shape[axis] > 1 else 0)
    return value.reshape(shape)


def _slice_draw(trace, plain_trace, s: int, max_plate_nesting: int, names=None) -> dict[str, Tensor]:
    """Draw ``s`` of a vectorized trace's unobserved sample sites (or the ``names`` ones), for replay."""
    out = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or (site["is_observed"] if names is None else name not in names):
            continue
        value = site["value"]
        if not _is_subsample(site):  # plates' index sites have no draw axis
            shape = plain_trace.nodes[name]["value"].shape
            value = _select_draw(value, site["fn"].event_dim, s, max_plate_nesting, shape)
        out[name] = value
    return out


def _unobserved_values(trace) -> dict[str, Tensor]:
    """The values of a one-draw trace's unobserved sample sites (plates' index sites included), for replay."""
    return {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


def _infer(trace) -> dict[str, dict]:
    """Each sample site's ``infer`` dict, which ``poutine.replay`` hands on to the model's site."""
    return {n: s["infer"] for n, s in trace.nodes.items() if s["type"] == "sample"}


def _replay_trace(values: dict[str, Tensor], infer: dict[str, dict]):
    """A trace holding only ``values`` as sampled sites: what ``poutine.replay`` reads."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", is_observed=False, value=value, infer=infer.get(name, {}))
    return trace


def _spot_check(model, args, kwargs, plain: _Plain, guide_trace, model_trace, draws: _Draws) -> None:
    """Replay draws 0 and S-1 alone and compare with the vectorized replay; raise where they differ.

    A model can broadcast the extra draw dimension without an error and still compute the wrong thing
    (``.sum()`` over everything, indexing the draw axis): its vectorized ``log p`` then disagrees with
    the model run on one draw, which is the model as written.
    """
    S, mpn, roles = draws.num_samples, draws.max_plate_nesting, draws.roles
    infer = _infer(guide_trace)
    model_only = roles.unguided + [n for n, s in model_trace.nodes.items() if _is_subsample(s)]
    for s in sorted({0, S - 1}):
        values = _slice_draw(guide_trace, plain.guide_trace, s, mpn)
        values.update(_slice_draw(model_trace, plain.model_trace, s, mpn, names=model_only))
        with torch.random.fork_rng(), poutine.block():
            trace = poutine.trace(poutine.replay(model, trace=_replay_trace(values, infer))).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        alone = _draw_log_density(trace, roles.weighted)
        if not math.isclose(alone, draws.log_p[s], rel_tol=_SPOT_RTOL, abs_tol=_SPOT_ATOL):
            raise ValueError(f"draw {s}: vectorized log p {draws.log_p[s]:.6g} but {alone:.6g} replayed alone")
        for name in roles.deterministic:
            batched, one = draws.posterior[name][0][s], trace.nodes[name]["value"].detach().double().cpu().numpy()
            if batched.size != one.size or not np.allclose(batched.ravel(), one.ravel(), _SPOT_RTOL, _SPOT_ATOL):
                raise ValueError(f"draw {s}: deterministic site {name!r} differs vectorized and replayed alone")


def _posterior_site(site: dict, roles: _Roles, mpn: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    """A latent or deterministic site of the vectorized trace as a named array, draws first."""
    if site["name"] in roles.deterministic:
        return _deterministic(site, site["value"], mpn, num_samples)
    return _sampled(site, mpn, num_samples)


@torch.no_grad()
def _draw_batched(model, guide, args, kwargs, num_samples: int, mpn: int, plain: _Plain, predictive: bool) -> _Draws:
    """All draws in one vectorized replay; raises where model or guide do not vectorize."""
    S = num_samples
    with poutine.block():
        guide_trace = poutine.trace(_vectorize(guide, S, mpn)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(_vectorize(model, S, mpn), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        predictive_trace = None
        if predictive:
            predictive_trace = poutine.trace(
                poutine.uncondition(poutine.replay(_vectorize(model, S, mpn), trace=guide_trace))
            ).get_trace(*args, **kwargs)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    roles = _roles(model_trace, _guide_names(guide_trace))
    nodes = model_trace.nodes
    draws = _Draws(
        log_p=_batched_log_density(model_trace, roles.weighted, S, mpn),
        log_q=_batched_log_density(guide_trace, _guide_names(guide_trace), S, mpn),
        roles=roles,
        max_plate_nesting=mpn,
        posterior={n: _posterior_site(nodes[n], roles, mpn, S) for n in roles.posterior},
        log_lik={n: _log_lik(nodes[n], mpn, S) for n in roles.observed},
        observed_data={n: _observed(nodes[n], mpn) for n in roles.observed if not _is_factor(nodes[n])},
    )
    if predictive_trace is not None:
        draws.predictive = {n: _sampled(predictive_trace.nodes[n], mpn, S) for n in roles.observed}
    _spot_check(model, args, kwargs, plain, guide_trace, model_trace, draws)
    return draws


# ---- one draw at a time (like Predictive(parallel=False)), with the same guide draws


def _guide_draws(guide, args, kwargs, num_samples: int, mpn: int, plain: _Plain):
    """Guide draws for the loop: (per-draw site values, each site's ``infer``, log q of shape (S,), looped).

    From one vectorized guide pass when the guide vectorizes (the same draws as the vectorized replay for
    the same seed; only the model is then run per draw), else from one guide run per draw.
    """
    state = _rng_state()
    try:
        with poutine.block():
            trace = poutine.trace(_vectorize(guide, num_samples, mpn)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        log_q = _batched_log_density(trace, _guide_names(trace), num_samples, mpn)
        values = [_slice_draw(trace, plain.guide_trace, s, mpn) for s in range(num_samples)]
    except Exception:
        _set_rng_state(state)
    else:
        return values, _infer(trace), log_q, False
    values, log_q = [], np.empty(num_samples)
    with poutine.block():
        for s in range(num_samples):
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            trace.compute_log_prob()
            log_q[s] = _draw_log_density(trace, _guide_names(trace))
            values.append(_unobserved_values(trace))
    return values, _infer(trace), log_q, True


def _batch_expanded(site: dict) -> Tensor:
    """A site's value broadcast to its distribution's batch shape (as :func:`_sampled` does)."""
    value, fn = site["value"], site["fn"]
    split = value.dim() - fn.event_dim
    return value.expand(torch.broadcast_shapes(value.shape[:split], fn.batch_shape) + value.shape[split:])


def _record(trace, roles: _Roles, predictive_trace) -> dict[str, Any]:
    """What the diagnostics keep of one draw's model trace."""
    nodes = trace.nodes
    keep = {n: nodes[n]["value"] if n in roles.deterministic else _batch_expanded(nodes[n]) for n in roles.posterior}
    record = {
        "log_p": _draw_log_density(trace, roles.weighted),
        "posterior": {n: v.detach().cpu() for n, v in keep.items()},
        "log_lik": {
            n: nodes[n]["unscaled_log_prob"].expand(nodes[n]["fn"].batch_shape).detach().cpu() for n in roles.observed
        },
    }
    if predictive_trace is not None:
        record["predictive"] = {n: _batch_expanded(predictive_trace.nodes[n]).detach().cpu() for n in roles.observed}
    return record


def _stack(values: list[Tensor], event_dim: int, max_plate_nesting: int) -> Tensor:
    """Per-draw values as one tensor shaped like the vectorized replay's: draws at batch dim -(mpn + 1)."""
    padded = []
    for v in values:
        pad = max_plate_nesting - (v.dim() - event_dim)
        padded.append(v.reshape((1,) * pad + v.shape) if pad > 0 else v)
    return torch.stack(padded)


def _stacked_arrays(records: list[dict], key: str, first, roles: _Roles, mpn: int) -> Arrays:
    """One group's named arrays from the per-draw records, as :func:`_draw_batched` names them."""
    S, out = len(records), {}
    names = roles.posterior if key == "posterior" else roles.observed
    for name in names:
        site, values = first.nodes[name], [r[key][name] for r in records]
        if name in roles.deterministic:
            same = all(torch.equal(v, values[0]) for v in values[1:])  # no draw axis in the vectorized replay
            out[name] = _deterministic(site, values[0] if same else torch.stack(values), mpn, S)
        else:
            event_dim = 0 if key == "log_lik" else site["fn"].event_dim
            out[name] = _named(site, _stack(values, event_dim, mpn), event_dim, mpn, S)
    return out


@torch.no_grad()
def _draw_looped(model, guide, args, kwargs, num_samples: int, mpn: int, plain: _Plain, predictive: bool) -> _Draws:
    """Guide draws first, then the model replayed on each draw alone: slower, but any model that runs works.

    A subsampling plate's indices are drawn once (at the first draw) and kept, as the vectorized replay does.
    """
    guide_values, infer, log_q, guide_looped = _guide_draws(guide, args, kwargs, num_samples, mpn, plain)
    records, fixed, roles, first = [], {}, None, None
    with poutine.block():
        for values in guide_values:
            replayed = _replay_trace({**values, **fixed}, infer)
            trace = poutine.trace(poutine.replay(model, trace=replayed)).get_trace(*args, **kwargs)
            trace.compute_log_prob()
            if roles is None:
                roles, first = _roles(trace, list(values)), trace
                fixed = {n: s["value"] for n, s in trace.nodes.items() if _is_subsample(s) and n not in values}
                for name in roles.weighted:
                    check_site_shape(trace.nodes[name], mpn)
            pred = None
            if predictive:
                unconditioned = poutine.uncondition(poutine.replay(model, trace=replayed))
                pred = poutine.trace(unconditioned).get_trace(*args, **kwargs)
            records.append(_record(trace, roles, pred))
    return _Draws(
        log_p=np.array([r["log_p"] for r in records]),
        log_q=log_q,
        roles=roles,
        max_plate_nesting=mpn,
        posterior=_stacked_arrays(records, "posterior", first, roles, mpn),
        log_lik=_stacked_arrays(records, "log_lik", first, roles, mpn),
        observed_data={n: _observed(first.nodes[n], mpn) for n in roles.observed if not _is_factor(first.nodes[n])},
        predictive=_stacked_arrays(records, "predictive", first, roles, mpn) if predictive else None,
        guide_looped=guide_looped,
    )


def vectorization_failure(model, guide, args, kwargs, num_samples: int = 2) -> str | None:
    """Why ``model`` and ``guide`` cannot run ``num_samples`` draws vectorized in one plate, or None if they can.

    The vectorized replay and its spot check of draws replayed alone (:func:`_spot_check`), under a forked RNG:
    the caller's random stream is untouched. ``fit`` asks this before vectorizing its particles.
    """
    with torch.random.fork_rng(), poutine.block():
        try:
            plain = _inspect(model, guide, args, kwargs, None)
            _draw_batched(model, guide, args, kwargs, num_samples, plain.max_plate_nesting, plain, False)
        except Exception as e:
            return _describe(e)
    return None


def _draw(model, guide, args, kwargs, num_samples: int, mpn: int, plain: _Plain, predictive: bool) -> _Draws:
    """Vectorized replay if the model allows it, else the loop from the same random state (the same draws)."""
    state = _rng_state()
    try:
        return _draw_batched(model, guide, args, kwargs, num_samples, mpn, plain, predictive)
    except Exception as e:
        reason = _describe(e)
    _set_rng_state(state)
    draws = _draw_looped(model, guide, args, kwargs, num_samples, mpn, plain, predictive)
    draws.fallback = reason
    return draws


def _run(
    model,
    guide,
    args,
    kwargs,
    num_samples: int,
    seed: int | None,
    max_plate_nesting: int | None,
    predictive: bool = False,
    many: bool = False,
) -> list[_Draws]:
    """Replay each guide (one, or with ``many`` a list of independent fits) ``num_samples`` times.

    On the full data where the model subsamples (see :func:`_plan`); one draw at a time where the model
    does not vectorize (see :func:`_draw`), with one warning saying so.
    """
    guides = _check_guides(guide, many)
    _check_num_samples(num_samples)
    plains, full = _plan(model, guides, args, kwargs, max_plate_nesting)
    mpn = max(p.max_plate_nesting for p in plains)
    out = []
    with torch.random.fork_rng(enabled=seed is not None), _full_data() if full else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        for g, plain in zip(guides, plains):
            out.append(_draw(model, g, args, kwargs, num_samples, mpn, plain, predictive))
    _warn_about(out, num_samples)
    return out


def _warn_about(out: list[_Draws], num_samples: int) -> None:
    """One warning for draws made one at a time, one for model latents the guide lacks; to the caller of the
    public function (``stacklevel=4``: it, :func:`_run`, this)."""
    looped = [d for d in out if d.fallback]
    if looped:
        who = "the guide" if any(d.guide_looped for d in looped) else "the model"
        same = "other draws than a vectorized replay" if who == "the guide" else "the same draws"
        warnings.warn(
            f"{who} does not vectorize over draws ({looped[0].fallback}); drawing the {num_samples} samples one at "
            f"a time instead (like Predictive(parallel=False)): {same}, but one model run each, so slower",
            stacklevel=4,
        )
    unguided = list(dict.fromkeys(n for d in out for n in d.roles.unguided))
    if unguided:
        warnings.warn(
            f"model latent sites {unguided} are not in the guide; they are drawn from their priors and left out "
            "of the weights and the per-site reports",
            stacklevel=4,
        )
