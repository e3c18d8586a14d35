"""Normalizing-flow layers as :class:`torch.distributions.Transform` modules.

One module per family; every layer is a :class:`FlowTransform` with an exact
``log_abs_det_jacobian`` and an inverse that works at arbitrary points.
"""

from .affine import Affine
from .autoregressive import InverseAutoregressive, iaf_stack
from .base import ComposeFlow, FlowTransform
from .continuous import ContinuousFlow
from .permute import Permute, Reverse
from .planar import Planar, PlanarStack
from .radial import Radial, RadialStack
from .stack import ConditionalComposeFlow, stack

__all__ = [
    "Affine",
    "ComposeFlow",
    "ConditionalComposeFlow",
    "ContinuousFlow",
    "FlowTransform",
    "InverseAutoregressive",
    "Permute",
    "Planar",
    "PlanarStack",
    "Radial",
    "RadialStack",
    "Reverse",
    "iaf_stack",
    "stack",
]
