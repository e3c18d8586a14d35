"""vi_flows: normalizing-flow variational inference for Pyro.

Guides (drop-in beside ``AutoNormal``): :class:`AutoPlanar`, :class:`AutoRadial`,
:class:`AutoIAF`, :class:`AutoCNF`, :class:`AutoRealNVP`,
:class:`AutoSylvester`, :class:`AutoNSF`, and :class:`AutoFlow` for any stack of
:mod:`vi_flows.transforms`. Training: :func:`fit`. Checking: :func:`diagnose`,
:func:`to_inference_data`, :func:`loo`.
"""

from __future__ import annotations

import importlib

from . import transforms
from .distributions import AffineNormal, FlowDistribution, StandardNormal
from .guides import AutoCNF, AutoFlow, AutoIAF, AutoNSF, AutoPlanar, AutoRadial, AutoRealNVP, AutoSylvester
from .training import FitResult, fit

#: Names imported on first use: their modules load pandas, ArviZ or torchdiffeq (with scipy), which
#: took ``import vi_flows`` from about 3 s (``import pyro``) to 6.
_LAZY = {
    "AmortizedFlow": "amortized",
    "DensityFit": "density",
    "FlowDensity": "density",
    "fit_density": "density",
    "Diagnostics": "diagnostics",
    "LooResult": "diagnostics",
    "diagnose": "diagnostics",
    "loo": "diagnostics",
    "plot_density_2d": "diagnostics",
    "plot_weights": "diagnostics",
    "to_inference_data": "diagnostics",
}

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


def __getattr__(name: str):
    """Import a name of :data:`_LAZY` from its module on first use (PEP 562) and keep it here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
