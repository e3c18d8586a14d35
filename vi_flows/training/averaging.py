"""Tail averaging, ``fit(tail_average=True)``: a converged fit ends at the mean of the iterates the rule judged flat.

Adam at a fixed step size leaves the parameters wandering around the optimum by about ``lr`` per
step. A wander that costs less than the stopping rule's 0.1 nat is invisible in the ELBO, but not
in the posterior's means: a flow 0.15–0.3 posterior sds off in one direction loses only
0.01–0.05 nat. The mean of the iterates over the steps the rule fitted its trend to (the last
``TREND_WINDOWS · window``) lies at the centre of the wander (Polyak & Juditsky, "Acceleration of
stochastic approximation by averaging", SIAM J. Control Optim. 1992; Ruppert 1988).

On by default, with the guides' heavy tails (``AutoFlow(tails=True)``). Alone, the averaged flow sits
at the KL optimum, a little too narrow in the tails, and PSIS k̂ rises (``AutoPlanar``: k̂ < 0.7 on 6 of
10 posteriordb posteriors instead of 9); with the tails layer every family is accurate on 10 of 10 with
k̂ < 0.7 on 9–10 (docs/benchmarks.md, posteriordb). ``fit(tail_average=False)`` keeps the last iterate.

Sums are kept per window, so the memory is ``TREND_WINDOWS + 1`` copies of the parameters and
the cost one in-place add per parameter and step; they travel in the checkpoint, so a resumed run
averages exactly as the uninterrupted one. Not ``torch.optim.swa_utils.AveragedModel``: that averages
one module's copy from a chosen step on, where this is a sliding window over Pyro's param store.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .stopping import TREND_WINDOWS

__all__ = ["TailAverage"]


class TailAverage:
    """Sums of the parameters per ``window`` steps (windows end at multiples of ``window``), the last ``windows`` kept.

    ``update`` after every step with the parameters the optimizer moves (unconstrained, by name);
    ``apply`` sets them to the mean over the kept windows once all of them are complete.
    """

    def __init__(self, window: int, windows: int = TREND_WINDOWS):
        self.window = window
        self.names: list[str] = []
        self.done: deque[list[Tensor]] = deque(maxlen=windows)
        self.current: list[Tensor] = []

    def update(self, step: int, params: dict[str, Tensor]) -> None:
        """Add the values after ``step``; a new parameter (created late) starts the averaging over."""
        if sorted(params) != self.names:
            self.names = sorted(params)
            self.done.clear()
            self.current = [torch.zeros_like(params[n]) for n in self.names]
        with torch.no_grad():
            for total, name in zip(self.current, self.names):
                total.add_(params[name])
        if step % self.window == 0:
            self.done.append(self.current)
            self.current = [torch.zeros_like(s) for s in self.current]

    @property
    def complete(self) -> bool:
        """Whether every kept window is complete."""
        return len(self.done) == self.done.maxlen

    def apply(self, params: dict[str, Tensor]) -> bool:
        """Set ``params`` in place to their mean over the kept windows; False (nothing done) until those are full."""
        if not self.complete or sorted(params) != self.names:
            return False
        count = self.window * len(self.done)
        with torch.no_grad():
            for k, name in enumerate(self.names):
                params[name].copy_(sum(window[k] for window in self.done) / count)
        return True

    def state(self) -> dict:
        """Tensors and plain data, for the checkpoint."""
        return {"window": self.window, "names": self.names, "done": list(self.done), "current": self.current}

    def load(self, state: dict, params: dict[str, Tensor]) -> None:
        """Continue from :meth:`state` (a checkpoint's, read on the CPU), on the devices of ``params``."""
        if state["window"] != self.window:
            raise CheckpointError(
                f"resume: the checkpoint's fit averaged over windows of {state['window']} steps; pass "
                f"window={state['window']} (got {self.window})"
            )
        self.names = list(state["names"])
        devices = [params[n].device if n in params else "cpu" for n in self.names]
        self.done = deque([[s.to(d) for s, d in zip(w, devices)] for w in state["done"]], maxlen=self.done.maxlen)
        self.current = [s.to(d) for s, d in zip(state["current"], devices)]
