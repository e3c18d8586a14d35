"""Did the variational fit work? Importance-sampling diagnostics and ArviZ export.

Every diagnostic here starts from one vectorized replay: ``S`` draws
``z_s ~ q`` from the guide inside ``pyro.plate("_num_samples", S)``, the model
replayed on them, and the log importance weights

    log w_s = log p(x, z_s) - log q(z_s),

both in constrained space (an autoguide's ``Delta`` sites carry the Jacobian
of its bijection, so ``log q`` is the density of the constrained draws).
From them: the ELBO, the importance-weighted bound, the PSIS Pareto
``k̂`` of Yao et al. (2018), PSIS-corrected posterior moments, an
:class:`arviz.InferenceData`, and PSIS-LOO for draws from ``q``
(Magnusson et al., 2019).

This is the only module of the package that imports ArviZ.

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational inference. ICML.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
    Magnusson, Andersen, Jonasson, Vehtari (2019). Bayesian leave-one-out cross-validation for large data. ICML.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_site_shape
from torch import Tensor

if TYPE_CHECKING:
    import arviz
    from matplotlib.figure import Figure

__all__ = [
    "Diagnostics",
    "LooResult",
    "diagnose",
    "load_inference_data",
    "loo",
    "plot_density_2d",
    "plot_weights",
    "save_inference_data",
    "summary",
    "to_inference_data",
]

PARTICLE_PLATE = "_num_samples"


def _az():
    """Import ArviZ on first use (its import is slow and announces its 1.x refactor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSIS along the last axis: (normalized smoothed log weights, k̂); draws are independent, so r_eff = 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k̂ > 0.7 is reported by the caller, not warned about
        lw, k = _az().psislw(np.asarray(log_weights, dtype=np.float64), reff=1.0)
    return np.asarray(lw), np.asarray(k)


# ---------------------------------------------------------------------------------------------------------------------
# The vectorized replay


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _check_num_samples(num_samples: int, minimum: int = 2) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(f"num_samples must be an integer >= {minimum}, got {num_samples!r}")
    return num_samples


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def _sample_sites(trace) -> list[dict]:
    return [s for s in prune_subsample_sites(trace).nodes.values() if s["type"] == "sample"]


def _inspect(model, guide, args, kwargs, max_plate_nesting: int | None) -> int:
    """One plain (unvectorized) replay: initializes a fresh autoguide, rejects discrete latents, and
    returns ``max_plate_nesting`` (the given one, or the deepest plate / batch rank seen).

    Runs under ``fork_rng`` so it leaves the random stream exactly as it found it.
    """
    with torch.random.fork_rng(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
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
    if max_plate_nesting is None:
        return depth
    if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
        raise ValueError(f"max_plate_nesting must be None or an integer >= 0, got {max_plate_nesting!r}")
    return max_plate_nesting


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


@dataclass
class _Draws:
    """One vectorized replay: traces, per-draw log densities and the roles of the model's sites."""

    model_trace: Any
    guide_trace: Any
    log_p: np.ndarray  # (S,) log p(x, z_s), float64
    log_q: np.ndarray  # (S,) log q(z_s)
    latent: list[str]  # model latent sites the guide provides, model order
    deterministic: list[str]
    observed: list[str]
    max_plate_nesting: int
    predictive_trace: Any = None

    @property
    def num_samples(self) -> int:
        return len(self.log_p)

    @property
    def log_w(self) -> np.ndarray:
        return self.log_p - self.log_q


@torch.no_grad()
def _draw(model, guide, args, kwargs, num_samples: int, max_plate_nesting: int, predictive: bool = False) -> _Draws:
    S, mpn = num_samples, max_plate_nesting
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
    dim = -(mpn + 1)
    log_q = torch.zeros(S, dtype=torch.float64)
    for site in _sample_sites(guide_trace):
        check_site_shape(site, mpn + 1)
        log_q += _per_draw(site["log_prob"].double().cpu(), S, dim)
    log_p = torch.zeros(S, dtype=torch.float64)
    latent, deterministic, observed, unguided = [], [], [], []
    for site in _sample_sites(model_trace):
        name = site["name"]
        if _is_deterministic(site):
            deterministic.append(name)
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            # drawn from its prior by the replay: p(z_u | ...) is part of the proposal and cancels in w
            unguided.append(name)
            continue
        check_site_shape(site, mpn + 1)
        log_p += _per_draw(site["log_prob"].double().cpu(), S, dim)
        (observed if site["is_observed"] else latent).append(name)
    if unguided:
        warnings.warn(
            f"model latent sites {unguided} are not in the guide; they are drawn from their priors and left out "
            "of the weights and the per-site reports",
            stacklevel=3,
        )
    return _Draws(
        model_trace=model_trace,
        guide_trace=guide_trace,
        log_p=log_p.numpy(),
        log_q=log_q.numpy(),
        latent=latent,
        deterministic=deterministic,
        observed=observed,
        max_plate_nesting=mpn,
        predictive_trace=predictive_trace,
    )


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
    """Replay each guide (one, or with ``many`` a list of independent fits) ``num_samples`` times."""
    if isinstance(guide, (list, tuple)) and not many:
        raise ValueError(
            f"guide must be a single Pyro guide here (lists of fits go to to_inference_data), got {guide!r}"
        )
    guides = list(guide) if isinstance(guide, (list, tuple)) else [guide]
    if not guides or not all(callable(g) for g in guides):
        raise ValueError(f"guide must be a callable Pyro guide or a non-empty list of them, got {guide!r}")
    _check_num_samples(num_samples)
    mpn = [_inspect(model, g, args, kwargs, max_plate_nesting) for g in guides]
    mpn = max(mpn)
    out = []
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for g in guides:
            out.append(_draw(model, g, args, kwargs, num_samples, mpn, predictive))
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


def _deterministic(site: dict, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    # pyro.deterministic declares every dim an event dim, so find the particle axis from the value itself:
    # the leftmost non-singleton axis, if it has size S; axes right of it are batch (plates) then event.
    value, mpn = site["value"], max_plate_nesting
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


def _latent_arrays(draws: _Draws, include_deterministic: bool = True) -> dict[str, tuple[np.ndarray, list[str]]]:
    names = draws.latent + (draws.deterministic if include_deterministic else [])
    nodes = draws.model_trace.nodes
    out = {}
    for n in sorted(names, key=list(nodes).index):
        convert = _deterministic if n in draws.deterministic else _sampled
        out[n] = convert(nodes[n], draws.max_plate_nesting, draws.num_samples)
    return out


def _log_lik_arrays(draws: _Draws) -> dict[str, tuple[np.ndarray, list[str]]]:
    out = {}
    for n in draws.observed:
        site = draws.model_trace.nodes[n]
        lp = site["unscaled_log_prob"].expand(site["fn"].batch_shape)
        out[n] = _named(site, lp, 0, draws.max_plate_nesting, draws.num_samples, site["fn"].batch_shape)
    return out


def _observed_arrays(draws: _Draws) -> dict[str, tuple[np.ndarray, list[str]]]:
    out = {}
    for n in draws.observed:
        site = draws.model_trace.nodes[n]
        out[n] = _named(site, site["value"], site["fn"].event_dim, draws.max_plate_nesting, None)
    return out


def _predictive_arrays(draws: _Draws) -> dict[str, tuple[np.ndarray, list[str]]]:
    nodes = draws.predictive_trace.nodes
    return {n: _sampled(nodes[n], draws.max_plate_nesting, draws.num_samples) for n in draws.observed}


# ---------------------------------------------------------------------------------------------------------------------
# diagnose


def _reading(khat: float) -> str:
    if not math.isfinite(khat):
        return "undefined"
    if khat < 0.5:
        return "good"
    if khat <= 0.7:
        return "ok"
    return "bad"


_READINGS = {
    "good": "k < 0.5: the guide is close to the posterior; importance-sampling estimates are reliable",
    "ok": "0.5 <= k <= 0.7: usable, but use the PSIS-corrected estimates",
    "bad": "k > 0.7: unreliable; the guide misses posterior mass and importance sampling cannot repair it",
    "undefined": "too few tail draws to fit the Pareto tail; increase num_samples",
}


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
      correction, > 0.7 unreliable (Yao et al., 2018);
    - ``ess = (Σ w̃)² / Σ w̃²`` of the PSIS-smoothed weights ``w̃``, ``ess_frac = ess / S``;
    - per latent site element, the guide's mean and sd next to the PSIS-weighted ones (constrained space).

    ``log_p``, ``log_q``, ``log_w`` (shape (S,)) and ``log_w_smoothed`` (normalized) are kept for plotting.
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

    @property
    def ess_frac(self) -> float:
        return self.ess / self.num_samples

    @property
    def reading(self) -> str:
        """``"good"`` (k̂ < 0.5), ``"ok"`` (0.5–0.7), ``"bad"`` (> 0.7) or ``"undefined"``."""
        return _reading(self.khat)

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
        """One row per latent site element: site, index (tuple), guide_mean, guide_sd, psis_mean, psis_sd."""
        rows = []
        for name, st in self.sites.items():
            for idx in np.ndindex(st["guide_mean"].shape):
                rows.append(
                    {
                        "site": name,
                        "index": idx,
                        "guide_mean": float(st["guide_mean"][idx]),
                        "guide_sd": float(st["guide_sd"][idx]),
                        "psis_mean": float(st["psis_mean"][idx]),
                        "psis_sd": float(st["psis_sd"][idx]),
                    }
                )
        return pd.DataFrame(rows, columns=["site", "index", "guide_mean", "guide_sd", "psis_mean", "psis_sd"])

    def __str__(self) -> str:
        lines = [
            f"Variational fit diagnostics ({self.num_samples} draws from the guide)",
            f"  ELBO         {self.elbo:12.4f} ± {self.elbo_se:.4f} (Monte-Carlo s.e.)",
            f"  IWAE bound   {self.iwae:12.4f}   (log-evidence estimate, K = {self.num_samples})",
            f"  Pareto k-hat {self.khat:12.3f}   {self.reading}: {_READINGS[self.reading]}",
            f"  IS ESS       {self.ess:12.1f}   ({100 * self.ess_frac:.1f}% of draws, PSIS-smoothed weights)",
        ]
        df = self.to_dataframe()
        if len(df):
            max_rows = 20
            lines.append("Posterior mean / sd per site (constrained space): guide vs PSIS-corrected")
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
    sites = {}
    for name, (x, _) in _latent_arrays(draws, include_deterministic=False).items():
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
    seed) and returns a :class:`Diagnostics`. ``max_plate_nesting`` defaults to the deepest plate or batch
    rank seen in one plain run. ``seed`` seeds torch's generator for the draws without disturbing the global
    stream; ``None`` uses (and advances) the global stream. Discrete latent sites raise ``ValueError``.
    """
    (draws,) = _run(model, guide, args, kwargs, num_samples, seed, max_plate_nesting)
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
        groups["log_likelihood"] = _group([_log_lik_arrays(d) for d in draws], pyro)
        groups["observed_data"] = _group([_observed_arrays(draws[0])], pyro, chains=False)
        if posterior_predictive:
            groups["posterior_predictive"] = _group([_predictive_arrays(d) for d in draws], pyro)
    return az.InferenceData(**groups)


def summary(idata: arviz.InferenceData, **kwargs) -> pd.DataFrame:
    """``az.summary(idata, **kwargs)`` of the posterior group (mean, sd, HDI, ESS, R-hat per element).

    With one chain (one guide) R-hat is undefined and shows as NaN; ArviZ's warnings about it are silenced.
    """
    import logging

    az = _az()
    logger = getattr(az, "_log", None) or logging.getLogger("arviz")  # ArviZ's logger is not in logging's registry
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Shape validation failed" for a single chain
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return az.summary(idata, **kwargs)
    finally:
        logger.setLevel(level)


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
    khat: float  # k̂ of the posterior importance weights w = p / q; above 0.7 the correction itself is unreliable
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
        bad = int((self.pointwise["khat"] > 0.7).sum())
        return "\n".join(
            [
                f"PSIS-LOO from {self.num_samples} guide draws, corrected for q (Magnusson et al. 2019)",
                f"  elpd_loo {self.elpd_loo:12.3f}  (se {self.se:.3f})",
                f"  p_loo    {self.p_loo:12.3f}",
                f"  k-hat of p/q {self.khat:.3f} ({_reading(self.khat)}); pointwise k-hat > 0.7: "
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
    for name, (ll, _) in _log_lik_arrays(draws).items():
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
