"""vi_flows: normalizing-flow variational inference for Pyro."""

from . import transforms

__version__ = "0.1.0"
__all__ = ["transforms"]
