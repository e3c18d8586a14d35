"""Normalizing-flow layers as :class:`torch.distributions.Transform` modules.

One module per family; every layer is a :class:`FlowTransform` with an exact
``log_abs_det_jacobian`` and an inverse that works at arbitrary points.
"""

from .affine import Affine
from .autoregressive import InverseAutoregressive, MaskedAutoregressive, iaf_stack, maf_stack
from .base import ComposeFlow, FlowTransform
from .continuous import ContinuousFlow
from .coupling import AffineCoupling, coupling_stack
from .linear import InvertibleLinear
from .permute import Permute, Reverse
from .planar import Planar, PlanarStack
from .radial import Radial, RadialStack
from .spline import SplineCoupling, rq_spline, spline_stack
from .stack import ConditionalComposeFlow, stack
from .sylvester import Sylvester

__all__ = [
    "Affine",
    "AffineCoupling",
    "ComposeFlow",
    "ConditionalComposeFlow",
    "ContinuousFlow",
    "FlowTransform",
    "InverseAutoregressive",
    "InvertibleLinear",
    "MaskedAutoregressive",
    "Permute",
    "Planar",
    "PlanarStack",
    "Radial",
    "RadialStack",
    "Reverse",
    "SplineCoupling",
    "Sylvester",
    "coupling_stack",
    "iaf_stack",
    "maf_stack",
    "rq_spline",
    "spline_stack",
    "stack",
]
