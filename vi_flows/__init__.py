"""vi_flows: normalizing-flow variational inference for Pyro.

Guides (drop-in beside ``AutoNormal``): :class:`AutoPlanar`, :class:`AutoRadial`,
:class:`AutoIAF`, :class:`AutoCNF`, :class:`AutoRealNVP`,
:class:`AutoSylvester`, :class:`AutoNSF`, and :class:`AutoFlow` for any stack of
:mod:`vi_flows.transforms`. Training: :func:`fit`. Checking: :func:`diagnose`,
:func:`to_inference_data`, :func:`loo`.
"""

from . import transforms
from .amortized import AmortizedFlow
from .density import DensityFit, FlowDensity, fit_density
from .diagnostics import Diagnostics, LooResult, diagnose, loo, plot_density_2d, plot_weights, to_inference_data
from .distributions import AffineNormal, FlowDistribution, StandardNormal
from .guides import AutoCNF, AutoFlow, AutoIAF, AutoNSF, AutoPlanar, AutoRadial, AutoRealNVP, AutoSylvester
from .training import FitResult, fit

__version__ = "0.1.0"
__all__ = [
    "AffineNormal",
    "AmortizedFlow",
    "AutoCNF",
    "AutoFlow",
    "AutoIAF",
    "AutoNSF",
    "AutoPlanar",
    "AutoRadial",
    "AutoRealNVP",
    "AutoSylvester",
    "DensityFit",
    "Diagnostics",
    "FitResult",
    "FlowDensity",
    "FlowDistribution",
    "LooResult",
    "StandardNormal",
    "diagnose",
    "fit",
    "fit_density",
    "loo",
    "plot_density_2d",
    "plot_weights",
    "to_inference_data",
    "transforms",
]
