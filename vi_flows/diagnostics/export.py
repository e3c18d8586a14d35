"""Guide draws as ArviZ InferenceData, and InferenceData to and from netCDF files.

One chain per guide (a list of independently fitted guides gives several chains, which ``az.rhat``
compares), ``S`` draws per chain, every site's dims named as in :mod:`.named`. The posterior group's
attributes say what its draws are (guide draws or PSIS-resampled ones) and what k̂ says of their weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyro

from .lazy_arviz import _az
from .named import _latent_arrays
from .psis import _chain_psis, _draws_attrs, psis_resample
from .replay import _run

if TYPE_CHECKING:
    import arviz


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

    Defaults: ``num_samples=1000`` draws per chain, Stan's and PyMC's default, put a posterior mean within
    about ``sd / √1000 ≈ 0.03 sd`` and keep the file small; for k̂ read against ``KHAT_OK`` pass at least
    ``MIN_DRAWS_FOR_KHAT`` (:mod:`.khat`).
    ``seed=None`` draws like any other Pyro call; ``posterior_predictive=False`` and ``corrected=False``
    skip a second model run and the resampling unless asked for; ``max_plate_nesting=None`` is found from
    one plain run.
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
