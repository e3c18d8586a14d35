"""AutoRealNVP / AutoSylvester / AutoNSF presets, and every vi_flows guide inside Pyro's NeuTraReparam."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam

from vi_flows import AutoIAF, AutoNSF, AutoPlanar, AutoRadial, AutoRealNVP, AutoSylvester, fit

GUIDES = [AutoIAF, AutoPlanar, AutoRadial, AutoRealNVP, AutoSylvester, AutoNSF]


def funnel(d=4):
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    with pyro.plate("d", d - 1):
        pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))


def positive_model():
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    pyro.sample("obs", dist.Normal(0.0, s), obs=torch.tensor([0.3, -1.2, 0.8]))


def _perturb(guide, scale=0.3, seed=0):
    """Move the flow off the identity so the checks see a non-trivial warp."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("cls", [AutoRealNVP, AutoSylvester, AutoNSF])
def test_presets_start_at_their_base_gaussian(cls):
    guide = cls(funnel, init_scale=1e-3)
    guide()
    z = guide.get_posterior().sample((50,))
    # the flow starts as the identity: draws sit at loc ± a few init_scale
    assert (z - guide.loc).abs().max() < 1e-2


@pytest.mark.parametrize("cls", [AutoRealNVP, AutoSylvester, AutoNSF])
def test_presets_fit_a_simple_posterior(cls):
    # Normal-Normal model: posterior of mu is N(ȳ n/(n+1), 1/(n+1)) with a N(0, 1) prior and unit noise
    y = torch.tensor([1.0, 2.0, 0.5, 1.5])

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 4):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = cls(model)
    # 16 particles: the shifts of the stacked layers are redundant, and one-sample ELBO noise makes them drift
    fit(model, guide, num_steps=200, lr=2e-2, num_particles=16, seed=0, progress=False, tol=None)
    draws = guide.get_posterior().sample((4000,)).squeeze(-1)
    # 4000 draws: MC error of the mean ≈ 0.007; 0.1 allows for the remaining SVI noise of a 200-step fit
    assert draws.mean().item() == pytest.approx(y.sum().item() / 5, abs=0.1)
    assert draws.std().item() == pytest.approx(math.sqrt(1 / 5), abs=0.1)


def test_preset_bad_arguments():
    with pytest.raises(ValueError, match="num_flows"):
        AutoRealNVP(funnel, num_flows=0)
    with pytest.raises(ValueError, match="hidden_dims"):
        AutoRealNVP(funnel, hidden_dims=())
    with pytest.raises(ValueError, match="num_householder"):
        AutoSylvester(funnel, num_householder=0)


@pytest.mark.parametrize("cls", GUIDES)
def test_neutra_density_is_the_pulled_back_posterior(cls):
    """log p̃(z) = log p(T(z)) + log|det ∂T/∂z| + (site bijection terms), exactly."""
    guide = cls(positive_model) if cls is AutoRadial else cls(funnel)
    model = positive_model if cls is AutoRadial else funnel
    guide()
    _perturb(guide)
    neutra = NeuTraReparam(guide)
    warped = neutra.reparam(model)
    dim = guide.latent_dim
    z = torch.randn(dim)
    trace = poutine.trace(poutine.condition(warped, {f"{'s' if cls is AutoRadial else 'y'}_shared_latent": z}))
    trace = trace.get_trace()
    transform = guide.get_transform()
    u, ladj = transform.call_and_ladj(z)
    values = {}
    log_det = ladj
    for site, value in guide._unpack_latent(u):
        bij = torch.distributions.biject_to(site["fn"].support)
        values[site["name"]] = bij(value)
        log_det = log_det + bij.log_abs_det_jacobian(value, values[site["name"]]).sum()
    expected = poutine.trace(poutine.condition(model, values)).get_trace().log_prob_sum() + log_det
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", GUIDES)
def test_nuts_runs_in_the_warped_space(cls):
    guide = cls(funnel)
    fit(funnel, guide, num_steps=10, lr=1e-2, seed=0, progress=False, tol=None)
    for p in guide.parameters():
        p.requires_grad_(False)  # NUTS differentiates with respect to z only
    neutra = NeuTraReparam(guide)
    mcmc = MCMC(NUTS(neutra.reparam(funnel), max_tree_depth=3), num_samples=10, warmup_steps=5, disable_progbar=True)
    mcmc.run()
    (latent,) = mcmc.get_samples().values()
    assert latent.shape == (10, 4)
    # batch dims of the samples must sit left of the model's plates
    samples = neutra.transform_sample(latent.unsqueeze(-2))
    assert samples["y"].shape == (10, 1) and samples["x"].shape == (10, 3)
    assert torch.isfinite(samples["x"]).all()
