"""Diagnostics on the models Pyro users write: ones that do not vectorize over draws, subsampled ones.

Each model here is the shape that broke the one-pass vectorized replay: ``PyroModule[nn.Linear]`` (Pyro's
Bayesian regression tutorial), ``torch.mm`` (Pyro's examples/lkj.py), ``X[idx] @ w`` under a subsampled
plate, ``a[g]`` group indexing, and a ``.sum()`` that silently sums the draws. Where a vectorizable twin
exists, the loop must give what the vectorized replay gives on the twin; elsewhere, what a per-draw
computation by hand gives.
"""

import logging
import math
import warnings
from dataclasses import replace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.importance import vectorized_importance_weights
from pyro.nn import PyroModule, PyroSample
from torch import nn

import vi_flows
from vi_flows import diagnostics
from vi_flows.diagnostics import (
    KHAT_GOOD,
    KHAT_OK,
    MIN_DRAWS_FOR_KHAT,
    _az,
    _psislw,
    diagnose,
    khat_threshold,
    loo,
    min_draws_for_khat,
    summary,
    to_inference_data,
)

az = _az()

LOOP = "does not vectorize"  # the fallback warning
SMALL_S = "is not reliable"  # the k-hat sample-size warning
# float32 models: the loop and the vectorized replay compute the same sums in another order (or with F.linear
# instead of a product and a sum), so per-draw log densities of ~100 nats agree to ~1e-5 relative
RTOL, ATOL = 1e-5, 1e-4


def _planar(model):
    """A two-layer planar-flow guide at its plain start (``init_scale`` given: no pre-fit search): these tests
    compare replays of one fixed guide, not fits."""
    return vi_flows.AutoPlanar(model, 2, init_scale=0.1)


def _messages(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def _run(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the warnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, record


def _assert_same_idata(a, b, groups=("posterior", "sample_stats", "log_likelihood", "observed_data")):
    for group in groups:
        assert set(a[group].data_vars) == set(b[group].data_vars), group
        for name in a[group].data_vars:
            assert a[group][name].dims == b[group][name].dims, (group, name)
            np.testing.assert_allclose(a[group][name].values, b[group][name].values, rtol=RTOL, atol=ATOL)


# ---- Pyro's Bayesian regression tutorial: PyroModule[nn.Linear]; F.linear fails on the draw dimension

P_IN = 3
g = torch.Generator().manual_seed(0)
X_REG = torch.randn(30, P_IN, generator=g)
Y_REG = X_REG @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(30, generator=g)


class BayesianRegression(PyroModule):
    def __init__(self, in_features, out_features=1):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


def regression_twin(x, y=None):
    """The same sites and density, written to broadcast over a leading draw dimension."""
    sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
    weight = pyro.sample("linear.weight", dist.Normal(0.0, 1.0).expand([1, P_IN]).to_event(2))
    bias = pyro.sample("linear.bias", dist.Normal(0.0, 10.0).expand([1]).to_event(1))
    mean = (x * weight[..., 0, :]).sum(-1) + bias[..., 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def test_pyromodule_regression_loop_equals_the_vectorized_twin():
    model = BayesianRegression(P_IN)
    guide = _planar(model)
    guide(X_REG, Y_REG)  # set up once; the twin then reuses the very same guide
    S = 200
    d, record = _run(diagnose, model, guide, X_REG, Y_REG, num_samples=S, seed=0)
    (message,) = _messages(record, LOOP)  # one line, once, naming the torch error
    assert "t() expects a tensor" in message and "\n" not in message
    d_twin, record = _run(diagnose, regression_twin, guide, X_REG, Y_REG, num_samples=S, seed=0)
    assert not _messages(record, LOOP)
    np.testing.assert_allclose(d.log_q, d_twin.log_q, rtol=0, atol=0)  # the same guide draws
    np.testing.assert_allclose(d.log_p, d_twin.log_p, rtol=RTOL, atol=ATOL)
    assert abs(d.khat - d_twin.khat) < 1e-3
    idata = to_inference_data(model, guide, X_REG, Y_REG, num_samples=S, seed=0)
    idata_twin = to_inference_data(regression_twin, guide, X_REG, Y_REG, num_samples=S, seed=0)
    _assert_same_idata(idata, idata_twin)
    assert idata.posterior["linear.weight"].shape == (1, S, 1, P_IN)  # event dims are kept, size 1 or not
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "data")
    res, res_twin = (loo(m, guide, X_REG, Y_REG, num_samples=S, seed=0) for m in (model, regression_twin))
    assert res.n_data_points == 30 and math.isfinite(res.elpd_loo)
    np.testing.assert_allclose(res.pointwise["elpd_loo"], res_twin.pointwise["elpd_loo"], rtol=1e-4, atol=1e-4)


# ---- Pyro's examples/lkj.py: torch.diag and torch.mm take one draw only

D_LKJ = 3
Y_LKJ = torch.randn(25, D_LKJ, generator=torch.Generator().manual_seed(1)) @ torch.tensor(
    [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.3, 1.5]]
)


def lkj_model(y):
    d = y.shape[1]
    theta = pyro.sample("theta", dist.HalfCauchy(torch.ones(d)).to_event(1))
    L_omega = pyro.sample("L_omega", dist.LKJCholesky(d, torch.tensor(2.0)))
    L_Omega = torch.mm(torch.diag(theta.sqrt()), L_omega)
    with pyro.plate("observations", y.shape[0]):
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(d), scale_tril=L_Omega), obs=y)


def test_lkj_torch_mm_model_matches_a_per_draw_computation():
    guide = _planar(lkj_model)
    S = 150
    idata, record = _run(to_inference_data, lkj_model, guide, Y_LKJ, num_samples=S, seed=0)
    (message,) = _messages(record, LOOP)
    assert "diag()" in message
    post = idata.posterior
    assert post["L_omega"].dims == ("chain", "draw", "L_omega_dim_0", "L_omega_dim_1")
    theta = torch.tensor(post["theta"].values[0], dtype=torch.float32)  # (S, d); exact: they were float32
    L_omega = torch.tensor(post["L_omega"].values[0], dtype=torch.float32)  # (S, d, d)
    scale_tril = theta.sqrt().unsqueeze(-1) * L_omega  # diag(√θ) @ L per draw
    log_lik = dist.MultivariateNormal(torch.zeros(D_LKJ), scale_tril=scale_tril).log_prob(Y_LKJ[:, None])  # (N, S)
    log_p = (
        dist.HalfCauchy(torch.ones(D_LKJ)).log_prob(theta).sum(-1)
        + dist.LKJCholesky(D_LKJ, torch.tensor(2.0)).log_prob(L_omega)
        + log_lik.sum(0)
    )
    np.testing.assert_allclose(idata.sample_stats["log_p"].values[0], log_p.double(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0], log_lik.T.double(), rtol=RTOL, atol=ATOL)
    d, _ = _run(diagnose, lkj_model, guide, Y_LKJ, num_samples=S, seed=0)
    np.testing.assert_array_equal(d.log_w, idata.sample_stats["log_importance_weight"].values[0])
    res, _ = _run(loo, lkj_model, guide, Y_LKJ, num_samples=S, seed=0)
    assert res.n_data_points == len(Y_LKJ) and math.isfinite(res.elpd_loo)


# ---- a[g] group indexing: indexes the draw axis when vectorized


def group_model(idx, y):
    with pyro.plate("groups", 4):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(a[idx], 0.5), obs=y)


def group_twin(idx, y):
    with pyro.plate("groups", 4):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(a[..., idx], 0.5), obs=y)


def test_group_indexing_loop_equals_the_vectorized_twin():
    idx = torch.arange(10) % 4
    y = torch.tensor([0.0, 1.0, -1.0, 2.0])[idx] + 0.1 * torch.randn(10, generator=torch.Generator().manual_seed(2))
    guide = AutoNormal(group_model)
    a, record = _run(to_inference_data, group_model, guide, idx, y, num_samples=200, seed=0)
    assert len(_messages(record, LOOP)) == 1
    b, record = _run(to_inference_data, group_twin, guide, idx, y, num_samples=200, seed=0)
    assert not _messages(record, LOOP)
    _assert_same_idata(a, b)
    assert a.posterior["a"].dims == ("chain", "draw", "groups")


# ---- a model that vectorizes without an error, and wrongly


def test_silently_wrong_vectorization_is_caught_and_replayed_per_draw():
    def model(y0):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("lik", -0.5 * ((y0 - mu) ** 2).sum())  # one draw: a scalar; vectorized: sums all draws

    guide = _planar(model)
    idata, record = _run(to_inference_data, model, guide, torch.tensor(1.0), num_samples=100, seed=0)
    (message,) = _messages(record, LOOP)
    assert "vectorized log p" in message
    mu = torch.tensor(idata.posterior["mu"].values[0])
    expected = dist.Normal(0.0, 1.0).log_prob(mu) - 0.5 * (1.0 - mu) ** 2
    np.testing.assert_allclose(idata.sample_stats["log_p"].values[0], expected, rtol=RTOL, atol=ATOL)


def test_guide_that_does_not_vectorize_is_run_per_draw_too():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    def guide():  # the prior, so every weight is 1; torch.mm takes one draw only
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(torch.mm(a.reshape(1, 1), torch.ones(1, 1)).squeeze(), 1.0))

    idata, record = _run(to_inference_data, model, guide, num_samples=100, seed=0)
    (message,) = _messages(record, LOOP)
    assert message.startswith("the guide does not vectorize")
    np.testing.assert_allclose(idata.sample_stats["log_importance_weight"], 0.0, atol=1e-6)
    assert idata.posterior["b"].values.std() > 0.5  # real draws, not one repeated


# ---- the loop against the vectorized replay on one vectorizable model: same draws, same arrays


def rich_model(y):
    """Constrained, vector and deterministic sites, two plates: every kind of array the export names."""
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    pyro.deterministic("p_max", p.max(-1).values)
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("school", 4, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.deterministic("theta2", 2 * theta)
        with pyro.plate("pupil", 3, dim=-1):
            pyro.sample("obs", dist.Normal(theta, tau), obs=y)


def test_loop_equals_vectorized_replay_on_a_vectorizable_model(monkeypatch):
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    guide = _planar(rich_model)
    S = 100
    vectorized, record = _run(to_inference_data, rich_model, guide, y, num_samples=S, seed=0, posterior_predictive=True)
    assert not _messages(record, LOOP)
    d, _ = _run(diagnose, rich_model, guide, y, num_samples=S, seed=0)
    assert d.khat == pytest.approx(_psislw(vectorized.sample_stats["log_importance_weight"].values[0])[1], abs=1e-9)

    def not_vectorizable(*args, **kwargs):
        raise RuntimeError("forced for the test")

    monkeypatch.setattr(diagnostics.replay, "_draw_batched", not_vectorizable)  # where _draw looks it up
    looped, record = _run(to_inference_data, rich_model, guide, y, num_samples=S, seed=0, posterior_predictive=True)
    assert _messages(record, LOOP) == [
        f"the model does not vectorize over draws (RuntimeError: forced for the test); drawing the {S} samples one "
        "at a time instead (like Predictive(parallel=False)): the same draws, but one model run each, so slower"
    ]
    _assert_same_idata(vectorized, looped)
    # posterior predictive: the same draws' distributions, other random numbers; compare shapes only
    assert vectorized.posterior_predictive["obs"].dims == looped.posterior_predictive["obs"].dims
    assert looped.posterior["theta"].dims == ("chain", "draw", "school")
    d_looped, _ = _run(diagnose, rich_model, guide, y, num_samples=S, seed=0)
    np.testing.assert_allclose(d_looped.log_w, d.log_w, rtol=1e-12, atol=0)  # float64 sums of the same terms
    assert d_looped.khat == pytest.approx(d.khat, abs=1e-9)


# ---- subsampled plates: diagnostics of the full data, not of one minibatch

N_SUB, P_SUB, B_SUB, SIG_SUB = 200, 2, 10, 1.0
g = torch.Generator().manual_seed(4)
X_SUB = torch.randn(N_SUB, P_SUB, generator=g)
Y_SUB = X_SUB @ torch.tensor([1.0, -0.5]) + SIG_SUB * torch.randn(N_SUB, generator=g)


def conj_guide(x, y):
    """The exact posterior of w (prior N(0, I), known noise) with its scale widened 1.2×: k̂ well below 0.5."""
    cov = torch.linalg.inv(torch.eye(P_SUB) + x.T @ x / SIG_SUB**2)
    loc = cov @ x.T @ y / SIG_SUB**2
    pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=1.2 * torch.linalg.cholesky(cov)))


def full_regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([P_SUB]).to_event(1))
    with pyro.plate("data", N_SUB):
        pyro.sample("obs", dist.Normal((x * w).sum(-1), SIG_SUB), obs=y)


def subsampled_regression(x, y):  # vectorizable
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([P_SUB]).to_event(1))
    with pyro.plate("data", N_SUB, subsample_size=B_SUB) as idx:
        pyro.sample("obs", dist.Normal((x[idx] * w).sum(-1), SIG_SUB), obs=y[idx])


def subsampled_matmul_regression(x, y):  # X[idx] @ w: not vectorizable
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([P_SUB]).to_event(1))
    with pyro.plate("data", N_SUB, subsample_size=B_SUB) as idx:
        pyro.sample("obs", dist.Normal(x[idx] @ w, SIG_SUB), obs=y[idx])


@pytest.mark.parametrize("model", [subsampled_regression, subsampled_matmul_regression])
def test_subsampled_model_is_diagnosed_on_the_full_data(model):
    S = 500
    full = diagnose(full_regression, conj_guide, X_SUB, Y_SUB, num_samples=S, seed=0)
    d, record = _run(diagnose, model, conj_guide, X_SUB, Y_SUB, num_samples=S, seed=0)
    assert not _messages(record, "minibatch")
    assert len(_messages(record, LOOP)) == (model is subsampled_matmul_regression)
    np.testing.assert_allclose(d.log_p, full.log_p, rtol=RTOL, atol=ATOL)
    assert d.khat == pytest.approx(full.khat, abs=1e-3)
    assert d.khat < KHAT_GOOD
    # the control: one minibatch of 10 scaled by N/b = 20 gives weights far too noisy (what was reported before);
    # the median over five random minibatches, as one lucky minibatch can read well
    minibatch_khats = []
    for seed in range(5):
        torch.manual_seed(seed)
        lw, _, _ = vectorized_importance_weights(
            subsampled_regression, conj_guide, X_SUB, Y_SUB, num_samples=S, max_plate_nesting=1
        )
        minibatch_khats.append(float(_psislw(lw.double().numpy())[1]))
    assert np.median(minibatch_khats) > KHAT_OK
    res, _ = _run(loo, model, conj_guide, X_SUB, Y_SUB, num_samples=S, seed=0)
    assert res.n_data_points == N_SUB


def test_subsample_by_outside_indices_warns_that_it_is_one_minibatch():
    idx = torch.arange(0, N_SUB, N_SUB // B_SUB)

    def model(x, y):  # indexes with its own idx: cannot be run on all N indices
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([P_SUB]).to_event(1))
        with pyro.plate("data", N_SUB, subsample=idx):
            pyro.sample("obs", dist.Normal(x[idx] @ w, SIG_SUB), obs=y[idx])

    idata, record = _run(to_inference_data, model, conj_guide, X_SUB, Y_SUB, num_samples=200, seed=0)
    (message,) = _messages(record, "minibatch")
    assert "'data' (10 of 200)" in message and "as idx" in message
    w = torch.tensor(idata.posterior["w"].values[0], dtype=torch.float32)  # (S, P)
    minibatch = dist.Normal(w @ X_SUB[idx].T, SIG_SUB).log_prob(Y_SUB[idx]).sum(-1)
    expected = dist.Normal(0.0, 1.0).log_prob(w).sum(-1) + (N_SUB / B_SUB) * minibatch
    np.testing.assert_allclose(idata.sample_stats["log_p"].values[0], expected.double(), rtol=RTOL, atol=1e-3)
    assert idata.log_likelihood["obs"].shape == (1, 200, B_SUB)


# ---- k̂ needs enough draws (Vehtari et al. 2024)


def test_khat_thresholds_follow_the_sample_size_rule():
    assert KHAT_GOOD == 0.5 and KHAT_OK == 0.7
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(10**5) == KHAT_OK
    assert MIN_DRAWS_FOR_KHAT == 2155  # 10^(1 / 0.3) = 2154.4
    assert khat_threshold(MIN_DRAWS_FOR_KHAT - 1) < KHAT_OK == khat_threshold(MIN_DRAWS_FOR_KHAT)
    assert min_draws_for_khat(0.5) == 100 and min_draws_for_khat(1.0) == math.inf


def test_few_draws_warn_and_read_against_the_lower_threshold():
    guide = AutoNormal(full_regression)
    d, record = _run(diagnose, full_regression, guide, X_SUB, Y_SUB, num_samples=500, seed=0)
    (message,) = _messages(record, SMALL_S)
    assert "500 draws" in message and f"num_samples >= {MIN_DRAWS_FOR_KHAT}" in message and "0.629" in message
    _, record = _run(diagnose, full_regression, guide, X_SUB, Y_SUB, num_samples=MIN_DRAWS_FOR_KHAT, seed=0)
    assert not _messages(record, SMALL_S)
    # 0.65 is "ok" from enough draws but above the 0.63 that 500 draws can vouch for
    assert replace(d, khat=0.65).reading == "bad" and replace(d, khat=0.65, num_samples=4000).reading == "ok"
    assert "k > 0.629" in str(replace(d, khat=0.65)) and "2155" in str(replace(d, khat=0.65))
    assert replace(d, khat=0.3).reading == "good"


# ---- ArviZ's "Shape validation failed" on every one-guide summary


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_az_summary_of_one_guide_logs_no_shape_validation_failure():
    logger = az._log  # ArviZ's own Logger; it logs each distinct message once per process, so forget them
    logger.cache.clear()
    handler = _Records()
    logger.addHandler(handler)
    try:
        guide = AutoNormal(full_regression)
        table = az.summary(to_inference_data(full_regression, guide, X_SUB, Y_SUB, num_samples=200, seed=0))
        assert np.isnan(table["r_hat"]).all()  # one chain: R-hat undefined, which the table says
        assert not [m for m in handler.messages if "Shape validation failed" in m]
        summary(to_inference_data(full_regression, guide, X_SUB, Y_SUB, num_samples=3, seed=0))
        az.summary(to_inference_data(full_regression, guide, X_SUB, Y_SUB, num_samples=3, seed=0))
    finally:
        logger.removeHandler(handler)
    # genuine problems still show, and summary() no longer leaves ArviZ's logger muted: 3 draws are too few
    assert [m for m in handler.messages if "Shape validation failed" in m and "draws=4" in m]
