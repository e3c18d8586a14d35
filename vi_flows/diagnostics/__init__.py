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

One idea per module:

- :mod:`.khat`: the k̂ thresholds (:data:`KHAT_GOOD`, :data:`KHAT_OK`, :func:`khat_threshold`,
  :func:`min_draws_for_khat`) and the readings derived from them;
- :mod:`.sites`: what each model and guide site is to the weights;
- :mod:`.plan`: one plain run before the draws (plate depth, subsampling, the particle plate);
- :mod:`.replay`: the vectorized replay of the model on the guide draws, and its per-draw loop fallback;
- :mod:`.named`: draws per site as arrays with named dimensions;
- :mod:`.psis`: :func:`diagnose`, :class:`Diagnostics`, PSIS-corrected draws and :func:`psis_resample`;
- :mod:`.export`: :func:`to_inference_data`, :func:`summary` and netCDF files;
- :mod:`.psis_loo`: :func:`loo`;
- :mod:`.plots`: :func:`plot_density_2d`, :func:`plot_weights`;
- :mod:`.lazy_arviz`: ArviZ, imported on first use.

This package is the only part of vi_flows that imports ArviZ.

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational inference. ICML.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
    Magnusson, Andersen, Jonasson, Vehtari (2019). Bayesian leave-one-out cross-validation for large data. ICML.
    Kitagawa (1996). Monte Carlo filter and smoother for non-Gaussian nonlinear state space models. JCGS 5(1).
    Douc, Cappé, Moulines (2005). Comparison of resampling schemes for particle filtering. ISPA.
"""

from __future__ import annotations

from .export import load_inference_data, save_inference_data, summary, to_inference_data
from .khat import KHAT_GOOD, KHAT_OK, MIN_DRAWS_FOR_KHAT, khat_reading, khat_scale, khat_threshold, min_draws_for_khat
from .khat import _khat_scale as _khat_scale  # private names other modules and tests import from here
from .khat import _reading as _reading
from .lazy_arviz import _az as _az
from .named import Arrays as Arrays
from .plan import PARTICLE_PLATE as PARTICLE_PLATE
from .plots import plot_density_2d, plot_weights
from .psis import RESAMPLING, Diagnostics, UnreliableWeightsError, diagnose, psis_resample
from .psis import _psislw as _psislw
from .psis import _stratified as _stratified
from .psis_loo import LooResult, loo

__all__ = [
    "KHAT_GOOD",
    "KHAT_OK",
    "MIN_DRAWS_FOR_KHAT",
    "RESAMPLING",
    "Diagnostics",
    "LooResult",
    "UnreliableWeightsError",
    "diagnose",
    "khat_reading",
    "khat_scale",
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
