"""What :func:`~vi_flows.fit` returns: the guide, one history row per step, and whether it converged."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd  # imported when the history is built: it takes a second to import

#: The history's columns, one value per step each.
_COLUMNS = ("step", "elbo", "elapsed", "lr", "grad_norm", "beta")


@dataclass(repr=False)
class FitResult:
    """What :func:`fit` returns.

    ``history`` has one row per step: ``step`` (1-based), ``elbo`` (= −loss,
    one Monte-Carlo estimate), ``elapsed`` (seconds since the start of the
    fit, summed over resumed runs), ``lr`` (of the first parameter's
    optimizer), ``grad_norm`` (2-norm of all unconstrained gradients,
    before any clipping) and ``beta`` (the annealing factor on ``log p``,
    1 unless ``fit(anneal=...)``). ``averaged``: the guide holds the mean of
    the iterates the stopping rule judged flat (``fit(tail_average=True)``),
    not the last one, whose ELBO the history's last row is.
    """

    guide: Any
    history: pd.DataFrame
    converged: bool
    num_steps: int
    elapsed: float
    averaged: bool = False

    @classmethod
    def build(cls, guide, history: dict, converged: bool, num_steps: int, averaged: bool = False) -> FitResult:
        """From the loop's history, a dict of one list per column."""
        import pandas as pd

        frame = pd.DataFrame(history, columns=list(_COLUMNS))
        elapsed = history["elapsed"][-1] if history["elapsed"] else 0.0
        return cls(guide, frame, converged, num_steps, elapsed, averaged)

    def __repr__(self) -> str:
        tail = self.history["elbo"].tail(100)
        return (
            f"FitResult(num_steps={self.num_steps}, converged={self.converged}, averaged={self.averaged}, "
            f"elbo={tail.mean():.6g} (mean of last {len(tail)}), elapsed={self.elapsed:.3g}s)"
        )

    def plot(self, ax=None, path: str | os.PathLike | None = None):
        """Draw the ELBO per step and its running mean; save to ``path`` if given. Returns the Axes."""
        if ax is None:
            if path is None:
                import matplotlib.pyplot as plt

                _, ax = plt.subplots()
            else:  # no pyplot: works on any backend and leaves no open figure behind
                from matplotlib.figure import Figure

                ax = Figure().subplots()
        step, elbo = self.history["step"], self.history["elbo"]
        ax.plot(step, elbo, lw=0.5, alpha=0.4, label="ELBO")
        ax.plot(step, elbo.rolling(max(1, len(elbo) // 50), min_periods=1).mean(), label="running mean")
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO")
        ax.legend()
        if path is not None:
            ax.figure.savefig(path)
        return ax
