"""Pareto k̂ thresholds: the one place every reading, warning, refusal and count of the diagnostics takes them from.

PSIS fits a generalized Pareto distribution to the largest importance weights ``w_s = p(x, z_s) / q(z_s)``;
its shape ``k̂`` says how heavy their tail is, hence whether importance-sampling estimates from ``q`` are
reliable. Below :data:`KHAT_GOOD` ``q`` is close to the posterior (Yao et al. 2018); above
``khat_threshold(S) = min(1 - 1/log10(S), KHAT_OK)`` the estimates from ``S`` draws are unreliable and no
reweighting repairs them (Vehtari et al. 2024, §3.2.4). The readings (``"good"``, ``"ok"``, ``"bad"``,
``"undefined"``) and the text describing them are derived from these constants only, so they cannot drift.

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational inference. ICML.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25(72).
"""

from __future__ import annotations

import math

KHAT_GOOD = 0.5  # below: q is close to the posterior and plain importance sampling is reliable (Yao et al. 2018)
KHAT_OK = 0.7  # above: unreliable at any sample size; PSIS cannot repair the missing mass (Vehtari et al. 2024)


def khat_threshold(num_samples: int) -> float:
    """The k̂ above which PSIS from ``num_samples`` draws is unreliable: ``min(1 - 1/log10(S), KHAT_OK)``.

    With fewer draws the Pareto tail is fitted to fewer points, so the estimate is trustworthy only for a
    lighter tail (Vehtari et al. 2024, §3.2.4, eq. 13; ArviZ's ``good_k``). It reaches :data:`KHAT_OK` at
    :data:`MIN_DRAWS_FOR_KHAT` draws; 100 draws give 0.5, 1000 give 0.67.
    """
    return min(1.0 - 1.0 / math.log10(num_samples), KHAT_OK)


def min_draws_for_khat(khat: float = KHAT_OK) -> float:
    """The fewest draws for which a k̂ of ``khat`` is reliable: ``10^(1 / (1 - max(k̂, 0)))`` (Vehtari et al.
    2024, eq. 11), rounded up; infinite for ``k̂ >= 1``, where no number of draws suffices.

    ``khat`` defaults to :data:`KHAT_OK`: the draws from which the usual upper threshold applies.
    """
    if khat >= 1:
        return math.inf
    return float(math.ceil(10 ** (1.0 / (1.0 - max(khat, 0.0)))))


MIN_DRAWS_FOR_KHAT = int(min_draws_for_khat(KHAT_OK))  # 2155: the draws at which khat_threshold reaches KHAT_OK


def khat_reading(khat: float, num_samples: int) -> str:
    """``"good"`` below :data:`KHAT_GOOD`, ``"bad"`` above ``khat_threshold(num_samples)``, else ``"ok"``."""
    if not math.isfinite(khat):
        return "undefined"
    if khat > khat_threshold(num_samples):
        return "bad"
    return "good" if khat < KHAT_GOOD else "ok"


def _reading_text(reading: str, num_samples: int) -> str:
    """What a reading means, with the thresholds that apply at ``num_samples`` draws."""
    bad = khat_threshold(num_samples)
    at = "" if bad >= KHAT_OK else f" (the threshold for {num_samples} draws; {KHAT_OK} needs {MIN_DRAWS_FOR_KHAT})"
    return {
        "good": f"k < {KHAT_GOOD}: the guide is close to the posterior; importance-sampling estimates are reliable",
        "ok": f"{KHAT_GOOD} <= k <= {bad:.3g}: usable, but use the PSIS-corrected estimates{at}",
        "bad": f"k > {bad:.3g}: unreliable; the guide misses posterior mass and importance sampling cannot repair "
        f"it{at}",
        "undefined": "too few tail draws to fit the Pareto tail; increase num_samples",
    }[reading]


def khat_scale(num_samples: int) -> str:
    """The k̂ scale that applies at ``num_samples`` draws, in words: ``"< 0.5 good, 0.5-0.7 ok, > 0.7 unreliable
    at 4000 draws"``, from :data:`KHAT_GOOD` and :func:`khat_threshold` (so the text cannot drift from the
    readings). Below :data:`MIN_DRAWS_FOR_KHAT` draws the upper end is lower, and under 100 draws the ok band
    is empty."""
    bad = khat_threshold(num_samples)
    good = min(KHAT_GOOD, bad)
    ok = f", {good:.3g}-{bad:.3g} ok" if bad > good else ""
    more = "" if bad >= KHAT_OK else f"; {KHAT_OK} needs {MIN_DRAWS_FOR_KHAT} draws"
    return f"< {good:.3g} good{ok}, > {bad:.3g} unreliable at {num_samples} draws{more}"


_reading, _khat_scale = khat_reading, khat_scale  # the names the package's modules use


# ---- PSIS-corrected estimates and draws are offered only where k̂ says the weights can correct q


def _corrected_valid(khat: float, num_samples: int) -> bool:
    """Whether PSIS-corrected estimates are valid: k̂ defined and reading good or ok (not above
    ``khat_threshold(num_samples)``); the same rule as :func:`_reading`, so verdict and refusal agree."""
    return _reading(khat, num_samples) in ("good", "ok")
