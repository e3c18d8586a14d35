import math
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_value  # noqa: E402
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights  # noqa: E402

from vi_flows.diagnostics import (  # noqa: E402
    Diagnostics,
    _az,
    diagnose,
    loo,
    plot_density_2d,
    plot_weights,
    to_inference_data,
)

az = _az()

# Conjugate model: mu ~ N(0, S0² I_D), y_n | mu ~ N(mu, SIG² I_D), n = 1..N.
D, N, S0, SIG = 3, 20, 2.0, 1.0
Y = torch.randn(N, D, generator=torch.Generator().manual_seed(0)) + torch.tensor([1.0, -0.5, 2.0])


def conj_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, S0).expand([D]).to_event(1))
    with pyro.plate("data", N):
        pyro.sample("y", dist.Normal(mu, SIG).to_event(1), obs=y)


def conj_posterior(y):
    """Closed-form posterior loc and scale of mu given the rows of y."""
    prec = 1 / S0**2 + len(y) / SIG**2
    return (y.sum(0) / SIG**2) / prec, torch.full((D,), prec**-0.5)


def scaled_guide(factor):
    """The exact posterior with its scale multiplied by ``factor`` (1 = exact)."""

    def guide(y):
        loc, scale = conj_posterior(y)
        pyro.sample("mu", dist.Normal(loc, factor * scale).to_event(1))

    return guide


def conj_log_evidence(y):
    # each coordinate's column y[:, j] ~ N(0, SIG² I + S0² 11ᵀ)
    cov = SIG**2 * torch.eye(len(y)) + S0**2 * torch.ones(len(y), len(y))
    return dist.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y.T).sum().item()


def conj_exact_elpd_loo(y):
    total = 0.0
    for i in range(len(y)):
        rest = torch.cat([y[:i], y[i + 1 :]])
        loc, scale = conj_posterior(rest)
        total += dist.Normal(loc, (SIG**2 + scale**2).sqrt()).log_prob(y[i]).sum().item()
    return total


# A model with constrained sites, a vector site, a deterministic site and two nested plates.
def shape_model(y):
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(4)))
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.deterministic("p_max", p.max(-1).values)
    with pyro.plate("school", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("theta2", 2 * theta)
        pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)


def nested_model(y):
    with pyro.plate("group", 3, dim=-2):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("item", 5, dim=-1):
            pyro.sample("obs", dist.Normal(a, 1.0), obs=y)


Y_SCHOOL = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]) / 10


def _constrained_values(idata):
    return {k: idata.posterior[k].values for k in idata.posterior.data_vars}


# ---------------------------------------------------------------------------------------------------------------------
# diagnose


def test_exact_guide_iwae_equals_log_evidence_and_khat_good():
    d = diagnose(conj_model, scaled_guide(1.0), Y, num_samples=4000, seed=0)
    log_z = conj_log_evidence(Y)
    # q = p(mu|y) makes log w = log p(y) for every draw; only float32 rounding of log p remains
    assert abs(d.iwae - log_z) < 1e-3
    assert abs(d.elbo - log_z) < 1e-3
    assert d.iwae >= d.elbo - 1e-9  # Jensen; equality up to rounding here
    assert d.khat < 0.5 and d.reading == "good"
    assert d.ess_frac > 0.99


def test_wide_guide_iwae_approaches_log_evidence_above_elbo():
    d = diagnose(conj_model, scaled_guide(1.5), Y, num_samples=4000, seed=1)
    log_z = conj_log_evidence(Y)
    # the IWAE estimate's sd is about sqrt(S/ESS - 1)/sqrt(S) ≈ 0.014 here (ESS ≈ 0.57 S); 0.06 is ~4 sd
    assert abs(d.iwae - log_z) < 0.06
    # KL(q || p) of a 1.5× too wide Gaussian in 3 dims: 3 * (1.5²/2 - 1/2 - log 1.5) ≈ 0.66 nats
    kl = D * (1.5**2 / 2 - 0.5 - math.log(1.5))
    assert d.elbo == pytest.approx(log_z - kl, abs=5 * d.elbo_se)
    assert d.iwae > d.elbo + 0.3
    assert d.khat < 0.5  # a wider-than-posterior Gaussian has bounded weights


def test_heavy_tailed_posterior_narrow_guide_khat_bad():
    def model():
        pyro.sample("z", dist.StudentT(1.5, 0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 0.5))

    d = diagnose(model, guide, num_samples=4000, seed=0)
    # w ∝ exp(z²/2·0.5²) / (1 + z²/1.5)^1.25 is unbounded with a power tail: k̂ far above 0.7 at any seed
    assert d.khat > 0.7
    assert d.reading == "bad"
    assert "bad" in str(d)


def test_log_weights_and_khat_agree_with_pyro():
    guide = scaled_guide(0.8)
    d = diagnose(conj_model, guide, Y, num_samples=4000, seed=3, max_plate_nesting=1)
    # seeding torch alike gives Pyro's vectorized replay the very same draws
    torch.manual_seed(3)
    lw, _, _ = vectorized_importance_weights(conj_model, guide, Y, num_samples=4000, max_plate_nesting=1)
    # Pyro sums log p in float32, we per site in float64: rounding of |log w| ≈ 90 in float32 is ~1e-5
    np.testing.assert_allclose(d.log_w, lw.double().numpy(), atol=1e-3)
    torch.manual_seed(3)
    k_pyro = psis_diagnostic(conj_model, guide, Y, num_particles=4000, max_plate_nesting=1)
    assert 0.3 < d.khat < 1.0  # an informative case, not a degenerate one
    # Both fit the GPD to the same largest ceil(3√S) weights by Zhang–Stephens with Vehtari's prior toward 0.5
    # (pyro: fit_generalized_pareto, arviz: psislw); they differ by float32/float64 rounding only.
    assert abs(d.khat - k_pyro) < 0.02


def test_psis_moments_move_toward_posterior():
    d = diagnose(conj_model, scaled_guide(0.8), Y, num_samples=4000, seed=0)
    loc, scale = conj_posterior(Y)
    df = d.to_dataframe()
    assert list(df.columns) == ["site", "index", "guide_mean", "guide_sd", "psis_mean", "psis_sd"]
    assert len(df) == D and list(df["index"]) == [(0,), (1,), (2,)]
    # the guide's sd is 0.8 × the true one; PSIS reweighting recovers most of the gap (ESS ≈ 2000 here)
    np.testing.assert_allclose(df["guide_sd"], 0.8 * scale.numpy(), rtol=0.05)
    np.testing.assert_allclose(df["psis_sd"], scale.numpy(), rtol=0.1)
    np.testing.assert_allclose(df["psis_mean"], loc.numpy(), atol=0.1 * float(scale[0]))  # MC s.e. ≈ sd/√ESS ≈ 0.02 sd


def test_autoguide_jacobian_is_in_log_q():
    # LogNormal(0, 1) prior, no data: the posterior is the prior, and a Normal(0, 1) on log z is exactly it.
    def model():
        pyro.sample("z", dist.LogNormal(0.0, 1.0))

    init = init_to_value(values={"z": torch.tensor(1.0)})
    for cls in (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal):
        guide = cls(model, init_loc_fn=init, init_scale=1.0)
        d = diagnose(model, guide, num_samples=500, seed=0)
        # without the |d log z / dz| term log w would be -log z, varying by several nats across draws
        np.testing.assert_allclose(d.log_w, 0.0, atol=1e-5)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_autoguides_match_pyro_weights_and_report(guide_cls):
    guide = guide_cls(shape_model)
    d = diagnose(shape_model, guide, Y_SCHOOL, num_samples=300, seed=0, max_plate_nesting=1)
    torch.manual_seed(0)
    lw, _, _ = vectorized_importance_weights(shape_model, guide, Y_SCHOOL, num_samples=300, max_plate_nesting=1)
    np.testing.assert_allclose(d.log_w, lw.detach().double().numpy(), atol=1e-3)
    df = d.to_dataframe()
    # one row per latent element: tau (1) + p (4) + mu (1) + theta (8); the deterministic p_max is not a latent
    assert len(df) == 14
    assert list(df.drop_duplicates("site")["site"]) == ["tau", "p", "mu", "theta"]
    s = str(d)
    assert f"{d.khat:.3f}" in s and d.reading in s
    summary = d.summary()
    assert set(summary) == {"elbo", "elbo_se", "iwae", "khat", "ess", "ess_frac", "num_samples", "reading"}
    assert summary["num_samples"] == 300 and 0 < summary["ess_frac"] <= 1
    assert d.log_p.shape == d.log_q.shape == d.log_w.shape == (300,)
    np.testing.assert_allclose(d.log_w, d.log_p - d.log_q)


def test_seed_is_reproducible_and_leaves_global_stream_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = diagnose(conj_model, scaled_guide(0.9), Y, num_samples=100, seed=5)
    after = torch.rand(1)
    b = diagnose(conj_model, scaled_guide(0.9), Y, num_samples=100, seed=5)
    assert torch.equal(before, after)
    np.testing.assert_array_equal(a.log_w, b.log_w)


def test_discrete_latent_raises_naming_site():
    def model():
        pyro.sample("flip", dist.Bernoulli(0.3))

    def guide():
        pyro.sample("flip", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="'flip'"):
        diagnose(model, guide, num_samples=10)
    with pytest.raises(ValueError, match="'flip'"):
        to_inference_data(model, guide, num_samples=10)


def test_unguided_latent_is_warned_about_and_excluded():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="'b'"):
        d = diagnose(model, guide, num_samples=50, seed=0)
    # q(a) p(b|a) is the proposal, so the weights of this exact posterior are 1
    np.testing.assert_allclose(d.log_w, 0.0, atol=1e-6)
    assert list(d.to_dataframe()["site"]) == ["a"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        diagnose(conj_model, scaled_guide(1.0), Y, num_samples=1)
    with pytest.raises(ValueError, match="max_plate_nesting"):
        diagnose(conj_model, scaled_guide(1.0), Y, num_samples=10, max_plate_nesting=-1)
    with pytest.raises(ValueError, match="guide"):
        to_inference_data(conj_model, [], Y, num_samples=10)
    with pytest.raises(ValueError, match="guide"):
        diagnose(conj_model, [scaled_guide(1.0)], Y, num_samples=10)


# ---------------------------------------------------------------------------------------------------------------------
# to_inference_data


def test_inference_data_groups_shapes_dims_and_constraints():
    guide = AutoNormal(shape_model)
    idata = to_inference_data(shape_model, guide, Y_SCHOOL, num_samples=200, seed=0, posterior_predictive=True)
    assert set(idata.groups()) == {
        "posterior",
        "sample_stats",
        "log_likelihood",
        "observed_data",
        "posterior_predictive",
    }
    post = idata.posterior
    assert post["tau"].dims == ("chain", "draw")
    assert post["p"].dims == ("chain", "draw", "p_dim_0") and post["p"].shape == (1, 200, 4)
    assert post["theta"].dims == ("chain", "draw", "school") and post["theta"].shape == (1, 200, 8)
    assert list(post["school"].values) == list(range(8))
    assert "p_max" in post  # deterministic sites are reported with the latents
    v = _constrained_values(idata)
    assert (v["tau"] > 0).all()
    np.testing.assert_allclose(v["p"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v["p_max"], v["p"].max(-1), atol=1e-6)
    assert post["theta2"].dims == ("chain", "draw", "school")
    np.testing.assert_allclose(v["theta2"], 2 * v["theta"], atol=1e-6)
    assert set(idata.sample_stats.data_vars) == {"log_p", "log_q", "log_importance_weight"}
    ss = idata.sample_stats
    assert ss["log_p"].shape == (1, 200)
    np.testing.assert_allclose(ss["log_importance_weight"], ss["log_p"] - ss["log_q"])
    ll = idata.log_likelihood["obs"]
    assert ll.dims == ("chain", "draw", "school") and ll.shape == (1, 200, 8)
    # pointwise log-likelihood recomputed from the posterior draws
    ref = dist.Normal(torch.tensor(v["theta"]), 1.0).log_prob(Y_SCHOOL.double()).numpy()
    np.testing.assert_allclose(ll.values, ref, atol=1e-4)
    assert idata.observed_data["obs"].dims == ("school",)
    np.testing.assert_allclose(idata.observed_data["obs"].values, Y_SCHOOL.numpy())
    pp = idata.posterior_predictive["obs"]
    assert pp.dims == ("chain", "draw", "school") and pp.shape == (1, 200, 8)
    # y_rep | theta ~ N(theta, 1): the residuals are standard normal (sd within 10% at 1600 residuals)
    assert abs(float((pp.values - v["theta"]).std()) - 1.0) < 0.1


def test_inference_data_event_and_nested_plate_dims():
    idata = to_inference_data(conj_model, scaled_guide(1.0), Y, num_samples=50, seed=0)
    assert idata.posterior["mu"].dims == ("chain", "draw", "mu_dim_0")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "data")
    assert idata.observed_data["y"].dims == ("data", "y_dim_0") and idata.observed_data["y"].shape == (N, D)

    y = torch.randn(3, 5)
    idata = to_inference_data(nested_model, AutoDiagonalNormal(nested_model), y, num_samples=40, seed=0)
    assert idata.posterior["a"].dims == ("chain", "draw", "group")  # the broadcast item axis of size 1 is dropped
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "group", "item")
    assert idata.log_likelihood["obs"].shape == (1, 40, 3, 5)


def test_arviz_functions_work_and_chains_are_fits():
    with pyro.settings.context(module_local_params=True):  # two fits of one guide class, each with its own params
        g1, g2 = AutoNormal(shape_model), AutoNormal(shape_model)
        g1(Y_SCHOOL)
        g2(Y_SCHOOL)
        with torch.no_grad():
            g2.locs.mu.add_(3.0)  # a second "fit" that disagrees about mu
        idata = to_inference_data(shape_model, [g1, g2], Y_SCHOOL, num_samples=300, seed=0)
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 300
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, var_names=["mu", "tau", "theta"])
        rhat = az.rhat(idata)
        loo_res = az.loo(idata)
        az.plot_posterior(idata, var_names=["mu", "tau"])
        az.plot_pair(idata, var_names=["mu", "tau"])
    plt.close("all")
    assert len(summary) == 1 + 1 + 8
    # the disagreeing fits show up in R-hat for mu only; tau's chains are copies of one guide (draws differ)
    assert float(rhat["mu"]) > 1.5
    assert float(rhat["tau"]) < 1.05
    assert loo_res.n_data_points == 8 and np.isfinite(loo_res.elpd_loo)


# ---------------------------------------------------------------------------------------------------------------------
# loo


def test_loo_with_exact_guide_matches_arviz_and_closed_form():
    guide = scaled_guide(1.0)
    res = loo(conj_model, guide, Y, num_samples=4000, seed=0)
    idata = to_inference_data(conj_model, guide, Y, num_samples=4000, seed=0)  # the same exact-posterior draws
    ref = az.loo(idata)
    # with q = posterior the weights are constant and the correction is the identity: only rounding differs
    assert res.elpd_loo == pytest.approx(ref.elpd_loo, abs=1e-3)
    assert res.p_loo == pytest.approx(ref.p_loo, abs=1e-3)
    assert res.se == pytest.approx(ref.se, rel=1e-3)
    # against the closed-form log p(y_i | y_-i): PSIS-LOO's Monte-Carlo error here is ~0.03 over 20 points
    assert res.elpd_loo == pytest.approx(conj_exact_elpd_loo(Y), abs=0.2)
    assert res.n_data_points == N and (res.pointwise["khat"] < 0.7).all()
    assert list(res.pointwise.columns) == ["site", "index", "elpd_loo", "p_loo", "khat"]


@pytest.mark.parametrize("factor", [0.8, 1.5])
def test_loo_correction_moves_toward_exact(factor):
    guide = scaled_guide(factor)
    exact = conj_exact_elpd_loo(Y)
    res = loo(conj_model, guide, Y, num_samples=4000, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = az.loo(to_inference_data(conj_model, guide, Y, num_samples=4000, seed=1))
    # plain PSIS-LOO on q draws is off by about one nat for these guides; the correction removes most of it
    assert abs(res.elpd_loo - exact) < abs(naive.elpd_loo - exact)
    assert abs(res.elpd_loo - exact) < 0.3
    assert "elpd_loo" in str(res) and res.to_series()["n_data_points"] == N


def test_poisson_gamma_counts_and_loo_closed_form():
    y = torch.tensor([3.0, 0.0, 5.0, 2.0, 4.0, 1.0, 7.0, 2.0])
    a0, b0 = 2.0, 1.0

    def model(y):
        rate = pyro.sample("rate", dist.Gamma(a0, b0))
        with pyro.plate("day", len(y)):
            pyro.sample("count", dist.Poisson(rate), obs=y)

    def guide(y):  # the exact posterior Gamma(a0 + Σy, b0 + n)
        pyro.sample("rate", dist.Gamma(a0 + y.sum(), b0 + len(y)))

    idata = to_inference_data(model, guide, y, num_samples=500, seed=0, posterior_predictive=True)
    assert (idata.posterior["rate"].values > 0).all()
    assert idata.log_likelihood["count"].dims == ("chain", "draw", "day")
    pp = idata.posterior_predictive["count"].values
    assert pp.shape == (1, 500, 8) and np.array_equal(pp, np.round(pp)) and (pp >= 0).all()
    # leave-one-out predictive of a Poisson-Gamma model is negative binomial
    exact = 0.0
    for i in range(len(y)):
        a, b = a0 + y.sum() - y[i], b0 + len(y) - 1
        exact += dist.NegativeBinomial(a, probs=1 / (b + 1)).log_prob(y[i]).item()
    res = loo(model, guide, y, num_samples=4000, seed=0)
    assert res.elpd_loo == pytest.approx(exact, abs=0.1)  # over 4 seeds the error was at most 0.02


def test_loo_needs_observations():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="observed"):
        loo(model, guide, num_samples=20)


# ---------------------------------------------------------------------------------------------------------------------
# plots


def _banana_model():
    pyro.sample("z", dist.Normal(torch.zeros(2), torch.tensor([1.0, 0.5])).to_event(1))


def test_plot_density_2d_autocontinuous_and_handwritten(tmp_path):
    guide = AutoMultivariateNormal(_banana_model)

    def target(z):
        return dist.Normal(torch.zeros(2, dtype=z.dtype), torch.tensor([1.0, 0.5], dtype=z.dtype)).log_prob(z).sum(-1)

    path = tmp_path / "density.png"
    fig = plot_density_2d(guide, num_samples=300, target_log_density=target, seed=0, path=str(path), gridsize=30)
    assert path.stat().st_size > 0
    assert len(fig.axes) == 2 and "unconstrained" in fig.axes[0].get_title()
    plt.close(fig)

    def hand_guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Gamma(2.0, 1.0))

    fig = plot_density_2d(hand_guide, num_samples=300, seed=0)
    assert "histogram" in fig.axes[0].get_title() and fig.axes[0].get_xlabel() == "a"
    assert fig.axes[0].get_ylim()[0] < 0.5  # Gamma draws are positive: the histogram spans from near 0
    plt.close(fig)

    def three_d():
        pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    with pytest.raises(ValueError, match="2-D"):
        plot_density_2d(three_d, num_samples=10)


def test_plot_weights(tmp_path):
    d = diagnose(conj_model, scaled_guide(0.8), Y, num_samples=500, seed=0)
    assert isinstance(d, Diagnostics)
    path = tmp_path / "weights.png"
    fig = plot_weights(d, path=str(path))
    assert path.stat().st_size > 0
    assert f"{d.khat:.2f}" in fig.axes[0].get_title()
    plt.close(fig)
    fig = plot_weights(diagnose(conj_model, scaled_guide(1.0), Y, num_samples=100, seed=0))  # all weights equal
    assert "good" in fig.axes[0].get_title()
    plt.close(fig)
