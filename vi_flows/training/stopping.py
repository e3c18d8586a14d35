"""When :func:`~vi_flows.fit` stops early: rules fed one ELBO estimate per step.

Both rules are deterministic functions of the ELBO history, so replaying the
history of a resumed run gives the same state.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["GAIN_TOL", "GainRule", "RelativeRule", "make_rule"]

#: Nats of ELBO that the remaining steps could still gain, at the optimistic end of the trend, below
#: which a fit stops: a tenth of a nat is well under the Monte-Carlo error of any ELBO comparison.
GAIN_TOL = 0.1
#: The trend is fitted over this many windows of the most recent steps: enough points for a stable slope.
TREND_WINDOWS = 5
#: The optimistic slope is the fitted one plus this many standard errors (one-sided ~98 %).
Z_UPPER = 2.0
#: Never before this fraction of ``num_steps``: a flow can sit on a plateau before it starts to bend
#: (AutoNSF on the energy U3), and the decaying lr needs its tail.
MIN_FRACTION = 0.5


class GainRule:
    r"""Stop once the steps left cannot gain ``tol`` nats, even at the optimistic end of the trend.

    At the end of every ``window`` steps from half of ``num_steps`` on, a line is fitted (least
    squares) to the last ``TREND_WINDOWS · window`` ELBO estimates; with slope ``b`` and its standard
    error ``s``, the fit stops when

        (b + 2s) · (num_steps − step) < tol.

    Noisy estimates make ``s`` large, so a noisy ELBO that is still climbing on average is never
    taken for a plateau (the failure of a rule on the change of window means, which stopped fits
    several posterior sds short); a flat, precise one (a Gaussian posterior with the
    sticking-the-landing gradient) stops as soon as it is flat.
    """

    def __init__(self, tol: float, window: int, num_steps: int):
        self.tol, self.window, self.num_steps = tol, window, num_steps
        self._recent: deque[tuple[int, float]] = deque(maxlen=TREND_WINDOWS * window)

    def update(self, step: int, elbo: float) -> bool:
        self._recent.append((step, elbo))
        if step % self.window or step < MIN_FRACTION * self.num_steps or step >= self.num_steps:
            return False
        if len(self._recent) < self._recent.maxlen:
            return False
        slope, se = _slope(self._recent)
        if not math.isfinite(slope + se):
            return False
        return (slope + Z_UPPER * se) * (self.num_steps - step) < self.tol


class RelativeRule:
    """Stan-ADVI-style: the mean ELBO of a ``window`` changes by a relative ``< tol``, ``patience`` windows in a row.

    Kept for ``fit(tol=<float>)``; on an ELBO of −1e4 a relative 1e-3 is 10 nats, which is why it is not
    the default (Kucukelbir et al. 2017, ADVI). Windows end at multiples of ``window`` (absolute step numbers).
    """

    def __init__(self, tol: float, window: int, patience: int):
        self.tol, self.window, self.patience = tol, window, patience
        self._sum, self._prev, self._calm = 0.0, None, 0

    def update(self, step: int, elbo: float) -> bool:
        self._sum += elbo
        if step % self.window:
            return False
        mean, self._sum = self._sum / self.window, 0.0
        prev, self._prev = self._prev, mean
        if prev is None:
            return False
        change = abs(mean - prev) / abs(prev) if prev else math.inf
        self._calm = self._calm + 1 if change < self.tol else 0
        return self._calm >= self.patience


def make_rule(tol, window: int, patience: int, num_steps: int) -> GainRule | RelativeRule | None:
    """``tol="auto"``: :class:`GainRule` with :data:`GAIN_TOL`; a number: :class:`RelativeRule`; None: no rule."""
    if tol is None:
        return None
    if tol == "auto":
        return GainRule(GAIN_TOL, window, num_steps)
    return RelativeRule(tol, window, patience)


def replay(rule, history: dict) -> bool:
    """Feed a resumed run's history to ``rule`` (steps at ``β = 1`` only); whether it had already converged."""
    if rule is None:
        return False
    rows = zip(history["step"], history["elbo"], history["beta"])
    return any([rule.update(step, elbo) for step, elbo, beta in rows if beta == 1.0])


def _slope(points) -> tuple[float, float]:
    """Least-squares slope of ``elbo`` on ``step`` and its standard error."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / sxx
    resid = sum((y - mean_y - slope * (t - mean_t)) ** 2 for t, y in points)
    return slope, math.sqrt(resid / (n - 2) / sxx)
