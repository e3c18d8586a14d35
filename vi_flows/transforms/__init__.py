"""Normalizing-flow layers as :class:`torch.distributions.Transform` modules."""

from .base import ComposeFlow, FlowTransform
from .planar import Planar
from .radial import Radial

__all__ = ["ComposeFlow", "FlowTransform", "Planar", "Radial"]
