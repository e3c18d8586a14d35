"""A training loop around Pyro's SVI: progress, early stopping, NaN guard, exact checkpoints, data parallelism.

:func:`fit` checks its keywords (:mod:`.options`), builds a step object
(:mod:`.steps`: one process, or one rank of a data-parallel fit) and runs one loop
over it (:mod:`.loop`). The pieces, each in its own module: minibatches
(:mod:`.batches`), the stopping rule (:mod:`.stopping`), the NaN guard
(:mod:`.guard`), checkpoints and random streams (:mod:`.checkpoint`), Ctrl-C
(:mod:`.interrupt`) and the annealed target (:mod:`.anneal`).

Every name that ``vi_flows.training`` held as one module is re-exported here.
"""

# ruff: noqa: F401

from .anneal import Tempered, anneal_beta
from .api import Callback, fit
from .batches import _Batches, _minibatches, _takes_keyword, _to_device
from .checkpoint import (
    _FORMAT,
    CheckpointError,
    _checkpoint_state,
    _get_rng_state,
    _load_checkpoint,
    _load_params,
    _save_atomic,
    _set_rng_state,
    _unreadable,
)
from .guard import _bad_sites, _grad_norm, _guard
from .interrupt import _DeferredInterrupt
from .options import (
    DEFAULT_LR_DECAY,
    _check_args,
    _check_device,
    _check_positive_int,
    _current_lr,
    _is_real,
    _make_loss,
    _make_optim,
)
from .result import _COLUMNS, FitResult
from .steps import _apply_step, _create_params, _svi_step, _traced_params
from .stopping import make_rule

__all__ = ["CheckpointError", "FitResult", "Tempered", "anneal_beta", "fit"]
