"""Argument checks shared by the package: each raises a one-line ``ValueError`` that names the argument,
says what it must be with an example of a valid value, and shows what was given.

Every check returns the value in its normal form (``int``, ``float``, a tuple), so a constructor reads
``self.bins = check_int(bins, "bins", minimum=2)``. :func:`discrete_site_advice` is the one message for a
discrete latent site, wherever it is found (guides, diagnostics, the command line).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "ENUMERATION_TUTORIAL",
    "check_activation",
    "check_bool",
    "check_choice",
    "check_continuous_site",
    "check_float",
    "check_hidden_dims",
    "check_int",
    "check_nonneg_int",
    "check_positive_float",
    "check_positive_int",
    "discrete_site_advice",
]

#: Pyro's tutorial on enumerating discrete latent sites, which every discrete-site error points to.
ENUMERATION_TUTORIAL = "https://pyro.ai/examples/enumeration.html"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value: Any, name: str, minimum: int | None = 1, *, example: int | None = None, note: str = "") -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (any integer: ``minimum=None``; ``bool`` is
    not one), else a ``ValueError``.

    ``example`` is the valid value the message suggests (default ``minimum``, or 0); ``note`` explains a
    special value, e.g. ``"0: no context"``.
    """
    if not _is_int(value) or (minimum is not None and value < minimum):
        if example is None:
            example = 0 if minimum is None else minimum
        hint = f"e.g. {name}={example}" + (f"; {note}" if note else "")
        what = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what} ({hint}), got {value!r}")
    return int(value)


def check_positive_int(value: Any, name: str, *, example: int | None = None) -> int:
    """An integer ``>= 1`` (a dimension, a number of layers or of samples)."""
    return check_int(value, name, 1, example=example)


def check_nonneg_int(value: Any, name: str, *, example: int | None = None, note: str = "") -> int:
    """An integer ``>= 0`` (``0`` usually switching something off: say what in ``note``)."""
    return check_int(value, name, 0, example=example, note=note)


def check_float(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    example: float | None = None,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high`` (open ends where asked)."""
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if low == -math.inf and high == math.inf:
            what = "a finite real number"
        else:
            what = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        hint = f" (e.g. {name}={example!r})" if example is not None else ""
        raise ValueError(f"{name} must be {what}{hint}, got {value!r}")
    return float(value)


def check_positive_float(value: Any, name: str, *, example: float = 1.0) -> float:
    """A finite number ``> 0`` (a tolerance, a bound, a time)."""
    if not (_is_real(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number (e.g. {name}={example!r}), got {value!r}")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """Exactly ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, allowed: Iterable[str], name: str) -> str:
    """One of the strings ``allowed``."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_hidden_dims(
    hidden_dims: Any, name: str = "hidden_dims", *, minimum: int = 1, example: tuple | None = None, note: str = ""
) -> tuple[int, ...]:
    """A non-empty sequence of integers ``>= minimum`` (the widths of a network's hidden layers), as a tuple."""
    try:
        hidden = tuple(hidden_dims)
    except TypeError:
        hidden = ()
    if not hidden or not all(_is_int(h) and h >= minimum for h in hidden):
        what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
        example = example or (64, 64)
        hint = f"e.g. {name}={example}" + (f"; {note}" if note else "")
        raise ValueError(f"{name} must be a non-empty sequence of {what} ({hint}), got {hidden_dims!r}")
    return tuple(int(h) for h in hidden)


def check_activation(activation: Any, allowed: Mapping[str, Callable], name: str = "activation") -> Callable:
    """A module factory from a name in ``allowed`` or an ``nn.Module`` class (any callable making a module)."""
    if isinstance(activation, str) and activation in allowed:
        return allowed[activation]
    if callable(activation) and not isinstance(activation, str):
        return activation
    raise ValueError(
        f"{name} must be one of {sorted(allowed)} or an nn.Module class (e.g. {name}='tanh'), got {activation!r}"
    )


def discrete_site_advice(name: str, fn: Any, owner: str | None = None) -> str:
    """The one message for a discrete latent site ``name`` with distribution ``fn``: Pyro's advice (its
    enumeration tutorial, as Pyro's ``AutoContinuous`` gives) and vi_flows' own ways out.

    ``owner`` names what refused the site (a guide class, ``"diagnostics"``), prepended as ``"owner: "``.
    """
    prefix = f"{owner}: " if owner else ""
    return (
        f"{prefix}latent site {name!r} is discrete ({type(fn).__name__}); flows cover continuous latent sites only. "
        "Enumerate it in the model (@config_enumerate or infer={'enumerate': 'parallel'}) and train with "
        f"TraceEnum_ELBO, see {ENUMERATION_TUTORIAL} ; or marginalize it out of the model by hand; or hide it from "
        f"the flow guide (poutine.block(model, hide=[{name!r}])) and guide it separately in an AutoGuideList "
        "(e.g. AutoDiscreteParallel)."
    )


def check_continuous_site(name: str, fn: Any, owner: str | None = None) -> None:
    """A ``ValueError`` with :func:`discrete_site_advice` if latent site ``name`` (distribution ``fn``) is discrete."""
    if fn.support.is_discrete:
        raise ValueError(discrete_site_advice(name, fn, owner))
