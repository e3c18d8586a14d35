"""Data-parallel SVI on ``torch.distributed``, as launched by ``torchrun``.

Every rank runs the same model and guide on its own minibatch and random
draws; after each backward the gradients are averaged across ranks,

    ḡ = (1/R) Σ_r ∇ loss_r,

so the update is that of one process whose minibatch is the union of the
ranks' (each ``loss_r`` is an unbiased estimate of the full-data loss), and
all ranks keep identical parameters. One all-reduce per step carries every
gradient, the loss and two flags (failed, interrupted), so a failing rank
is reported on every rank instead of leaving the others blocked in a
collective; the collectives' timeout bounds the wait for a rank that hangs.
See ``docs/scaling.md``.

Gradients are reduced by hand rather than by ``DistributedDataParallel``:
Pyro keeps parameters in its param store, created lazily by the model and
guide, not in one ``nn.Module`` whose forward computes the loss, and the
flat buffer costs one collective per step, as DDP's buckets do for models
this size.
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "Context",
    "GradientSync",
    "RankError",
    "SlowSyncWarning",
    "SyncTiming",
    "bind_to_cpus",
    "init",
    "is_main",
    "launched",
    "relaunch",
    "resolve",
    "sync_verdict",
]

#: torchrun's variables that describe the process group (read by ``init_method="env://"``).
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 300.0


class RankError(RuntimeError):
    """Raised on every rank but the failing one, with the failing rank's message."""


@dataclass(frozen=True)
class Context:
    """This process's place in the group: ``rank`` of ``world_size``; ``device`` its data and parameters live on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device | None

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- collectives used outside the step: rare, pickled ------------------------------------------------------------

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        return box[0]

    def gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Whether each flag is set on any rank (one small all-reduce)."""
        t = torch.tensor(flags, dtype=torch.int32, device=self._object_device)
        dist.all_reduce(t)
        return tuple(bool(v) for v in t.tolist())

    def agree(self, error: BaseException | None, where: str, payload=None) -> list:
        """Exchange ``(error message, payload)``; raise on every rank if any rank failed. Returns all payloads.

        The failing rank (the lowest one, if several) re-raises its own exception;
        the others raise :class:`RankError` with its message.
        """
        message = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self.gather_object((message, payload))
        failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
        if failed:
            rank, first = failed[0]
            if rank == self.rank:
                raise error
            raise RankError(f"rank {rank} of {self.world_size} failed {where}: {first}") from error
        return [p for _, p in gathered]

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    @property
    def _object_device(self):
        return self.device if self.device is not None and self.device.type == "cuda" else None


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets its variables)."""
    return all(v in os.environ for v in ENV_VARS)


def relaunch(nproc: int, target: list[str], argv: list[str], quiet: tuple[int, ...] = (1, 2)) -> int:
    """Start ``nproc`` copies of ``target + argv`` under torchrun's engine (``--standalone``); return the exit code.

    ``target`` is ``["--module", "pkg"]`` or ``[script_path]``. The copies find torchrun's
    variables, so :func:`launched` is true there and :func:`vi_flows.fit` joins the group. A
    ``--nproc N`` in ``argv`` is dropped: torchrun would read it as its own ``--nproc-per-node``.

    Returns 0; the first failing rank's exit code (``128 + N`` for one killed by signal ``N``),
    with one line on stderr unless the code is in ``quiet`` (codes whose rank has said why); or
    ``128 + N`` when this launcher got signal ``N`` (130: Ctrl-C). The copies run in sessions of
    their own, so a Ctrl-C reaches only the launcher: torchrun forwards the signal and waits for
    them, which lets :func:`vi_flows.fit` finish its step and write its checkpoint. torchrun's own
    warnings (its OMP_NUM_THREADS banner, "Sending process ... closing signal") are silenced.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    child, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc="):
            skip = False
        elif a == "--nproc":
            skip = True
        else:
            child.append(a)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner saying so
    _quiet_torchrun_logs()
    try:
        torchrun.main(["--standalone", f"--nproc_per_node={nproc}", *target, *child])
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if code not in quiet:
            how = f"exited with code {code}" if failure.exitcode > 0 else f"was killed by {failure.signal_name()}"
            print(f"rank {rank} of {nproc} {how}", file=sys.stderr)
        return code
    return 0


def _quiet_torchrun_logs() -> None:
    """Show only errors from torchrun's loggers (each has its own level, set from ``LOGLEVEL`` at import)."""
    import logging

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)


def resolve(distributed: bool | None) -> bool:
    """``None``: on under torchrun or inside an initialized process group; ``True``: required; ``False``: off."""
    if distributed is None:
        return (dist.is_available() and dist.is_initialized()) or launched()
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or None (auto), got {distributed!r}")
    if distributed and not ((dist.is_available() and dist.is_initialized()) or launched()):
        missing = [v for v in ENV_VARS if v not in os.environ]
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group or torchrun's environment; "
            f"missing {', '.join(missing)} (launch with `torchrun --nproc_per_node N script.py`)"
        )
    return distributed


def init(
    device: torch.device | None = None, timeout: float = DEFAULT_TIMEOUT, bind_cpus: bool | None = None
) -> Context:
    """Join the process group torchrun describes, initializing it if the caller has not.

    Backend gloo for CPU, NCCL when ``device`` is CUDA, which then becomes
    ``cuda:LOCAL_RANK`` (one device per local rank). ``timeout`` (seconds)
    bounds every collective, so a rank that stops answering ends the others
    with an error instead of a hang. ``bind_cpus`` (CPU only; default: off
    unless ``VI_FLOWS_BIND_CPUS=1``) gives each local rank its own share of
    the cores, see :func:`bind_to_cpus`; it is off by default because two
    jobs on one machine would both pin their rank 0 to the first cores.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        device = torch.device("cuda", local_rank if torch.device(device).index is None else torch.device(device).index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not cuda and (bind_cpus if bind_cpus is not None else os.environ.get("VI_FLOWS_BIND_CPUS", "0") == "1"):
            bind_to_cpus()
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_destroy)
    if dist.get_backend() == "nccl" and not cuda:
        raise ValueError(f"the process group uses NCCL, which needs device='cuda'; got device={device!r}")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def bind_to_cpus() -> list[int] | None:
    """Pin this process to local rank ``LOCAL_RANK``'s contiguous share of the CPUs it may use; return them.

    With one core per rank, an unpinned rank's gloo threads wake on whichever
    core is free and every all-reduce waits for the scheduler (pinned against
    unpinned: ``docs/benchmarks.md``, scaling). Does nothing (returns None) where the OS has no affinity
    call or there are fewer CPUs than local ranks. Caps torch's intra-op
    threads at the share's size.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not hasattr(os, "sched_setaffinity") or local_world < 2:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // local_world
    if share < 1:
        return None
    mine = cpus[local_rank * share : (local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(min(torch.get_num_threads(), share))
    return mine


def _destroy() -> None:
    if dist.is_initialized():
        try:
            # Let every rank finish its last collective before any rank tears the group down; a rank
            # leaving early once aborted its peer at exit ("terminate called without an active exception").
            dist.barrier()
        except Exception:  # a peer already failed: nothing left to wait for
            pass
        dist.destroy_process_group()


def is_main() -> bool:
    """True in rank 0 of an initialized group, or outside any group: guard a script's own outputs with it."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class GradientSync:
    """Average ``params``' gradients across ranks in one all-reduce, with the loss and the flags riding along.

    The loss travels as two numbers of the buffer's dtype, ``hi = float(loss)``
    rounded and ``lo = loss − hi``, so the global mean keeps float64 accuracy
    in a float32 buffer.
    """

    def __init__(self, ctx: Context, params: list[torch.Tensor]):
        self.ctx, self.params = ctx, params
        self._ids = {id(p) for p in params}
        self.dtype = params[0].dtype if params else torch.get_default_dtype()
        for p in params[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self.device = params[0].device if params else (ctx.device or torch.device("cpu"))
        self.numel = sum(p.numel() for p in params)
        self.timing = SyncTiming(ctx.main, ctx.world_size)

    def unknown(self, params) -> list[torch.Tensor]:
        """Parameters of this step that were not there when the sync was set up."""
        return [p for p in params if id(p) not in self._ids]

    def __call__(self, loss: float, failed: bool = False, interrupt: bool = False):
        """Average gradients in place. Returns (mean loss, any rank failed, any rank interrupted)."""
        parts = [p.grad.reshape(-1).to(self.dtype) if p.grad is not None else p.new_zeros(p.numel(), dtype=self.dtype)
                 for p in self.params]  # fmt: skip
        hi = torch.tensor(loss, dtype=self.dtype).item()
        tail = torch.tensor([hi, loss - hi, failed, interrupt], dtype=self.dtype, device=self.device)
        buffer = torch.cat([*parts, tail])
        dist.all_reduce(buffer)
        buffer /= self.ctx.world_size
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.grad = buffer[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
        hi, lo, *flags = buffer[offset:].tolist()
        return (hi + lo, *(f > 0 for f in flags))


# ---- is data parallelism paying off? ---------------------------------------------------------------------------------


class SlowSyncWarning(UserWarning):
    """A data-parallel fit whose steps spend so long synchronizing that one process would be faster."""


def sync_verdict(sync_s: float, step_s: float, world_size: int) -> str | None:
    """The warning for steps of ``step_s`` seconds of which the all-reduce took ``sync_s``, or None if they pay off.

    With ``R`` ranks each computing its share in ``c = step − sync``, one process
    computes the whole global batch in at most ``R·c`` (a step's cost grows at
    most linearly with its batch, less where per-step overhead dominates), so it
    is faster whenever ``sync ≥ (R − 1)·c``: for two ranks, once synchronizing
    takes half the step.
    """
    compute = max(step_s - sync_s, 0.0)
    if world_size < 2 or sync_s < (world_size - 1) * compute:
        return None
    return (
        f"data-parallel fit on {world_size} processes: sync takes {1e3 * sync_s:.2f} ms of {1e3 * step_s:.2f} ms "
        f"per step (all-reduce and waiting for the slowest rank; medians of early steps); one process would be "
        f"faster: it computes all {world_size} ranks' batches in at most {1e3 * world_size * compute:.2f} ms "
        "(or give each process a larger batch)"
    )


@dataclass
class SyncTiming:
    """Times of this rank's steps ``first``..``last`` (counted from the start of the fit): all-reduce against step.

    After step ``last``, rank 0 warns once (:class:`SlowSyncWarning`, see
    :func:`sync_verdict`) when the median all-reduce makes data parallelism a
    loss: on a step of a small model the collective's fixed latency can cost
    more than the compute it shares (``docs/benchmarks.md``, scaling). The first steps are left out
    (warm-up: allocations, lazy initialization).
    """

    main: bool
    world_size: int
    first: int = 5
    last: int = 25
    steps: int = 0
    syncs: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)

    def add(self, sync_s: float, step_s: float) -> None:
        """Record one step: ``sync_s`` seconds in the all-reduce of ``step_s`` in all."""
        self.steps += 1
        if not self.main or not self.first <= self.steps <= self.last:
            return
        self.syncs.append(sync_s)
        self.totals.append(step_s)
        if self.steps == self.last:
            message = sync_verdict(statistics.median(self.syncs), statistics.median(self.totals), self.world_size)
            if message is not None:
                warnings.warn(message, SlowSyncWarning, stacklevel=2)
