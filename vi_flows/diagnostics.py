"""Did the variational fit work? Importance-sampling diagnostics and ArviZ export.

Every diagnostic here starts from ``S`` draws ``z_s ~ q`` from the guide, the model replayed on them, and
the log importance weights

    log w_s = log p(x, z_s) - log q(z_s),

both in constrained space (an autoguide's ``Delta`` sites carry the Jacobian
of its bijection, so ``log q`` is the density of the constrained draws).
The replay is vectorized (guide and model inside ``pyro.plate("_num_samples", S)``) when the model
allows it; a model that does not (``torch.mm``, ``nn.Linear``, ``x[idx] @ w``) is replayed one draw at a
time on the same guide draws, like ``Predictive(parallel=False)``. A model that subsamples a plate is
evaluated on all of it. From the weights: the ELBO, the importance-weighted bound, the PSIS Pareto
``k̂`` of Yao et al. (2018) read against the sample-size-aware thresholds of Vehtari et al. (2024),
PSIS-corrected posterior moments and draws (offered only where k̂ says they are valid), an
:class:`arviz.InferenceData`, and PSIS-LOO for draws from ``q`` (Magnusson et al., 2019).

This is the only module of the package that imports ArviZ.

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational inference. ICML.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
    Magnusson, Andersen, Jonasson, Vehtari (2019). Bayesian leave-one-out cross-validation for large data. ICML.
    Kitagawa (1996). Monte Carlo filter and smoother for non-Gaussian nonlinear state space models. JCGS 5(1).
    Douc, Cappé, Moulines (2005). Comparison of resampling schemes for particle filtering. ISPA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_site_shape
from torch import Tensor

if TYPE_CHECKING:
    import arviz
    from matplotlib.figure import Figure

__all__ = [
    "KHAT_GOOD",
    "KHAT_OK",
    "MIN_DRAWS_FOR_KHAT",
    "RESAMPLING",
    "Diagnostics",
    "LooResult",
    "UnreliableWeightsError",
    "diagnose",
    "khat_threshold",
    "load_inference_data",
    "loo",
    "min_draws_for_khat",
    "plot_density_2d",
    "plot_weights",
    "psis_resample",
    "save_inference_data",
    "summary",
    "to_inference_data",
]

PARTICLE_PLATE = "_num_samples"

# ---------------------------------------------------------------------------------------------------------------------
# Pareto k̂ thresholds: the one place every reading, warning and count of this module takes them from

KHAT_GOOD = 0.5  # below: q is close to the posterior and plain importance sampling is reliable (Yao et al. 2018)
KHAT_OK = 0.7  # above: unreliable at any sample size; PSIS cannot repair the missing mass (Vehtari et al. 2024)


def khat_threshold(num_samples: int) -> float:
    """The k̂ above which PSIS from ``num_samples`` draws is unreliable: ``min(1 - 1/log10(S), 0.7)``.

    With fewer draws the Pareto tail is fitted to fewer points, so the estimate is trustworthy only for a
    lighter tail (Vehtari et al. 2024, §3.2.4, eq. 13; ArviZ's ``good_k``). It reaches 0.7 at
    :data:`MIN_DRAWS_FOR_KHAT` draws; 100 draws give 0.5, 1000 give 0.67.
    """
    return min(1.0 - 1.0 / math.log10(num_samples), KHAT_OK)


def min_draws_for_khat(khat: float = KHAT_OK) -> float:
    """The fewest draws for which a k̂ of ``khat`` is reliable: ``10^(1 / (1 - max(k̂, 0)))`` (Vehtari et al.
    2024, eq. 11), rounded up; infinite for ``k̂ >= 1``, where no number of draws suffices."""
    if khat >= 1:
        return math.inf
    return float(math.ceil(10 ** (1.0 / (1.0 - max(khat, 0.0)))))


MIN_DRAWS_FOR_KHAT = int(min_draws_for_khat(KHAT_OK))  # 2155: the draws at which khat_threshold reaches KHAT_OK

# ---------------------------------------------------------------------------------------------------------------------
# ArviZ

# ArviZ logs "Shape validation failed: input_shape: (1, S), minimum_shape: (chains=2, draws=4)" from R-hat,
# which needs two chains, for every variable of a one-chain InferenceData: every single-guide fit. Nothing is
# wrong with the data (one guide is one chain, and the summary's r_hat column shows NaN), so exactly that
# record is dropped; the draws=4 one (too few draws) and every other ArviZ message still show.
_ONE_CHAIN_RHAT = re.compile(
    r"Shape validation failed: input_shape: \(1, (\d+)\), minimum_shape: \(chains=2, draws=(\d+)\)"
)


class _OneChainRhatFilter(logging.Filter):
    """Drops ArviZ's R-hat shape message for one chain with enough draws (see ``_ONE_CHAIN_RHAT``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        m = _ONE_CHAIN_RHAT.match(record.getMessage())
        return not (m and int(m.group(1)) >= int(m.group(2)))


def _az():
    """Import ArviZ on first use (its import is slow and announces its 1.x refactor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    logger = getattr(arviz, "_log", None)  # ArviZ's own Logger instance; not in logging's registry
    if isinstance(logger, logging.Logger) and not any(isinstance(f, _OneChainRhatFilter) for f in logger.filters):
        logger.addFilter(_OneChainRhatFilter())
    return arviz


def _psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSIS along the last axis: (normalized smoothed log weights, k̂); draws are independent, so r_eff = 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k̂ above the threshold is reported by the caller, not warned about
        lw, k = _az().psislw(np.asarray(log_weights, dtype=np.float64), reff=1.0)
    return np.asarray(lw), np.asarray(k)


# ---------------------------------------------------------------------------------------------------------------------
# Replaying the model on guide draws: vectorized when the model allows, one draw at a time when it does not


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _check_num_samples(num_samples: int, minimum: int = 2) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(f"num_samples must be an integer >= {minimum}, got {num_samples!r}")
    return num_samples


def _describe(e: BaseException, limit: int = 160) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters, for one-line warnings."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def _is_subsample(site: dict) -> bool:
    """The index-drawing site a subsampling ``pyro.plate`` records (what ``prune_subsample_sites`` removes)."""
    return site["type"] == "sample" and type(site["fn"]).__name__ == "_Subsample"


def _sample_sites(trace) -> list[dict]:
    return [s for s in prune_subsample_sites(trace).nodes.values() if s["type"] == "sample"]


def _guide_names(trace) -> list[str]:
    """The guide's sample sites that make up ``log q`` (every sample site but plates' index sites)."""
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not _is_subsample(s)]


def _subsampled_plates(*traces) -> list[str]:
    """``"'name' (size of full_size)"`` for each plate that subsamples in any of ``traces``."""
    found = {}
    for trace in traces:
        for site in trace.nodes.values():
            for f in site.get("cond_indep_stack", ()):
                if f.full_size is not None and f.size != f.full_size:
                    found[f.name] = f"{f.name!r} ({f.size} of {f.full_size})"
    return list(found.values())


@contextlib.contextmanager
def _full_data() -> Iterator[None]:
    """Inside, every ``pyro.plate`` uses all its indices: ``subsample_size`` and ``subsample`` are ignored.

    A messenger cannot do this: ``pyro.plate`` keeps ``subsample_size`` in a local variable and raises when
    the indices a handler returns have another length. So ``SubsampleMessenger._subsample`` (the static
    method every plate calls on entry) is swapped for one that drops both arguments, and restored on exit.
    Like Pyro's handler stack, this is process-wide state while it is active.
    """
    original = SubsampleMessenger.__dict__["_subsample"]

    def full(name, size=None, subsample_size=None, subsample=None, use_cuda=None, device=None):
        if size is None:  # an unsized plate has nothing to subsample
            return original.__func__(name, size, subsample_size, subsample, use_cuda, device)
        return original.__func__(name, size, None, None, use_cuda, device)

    SubsampleMessenger._subsample = staticmethod(full)
    try:
        yield
    finally:
        SubsampleMessenger._subsample = original


@dataclass
class _Plain:
    """One plain (unvectorized) run of guide and model: the shapes of one draw and the plate depth."""

    guide_trace: Any
    model_trace: Any
    max_plate_nesting: int
    subsampled: list[str]


def _plate_depth(guide_trace, model_trace) -> int:
    """The deepest plate or batch rank among both traces' sample sites; rejects discrete latents."""
    depth = 0
    for trace, who in ((model_trace, "model"), (guide_trace, "guide")):
        for site in _sample_sites(trace):
            if not site["is_observed"] and site["fn"].support.is_discrete:
                raise ValueError(
                    f"{who} site {site['name']!r} is a discrete latent ({type(site['fn']).__name__}); "
                    "diagnostics need continuous latent sites only (enumerate or marginalize it out of the model)"
                )
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
            depth = max(depth, len(site["fn"].batch_shape), *dims)
    return depth


def _inspect(model, guide, args, kwargs, max_plate_nesting: int | None) -> _Plain:
    """One plain replay: initializes a fresh autoguide, rejects discrete latents, finds ``max_plate_nesting``
    (the given one, or the deepest plate / batch rank seen) and the plates that subsample.

    Runs under ``fork_rng`` so it leaves the random stream exactly as it found it.
    """
    with torch.random.fork_rng(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    depth = _plate_depth(guide_trace, model_trace)
    if max_plate_nesting is not None:
        if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
            raise ValueError(f"max_plate_nesting must be None or an integer >= 0, got {max_plate_nesting!r}")
        depth = max_plate_nesting
    return _Plain(guide_trace, model_trace, depth, _subsampled_plates(guide_trace, model_trace))


def _plan(model, guides: list, args, kwargs, max_plate_nesting: int | None) -> tuple[list[_Plain], bool]:
    """Plain runs of each guide, and whether the draws run on the full data.

    A model that subsamples a plate is evaluated on all of it (diagnostics of one random minibatch mislead:
    its likelihood is scaled by N/b, so the weights are far noisier than the full data's). Where the model
    cannot run on all indices (it indexes the data with its own minibatch), one minibatch it is, with a warning.
    """
    plains = [_inspect(model, g, args, kwargs, max_plate_nesting) for g in guides]
    plates = sorted({p for plain in plains for p in plain.subsampled})
    if not plates:
        return plains, False
    try:
        with _full_data():
            return [_inspect(model, g, args, kwargs, max_plate_nesting) for g in guides], True
    except Exception as e:
        warnings.warn(
            f"the model subsamples plate {', '.join(plates)} and cannot run on all its indices ({_describe(e)}); "
            "ELBO, k-hat and LOO are from one minibatch, not the data set: for full-data numbers index the data "
            "with the plate's own indices (`with pyro.plate(name, N, subsample_size=b) as idx: ... x[idx]`) "
            "or pass a model without subsampling",
            stacklevel=4,
        )
        return plains, False


def _vectorize(fn, num_samples: int, max_plate_nesting: int):
    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_samples, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return vectorized


def _per_draw(log_prob: Tensor, num_samples: int, dim: int) -> Tensor:
    """Sum a site's log-density over everything but the particle dimension ``dim`` (< 0): shape (S,)."""
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
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@dataclass
class _Roles:
    """What each model site is to the diagnostics, in model order."""

    latent: list[str]  # model latent sites the guide provides
    deterministic: list[str]
    observed: list[str]
    unguided: list[str]  # latent sites drawn from their priors by the replay: part of the proposal, not of w
    posterior: list[str]  # latent and deterministic, model order

    @property
    def weighted(self) -> list[str]:
        """The sites of ``log p(x, z)``."""
        return [n for n in self.posterior if n not in self.deterministic] + self.observed


def _roles(model_trace, guide_names: Sequence[str]) -> _Roles:
    """Sort a model trace's sample sites (plates' index sites aside) by what they are to the weights."""
    roles = _Roles([], [], [], [], [])
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or _is_subsample(site):
            continue
        if _is_deterministic(site):
            roles.deterministic.append(name)
        elif site["is_observed"]:
            roles.observed.append(name)
            continue
        elif name not in guide_names:
            roles.unguided.append(name)
            continue
        else:
            roles.latent.append(name)
        roles.posterior.append(name)
    return roles


Arrays = dict[str, tuple[np.ndarray, list[str]]]  # site -> (array with the draws first, its dim names)


@dataclass
class _Draws:
    """``S`` guide draws replayed through the model: per-draw log densities and each group's named arrays."""

    log_p: np.ndarray  # (S,) log p(x, z_s), float64
    log_q: np.ndarray  # (S,) log q(z_s)
    roles: _Roles
    max_plate_nesting: int
    posterior: Arrays  # latent and deterministic sites, model order
    log_lik: Arrays  # unscaled log p(y_i | z_s) per observed site
    observed_data: Arrays  # observed values (no draw axis)
    predictive: Arrays | None = None  # observed sites redrawn, with posterior_predictive
    fallback: str | None = None  # why the vectorized replay was not used, if it was not
    guide_looped: bool = False  # the guide, too, was run once per draw

    @property
    def num_samples(self) -> int:
        return len(self.log_p)

    @property
    def log_w(self) -> np.ndarray:
        return self.log_p - self.log_q

    @property
    def latent(self) -> list[str]:
        return self.roles.latent

    @property
    def deterministic(self) -> list[str]:
        return self.roles.deterministic

    @property
    def observed(self) -> list[str]:
        return self.roles.observed


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


def _check_guides(guide, many: bool) -> list:
    """The guide(s) as a list: one, or with ``many`` a list of independent fits (one chain each)."""
    if isinstance(guide, (list, tuple)) and not many:
        raise ValueError(
            f"guide must be a single Pyro guide here (lists of fits go to to_inference_data), got {guide!r}"
        )
    guides = list(guide) if isinstance(guide, (list, tuple)) else [guide]
    if not guides or not all(callable(g) for g in guides):
        raise ValueError(f"guide must be a callable Pyro guide or a non-empty list of them, got {guide!r}")
    return guides


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
    looped = [d for d in out if d.fallback]
    if looped:
        who = "the guide" if any(d.guide_looped for d in looped) else "the model"
        same = "other draws than a vectorized replay" if who == "the guide" else "the same draws"
        warnings.warn(
            f"{who} does not vectorize over draws ({looped[0].fallback}); drawing the {num_samples} samples one at "
            f"a time instead (like Predictive(parallel=False)): {same}, but one model run each, so slower",
            stacklevel=3,
        )
    unguided = list(dict.fromkeys(n for d in out for n in d.roles.unguided))
    if unguided:
        warnings.warn(
            f"model latent sites {unguided} are not in the guide; they are drawn from their priors and left out "
            "of the weights and the per-site reports",
            stacklevel=3,
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Site values as arrays with named dimensions


def _named(
    site: dict,
    value: Tensor,
    event_dim: int,
    max_plate_nesting: int,
    num_samples: int | None,
    batch_shape: torch.Size | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``value`` of ``site`` as an array with (when ``num_samples``) the particle axis first, and its dim names.

    ``value``'s batch part is first broadcast to ``batch_shape`` if given. Batch axes inside a plate are
    named after the plate; other batch axes of size 1 (broadcasting only) are dropped; remaining axes are
    named ``{site}_dim_{i}``.
    """
    name = site["name"]
    frames = site["cond_indep_stack"]
    plates = {f.dim: f.name for f in frames if f.vectorized and f.dim is not None and f.name != PARTICLE_PLATE}
    pdim = -(max_plate_nesting + 1)
    value = value.detach().cpu()
    if batch_shape is not None:
        shape = value.shape[: value.dim() - event_dim]
        target = torch.broadcast_shapes(shape, batch_shape)
        value = value.expand(target + value.shape[value.dim() - event_dim :])
    batch_ndim = value.dim() - event_dim
    dims, keep, k = [], [], 0
    particle_axis = None
    for axis in range(batch_ndim):
        rel = axis - batch_ndim
        if num_samples is not None and rel == pdim:
            particle_axis = axis
        elif rel in plates:
            dims.append(plates[rel])
            keep.append(axis)
        elif value.shape[axis] == 1:
            continue
        elif rel <= pdim:
            raise ValueError(
                f"site {name!r} has a batch dimension of size {value.shape[axis]} at dim {rel}, left of "
                f"max_plate_nesting={max_plate_nesting}; pass a larger max_plate_nesting"
            )
        else:
            dims.append(f"{name}_dim_{k}")
            keep.append(axis)
            k += 1
    for axis in range(batch_ndim, value.dim()):
        dims.append(f"{name}_dim_{k}")
        keep.append(axis)
        k += 1
    if particle_axis is None and num_samples is not None:
        raise ValueError(f"site {name!r} has no particle dimension at dim {pdim}; is max_plate_nesting too small?")
    if particle_axis is not None:
        value = value.movedim(particle_axis, 0)
        shape = [num_samples] + [value.shape[a + (a < particle_axis)] for a in keep]
    else:
        shape = [value.shape[a] for a in keep]
    return value.reshape(shape).double().numpy() if value.is_floating_point() else value.reshape(shape).numpy(), dims


def _sampled(site: dict, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    fn = site["fn"]
    return _named(site, site["value"], fn.event_dim, max_plate_nesting, num_samples, fn.batch_shape)


def _deterministic(site: dict, value: Tensor, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    # pyro.deterministic declares every dim an event dim, so find the particle axis from the value itself:
    # the leftmost non-singleton axis, if it has size S; axes right of it are batch (plates) then event.
    mpn = max_plate_nesting
    wide = [a for a in range(value.dim()) if value.shape[a] != 1]
    if wide and value.shape[wide[0]] == num_samples:
        a = wide[0]
        right = value.dim() - 1 - a
        if right < mpn:  # trailing singleton batch dims were squeezed away
            value = value.reshape(value.shape[: a + 1] + (1,) * (mpn - right) + value.shape[a + 1 :])
        event_dim = max(right - mpn, 0)
    else:  # the same for every draw
        event_dim = value.dim()
        value = value.reshape((1,) * (mpn + 1) + value.shape).expand((num_samples,) + (1,) * mpn + value.shape)
    return _named(site, value, event_dim, mpn, num_samples)


def _log_lik(site: dict, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    """An observed site's unscaled pointwise ``log p(y_i | z_s)``, draws first."""
    lp = site["unscaled_log_prob"].expand(site["fn"].batch_shape)
    return _named(site, lp, 0, max_plate_nesting, num_samples, site["fn"].batch_shape)


def _is_factor(site: dict) -> bool:
    """A ``pyro.factor`` site: it adds to ``log p`` but holds no data (its value is an empty placeholder)."""
    return bool(site["infer"].get("is_auxiliary")) and site["value"].numel() == 0


def _observed(site: dict, max_plate_nesting: int) -> tuple[np.ndarray, list[str]]:
    return _named(site, site["value"], site["fn"].event_dim, max_plate_nesting, None)


def _latent_arrays(draws: _Draws, include_deterministic: bool = True) -> Arrays:
    return {n: v for n, v in draws.posterior.items() if include_deterministic or n not in draws.deterministic}


# ---------------------------------------------------------------------------------------------------------------------
# diagnose


def _reading(khat: float, num_samples: int) -> str:
    """``"good"`` below :data:`KHAT_GOOD`, ``"bad"`` above ``khat_threshold(num_samples)``, else ``"ok"``."""
    if not math.isfinite(khat):
        return "undefined"
    if khat > khat_threshold(num_samples):
        return "bad"
    return "good" if khat < KHAT_GOOD else "ok"


def _reading_text(reading: str, num_samples: int) -> str:
    """What a reading means, with the thresholds that apply at ``num_samples`` draws."""
    bad = khat_threshold(num_samples)
    at = "" if bad >= KHAT_OK else f" (the threshold for {num_samples} draws; {KHAT_OK} needs {MIN_DRAWS_FOR_KHAT})"
    return {
        "good": f"k < {KHAT_GOOD}: the guide is close to the posterior; importance-sampling estimates are reliable",
        "ok": f"{KHAT_GOOD} <= k <= {bad:.3g}: usable, but use the PSIS-corrected estimates{at}",
        "bad": f"k > {bad:.3g}: unreliable; the guide misses posterior mass and importance sampling cannot repair "
        f"it{at}",
        "undefined": "too few tail draws to fit the Pareto tail; increase num_samples",
    }[reading]


def _khat_scale(num_samples: int) -> str:
    """The k̂ scale that applies at ``num_samples`` draws, in words: ``"< 0.5 good, 0.5-0.7 ok, > 0.7 unreliable
    at 4000 draws"``, from :data:`KHAT_GOOD` and :func:`khat_threshold` (so the text cannot drift from the
    readings). Below :data:`MIN_DRAWS_FOR_KHAT` draws the upper end is lower, and under 100 draws the ok band
    is empty."""
    bad = khat_threshold(num_samples)
    good = min(KHAT_GOOD, bad)
    ok = f", {good:.3g}-{bad:.3g} ok" if bad > good else ""
    more = "" if bad >= KHAT_OK else f"; {KHAT_OK} needs {MIN_DRAWS_FOR_KHAT} draws"
    return f"< {good:.3g} good{ok}, > {bad:.3g} unreliable at {num_samples} draws{more}"


# ---- PSIS-corrected draws: only where k̂ says the weights can correct q

#: How corrected draws are made; recorded in the ``vi_flows_resampling`` attribute of their posterior group.
RESAMPLING = "stratified resampling with replacement (Kitagawa 1996) with PSIS-smoothed weights (Vehtari et al. 2024)"


class UnreliableWeightsError(ValueError):
    """PSIS-corrected draws were asked for where k̂ says the importance weights cannot correct the guide.

    A ``ValueError``, so one ``except ValueError`` still catches every refusal of this module.
    """


def _corrected_valid(khat: float, num_samples: int) -> bool:
    """Whether PSIS-corrected estimates are valid: k̂ defined and reading good or ok (not above
    ``khat_threshold(num_samples)``); the same rule as :func:`_reading`, so verdict and refusal agree."""
    return _reading(khat, num_samples) in ("good", "ok")


def _refusal(khat: float, num_samples: int, what: str) -> str:
    """The one line refusing PSIS-corrected ``what`` when k̂ says they are not valid, and what would help."""
    if not math.isfinite(khat):
        return f"no PSIS-corrected {what}: k-hat is undefined (too few distinct large weights to fit the Pareto tail)"
    bad = khat_threshold(num_samples)
    head = f"no PSIS-corrected {what}: k-hat {khat:.3g} > {bad:.3g}, unreliable at {num_samples} draws"
    if khat <= KHAT_OK:  # only the sample size is short
        return f"{head}; k-hat {khat:.3g} is reliable from {min_draws_for_khat(khat):.0f} draws on"
    return f"{head}: the guide misses posterior mass that reweighting cannot restore; refit a wider or richer guide"


def _stratified(log_weights: np.ndarray, num_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of ``num_draws`` draws resampled with replacement in proportion to ``exp(log_weights)``.

    Stratified resampling (Kitagawa 1996; the default of the ``posterior`` R package's ``resample_draws``):
    one uniform in each of ``num_draws`` equal strata of [0, 1), mapped through the weights' cumulative sum.
    Draw ``s`` is repeated ``num_draws · w_s`` times in expectation (unbiased, as multinomial resampling is)
    with a smaller resampling variance than multinomial (Douc, Cappé, Moulines 2005). With replacement,
    because without it draws whose weight exceeds ``1 / num_draws`` are capped at one copy, which biases
    the draws toward the guide exactly where it is most wrong.
    """
    w = np.exp(log_weights - np.max(log_weights))
    cdf = np.cumsum(w)
    u = (np.arange(num_draws) + rng.random(num_draws)) / num_draws
    return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), len(w) - 1)


def _weighted_moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over axis 0 of ``x`` (S, ...) under normalized weights ``w`` (S,)."""
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    mean = (w * x).sum(0)
    return mean, np.sqrt(np.maximum((w * (x - mean) ** 2).sum(0), 0.0))


@dataclass
class Diagnostics:
    r"""Importance-sampling diagnostics of a guide ``q`` for a model ``p`` from ``S`` draws ``z_s ~ q``.

    With ``log w_s = log p(x, z_s) - log q(z_s)``:

    - ``elbo = mean_s log w_s`` (``elbo_se`` its Monte-Carlo standard error ``sd(log w) / √S``);
    - ``iwae = logsumexp_s log w_s - log S``, the importance-weighted bound with ``K = S``; a lower bound
      on ``log p(x)`` that tightens to it as ``S`` grows, and ``iwae >= elbo``;
    - ``khat``: Pareto shape of the upper tail of ``w`` (PSIS): < 0.5 good, 0.5–0.7 usable with PSIS
      correction, > 0.7 unreliable (Yao et al., 2018); with fewer than :data:`MIN_DRAWS_FOR_KHAT` draws the
      upper threshold is the lower ``khat_threshold(S)`` (Vehtari et al., 2024);
    - ``ess = (Σ w̃)² / Σ w̃²`` of the PSIS-smoothed weights ``w̃``, ``ess_frac = ess / S``;
    - per latent site element, the guide's mean and sd next to the PSIS-weighted ones (constrained space),
      the latter withheld (NaN) where ``corrected_valid`` is False;
    - :meth:`corrected_draws`: the guide's draws resampled with the smoothed weights, refused where
      ``corrected_valid`` is False.

    ``log_p``, ``log_q``, ``log_w`` (shape (S,)) and ``log_w_smoothed`` (normalized) are kept for plotting;
    ``draws`` (site -> (S, ...) constrained latent draws) for :meth:`corrected_draws`. ``sites`` holds the
    weighted moments whatever k̂ says; :meth:`to_dataframe` and the report show them only where valid.
    """

    elbo: float
    elbo_se: float
    iwae: float
    khat: float
    ess: float
    num_samples: int
    log_p: np.ndarray = field(repr=False)
    log_q: np.ndarray = field(repr=False)
    log_w: np.ndarray = field(repr=False)
    log_w_smoothed: np.ndarray = field(repr=False)
    sites: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    draws: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def ess_frac(self) -> float:
        return self.ess / self.num_samples

    @property
    def reading(self) -> str:
        """``"good"`` (k̂ < 0.5), ``"ok"`` (0.5 to ``khat_threshold``), ``"bad"`` (above it) or ``"undefined"``."""
        return _reading(self.khat, self.num_samples)

    @property
    def khat_threshold(self) -> float:
        """The k̂ above which these ``num_samples`` draws are unreliable: 0.7 from 2155 draws on, less below."""
        return khat_threshold(self.num_samples)

    @property
    def corrected_valid(self) -> bool:
        """Whether PSIS-corrected moments and draws are valid: k̂ at most ``khat_threshold(num_samples)``
        (reading good or ok). Above it the weights cannot repair ``q`` and nothing corrected is offered."""
        return _corrected_valid(self.khat, self.num_samples)

    def corrected_draws(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """The guide's latent draws resampled with the PSIS-smoothed weights: draws of the posterior, not of ``q``.

        ``num_samples`` draws per site (constrained space, draws first, ascending guide-draw order so repeats
        sit together), by stratified resampling with replacement (see :data:`RESAMPLING`); ``seed`` seeds the
        resampling only. They carry about ``ess`` draws' worth of information, not ``num_samples``. Raises
        :class:`UnreliableWeightsError` (one line) where ``corrected_valid`` is False: those would be the
        guide's errors presented as the posterior. Deterministic sites and the other ArviZ groups:
        ``to_inference_data(..., corrected=True)``.
        """
        if not self.corrected_valid:
            raise UnreliableWeightsError(_refusal(self.khat, self.num_samples, "draws"))
        if not self.draws:
            raise ValueError("this Diagnostics holds no draws to resample (it was not made by diagnose)")
        index = _stratified(self.log_w_smoothed, self.num_samples, np.random.default_rng(seed))
        return {name: x[index] for name, x in self.draws.items()}

    def summary(self) -> dict[str, Any]:
        return {
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "iwae": self.iwae,
            "khat": self.khat,
            "ess": self.ess,
            "ess_frac": self.ess_frac,
            "num_samples": self.num_samples,
            "reading": self.reading,
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per latent site element: site, index (tuple), guide_mean, guide_sd, psis_mean, psis_sd.

        ``psis_mean`` and ``psis_sd`` are NaN where ``corrected_valid`` is False: a corrected column that
        k̂ says is not corrected would be read as the posterior's.
        """
        rows, valid = [], self.corrected_valid
        for name, st in self.sites.items():
            for idx in np.ndindex(st["guide_mean"].shape):
                rows.append(
                    {
                        "site": name,
                        "index": idx,
                        "guide_mean": float(st["guide_mean"][idx]),
                        "guide_sd": float(st["guide_sd"][idx]),
                        "psis_mean": float(st["psis_mean"][idx]) if valid else math.nan,
                        "psis_sd": float(st["psis_sd"][idx]) if valid else math.nan,
                    }
                )
        return pd.DataFrame(rows, columns=["site", "index", "guide_mean", "guide_sd", "psis_mean", "psis_sd"])

    def __str__(self) -> str:
        lines = [
            f"Variational fit diagnostics ({self.num_samples} draws from the guide)",
            f"  ELBO         {self.elbo:12.4f} ± {self.elbo_se:.4f} (Monte-Carlo s.e.)",
            f"  IWAE bound   {self.iwae:12.4f}   (log-evidence estimate, K = {self.num_samples})",
            f"  Pareto k-hat {self.khat:12.3f}   {self.reading}: {_reading_text(self.reading, self.num_samples)}",
            f"  IS ESS       {self.ess:12.1f}   ({100 * self.ess_frac:.1f}% of draws, PSIS-smoothed weights)",
        ]
        df = self.to_dataframe()
        if len(df):
            max_rows = 20
            withheld = "" if self.corrected_valid else f" (withheld as NaN: k-hat reads {self.reading})"
            lines.append(f"Posterior mean / sd per site (constrained space): guide vs PSIS-corrected{withheld}")
            table = df.head(max_rows).to_string(index=False, float_format=lambda v: f"{v:.4g}")
            lines += ["  " + line for line in table.splitlines()]
            if len(df) > max_rows:
                lines.append(f"  ... {len(df) - max_rows} more rows (see .to_dataframe())")
        return "\n".join(lines)


def _diagnostics(draws: _Draws) -> Diagnostics:
    S = draws.num_samples
    log_w = draws.log_w
    lw, khat = _psislw(log_w)
    w = np.exp(lw)
    latent = {name: x for name, (x, _) in _latent_arrays(draws, include_deterministic=False).items()}
    sites = {}
    for name, x in latent.items():
        pm, ps = _weighted_moments(x, w)
        sites[name] = {"guide_mean": x.mean(0), "guide_sd": x.std(0), "psis_mean": pm, "psis_sd": ps}
    return Diagnostics(
        elbo=float(log_w.mean()),
        elbo_se=float(log_w.std(ddof=1) / math.sqrt(S)),
        iwae=float(_logsumexp(log_w) - math.log(S)),
        khat=float(khat),
        ess=float(1.0 / np.sum(w**2)),  # w normalized: (Σw)² / Σw² = 1 / Σw²
        num_samples=S,
        log_p=draws.log_p,
        log_q=draws.log_q,
        log_w=log_w,
        log_w_smoothed=lw,
        sites=sites,
        draws=latent,
    )


def diagnose(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 4000,
    seed: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> Diagnostics:
    """How good is ``guide`` as a posterior approximation for ``model(*args, **kwargs)``?

    Draws ``num_samples`` particles from the guide in one vectorized replay (a ``pyro.plate`` at
    ``dim = -(max_plate_nesting + 1)`` around guide and model, as in
    :func:`pyro.infer.importance.vectorized_importance_weights`, which gives the same ``log_w`` for the same
    seed) and returns a :class:`Diagnostics`. A model that does not vectorize is replayed one draw at a time
    on the same guide draws (one warning); a model that subsamples a plate is evaluated on the full data.
    Fewer than :data:`MIN_DRAWS_FOR_KHAT` draws warn that k̂ is not yet reliable. ``max_plate_nesting``
    defaults to the deepest plate or batch rank seen in one plain run. ``seed`` seeds torch's generator for
    the draws without disturbing the global stream; ``None`` uses (and advances) the global stream.
    Discrete latent sites raise ``ValueError``. Where k̂ allows (``corrected_valid``), the result also
    holds PSIS-corrected moments and gives corrected draws (:meth:`Diagnostics.corrected_draws`).
    """
    (draws,) = _run(model, guide, args, kwargs, num_samples, seed, max_plate_nesting)
    if num_samples < MIN_DRAWS_FOR_KHAT:
        warnings.warn(
            f"k-hat from {num_samples} draws is not reliable: at this sample size it reads unreliable above "
            f"{khat_threshold(num_samples):.3g}, not {KHAT_OK}, and the estimate itself is noisy; use "
            f"num_samples >= {MIN_DRAWS_FOR_KHAT} (Vehtari et al. 2024)",
            stacklevel=2,
        )
    return _diagnostics(draws)


# ---------------------------------------------------------------------------------------------------------------------
# ArviZ export


def _group(per_chain: list[dict[str, tuple[np.ndarray, list[str]]]], library, chains: bool = True):
    """Stack per-chain named arrays along a leading chain axis and build one xarray Dataset."""
    az = _az()
    data, dims = {}, {}
    for name, (_, d) in per_chain[0].items():
        arrays = [c[name][0] for c in per_chain]
        data[name] = np.stack(arrays) if chains else arrays[0]
        dims[name] = d
    return az.dict_to_dataset(data, library=library, dims=dims, default_dims=None if chains else [])


def to_inference_data(
    model: Callable,
    guide: Callable | Sequence[Callable],
    *args,
    num_samples: int = 1000,
    seed: int | None = None,
    posterior_predictive: bool = False,
    max_plate_nesting: int | None = None,
    corrected: bool = False,
    **kwargs,
) -> arviz.InferenceData:
    """Draws from ``guide`` (or one chain per guide of a list of independent fits) as ArviZ InferenceData.

    Groups (``chain`` = number of guides, ``draw`` = ``num_samples``):

    - ``posterior``: every latent and deterministic site in constrained space; plate dims are named after
      the plate (``pyro.plate("school", 8)`` -> dim ``"school"``), other dims ``{site}_dim_{i}``;
    - ``sample_stats``: ``log_p``, ``log_q``, ``log_importance_weight`` (= log_p - log_q) per draw, from the
      same replay as the draws (so ``log_q`` includes autoguides' Jacobian terms);
    - ``log_likelihood``: ``log p(y_i | z_s)`` per observed site and data point (``az.loo`` on it is plain
      PSIS-LOO treating ``q`` draws as posterior draws; :func:`loo` corrects for ``q``);
    - ``observed_data``: the observed values;
    - ``posterior_predictive`` (if asked): the model rerun on the same draws with observed sites resampled.

    The posterior group's attributes say what its draws are: ``vi_flows_draws`` (``"guide"``), and the PSIS
    ``vi_flows_khat`` (the largest over chains), ``vi_flows_khat_threshold``, ``vi_flows_reading`` and
    ``vi_flows_is_ess`` (the smallest over chains) of the importance weights. ``corrected=True`` returns
    :func:`psis_resample` of it instead (``"psis-resampled"`` draws, resampled with ``seed``), and raises
    :class:`UnreliableWeightsError` where k̂ says the correction is not valid.

    With a list of guides (same model, independently fitted), ``az.rhat`` compares the fits.
    """
    draws = _run(
        model, guide, args, kwargs, num_samples, seed, max_plate_nesting, predictive=posterior_predictive, many=True
    )
    az = _az()
    groups = {"posterior": _group([_latent_arrays(d) for d in draws], pyro)}
    stats = [
        {
            "log_p": (d.log_p, []),
            "log_q": (d.log_q, []),
            "log_importance_weight": (d.log_w, []),
        }
        for d in draws
    ]
    groups["sample_stats"] = _group(stats, pyro)
    if draws[0].observed:
        groups["log_likelihood"] = _group([d.log_lik for d in draws], pyro)
        groups["observed_data"] = _group([draws[0].observed_data], pyro, chains=False)
        if posterior_predictive:
            groups["posterior_predictive"] = _group([d.predictive for d in draws], pyro)
    idata = az.InferenceData(**groups)
    _, khat, ess = _chain_psis(np.stack([d.log_w for d in draws]))
    idata.posterior.attrs.update(_draws_attrs("guide", khat, ess, num_samples))
    return psis_resample(idata, seed=seed) if corrected else idata


def _chain_psis(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSIS of each chain's log weights (chain, draw): smoothed normalized log weights, k̂ and ESS per chain."""
    lw, khat = _psislw(log_w)
    return lw, np.atleast_1d(khat), 1.0 / np.sum(np.exp(lw) ** 2, axis=-1)


def _worst_khat(khat: np.ndarray) -> float:
    """The k̂ a set of chains is judged by: the largest, or NaN (undefined) if any chain's is."""
    return math.nan if np.isnan(khat).any() else float(khat.max())


def _draws_attrs(kind: str, khat: np.ndarray, ess: np.ndarray, num_samples: int) -> dict[str, Any]:
    """The posterior group's attributes saying what its draws are (netCDF-safe: str, float and int only)."""
    worst = _worst_khat(khat)
    attrs = {
        "vi_flows_draws": kind,
        "vi_flows_khat": worst,
        "vi_flows_khat_threshold": khat_threshold(num_samples),
        "vi_flows_reading": _reading(worst, num_samples),
        "vi_flows_guide_draws": int(num_samples),
        "vi_flows_is_ess": float(ess.min()),
    }
    if kind == "psis-resampled":
        attrs["vi_flows_resampling"] = RESAMPLING
    return attrs


def _resampled(ds, index: np.ndarray):
    """A Dataset with dims (chain, draw, ...) at the draws ``index`` (chain, new draw) picks in each chain."""
    import xarray as xr

    draw = np.arange(index.shape[1])  # new draw labels first: chains picked different draws, concat aligns on them
    parts = [ds.isel(chain=[c], draw=index[c]).assign_coords(draw=draw) for c in range(index.shape[0])]
    return parts[0] if len(parts) == 1 else xr.concat(parts, dim="chain")


def psis_resample(idata: arviz.InferenceData, seed: int | None = None) -> arviz.InferenceData:
    """:func:`to_inference_data`'s guide draws resampled with their PSIS-smoothed importance weights.

    Each chain's ``sample_stats.log_importance_weight`` is Pareto-smoothed (Vehtari et al. 2024) and the
    chain's draws resampled with replacement, as many as it had, by stratified resampling (Kitagawa 1996;
    see :data:`RESAMPLING`); ``seed`` seeds that alone. Every group with a ``draw`` dim is resampled alike
    (``sample_stats`` then describes the guide draw each new draw repeats, whose index is the added
    ``guide_draw``); ``observed_data`` is kept. The draws stay in guide-draw order, so repeats sit together,
    and hold about ``vi_flows_is_ess`` draws' worth of information each chain, not ``draw``.

    The posterior group's attributes say ``vi_flows_draws = "psis-resampled"`` with k̂ and its reading. Where
    any chain's k̂ is above ``khat_threshold(draws)`` (or undefined) this raises
    :class:`UnreliableWeightsError` with one line instead: resampling cannot restore mass the guide misses,
    and draws labelled corrected would pass the guide's errors off as the posterior's.
    """
    if "sample_stats" not in idata.groups() or "log_importance_weight" not in idata["sample_stats"]:
        raise ValueError("psis_resample needs to_inference_data's sample_stats.log_importance_weight")
    if idata["posterior"].attrs.get("vi_flows_draws") == "psis-resampled":
        raise ValueError("these draws are PSIS-resampled already; resample the guide's draws (corrected=False)")
    log_w = idata["sample_stats"]["log_importance_weight"].transpose("chain", "draw").values
    S = log_w.shape[1]
    lw, khat, ess = _chain_psis(log_w)
    for c, k in enumerate(khat):
        if not _corrected_valid(float(k), S):
            where = f" (chain {c} of {len(khat)})" if len(khat) > 1 else ""
            raise UnreliableWeightsError(_refusal(float(k), S, "draws") + where)
    rng = np.random.default_rng(seed)
    index = np.stack([_stratified(lw[c], S, rng) for c in range(len(khat))])
    groups = {g: _resampled(idata[g], index) if "draw" in idata[g].dims else idata[g] for g in idata.groups()}
    groups["sample_stats"] = groups["sample_stats"].assign(guide_draw=(("chain", "draw"), index))
    groups["posterior"].attrs.update(_draws_attrs("psis-resampled", khat, ess, S))
    return _az().InferenceData(**groups)


def summary(idata: arviz.InferenceData, **kwargs) -> pd.DataFrame:
    """``az.summary(idata, **kwargs)`` of the posterior group (mean, sd, HDI, ESS, R-hat per element).

    With one chain (one guide) R-hat is undefined and shows as NaN. ArviZ's "Shape validation failed"
    message about that is dropped by a filter on ArviZ's logger (installed on import, see ``_az``), which
    also covers ``az.summary`` called directly; its warnings about R-hat and ESS are silenced here.
    (The filter replaces raising the logger's level around the call: ArviZ's logger is outside logging's
    registry, so its level cache was never cleared and its warnings stayed off for the rest of the process.)
    """
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.summary(idata, **kwargs)


def save_inference_data(idata: arviz.InferenceData, path: str | os.PathLike) -> None:
    """Write ``idata`` to a netCDF-4 file with the ``h5netcdf`` engine (an ArviZ dependency).

    InferenceData stores one netCDF group per ArviZ group, which netCDF-3 (xarray's ``scipy`` engine) cannot.
    """
    idata.to_netcdf(os.fspath(path), engine="h5netcdf")


def load_inference_data(path: str | os.PathLike) -> arviz.InferenceData:
    """Read an InferenceData written by :func:`save_inference_data` (all groups loaded into memory)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path must be an existing netCDF file, got {path!r}")
    idata = _az().from_netcdf(path, engine="h5netcdf")
    for group in idata.groups():
        idata[group].load()
    return idata


# ---------------------------------------------------------------------------------------------------------------------
# PSIS-LOO for draws from q


@dataclass
class LooResult:
    """PSIS-LOO estimated from guide draws (see :func:`loo`); ``pointwise`` has one row per data point."""

    elpd_loo: float
    se: float
    p_loo: float
    lpd: float
    khat: float  # k̂ of the posterior importance weights w = p / q; above khat_threshold(S) the correction fails
    num_samples: int
    pointwise: pd.DataFrame = field(repr=False)

    @property
    def n_data_points(self) -> int:
        return len(self.pointwise)

    @property
    def max_pointwise_khat(self) -> float:
        return float(self.pointwise["khat"].max())

    def to_series(self) -> pd.Series:
        return pd.Series(
            {
                "elpd_loo": self.elpd_loo,
                "se": self.se,
                "p_loo": self.p_loo,
                "lpd": self.lpd,
                "khat": self.khat,
                "max_pointwise_khat": self.max_pointwise_khat,
                "n_data_points": self.n_data_points,
                "num_samples": self.num_samples,
            }
        )

    def __str__(self) -> str:
        threshold = khat_threshold(self.num_samples)
        bad = int((self.pointwise["khat"] > threshold).sum())
        return "\n".join(
            [
                f"PSIS-LOO from {self.num_samples} guide draws, corrected for q (Magnusson et al. 2019)",
                f"  elpd_loo {self.elpd_loo:12.3f}  (se {self.se:.3f})",
                f"  p_loo    {self.p_loo:12.3f}",
                f"  k-hat of p/q {self.khat:.3f} ({_reading(self.khat, self.num_samples)}); "
                f"pointwise k-hat > {threshold:.3g}: "
                f"{bad} of {self.n_data_points}",
            ]
        )


def loo(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 4000,
    seed: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> LooResult:
    r"""PSIS-LOO cross-validation from draws ``θ_s ~ q`` of a guide instead of the posterior.

    With ``log w_s = log p(y, θ_s) - log q(θ_s)`` and ``p(θ | y_{-i}) ∝ p(θ | y) / p(y_i | θ)``, the
    importance ratios of the leave-one-out posterior relative to ``q`` are (Magnusson et al., 2019, §3)

        log r_{s,i} = log w_s - log p(y_i | θ_s)      (up to a constant in s),

    PSIS-smoothed per ``i`` and normalized (``Σ_s r̃_{s,i} = 1``), giving

        elpd_loo_i = log Σ_s r̃_{s,i} p(y_i | θ_s),
        lpd_i      = log Σ_s w̃_s p(y_i | θ_s)        (w̃: PSIS-normalized weights of p(θ|y) / q),
        elpd_loo = Σ_i elpd_loo_i,   p_loo = Σ_i (lpd_i - elpd_loo_i),   se = √(n Var_i elpd_loo_i).

    When ``q`` is the exact posterior, ``w`` is constant and this is ordinary PSIS-LOO. Data points are
    all elements of all observed sites. The pointwise table has site, index, elpd_loo, khat (PSIS k̂ of
    ``r_{·,i}``); ``khat`` of the result is that of ``w`` itself.
    """
    (draws,) = _run(model, guide, args, kwargs, num_samples, seed, max_plate_nesting)
    if not draws.observed:
        raise ValueError("loo needs a model with observed sites; model(*args, **kwargs) observed none")
    S = draws.num_samples
    log_w = draws.log_w
    blocks, rows = [], []
    for name, (ll, _) in draws.log_lik.items():
        rows += [(name, idx) for idx in np.ndindex(ll.shape[1:])]
        blocks.append(ll.reshape(S, -1))
    log_lik = np.concatenate(blocks, axis=1).T  # (n, S)
    lw_post, khat = _psislw(log_w)
    lpd_i = _logsumexp(lw_post[None, :] + log_lik)
    lr, khat_i = _psislw(log_w[None, :] - log_lik)
    elpd_i = _logsumexp(lr + log_lik)
    n = len(elpd_i)
    pointwise = pd.DataFrame(
        {
            "site": [r[0] for r in rows],
            "index": [r[1] for r in rows],
            "elpd_loo": elpd_i,
            "p_loo": lpd_i - elpd_i,
            "khat": khat_i,
        }
    )
    return LooResult(
        elpd_loo=float(elpd_i.sum()),
        se=float(math.sqrt(n * elpd_i.var())),
        p_loo=float((lpd_i - elpd_i).sum()),
        lpd=float(lpd_i.sum()),
        khat=float(khat),
        num_samples=S,
        pointwise=pointwise,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


def _guide_samples_2d(guide, args, kwargs, num_samples: int) -> tuple[np.ndarray, list[str]]:
    """(num_samples, 2) constrained draws of a guide's (non-auxiliary) sample sites, and their labels."""
    with torch.random.fork_rng(), poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = [s for s in _sample_sites(trace) if not s["is_observed"] and not s["infer"].get("is_auxiliary")]
    dims = [-f.dim for s in sites for f in s["cond_indep_stack"] if f.vectorized and f.dim is not None]
    mpn = max([len(s["fn"].batch_shape) for s in sites] + dims + [0])
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(_vectorize(guide, num_samples, mpn)).get_trace(*args, **kwargs)
    cols, labels = [], []
    for s in sites:
        site = trace.nodes[s["name"]]
        x, _ = _sampled(site, mpn, num_samples)
        x = x.reshape(num_samples, -1)
        cols.append(x)
        labels += [s["name"]] if x.shape[1] == 1 else [f"{s['name']}[{i}]" for i in range(x.shape[1])]
    return np.concatenate(cols, axis=1), labels


def plot_density_2d(
    guide: Callable,
    *args,
    num_samples: int = 2000,
    target_log_density: Callable[[Tensor], Tensor] | None = None,
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
    gridsize: int = 100,
    seed: int | None = None,
    path: str | None = None,
    **kwargs,
) -> Figure:
    """The fitted density of a guide with a 2-D latent beside draws from it.

    For guides with ``get_posterior`` (``AutoContinuous``) the left panel is ``exp(log q)`` of
    ``guide.get_posterior(*args, **kwargs)`` on a grid, in the *unconstrained* latent space; otherwise a 2-D
    histogram of constrained draws. ``target_log_density`` (a callable on (..., 2) tensors in the same
    space, unnormalized is fine) is drawn as contour lines on both panels. Returns the Figure; ``path``
    saves it.
    """
    import matplotlib.pyplot as plt

    _check_num_samples(num_samples)
    with torch.random.fork_rng(enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        posterior = None
        if hasattr(guide, "get_posterior"):
            guide(*args, **kwargs)  # sets up an untrained autoguide
            try:
                posterior = guide.get_posterior(*args, **kwargs)
            except NotImplementedError:
                posterior = None
        if posterior is not None:
            if posterior.event_shape != (2,):
                raise ValueError(
                    f"plot_density_2d needs a 2-D latent; guide's latent has event shape {tuple(posterior.event_shape)}"
                )
            x = posterior.sample((num_samples,)).double().cpu().numpy()
            labels, space = ["u[0]", "u[1]"], "unconstrained"
        else:
            x, labels = _guide_samples_2d(guide, args, kwargs, num_samples)
            space = "constrained"
            if x.shape[1] != 2:
                raise ValueError(f"plot_density_2d needs a 2-D latent; guide's latent sites {labels} have {x.shape[1]}")
    if bounds is None:
        lo, hi = np.quantile(x, 0.005, axis=0), np.quantile(x, 0.995, axis=0)
        pad = 0.15 * (hi - lo) + 1e-6
        bounds = ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))
    gx = np.linspace(*bounds[0], gridsize)
    gy = np.linspace(*bounds[1], gridsize)
    X, Y = np.meshgrid(gx, gy)
    grid = torch.tensor(np.stack([X, Y], -1))

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    if posterior is not None:
        with torch.no_grad():
            dtype = posterior.sample().dtype
            lq = posterior.log_prob(grid.to(dtype)).double().cpu().numpy()
        ax0.contourf(X, Y, np.exp(lq), levels=20, cmap="viridis")
        ax0.set_title(f"guide density q ({space})")
    else:
        ax0.hist2d(x[:, 0], x[:, 1], bins=50, range=bounds, cmap="viridis")
        ax0.set_title(f"guide draws, histogram ({space})")
    ax1.scatter(x[:, 0], x[:, 1], s=2, alpha=0.3)
    ax1.set_title(f"{num_samples} guide draws")
    if target_log_density is not None:
        with torch.no_grad():
            lt = target_log_density(grid).double().cpu().numpy()
        for ax in (ax0, ax1):
            ax.contour(X, Y, np.exp(lt - lt.max()), levels=6, colors="white" if ax is ax0 else "black", linewidths=0.8)
    for ax in (ax0, ax1):
        ax.set_xlabel(labels[0])
    ax0.set_ylabel(labels[1])
    ax0.set_xlim(*bounds[0])
    ax0.set_ylim(*bounds[1])
    fig.tight_layout()
    return _finish(fig, path)


def plot_weights(diagnostics: Diagnostics, path: str | None = None) -> Figure:
    """Log importance weights (histogram, raw vs PSIS-smoothed) and the largest normalized weights."""
    import matplotlib.pyplot as plt

    d = diagnostics
    S = d.num_samples
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    raw = d.log_w - _logsumexp(d.log_w)
    lo, hi = min(raw.min(), d.log_w_smoothed.min()), max(raw.max(), d.log_w_smoothed.max())
    if hi - lo < 1e-9:  # equal weights (q = posterior): one bar
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 60)
    ax0.hist(raw, bins=bins, alpha=0.6, label="raw")
    ax0.hist(d.log_w_smoothed, bins=bins, alpha=0.6, label="PSIS-smoothed")
    ax0.set_xlabel("normalized log importance weight")
    ax0.set_ylabel("draws")
    ax0.set_title(f"k-hat = {d.khat:.2f} ({d.reading})")
    ax0.legend()
    top = np.sort(np.exp(d.log_w_smoothed))[::-1][: min(S, 100)]
    ax1.plot(np.arange(1, len(top) + 1), top, marker=".", lw=1)
    ax1.axhline(1.0 / S, color="gray", ls="--", label="1 / S (equal weights)")
    ax1.set_yscale("log")
    ax1.set_xlabel("rank")
    ax1.set_ylabel("smoothed normalized weight")
    ax1.set_title(f"ESS = {d.ess:.0f} ({100 * d.ess_frac:.1f}% of {S})")
    ax1.legend()
    fig.tight_layout()
    return _finish(fig, path)
