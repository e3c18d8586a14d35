"""Pareto-smoothed importance sampling of guide draws: :func:`diagnose`, k̂, and corrected draws.

From ``S`` draws ``z_s ~ q`` and ``log w_s = log p(x, z_s) - log q(z_s)``: the ELBO, the importance-weighted
bound, PSIS (the largest weights replaced by quantiles of a generalized Pareto fit to them, whose shape is
``k̂``), the effective sample size of the smoothed weights, PSIS-weighted posterior moments, and the draws
resampled with the smoothed weights (:meth:`Diagnostics.corrected_draws`, :func:`psis_resample`). Anything
corrected is offered only where k̂ says the weights can correct ``q`` (:func:`~.khat._corrected_valid`);
elsewhere it is refused with :class:`UnreliableWeightsError`.

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational inference. ICML.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
    Kitagawa (1996). Monte Carlo filter and smoother for non-Gaussian nonlinear state space models. JCGS 5(1).
    Douc, Cappé, Moulines (2005). Comparison of resampling schemes for particle filtering. ISPA.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .khat import (
    KHAT_OK,
    MIN_DRAWS_FOR_KHAT,
    _corrected_valid,
    _reading,
    _reading_text,
    khat_threshold,
    min_draws_for_khat,
)
from .lazy_arviz import _az
from .named import _Draws, _latent_arrays
from .replay import _run

if TYPE_CHECKING:
    import arviz


def _psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSIS along the last axis (Vehtari et al. 2024) by ArviZ's ``psislw``: log weights (..., S) to the
    normalized smoothed log weights (..., S), ``logsumexp = 0`` along the last axis, and k̂ (...) in float64.
    Guide draws are independent, so the relative efficiency ``r_eff`` is 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k̂ above the threshold is reported by the caller, not warned about
        lw, k = _az().psislw(np.asarray(log_weights, dtype=np.float64), reff=1.0)
    return np.asarray(lw), np.asarray(k)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log Σ exp(x)`` along ``axis``, shifted by the maximum so it neither overflows nor underflows."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


#: How corrected draws are made; recorded in the ``vi_flows_resampling`` attribute of their posterior group.
RESAMPLING = "stratified resampling with replacement (Kitagawa 1996) with PSIS-smoothed weights (Vehtari et al. 2024)"


class UnreliableWeightsError(ValueError):
    """PSIS-corrected draws were asked for where k̂ says the importance weights cannot correct the guide.

    A ``ValueError``, so one ``except ValueError`` still catches every refusal of the diagnostics.
    """


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
    - ``khat``: Pareto shape of the upper tail of ``w`` (PSIS): below :data:`KHAT_GOOD` good, up to
      :data:`KHAT_OK` usable with PSIS correction, above it unreliable (Yao et al., 2018); with fewer than
      :data:`MIN_DRAWS_FOR_KHAT` draws the upper threshold is the lower ``khat_threshold(S)`` (Vehtari et
      al., 2024);
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
        """``"good"`` (k̂ < KHAT_GOOD), ``"ok"`` (up to ``khat_threshold``), ``"bad"`` (above it) or ``"undefined"``."""
        return _reading(self.khat, self.num_samples)

    @property
    def khat_threshold(self) -> float:
        """The k̂ above which these ``num_samples`` draws are unreliable: :data:`KHAT_OK` from
        :data:`MIN_DRAWS_FOR_KHAT` draws on, less below."""
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
    """The :class:`Diagnostics` of one replay: bounds and PSIS of its weights, moments of its latent sites."""
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

    Defaults: ``num_samples=4000`` is above :data:`MIN_DRAWS_FOR_KHAT`, so k̂ reads against :data:`KHAT_OK`
    (Vehtari et al. 2024); ``seed=None`` draws like any other Pyro call; ``max_plate_nesting=None`` lets
    the plain run find it, as ``Trace_ELBO`` does.
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


# ---- PSIS-resampled InferenceData (the groups to_inference_data makes)


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
