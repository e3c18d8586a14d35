import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from vi_flows import fit
from vi_flows.density import FlowDensity, evaluate_nll, fit_density
from vi_flows.transforms import (
    ComposeFlow,
    InvertibleLinear,
    PlanarStack,
    RadialStack,
    Sylvester,
    coupling_stack,
    maf_stack,
)

COV = torch.tensor([[4.0, 1.8], [1.8, 1.0]])
MEAN = torch.tensor([1.0, -2.0])


def _gaussian_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MEAN + torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(COV).T


def _entropy():
    return 0.5 * torch.logdet(2 * math.pi * math.e * COV).item()


def test_pyro_model_with_empty_guide_is_maximum_likelihood():
    torch.manual_seed(0)
    data = _gaussian_data(512)
    density = FlowDensity(maf_stack(2, 2, (16,)))
    n, b = data.shape[0], 64
    trace = poutine.trace(density.model).get_trace(data, b)
    idx = trace.nodes["data"]["value"]
    # the subsampled plate scales the minibatch log-likelihood to the full data set
    expected = n / b * density.log_prob(data[idx]).sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected)

    before = evaluate_nll(density, data)
    fit(density.model, lambda *a, **k: None, data, b, num_steps=150, lr=1e-2, tol=None, seed=0, progress=False)
    after = evaluate_nll(density, data)
    # the start is far from the data (NLL ≈ 7 vs the law's entropy 2.70); 150 Adam steps close most of that gap
    assert after < before - 1.0 and after < _entropy() + 0.5, (before, after)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PlanarStack(2, 8),
        lambda: RadialStack(2, 8),
        lambda: ComposeFlow([Sylvester(2) for _ in range(3)]),
        lambda: ComposeFlow([InvertibleLinear(2), *coupling_stack(2, 2, (16,), linear=False).parts]),
    ],
    ids=["planar", "radial", "sylvester", "coupling"],
)
def test_every_family_trains_by_maximum_likelihood(make):
    """Planar and Sylvester train through their numerical inverses (implicit gradients)."""
    torch.manual_seed(0)
    data = (_gaussian_data(1000) - MEAN) / 2  # centred: the test is the fit of shape, not the location
    density = FlowDensity(make())
    start = evaluate_nll(density, data)
    fit = fit_density(density, data, num_steps=100, batch_size=128, lr=2e-2, eval_every=50, seed=0, progress=False)
    # N(0, I) scores 2.46 nats here (the start: every family starts at the identity), the law itself 1.31;
    # 0.3 nats of progress needs the flow to capture part of the scale and correlation.
    assert fit.best_valid_nll < start - 0.3, (start, fit.best_valid_nll)
    assert math.isfinite(fit.best_valid_nll)


def test_fit_density_history_early_stopping_and_restore():
    torch.manual_seed(1)
    data = _gaussian_data(600, seed=1)
    valid = _gaussian_data(200, seed=2)
    fit = fit_density(
        coupling_stack(2, 2, (16,)),
        data,
        valid_data=valid,
        num_steps=400,
        eval_every=20,
        lr=5e-2,
        patience=2,
        seed=0,
        progress=False,
    )
    assert list(fit.history.columns) == ["step", "train_nll", "valid_nll", "elapsed"]
    assert fit.history["step"].iloc[0] == 20
    assert fit.best_valid_nll == fit.history["valid_nll"].min()
    # the best step's parameters are the ones returned
    assert evaluate_nll(fit.density, valid) == pytest.approx(fit.best_valid_nll, rel=1e-5)
    if fit.stopped_early:
        assert fit.num_steps < 400
        assert (fit.history["step"] > fit.best_step).sum() == 2  # patience evaluations without improvement


def test_fit_density_reproducible_with_seed():
    data = _gaussian_data(300)
    fits = []
    for _ in range(2):
        torch.manual_seed(5)
        flow = maf_stack(2, 1, (8,))
        fits.append(fit_density(flow, data, num_steps=40, eval_every=20, seed=3, progress=False))
    assert fits[0].history["valid_nll"].tolist() == fits[1].history["valid_nll"].tolist()


def test_save_reload_sample_and_use_as_prior(tmp_path):
    torch.manual_seed(2)
    data = _gaussian_data(800)
    fit = fit_density(maf_stack(2, 2, (16,)), data, num_steps=150, lr=1e-2, eval_every=50, seed=0, progress=False)
    path = tmp_path / "density.pt"
    fit.density.save(path)
    loaded = FlowDensity.load(path)
    x = torch.randn(7, 2)
    torch.testing.assert_close(loaded.log_prob(x), fit.density.log_prob(x))
    draws = loaded.sample((4000,))
    assert draws.shape == (4000, 2)
    # samples follow the fitted law: moments near the data's (MC error of 4000 draws ≈ 0.03-0.06, model error larger)
    torch.testing.assert_close(draws.mean(0), MEAN, atol=0.3, rtol=0)

    # as a prior: θ ~ fitted density, y ~ N(θ, 0.5 I); its log-density enters the joint unchanged
    def model(y):
        theta = pyro.sample("theta", loaded.distribution())
        with pyro.plate("obs", y.shape[0]):
            pyro.sample("y", dist.Normal(theta, 0.5).to_event(1), obs=y)

    y = torch.tensor([[0.0, -1.0]]).expand(5, 2)
    guide = pyro.infer.autoguide.AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), Trace_ELBO())
    for _ in range(100):
        svi.step(y)
    trace = poutine.trace(model).get_trace(y)
    theta = trace.nodes["theta"]["value"]
    torch.testing.assert_close(trace.nodes["theta"]["fn"].log_prob(theta), loaded.log_prob(theta))
    post = guide.median(y)["theta"]
    # the posterior mean sits between the prior mean and the data mean, pulled toward the data (5 obs, σ = 0.5)
    assert (post - torch.tensor([0.0, -1.0])).norm() < (MEAN - torch.tensor([0.0, -1.0])).norm()


def test_bad_arguments(tmp_path):
    flow = maf_stack(2, 1, (8,))
    with pytest.raises(ValueError, match="data"):
        fit_density(flow, torch.randn(10, 3), progress=False)
    with pytest.raises(ValueError, match="valid_fraction"):
        fit_density(flow, torch.randn(10, 2), valid_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit_density(flow, torch.randn(10, 2), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_density(flow, torch.randn(10, 2), lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="transform"):
        FlowDensity([])
    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="FlowDensity"):
        FlowDensity.load(tmp_path / "x.pt")
