"""Every use of another library's private internals, each behind one small function.

Nothing else in vi_flows reaches into ``torchdiffeq._impl`` or a tensor's ``_version``: it calls these.
``tests/test_internals.py`` checks each one against the installed library and fails loudly, naming the
function to fix, when a release moves or changes what it relies on.
"""

from __future__ import annotations

from functools import cache

from torch import Tensor

__all__ = ["torchdiffeq_fixed_grid_methods", "torchdiffeq_methods", "version_counter"]


@cache
def _torchdiffeq_solvers() -> dict[str, type]:
    # torchdiffeq has no public list of its methods: odeint checks a name against this private dict
    # (torchdiffeq 0.2.x: torchdiffeq/_impl/odeint.py, SOLVERS).
    from torchdiffeq._impl.odeint import SOLVERS

    return dict(SOLVERS)


@cache
def torchdiffeq_methods() -> tuple[str, ...]:
    """The names ``torchdiffeq.odeint(method=...)`` accepts, in torchdiffeq's order."""
    return tuple(_torchdiffeq_solvers())


@cache
def torchdiffeq_fixed_grid_methods() -> frozenset[str]:
    """The torchdiffeq methods that take fixed steps (``options={"step_size": ...}``), not adaptive ones."""
    # No public flag either: the fixed-step solvers subclass this private base (torchdiffeq/_impl/solvers.py).
    from torchdiffeq._impl.solvers import FixedGridODESolver

    return frozenset(name for name, cls in _torchdiffeq_solvers().items() if issubclass(cls, FixedGridODESolver))


def version_counter(t: Tensor) -> int:
    """``t``'s in-place version counter: it grows whenever ``t`` is modified in place (an optimizer step).

    ``Tensor._version`` is the counter autograd itself uses to detect in-place changes of saved tensors;
    torch has no public accessor for it.
    """
    return t._version
