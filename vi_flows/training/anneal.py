"""The annealed target of ``fit(anneal=T)``: ``β_t log p(x, z)`` with ``β_t`` rising linearly to 1.

Training on the tempered ELBO ``E_q[β_t log p(x, z) − log q(z)]`` first fits a broad,
flattened target, which lets a flow spread over every mode before the full target
sharpens them (Rezende & Mohamed 2015, §6.1). Every site of the model is scaled
(``poutine.scale``), the guide's ``log q`` is not. ``history["elbo"]`` is the tempered
ELBO while ``history["beta"] < 1``, and the stopping rule waits for ``β = 1``.
"""

from __future__ import annotations

from collections.abc import Callable

from pyro import poutine

__all__ = ["Tempered", "anneal_beta"]

#: ``β`` at step 1: small enough that the first target is nearly flat, non-zero so that it is still ``p``'s shape.
BETA_START = 0.01


def anneal_beta(step: int, anneal: int) -> float:
    """``β`` at 1-based ``step``: ``min(1, 0.01 + (step − 1)/anneal)`` (Rezende & Mohamed 2015, §6.1).

    Constant 1 when ``anneal = 0``.
    """
    return min(1.0, BETA_START + (step - 1) / anneal) if anneal else 1.0


def check_anneal(anneal) -> None:
    """``anneal`` counts steps until ``β = 1``: an integer >= 0 (0: off)."""
    if isinstance(anneal, bool) or not isinstance(anneal, int) or anneal < 0:
        raise ValueError(f"anneal must be an integer >= 0 (steps until beta = 1; 0: off), got {anneal!r}")


class Tempered:
    """``model`` with every site's log-density scaled by ``beta`` (set before each step)."""

    def __init__(self, model: Callable):
        self.model, self.beta = model, 1.0

    def __call__(self, *args, **kwargs):
        with poutine.scale(scale=self.beta):
            return self.model(*args, **kwargs)


class Schedule:
    """The model each step trains on and its ``β``: ``model`` itself when ``anneal = 0``."""

    def __init__(self, model: Callable, anneal: int):
        check_anneal(anneal)
        self.anneal = anneal
        self.tempered = Tempered(model) if anneal else None
        self.model = self.tempered if anneal else model

    def beta(self, step: int) -> float:
        """Set and return ``β`` of ``step``."""
        beta = anneal_beta(step, self.anneal)
        if self.tempered is not None:
            self.tempered.beta = beta
        return beta
