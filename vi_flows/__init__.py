"""vi_flows: normalizing-flow variational inference for Pyro."""

from . import transforms
from .distributions import FlowDistribution, StandardNormal
from .guides import AutoCNF, AutoFlow, AutoIAF, AutoPlanar, AutoRadial

__version__ = "0.1.0"
__all__ = [
    "AutoCNF",
    "AutoFlow",
    "AutoIAF",
    "AutoPlanar",
    "AutoRadial",
    "FlowDistribution",
    "StandardNormal",
    "transforms",
]
