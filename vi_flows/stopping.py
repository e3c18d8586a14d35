"""Moved to :mod:`vi_flows.training.stopping`; this name stays importable."""

from .training.stopping import (  # noqa: F401
    GAIN_TOL,
    MIN_FRACTION,
    TREND_WINDOWS,
    Z_UPPER,
    GainRule,
    RelativeRule,
    _slope,
    make_rule,
)

__all__ = ["GAIN_TOL", "GainRule", "RelativeRule", "make_rule"]
