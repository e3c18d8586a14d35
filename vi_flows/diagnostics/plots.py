"""Pictures of a fit: a guide's 2-D density beside its draws, and its importance weights.

Matplotlib is imported inside each function, so the diagnostics load without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from pyro import poutine
from torch import Tensor

from .named import _sampled
from .plan import _check_num_samples, _vectorize
from .psis import Diagnostics, _logsumexp
from .sites import _sample_sites

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _finish(fig, path):
    """Save ``fig`` to ``path`` if one is given; return it either way."""
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


def _fitted_posterior(guide, args, kwargs):
    """An ``AutoContinuous`` guide's ``get_posterior`` (its density in unconstrained space), else ``None``."""
    if not hasattr(guide, "get_posterior"):
        return None
    guide(*args, **kwargs)  # sets up an untrained autoguide
    try:
        return guide.get_posterior(*args, **kwargs)
    except NotImplementedError:
        return None


def _density_draws(guide, args, kwargs, num_samples: int, seed: int | None):
    """(draws (num_samples, 2), their labels, their space, the guide's density or ``None``) for the plot.

    Draws of ``guide.get_posterior`` in unconstrained space where the guide has one, else the guide's
    constrained draws; raises where the latent is not 2-D.
    """
    with torch.random.fork_rng(enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        posterior = _fitted_posterior(guide, args, kwargs)
        if posterior is not None:
            if posterior.event_shape != (2,):
                raise ValueError(
                    f"plot_density_2d needs a 2-D latent; guide's latent has event shape {tuple(posterior.event_shape)}"
                )
            x = posterior.sample((num_samples,)).double().cpu().numpy()
            return x, ["u[0]", "u[1]"], "unconstrained", posterior
        x, labels = _guide_samples_2d(guide, args, kwargs, num_samples)
        if x.shape[1] != 2:
            raise ValueError(f"plot_density_2d needs a 2-D latent; guide's latent sites {labels} have {x.shape[1]}")
        return x, labels, "constrained", None


def _bounds(x: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Plot limits: the central 99% of the draws (x: (S, 2)) per axis, padded by 15% of that range so the
    density's edges and outlying draws stay in view."""
    lo, hi = np.quantile(x, 0.005, axis=0), np.quantile(x, 0.995, axis=0)
    pad = 0.15 * (hi - lo) + 1e-6
    return ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))


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

    Defaults: ``num_samples=2000`` draws fill a 50 x 50 histogram and a scatter without hiding the shape;
    ``bounds=None`` takes the draws' central 99%, padded; ``gridsize=100`` points per axis resolve the
    density's contours; ``seed=None`` draws like any other Pyro call; ``path=None`` saves nothing.
    """
    import matplotlib.pyplot as plt

    _check_num_samples(num_samples)
    x, labels, space, posterior = _density_draws(guide, args, kwargs, num_samples, seed)
    if bounds is None:
        bounds = _bounds(x)
    X, Y = np.meshgrid(np.linspace(*bounds[0], gridsize), np.linspace(*bounds[1], gridsize))
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
    """Log importance weights (histogram, raw vs PSIS-smoothed) and the largest normalized weights.

    Normalized raw weights ``log w_s - logsumexp(log w)`` beside the PSIS-smoothed ones (Vehtari et al.
    2024); a long right tail of raw weights is what a large k̂ measures. The right panel ranks the 100
    largest smoothed weights against ``1 / S``, their value if ``q`` were the posterior. ``path=None`` saves
    nothing.
    """
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
