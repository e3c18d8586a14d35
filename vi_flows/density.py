"""Density estimation by maximum likelihood: fit a flow to data.

``log p(x) = log N(f⁻¹(x); 0, I) − log|det J_f(f⁻¹(x))|``, evaluated through
the layers' inverses, so every vi_flows family trains this way, planar and
Sylvester included (their numerical inverses carry implicit-function
gradients). Cheapest per step: layers whose inverse is one pass
(:class:`~vi_flows.transforms.MaskedAutoregressive`,
:class:`~vi_flows.transforms.AffineCoupling`, :class:`~vi_flows.transforms.InvertibleLinear`,
radial).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributions import FlowDistribution, StandardNormal
from .transforms.base import ComposeFlow, FlowTransform

__all__ = ["DensityFit", "FlowDensity", "evaluate_nll", "fit_density"]


class FlowDensity(nn.Module):
    r"""A learnable density on ``R^d``: ``x = f(ε)``, ``ε ~ N(0, I)``, ``f`` a stack of flow layers.

    :param transform: one :class:`~vi_flows.transforms.FlowTransform` or a
        sequence of them (applied in order, noise to data).

    ``log_prob`` works at any point through the inverses; ``distribution()``
    is a Pyro distribution usable in any model, as a likelihood
    (``obs=``, see :meth:`model`) or as a prior.
    """

    def __init__(self, transform: FlowTransform | Sequence[FlowTransform]):
        super().__init__()
        parts = list(transform) if isinstance(transform, (list, tuple)) else [transform]
        if not parts or not all(isinstance(p, FlowTransform) for p in parts):
            raise ValueError(f"transform must be a FlowTransform or a non-empty sequence of them, got {transform!r}")
        self.flow = parts[0] if len(parts) == 1 else ComposeFlow(parts)
        self.dim = self.flow.dim

    def _like(self) -> Tensor:
        return next(iter(self.parameters()), torch.zeros(()))

    def distribution(self) -> FlowDistribution:
        """The density as a :class:`~vi_flows.FlowDistribution` (event shape ``(dim,)``)."""
        like = self._like()
        return FlowDistribution(StandardNormal(self.dim, dtype=like.dtype, device=like.device), self.flow)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``, shape ``x.shape[:-1]``, always recomputed with the current parameters."""
        # A fresh alias: the layers cache their last (x, y) pair by identity, and a training loop that
        # passes the same tensor after an optimizer step must not get the previous step's result.
        return self.distribution().log_prob(x.view_as(x))

    @torch.no_grad()
    def sample(self, sample_shape: Sequence[int] | torch.Size = torch.Size()) -> Tensor:
        return self.distribution().sample(torch.Size(sample_shape))

    def model(self, data: Tensor, batch_size: int | None = None, name: str = "x") -> None:
        """A Pyro model whose only site is the data: SVI with an empty guide is maximum likelihood.

        ``pyro.module`` registers the flow's parameters; ``batch_size``
        subsamples a plate over the rows of ``data`` (the log-likelihood is
        scaled by ``N/batch_size``). The parameters are registered as ``f"{name}_flow"``.
        """
        pyro.module(f"{name}_flow", self)
        with pyro.plate("data", data.shape[0], subsample_size=batch_size) as idx:
            pyro.sample(name, self.distribution(), obs=data[idx])

    def save(self, path: str | os.PathLike) -> None:
        """Pickle the whole module (layers and parameters); reload with :meth:`load`."""
        torch.save(self, path)

    @staticmethod
    def load(path: str | os.PathLike, map_location=None) -> FlowDensity:
        """Load a :class:`FlowDensity` saved by :meth:`save` (a pickle: load only files you trust)."""
        obj = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(obj, FlowDensity):
            raise ValueError(f"path does not hold a FlowDensity, got {type(obj).__name__}")
        return obj


@dataclass(repr=False)
class DensityFit:
    """What :func:`fit_density` returns.

    ``history`` has one row per evaluation: ``step``, ``train_nll`` (mean
    minibatch NLL since the previous evaluation), ``valid_nll`` (held-out
    NLL, nats per example) and ``elapsed`` (seconds, evaluations excluded).
    ``density`` holds the parameters of the best held-out step.
    """

    density: FlowDensity
    history: pd.DataFrame
    best_step: int
    best_valid_nll: float
    stopped_early: bool
    num_steps: int
    elapsed: float

    def __repr__(self) -> str:
        return (
            f"DensityFit(best_step={self.best_step}, best_valid_nll={self.best_valid_nll:.6g}, "
            f"num_steps={self.num_steps}, stopped_early={self.stopped_early}, elapsed={self.elapsed:.3g}s)"
        )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_fit_args(density: FlowDensity, data, num_steps, batch_size, eval_every, patience, lr) -> None:
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[1] != density.dim:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (N, {density.dim}), got {shape}")
    _positive_int("num_steps", num_steps)
    _positive_int("batch_size", batch_size)
    _positive_int("eval_every", eval_every)
    if patience is not None:
        _positive_int("patience", patience)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def _split(density: FlowDensity, data: Tensor, valid_data, valid_fraction, gen) -> tuple[Tensor, Tensor]:
    """(held-out rows, training rows): ``valid_data`` and all of ``data``, or a random ``valid_fraction`` of it."""
    like = density._like()
    if valid_data is not None:
        if not isinstance(valid_data, Tensor) or valid_data.dim() != 2 or valid_data.shape[1] != density.dim:
            raise ValueError(f"valid_data must be a tensor of shape (M, {density.dim})")
        return valid_data.to(dtype=like.dtype, device=like.device), data
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)):
        raise ValueError(f"valid_fraction must be a number in (0, 1), got {valid_fraction!r}")
    n_valid = int(round(valid_fraction * data.shape[0]))
    if not (0 < valid_fraction < 1) or n_valid < 1 or n_valid >= data.shape[0]:
        raise ValueError(
            f"valid_fraction must be in (0, 1) and leave at least one row on each side; got {valid_fraction!r} "
            f"for {data.shape[0]} rows"
        )
    perm = torch.randperm(data.shape[0], generator=gen).to(data.device)
    return data[perm[:n_valid]], data[perm[n_valid:]]


class _Shuffled:
    """Minibatches of ``batch_size`` rows without replacement, reshuffled when fewer than a batch are left."""

    def __init__(self, rows: Tensor, batch_size: int, gen: torch.Generator | None):
        self.rows, self.batch_size, self.gen = rows, min(batch_size, rows.shape[0]), gen
        self.order, self.pos = self._perm(), 0

    def _perm(self) -> Tensor:
        return torch.randperm(self.rows.shape[0], generator=self.gen).to(self.rows.device)

    def next(self) -> Tensor:
        if self.pos + self.batch_size > self.rows.shape[0]:
            self.order, self.pos = self._perm(), 0
        self.pos += self.batch_size
        return self.rows[self.order[self.pos - self.batch_size : self.pos]]


class _Best:
    """The best held-out NLL so far, its step and parameters; stop after ``patience`` evaluations without a better."""

    def __init__(self, density: FlowDensity, patience: int | None):
        self.density, self.patience = density, patience
        self.nll, self.step, self.state = math.inf, 0, copy.deepcopy(density.state_dict())
        self.since, self.stopped = 0, False

    def update(self, nll: float, step: int) -> bool:
        """Record an evaluation; whether to stop."""
        if nll < self.nll:
            self.nll, self.step, self.state, self.since = nll, step, copy.deepcopy(self.density.state_dict()), 0
        else:
            self.since += 1
            self.stopped = self.patience is not None and self.since >= self.patience
        return self.stopped


def fit_density(
    flow: FlowDensity | FlowTransform | Sequence[FlowTransform],
    data: Tensor,
    *,
    num_steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-3,
    valid_fraction: float = 0.1,
    valid_data: Tensor | None = None,
    eval_every: int = 100,
    patience: int | None = 10,
    seed: int | None = None,
    progress: bool = True,
) -> DensityFit:
    """Fit ``flow`` to the rows of ``data`` (shape ``(N, d)``) by maximum likelihood with Adam.

    Each step lowers the minibatch NLL ``−(1/B) Σ_i log p(x_i)``. A random ``valid_fraction``
    of the rows is held out (or ``valid_data`` is used), scored every ``eval_every`` steps;
    training stops once the held-out NLL has not improved for ``patience`` evaluations, and
    the parameters of the best evaluation are restored. Early stopping is on by default:
    flows overfit small data within a few hundred steps, after which the held-out NLL can
    grow without bound. The defaults are the protocol of ``benchmarks/density.py``.

    Args:
        num_steps: Adam steps at most; 3000, the benchmarks' budget.
        batch_size: rows per step (at most ``N``); 256, the benchmarks' batch.
        lr: Adam's learning rate; 1e-3, Adam's default (Kingma & Ba 2015) and the benchmarks'.
        valid_fraction: share of ``data`` held out when ``valid_data`` is None; 0.1, a tenth spared for scoring.
        valid_data: held-out rows ``(M, d)``; then all of ``data`` trains.
        eval_every: steps between held-out scores; 100, the benchmarks' interval.
        patience: evaluations without improvement before stopping; 10; ``None``: run all ``num_steps``.
        seed: seeds the split and the minibatch order (and ``torch.manual_seed``); None: torch's stream.
        progress: a tqdm bar.

    Returns a :class:`DensityFit`.
    """
    density = flow if isinstance(flow, FlowDensity) else FlowDensity(flow)
    _check_fit_args(density, data, num_steps, batch_size, eval_every, patience, lr)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    like = density._like()
    valid_data, train = _split(density, data.to(dtype=like.dtype, device=like.device), valid_data, valid_fraction, gen)
    params = list(density.parameters())
    if not params:
        raise ValueError("flow has no parameters to fit")
    optim = torch.optim.Adam(params, lr=lr)
    rows: list[dict] = []
    best = _Best(density, patience)
    running, count, elapsed = 0.0, 0, 0.0
    bar = tqdm(total=num_steps, disable=not progress, desc="fit_density")
    batches = _Shuffled(train, batch_size, gen)
    for step in range(1, num_steps + 1):
        start = time.perf_counter()
        loss = -density.log_prob(batches.next()).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        running += loss.item()
        count += 1
        elapsed += time.perf_counter() - start
        bar.update(1)
        if step % eval_every == 0 or step == num_steps:
            valid_nll = evaluate_nll(density, valid_data)
            rows.append(dict(step=step, train_nll=running / count, valid_nll=valid_nll, elapsed=elapsed))
            running, count = 0.0, 0
            bar.set_postfix(valid_nll=f"{valid_nll:.4g}")
            if best.update(valid_nll, step):
                break
    bar.close()
    density.load_state_dict(best.state)
    history = pd.DataFrame(rows, columns=["step", "train_nll", "valid_nll", "elapsed"])
    return DensityFit(density, history, best.step, best.nll, best.stopped, step, elapsed)


@torch.no_grad()
def evaluate_nll(density: FlowDensity, data: Tensor, batch_size: int = 4096) -> float:
    """Mean ``−log p(x)`` over the rows of ``data`` (nats per example); ``inf`` if any is not finite."""
    total = 0.0
    for chunk in data.split(batch_size):
        lp = density.log_prob(chunk)
        if not torch.isfinite(lp).all():
            return math.inf
        total += -lp.sum().item()
    return total / data.shape[0]
