"""What each step of :func:`~vi_flows.fit` passes to the model and guide: fixed arguments, or minibatches.

Minibatches come from any iterable (a ``DataLoader``), cycled epoch after epoch and
drawn outside the global random stream, so the batch of step ``k`` is found again
after a resume.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable

import torch


def _minibatches(model: Callable, batches: Iterable | None, kwargs: dict) -> Iterable | None:
    """``batches``, or ``kwargs["data"]`` popped as its deprecated alias when it cannot be the model's argument.

    ``data=`` was fit's name for the minibatches, which hid the model's own ``data``
    (Pyro's tutorials' ``def model(data)``). It stays the model's whenever the
    model has a parameter of that name or the value is a tensor.
    """
    if "data" not in kwargs or isinstance(kwargs["data"], torch.Tensor) or _takes_keyword(model, "data"):
        return batches
    if batches is not None:
        raise ValueError("batches= and data= were both given; data= is the former name of batches=")
    warnings.warn("fit(data=...) for minibatches is deprecated: pass them as batches=...", FutureWarning, stacklevel=4)
    return kwargs.pop("data")


def _takes_keyword(model: Callable, name: str) -> bool:
    """Whether ``model`` (for a module: its ``forward``) has a parameter ``name`` that a keyword argument can fill."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or a C extension: no signature to read
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)


def _to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (also inside tuples, namedtuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


class _Batches:
    """The steps' arguments from an iterable of minibatches, cycled epoch after epoch.

    Calls ``sampler.set_epoch(epoch)`` before each epoch when ``data`` has
    one (``DistributedSampler`` reshuffles by it). Batches are drawn under
    ``torch.random.fork_rng``: loading leaves the global stream alone, so
    the batch of step ``k`` does not depend on the model's draws, and
    :meth:`seek` finds it again after a resume.
    """

    def __init__(self, data: Iterable, device: torch.device | None):
        self.data, self.device = data, device
        self.epoch, self._it, self._fresh, self._peeked = 0, None, False, None

    def seek(self, done: int) -> None:
        """Position after ``done`` steps."""
        skip = done
        if hasattr(self.data, "__len__") and len(self.data) > 0:
            self.epoch, skip = divmod(done, len(self.data))
        for _ in range(skip):
            self._raw()

    def peek(self, kwargs: dict) -> tuple[tuple, dict]:
        if self._peeked is None:
            self._peeked = self._raw()
        return self._as_args(self._peeked, kwargs)

    def next(self, kwargs: dict) -> tuple[tuple, dict]:
        batch = self._raw() if self._peeked is None else self._peeked
        self._peeked = None
        return self._as_args(batch, kwargs)

    def _raw(self):
        with torch.random.fork_rng(devices=[]):
            while True:
                if self._it is None:
                    sampler = getattr(self.data, "sampler", None)
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(self.epoch)
                    self._it, self._fresh = iter(self.data), True
                try:
                    batch = next(self._it)
                except StopIteration:
                    if self._fresh:
                        raise ValueError(f"batches must yield batches, got none in epoch {self.epoch}") from None
                    self._it, self.epoch = None, self.epoch + 1
                    continue
                self._fresh = False
                return batch

    def _as_args(self, batch, kwargs: dict) -> tuple[tuple, dict]:
        if self.device is not None:
            batch = _to_device(batch, self.device)
        if isinstance(batch, dict):
            return (), {**kwargs, **batch}
        if isinstance(batch, (tuple, list)):
            return tuple(batch), kwargs
        return (batch,), kwargs


class Inputs:
    """The ``(args, kwargs)`` of each step: the same every step, or the next minibatch.

    ``batches`` (e.g. a ``DataLoader``, with a ``DistributedSampler`` when distributed)
    is cycled for as many epochs as the steps need, and excludes positional ``args``.
    Step ``k`` calls ``model(*batch, **kwargs)`` for a tuple or list,
    ``model(**batch, **kwargs)`` for a dict and ``model(batch, **kwargs)`` otherwise, and
    so the guide. The model must scale its likelihood by ``N / len(batch)``, e.g. with
    ``pyro.plate("data", N, subsample=batch_indices)``. ``data=`` in ``kwargs`` is taken
    as the former name of ``batches`` (with a ``FutureWarning``) only when the model has
    no parameter named ``data`` and the value is not a tensor (:func:`_minibatches`).
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict, batches: Iterable | None):
        batches = _minibatches(model, batches, kwargs)
        if batches is not None and (args or not isinstance(batches, Iterable)):
            got = f"{len(args)} positional arguments" if args else type(batches).__name__
            raise ValueError(f"batches must be an iterable of batches and excludes positional arguments, got {got}")
        self.args, self.kwargs, self.batches = args, kwargs, batches

    def to(self, device: torch.device | None) -> Inputs:
        """Move the arguments to ``device`` now, and each batch when it is drawn.

        Autoguides then create their parameters where the model's values live.
        """
        if device is not None:
            self.args, self.kwargs = _to_device(self.args, device), _to_device(self.kwargs, device)
        self.batches = None if self.batches is None else _Batches(self.batches, device)
        return self

    def seek(self, done: int) -> None:
        if self.batches is not None:
            self.batches.seek(done)

    def peek(self) -> tuple[tuple, dict]:
        """The next step's arguments, without using them up."""
        return (self.args, self.kwargs) if self.batches is None else self.batches.peek(self.kwargs)

    def next(self) -> tuple[tuple, dict]:
        return (self.args, self.kwargs) if self.batches is None else self.batches.next(self.kwargs)
