"""Normalizing-flow layers as :class:`torch.distributions.Transform` modules.

One module per family; every layer is a :class:`FlowTransform` with an exact
``log_abs_det_jacobian`` and an inverse that works at arbitrary points.
"""

from .affine import Affine
from .autoregressive import (
    AffineInverseAutoregressive,
    InverseAutoregressive,
    MaskedAutoregressive,
    affine_iaf_stack,
    iaf_stack,
    maf_stack,
)
from .base import ComposeFlow, FlowTransform
from .coupling import AffineCoupling, coupling_stack
from .linear import InvertibleLinear
from .permute import Permute, Reverse
from .planar import Planar, PlanarStack
from .radial import Radial, RadialStack
from .spline import SplineCoupling, rq_spline, spline_stack
from .stack import ConditionalComposeFlow, stack
from .sylvester import Sylvester
from .tails import SinhArcsinh

__all__ = [
    "Affine",
    "AffineCoupling",
    "AffineInverseAutoregressive",
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
    "SinhArcsinh",
    "SplineCoupling",
    "Sylvester",
    "affine_iaf_stack",
    "coupling_stack",
    "iaf_stack",
    "maf_stack",
    "rq_spline",
    "spline_stack",
    "stack",
]


def __getattr__(name: str):
    """``ContinuousFlow`` on first use: its module imports torchdiffeq, which imports scipy (a second or two)."""
    if name == "ContinuousFlow":
        from .continuous import ContinuousFlow

        return ContinuousFlow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
