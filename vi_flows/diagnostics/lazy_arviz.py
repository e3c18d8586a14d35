"""ArviZ, imported on first use: the diagnostics package is the only part of vi_flows that imports it.

``import arviz`` is slow and announces its 1.x refactor with a ``FutureWarning``, so ``import vi_flows``
does not pay for it; :func:`_az` imports it when a diagnostic first needs it and installs a filter on
ArviZ's logger for a message that is noise for one-chain (one-guide) data.
"""

from __future__ import annotations

import logging
import re
import warnings

# ArviZ logs "Shape validation failed: input_shape: (1, S), minimum_shape: (chains=2, draws=4)" from R-hat,
# which needs two chains, for every variable of a one-chain InferenceData: every single-guide fit. Nothing is
# wrong with the data (one guide is one chain, and the summary's r_hat column shows NaN), so exactly that
# record is dropped; the draws=4 one (too few draws) and every other ArviZ message still show.
_ONE_CHAIN_RHAT = re.compile(
    r"Shape validation failed: input_shape: \(1, (\d+)\), minimum_shape: \(chains=2, draws=(\d+)\)"
)


class _OneChainRhatFilter(logging.Filter):
    """Drops ArviZ's R-hat shape message for one chain with enough draws (see ``_ONE_CHAIN_RHAT``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        m = _ONE_CHAIN_RHAT.match(record.getMessage())
        return not (m and int(m.group(1)) >= int(m.group(2)))


def _az():
    """Import ArviZ on first use (its import is slow and announces its 1.x refactor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    logger = getattr(arviz, "_log", None)  # ArviZ's own Logger instance; not in logging's registry
    if isinstance(logger, logging.Logger) and not any(isinstance(f, _OneChainRhatFilter) for f in logger.filters):
        logger.addFilter(_OneChainRhatFilter())
    return arviz
