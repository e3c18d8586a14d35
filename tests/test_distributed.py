"""Data-parallel fit: two gloo processes on loopback against one process.

Each test starts its ranks with ``multiprocessing`` (spawn), sets torchrun's
variables itself, and reads back what every rank returned or raised; a rank
still running after ``TIMEOUT`` fails the test instead of hanging it.
"""

import os
import signal
import socket
import time
import traceback
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
import torch.multiprocessing as mp
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vi_flows.distributed import RankError, SlowSyncWarning, SyncTiming, is_main, sync_verdict
from vi_flows.training import fit

TIMEOUT = 120.0  # seconds for the whole two-process session: a guard against a hang, with room for a busy machine
N, D = 2000, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out, world_size: int = 2) -> dict:
    """Run every scenario in ``world_size`` gloo processes; return ``{name: [each rank's outcome or None]}``."""
    port = free_port()
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_entry, args=(r, world_size, port, str(out))) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {TIMEOUT} s"
    outcomes = {}
    for name in SCENARIOS:
        paths = [os.path.join(out, f"{name}.rank{r}.pt") for r in range(world_size)]
        outcomes[name] = [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]
    return outcomes


def _entry(rank, world_size, port, out):
    """One rank: each scenario in turn, its outcome saved as soon as it is known (a later one may kill the process)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    for name, worker in SCENARIOS.items():
        pyro.clear_param_store()
        t0 = time.monotonic()
        try:
            outcome = {"value": worker(rank, out)}
        except Exception as e:
            outcome = {"error": e, "traceback": traceback.format_exc()}
        torch.save(outcome | {"seconds": time.monotonic() - t0}, os.path.join(out, f"{name}.rank{rank}.pt"))


def problem(seed=0):
    """Logistic regression data: N rows, D features, known weights."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return X, torch.bernoulli(torch.sigmoid(X @ w), generator=g)


def params():
    return {name: pyro.param(name).detach().clone() for name in pyro.get_param_store().keys()}


# ---- one step on a split batch ---------------------------------------------------------------------------------------


def indexed_logistic(idx, X, y):
    """Rows ``idx`` of N: the plate scales their likelihood by N / len(idx). ``b`` is a model parameter."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    b = pyro.param("b", torch.tensor(0.3))
    with pyro.plate("data", N, subsample=idx):
        pyro.sample("obs", dist.Bernoulli(logits=X @ w + b), obs=y)


def one_sgd_step(batches, distributed):
    guide = AutoDelta(indexed_logistic, init_loc_fn=init_to_value(values={"w": torch.tensor([0.2, 0.1, -0.3])}))
    result = fit(indexed_logistic, guide, batches=batches, num_steps=1, optim=pyro.optim.SGD({"lr": 1e-4}), tol=None,
                 progress=False, distributed=distributed)  # fmt: skip
    return params(), result.history["elbo"].item()


def fixed_batch():
    return torch.randperm(N, generator=torch.Generator().manual_seed(1))[:64]


def _split_step_worker(rank, out):
    X, y = problem()
    mine = fixed_batch()[rank::2]
    return one_sgd_step([(mine, X[mine], y[mine])], distributed=True)


def test_one_step_on_a_split_batch_equals_one_process_on_the_whole(session, float64):
    idx = fixed_batch()
    X, y = problem()
    expected, elbo = one_sgd_step([(idx, X[idx], y[idx])], distributed=False)
    start = {"AutoDelta.w": torch.tensor([0.2, 0.1, -0.3]), "b": torch.tensor(0.3)}
    for got, got_elbo in values(session, "split"):
        assert got.keys() == expected.keys() == start.keys()
        for name in expected:
            # SGD moves by lr · gradient, so equal updates mean equal averaged gradients, model parameter b included.
            assert (expected[name] - start[name]).abs().min() > 1e-6, name  # the step moved every coordinate
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14)
        assert got_elbo == pytest.approx(elbo, rel=1e-12)  # the global mean ELBO is the whole batch's


# ---- a subsampled fit ------------------------------------------------------------------------------------------------


def subsampled_logistic(X, y, batch):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with pyro.plate("data", len(X), subsample_size=batch) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=(X[idx] * w).sum(-1)), obs=y[idx])  # vectorized particles


# 8 vectorized particles and 200 rows a rank: little gradient noise for the cost (a step is mostly Python overhead).
FIT = dict(num_steps=600, lr=0.05, lr_decay=0.01, num_particles=8, tol=None, progress=False, seed=0)


def _posterior_worker(rank, out):
    X, y = problem()
    result = fit(subsampled_logistic, AutoNormal(subsampled_logistic), X, y, 200, **FIT)
    return params(), result.history["elbo"].tolist(), is_main()


def test_two_processes_reach_the_posterior_of_one_with_twice_the_batch(session, float64):
    (p0, elbo0, main0), (p1, elbo1, main1) = values(session, "posterior")
    assert (main0, main1) == (True, False)
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name  # identical on every rank, bit for bit
    assert elbo0 == elbo1  # the global mean ELBO

    X, y = problem()
    fit(subsampled_logistic, AutoNormal(subsampled_logistic), X, y, 400, distributed=False, **FIT)
    one = params()
    sd = one["AutoNormal.scales.w"]
    # The mean-field posterior sds are 0.06-0.09 (Laplace). One-process fits with seeds 0-3 ended with means spread over
    # 0.4 sd and sds over 11 % (the optimizer's noise at the final lr). 0.75 sd and 15 % leave room for two such draws
    # and still catch a plate scaled by the global instead of the local batch (sds √2 off).
    assert ((p0["AutoNormal.locs.w"] - one["AutoNormal.locs.w"]).abs() < 0.75 * sd).all()
    torch.testing.assert_close(p0["AutoNormal.scales.w"], sd, rtol=0.15, atol=0.0)


# ---- resume after a restart of every rank ----------------------------------------------------------------------------


def _resume_worker(rank, out):
    ckpt = os.path.join(out, "ckpt.pt")
    X, y = problem()
    idx = torch.arange(200)
    dataset = TensorDataset(idx, X[:200], y[:200])

    def run(**kw):
        pyro.clear_param_store()
        sampler = DistributedSampler(dataset, shuffle=True, seed=5)  # 100 rows a rank, 4 batches of 25 an epoch
        loader = DataLoader(dataset, batch_size=25, sampler=sampler)
        # lr_decay=None: the default decay is tied to num_steps, and this run extends a 10-step run to 20 steps
        result = fit(sub200, AutoNormal(sub200), batches=loader, seed=2, lr=0.05, tol=None, lr_decay=None,
                     progress=False, **kw)  # fmt: skip
        return params(), result.history.drop(columns="elapsed")

    full, full_history = run(num_steps=20)
    run(num_steps=10, checkpoint=ckpt, checkpoint_every=3)  # stops mid-epoch: step 10 is batch 3 of epoch 3
    pyro.set_rng_seed(99 + rank)  # whatever the RNGs hold now, resume restores them
    resumed, resumed_history = run(num_steps=20, resume=ckpt)
    return full, resumed, full_history.equals(resumed_history)


def sub200(idx, X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with pyro.plate("data", 200, subsample=idx):
        pyro.sample("obs", dist.Bernoulli(logits=X @ w), obs=y)


def test_resume_reproduces_the_uninterrupted_distributed_run(session):
    for full, resumed, same_history in values(session, "resume"):
        assert same_history
        for name in full:
            assert torch.equal(full[name], resumed[name]), name
    state = torch.load(session["dir"] / "ckpt.pt", weights_only=True)
    assert state["step"] == 10 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # seed + rank


# ---- Ctrl-C on one rank, then resume ---------------------------------------------------------------------------------


def _interrupt_worker(rank, out):
    """Uninterrupted: 20 steps. Interrupted: rank 1 gets a SIGINT at step 7 (Ctrl-C); then resumed to step 20.

    A shell that starts the tests in the background hands its children SIGINT ignored; a terminal's Ctrl-C
    reaches Python's default handler, so that is the one restored here.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ckpt = os.path.join(out, "interrupted.pt")
    X, y = problem()
    seen = []

    def run(**kw):
        pyro.clear_param_store()
        result = fit(subsampled_logistic, AutoNormal(subsampled_logistic), X, y, 20, num_steps=20, seed=3, lr=0.05,
                     tol=None, progress=False, **kw)  # fmt: skip
        return params(), result.history.drop(columns="elapsed")

    def ctrl_c(step, elbo, guide):
        seen.append(step)
        if rank == 1 and step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # fit defers it to the end of a step every rank agrees on

    full, full_history = run()
    try:
        run(checkpoint=ckpt, callbacks=[ctrl_c])
        stopped = None
    except KeyboardInterrupt:
        stopped = seen[-1]
    pyro.set_rng_seed(99 + rank)  # whatever the RNGs hold now, resume restores them
    resumed, resumed_history = run(resume=ckpt)
    return full, resumed, full_history.equals(resumed_history), stopped


def test_ctrl_c_on_one_rank_then_resume_reproduces_the_uninterrupted_run(session):
    """The ranks agree on the interrupt in the next step's all-reduce and all complete that step before stopping.

    They used to discard it, after its draws: the checkpoint then held step 7 with the random streams of step 8,
    and the resumed run diverged from its first step.
    """
    for full, resumed, same_history, stopped in values(session, "interrupt"):
        assert stopped == 8  # the step in which the interrupt was agreed, completed on both ranks
        assert same_history
        for name in full:
            assert torch.equal(full[name], resumed[name]), name
    state = torch.load(session["dir"] / "interrupted.pt", weights_only=True)
    assert state["step"] == 8 and len(state["rng_ranks"]) == 2


# ---- is synchronization eating the steps? ---------------------------------------------------------------------------


def _sync_worker(rank, out):
    """30 steps of a one-latent model, where sleeping ranks take 20 ms to compute a step; the SlowSyncWarnings."""

    def run(sleepers):
        def model():
            if rank in sleepers:
                time.sleep(0.02)
            pyro.sample("z", dist.Normal(0.0, 1.0))

        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, AutoNormal(model), num_steps=30, tol=None, progress=False, seed=0)
        return [str(w.message) for w in caught if issubclass(w.category, SlowSyncWarning)]

    # Rank 1 slow: rank 0 computes in ~1 ms and waits ~20 ms in the all-reduce. Both slow: both compute, little wait.
    return run({1}), run({0, 1})


def test_rank_0_warns_once_when_synchronization_dominates_the_steps(session):
    (waiting0, busy0), (waiting1, busy1) = values(session, "sync")
    assert len(waiting0) == 1, waiting0
    assert "sync takes" in waiting0[0] and "one process would be faster" in waiting0[0]
    assert waiting1 == [] and busy1 == []  # only rank 0 warns
    assert busy0 == []


def test_sync_verdict_weighs_the_all_reduce_against_the_compute_it_shares():
    assert sync_verdict(0.003, 0.004, 2) is not None  # 3 ms of sync beside 1 ms of compute
    assert sync_verdict(0.0004, 0.010, 2) is None
    assert sync_verdict(0.005, 0.010, 2) is not None  # half: one process computes both batches in 10 ms
    assert sync_verdict(0.005, 0.010, 4) is None  # four ranks share more: one process would need 20 ms
    assert "sync takes 3.00 ms of 4.00 ms per step" in sync_verdict(0.003, 0.004, 2)


def test_sync_timing_looks_at_steps_5_to_25_and_warns_once():
    timing = SyncTiming(main=True, world_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 60):
            timing.add(0.004 if step >= 5 else 0.0, 0.005)
    assert len(caught) == 1 and issubclass(caught[0].category, SlowSyncWarning)
    assert len(timing.syncs) == 21
    quiet = SyncTiming(main=False, world_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            quiet.add(0.004, 0.005)
    assert caught == []


# ---- failures ----------------------------------------------------------------------------------------------------


def _failing_worker(rank, how):
    X, y = problem()
    steps = {"n": 0}

    def model(X, y, batch):
        steps["n"] += 1
        if rank == 1 and steps["n"] == 4:  # call 1 creates the parameters, so this is step 3
            if how == "exit":
                os._exit(3)
            raise ValueError("boom from rank 1")
        subsampled_logistic(X, y, batch)

    fit(model, AutoNormal(subsampled_logistic), X, y, 20, num_steps=50, progress=False, seed=0)


# The collectives' timeout is 300 s: ending in well under that means no rank waited on the failed one.
PROMPT = 20.0


def test_a_rank_that_raises_ends_every_rank_with_its_message(session):
    rank0, rank1 = session["raise"]
    assert isinstance(rank1["error"], ValueError) and str(rank1["error"]).startswith("boom from rank 1")
    assert isinstance(rank0["error"], RankError)
    assert "rank 1 of 2 failed at step 3: ValueError: boom from rank 1" in str(rank0["error"])
    assert rank0["seconds"] < PROMPT and rank1["seconds"] < PROMPT


def test_a_rank_that_dies_ends_the_others_promptly(session):
    rank0, rank1 = session["exit"]
    assert rank1 is None  # died without a word
    assert isinstance(rank0["error"], RuntimeError)  # gloo's: the peer closed the connection
    assert rank0["seconds"] < PROMPT


# ---- one group of two processes runs all the scenarios above, in this order: starting one costs seconds -------------


def _raise_worker(rank, out):
    return _failing_worker(rank, "raise")


def _exit_worker(rank, out):
    return _failing_worker(rank, "exit")


SCENARIOS = {"split": _split_step_worker, "posterior": _posterior_worker, "resume": _resume_worker,
             "interrupt": _interrupt_worker, "sync": _sync_worker, "raise": _raise_worker,
             "exit": _exit_worker}  # fmt: skip


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    return {"dir": out} | run_ranks(out)


def values(session, name) -> list:
    for outcome in session[name]:
        assert "error" not in outcome, outcome.get("traceback")
    return [o["value"] for o in session[name]]


# ---- one process: the batches= path and the switches --------------------------------------------------------------


class Epochs:
    """Three one-row batches a pass; records the epochs its sampler is set to."""

    def __init__(self):
        self.sampler = self
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return 3

    def __iter__(self):
        return iter([(torch.tensor([i]), torch.tensor([float(i)])) for i in range(3)])


def test_data_batches_cycle_through_epochs():
    seen = []

    def model(idx, x):
        seen.append(int(idx))
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3, subsample=idx):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    data = Epochs()
    result = fit(model, AutoNormal(model), batches=data, num_steps=7, tol=None, progress=False)
    assert result.num_steps == 7
    assert seen[-7:] == [0, 1, 2, 0, 1, 2, 0]  # before these, the guide's prototype trace saw batch 0
    assert data.epochs == [0, 1, 2]


def test_data_excludes_positional_arguments():
    with pytest.raises(ValueError, match="batches must be an iterable of batches.*1 positional"):
        fit(subsampled_logistic, AutoNormal(subsampled_logistic), torch.zeros(3), batches=[()], progress=False)


def test_distributed_true_needs_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert is_main()
    with pytest.raises(ValueError, match="distributed=True needs .* missing RANK, WORLD_SIZE"):
        fit(subsampled_logistic, AutoNormal(subsampled_logistic), batches=[()], distributed=True, progress=False)
    with pytest.raises(ValueError, match="distributed must be True, False or None"):
        fit(subsampled_logistic, AutoNormal(subsampled_logistic), batches=[()], distributed="yes", progress=False)


# ---- pinning ranks to cores ------------------------------------------------------------------------------------------

BIND = "import json, os, torch; from vi_flows.distributed import bind_to_cpus; mine = bind_to_cpus(); " \
       "print(json.dumps([mine, sorted(os.sched_getaffinity(0)), torch.get_num_threads()]))"  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity call on this OS")
@pytest.mark.parametrize("local_world", [1, 2, 10_000])
def test_bind_to_cpus_gives_each_local_rank_its_share(local_world):
    import json
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // local_world
    rank = local_world - 1 if share else 0
    env = os.environ | {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(local_world)}
    out = subprocess.run([sys.executable, "-c", BIND], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mine, affinity, threads = json.loads(out.stdout.strip().splitlines()[-1])
    if local_world == 1 or share == 0:  # nothing to split, or fewer cores than ranks: left alone
        assert mine is None and affinity == cpus
    else:
        assert mine == affinity == cpus[rank * share : (rank + 1) * share]
        assert threads <= share
