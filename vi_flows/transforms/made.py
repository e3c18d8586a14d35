"""MADE (Germain et al. 2015), the network of the IAF and the MAF: now in :mod:`.networks`, re-exported here."""

from __future__ import annotations

from .networks import MADE, PACK_LIMIT
from .networks import _pack as _pack

__all__ = ["MADE", "PACK_LIMIT"]
