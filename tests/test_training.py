import io
import math
import os
import signal
import sys
import threading

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from vi_flows.training import FitResult, _to_device, fit

from .conftest import cuda

PRIOR_SD = 10.0


@pytest.fixture(autouse=True)
def _one_thread():
    # The models are tiny: a second intra-op thread only adds contention on a shared CI machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def conjugate(x):
    """mu ~ N(0, 10²), x_i ~ N(mu, 1): posterior N(Σx / (n + 0.01), 1 / (n + 0.01))."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), PRIOR_SD))  # on x's device, and so the guide
    with pyro.plate("n", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def regression(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("obs", dist.Normal((X * w).sum(-1), s), obs=y)  # broadcasts over vectorized particles


def data(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) + 3.0


def reg_data(n=50, d=3):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g)
    return X, X @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)


def log_evidence(x):
    n = len(x)
    cov = torch.eye(n, dtype=torch.float64) + PRIOR_SD**2
    return dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(x.double()).item()


def params():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def trajectory(result):
    return result.history.drop(columns="elapsed")


# ---- early stopping -------------------------------------------------------------------------------------------------


def test_stops_early_at_the_optimum():
    x = data()
    result = fit(conjugate, AutoNormal(conjugate), x, num_steps=3000, lr=0.05, seed=0, progress=False)
    assert result.converged
    assert result.num_steps < 3000 and result.num_steps % 100 == 0  # stops at the end of a window
    assert len(result.history) == result.num_steps
    # AutoNormal holds the exact posterior, so at the optimum ELBO = log p(x) with zero variance.
    # 0.1 nat of KL is a loc 0.45 posterior sds off: clearly converged, yet far above the MC noise here.
    assert log_evidence(x) - result.history["elbo"].tail(100).mean() < 0.1
    post_mean, post_sd = x.sum().item() / (len(x) + PRIOR_SD**-2), (len(x) + PRIOR_SD**-2) ** -0.5
    assert abs(pyro.param("AutoNormal.locs.mu").item() - post_mean) < post_sd


def test_does_not_stop_while_improving():
    # Same problem, lr 1e-3: Adam moves the loc by ~1e-3 a step, so the ELBO climbs steadily for thousands of steps.
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=600, lr=1e-3, seed=0, progress=False, tol=1e-3,
                 lr_decay=None)  # fmt: skip
    assert not result.converged
    assert result.num_steps == 600
    means = result.history["elbo"].to_numpy().reshape(-1, 100).mean(1)
    change = (means[1:] - means[:-1]) / abs(means[:-1])
    assert (change > 10 * 1e-3).all()  # every window improved by well over tol: stopping would have been wrong


def test_tol_none_runs_all_steps():
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=300, lr=0.05, window=10, tol=None, progress=False)
    assert not result.converged and result.num_steps == 300


# ---- NaN guard ------------------------------------------------------------------------------------------------------


def exploding(x, flag):
    """``conjugate`` plus a term that turns non-finite once ``flag["on"]``: in the loss or only in the gradient."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("n", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
    if flag["on"] == "loss":
        pyro.factor("boom", mu * 0 - math.inf)  # Pyro's validation rejects a nan factor, not an infinite one
    elif flag["on"] == "grad":
        pyro.factor("boom", (mu - mu.detach()).abs().sqrt())  # value 0, derivative 0 · ∞ = nan


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own warning, before fit raises
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_guard_names_step_and_culprit_and_keeps_params(where, tmp_path):
    flag = {"on": None}
    snapshot = {}

    def arm_at_7(step, elbo, guide):
        snapshot.update(params())
        if step == 7:
            flag["on"] = where

    path = tmp_path / "ckpt.pt"
    model = exploding
    with pytest.raises(FloatingPointError) as info:
        fit(model, AutoNormal(model), data(), flag, num_steps=50, callbacks=[arm_at_7], checkpoint=path,
            checkpoint_every=5, progress=False)  # fmt: skip
    message = str(info.value)
    assert "step 8" in message
    if where == "loss":
        assert "non-finite loss (inf)" in message and "'boom'" in message
    else:
        assert "non-finite gradient" in message and "AutoNormal.locs.mu" in message
    assert snapshot.keys() == params().keys()
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), name
        assert p.grad is None or not p.grad.any(), name  # no non-finite gradient left for a later step
    assert torch.load(path, weights_only=True)["step"] == 5  # the last good checkpoint is left alone


# ---- checkpoints ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_resume_reproduces_the_uninterrupted_run(guide_class, tmp_path):
    X, y = reg_data()
    run = dict(num_steps=60, seed=3, lr_decay=0.3, progress=False, checkpoint_every=20)
    full = fit(regression, guide_class(regression), X, y, checkpoint=tmp_path / "full.pt", **run)
    full_params = params()

    pyro.clear_param_store()
    first = fit(regression, guide_class(regression), X, y, callbacks=[lambda s, e, g: s == 40],
                checkpoint=tmp_path / "part.pt", **run)  # fmt: skip
    assert first.num_steps == 40

    pyro.clear_param_store()
    pyro.set_rng_seed(99)  # whatever the RNG holds now, resume restores it
    second = fit(regression, guide_class(regression), X, y, resume=tmp_path / "part.pt", **(run | {"seed": 7}))
    assert second.num_steps == 60
    assert trajectory(second).equals(trajectory(full))
    assert params().keys() == full_params.keys()
    for name, value in params().items():
        assert torch.equal(value, full_params[name]), name


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    path = tmp_path / "ckpt.pt"
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=30, checkpoint=path, checkpoint_every=20,
                 tol=None, progress=False)  # fmt: skip
    state = torch.load(path, weights_only=True)
    assert state["step"] == 30  # the final one, after the one at step 20
    assert state["history"]["elbo"] == result.history["elbo"].tolist()
    assert set(state["params"]) == {"AutoNormal.locs.mu", "AutoNormal.scales.mu"}
    current = dict(pyro.get_param_store().named_parameters())
    for name, value in state["params"].items():
        assert torch.equal(value, current[name].detach())
    assert set(state["optim"]) == set(state["params"])
    assert {"torch", "numpy", "random"} <= set(state["rng"])
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_interrupt_writes_a_final_checkpoint_and_reraises(tmp_path):
    x = data()
    full = fit(conjugate, AutoNormal(conjugate), x, num_steps=50, seed=5, tol=None, progress=False)

    def interrupt_at_30(step, elbo, guide):
        if step == 30:
            raise KeyboardInterrupt

    pyro.clear_param_store()
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(conjugate, AutoNormal(conjugate), x, num_steps=50, seed=5, tol=None, progress=False,
            callbacks=[interrupt_at_30], checkpoint=path, checkpoint_every=20)  # fmt: skip
    assert torch.load(path, weights_only=True)["step"] == 30
    pyro.clear_param_store()
    resumed = fit(conjugate, AutoNormal(conjugate), x, num_steps=50, tol=None, progress=False, resume=path)
    assert trajectory(resumed).equals(trajectory(full))


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="fit defers Ctrl-C only in the main thread over Python's default handler",
)
def test_ctrl_c_stops_after_the_current_step(tmp_path):
    def ctrl_c_at_12(step, elbo, guide):
        if step == 12:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to fit's handler, not raised here

    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(conjugate, AutoNormal(conjugate), data(), num_steps=50, tol=None, progress=False,
            callbacks=[ctrl_c_at_12], checkpoint=path, checkpoint_every=100)  # fmt: skip
    assert torch.load(path, weights_only=True)["step"] == 12
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_rejects_another_guide_or_a_used_optimizer(tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(conjugate, AutoNormal(conjugate), data(), num_steps=5, checkpoint=path, progress=False)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="resume.*AutoNormal.locs.mu"):
        fit(conjugate, AutoDiagonalNormal(conjugate), data(), num_steps=10, resume=path, progress=False)
    used = pyro.optim.Adam({"lr": 0.1})
    fit(conjugate, AutoNormal(conjugate), data(), num_steps=2, optim=used, progress=False)
    with pytest.raises(ValueError, match="optim has already stepped"):
        fit(conjugate, AutoNormal(conjugate), data(), num_steps=10, optim=used, resume=path, progress=False)


# ---- history, options -----------------------------------------------------------------------------------------------


def test_history_has_one_row_per_step():
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=25, tol=None, progress=False)
    h = result.history
    assert list(h.columns) == ["step", "elbo", "elapsed", "lr", "grad_norm", "beta"]
    assert len(h) == result.num_steps == 25
    assert h["step"].tolist() == list(range(1, 26))
    assert (h["elapsed"].diff().iloc[1:] >= 0).all() and result.elapsed == h["elapsed"].iloc[-1]
    # the default decay: lr 1e-2 at the first step, falling by a constant factor to 1e-3 at the last
    expected = 1e-2 * 0.1 ** (torch.arange(25, dtype=torch.float64) / 24)
    torch.testing.assert_close(torch.tensor(h["lr"].to_numpy()), expected, rtol=1e-5, atol=0)
    assert (h["grad_norm"] > 0).all() and h["grad_norm"].map(math.isfinite).all()
    assert h["elbo"].iloc[-5:].mean() > h["elbo"].iloc[:5].mean()  # elbo = −loss: it rises


def test_same_seed_same_trajectory():
    runs = []
    for seed in (11, 11, 12):
        pyro.clear_param_store()
        runs.append(fit(conjugate, AutoNormal(conjugate), data(), num_steps=20, seed=seed, progress=False))
    assert trajectory(runs[0]).equals(trajectory(runs[1]))
    assert not runs[0].history["elbo"].equals(runs[2].history["elbo"])


def test_progress_bar_only_when_asked(monkeypatch, capfd):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for progress in (True, False):
        pyro.clear_param_store()
        monkeypatch.setattr(sys, "stderr", Terminal())
        fit(conjugate, AutoNormal(conjugate), data(), num_steps=20, progress=progress, log_every=5)
        shown = sys.stderr.getvalue()
        assert ("20/20" in shown and "elbo=" in shown) if progress else shown == ""
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_progress_bar_off_when_stderr_is_not_a_terminal(capfd):
    fit(conjugate, AutoNormal(conjugate), data(), num_steps=20, progress=True)
    assert capfd.readouterr() == ("", "")


def test_lr_decay_reaches_its_final_ratio():
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=40, lr=0.1, lr_decay=0.01, progress=False)
    lr = result.history["lr"].to_numpy()
    assert lr[0] == 0.1
    assert (lr[1:] < lr[:-1]).all()
    assert lr[-1] == pytest.approx(0.1 * 0.01, rel=1e-12)


def test_user_scheduler_is_stepped_every_step():
    optim = pyro.optim.StepLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "step_size": 10, "gamma": 0.5})
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=30, optim=optim, progress=False)
    assert result.history["lr"].tolist() == [0.1] * 10 + [0.05] * 10 + [0.025] * 10


def test_vectorized_particles_reduce_elbo_noise():
    X, y = reg_data()
    spread = {}
    for k in (1, 16):
        pyro.clear_param_store()
        # lr 1e-9 keeps the guide where it starts, so the spread is that of the ELBO estimator alone.
        result = fit(regression, AutoNormal(regression), X, y, num_steps=60, lr=1e-9, num_particles=k, seed=0,
                     tol=None, progress=False)  # fmt: skip
        spread[k] = result.history["elbo"].std()
    # Expected ratio 1/√16 = 0.25; a standard deviation from 60 draws is good to ~10%, so 0.5 is a safe bound.
    assert spread[16] < 0.5 * spread[1]


def test_callback_returning_true_stops():
    seen = []

    def stop_at_9(step, elbo, guide):
        seen.append((step, elbo))
        return step == 9

    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=50, callbacks=[stop_at_9], progress=False)
    assert result.num_steps == 9 and not result.converged
    assert seen == list(zip(result.history["step"], result.history["elbo"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": -5}, "num_steps must be a positive integer, got -5"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"num_steps": True}, "num_steps"),
        ({"lr": 0.0}, "lr must be"),
        ({"lr": math.inf}, "lr must be"),
        ({"num_particles": 0}, "num_particles"),
        ({"tol": 0.0}, "tol must be"),
        ({"tol": -1e-3}, "tol must be"),
        ({"patience": 0}, "patience"),
        ({"window": 0}, "window"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"log_every": -1}, "log_every"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"lr_decay": 1.5}, "lr_decay"),
        ({"optim": torch.optim.Adam}, "optim must be"),
        ({"optim": pyro.optim.Adam({"lr": 0.1}), "lr_decay": 0.5}, "lr_decay"),
        ({"loss": "elbo"}, "loss must be"),
        ({"loss": Trace_ELBO(), "num_particles": 4}, "num_particles"),
        ({"checkpoint": "/nonexistent-dir/ckpt.pt"}, "checkpoint"),
        ({"device": "nope"}, "device must be"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(conjugate, AutoNormal(conjugate), data(), progress=False, **kwargs)
    assert len(pyro.get_param_store()) == 0  # rejected before any work


# ---- FitResult ------------------------------------------------------------------------------------------------------


def test_plot_saves_a_png(tmp_path):
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=30, progress=False)
    path = tmp_path / "elbo.png"
    ax = result.plot(path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.lines[0].get_ydata().tolist() == result.history["elbo"].tolist()
    assert "num_steps=30" in repr(result) and "converged=False" in repr(result)
    assert isinstance(result, FitResult) and result.guide is not None


def test_to_device_moves_tensors_in_containers():
    t = torch.ones(2)
    moved = _to_device((t, [t, 3], {"a": t, "b": "s"}), torch.device("meta"))
    assert moved[0].is_meta and moved[1][0].is_meta and moved[2]["a"].is_meta
    assert moved[1][1] == 3 and moved[2]["b"] == "s"
    assert t.device.type == "cpu"


@cuda
def test_device_puts_data_and_guide_on_cuda():
    result = fit(conjugate, AutoNormal(conjugate), data(), num_steps=20, progress=False, device="cuda")
    assert all(p.is_cuda for p in result.guide.parameters())
    assert result.history["elbo"].map(math.isfinite).all()


# ---- annealing -------------------------------------------------------------------------------------------------------


def test_anneal_scales_log_p_by_the_schedule_and_convergence_waits_for_beta_one():
    """With a point-mass guide (log q = 0) that does not move (lr tiny), the ELBO is β_t log p(z₀) exactly."""
    from pyro.infer.autoguide import AutoDelta, init_to_value

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, 2.0), obs=torch.tensor(1.5))

    pyro.clear_param_store()
    z0 = torch.tensor(0.7)
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"z": z0}))
    result = fit(model, guide, num_steps=30, anneal=20, lr=1e-12, tol=1e-3, window=5, patience=1, seed=0,
                 progress=False)  # fmt: skip
    h = result.history
    beta = (0.01 + (h["step"] - 1) / 20).clip(upper=1.0)
    torch.testing.assert_close(torch.tensor(h["beta"].to_numpy()), torch.tensor(beta.to_numpy()))
    log_p = dist.Normal(0.0, 1.0).log_prob(z0) + dist.Normal(0.0, 2.0).log_prob(torch.tensor(1.5))
    expected = torch.tensor(beta.to_numpy(), dtype=torch.float64) * log_p.double()
    torch.testing.assert_close(torch.tensor(h["elbo"].to_numpy()), expected, rtol=1e-5, atol=1e-6)
    # Convergence: while β < 1 the tempered ELBO changes by design. Over steps 1-30 of a 1000-step schedule the
    # window means differ by < 50 %, so tol=0.5 would stop at step 10 were it not waiting for β = 1.
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"z": z0}))
    slow = fit(model, guide, num_steps=30, anneal=1000, lr=1e-12, tol=0.5, window=5, patience=1, progress=False)
    assert not slow.converged and slow.num_steps == 30
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=init_to_value(values={"z": z0}))
    plain = fit(model, guide, num_steps=30, lr=1e-12, tol=0.5, window=5, patience=1, progress=False)
    assert plain.converged and plain.num_steps == 10  # the same rule without annealing


def test_anneal_rejects_bad_values():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="anneal"):
            fit(lambda: None, lambda: None, num_steps=1, anneal=bad, progress=False)
