"""The autoguide contract a Pyro user relies on."""

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    Predictive,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
)
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal

from vi_flows import AutoCNF, AutoFlow, AutoIAF, AutoNSF, AutoPlanar, AutoRadial
from vi_flows.transforms import Planar

from .conftest import cuda

FAST_GUIDES = {
    "planar": lambda m, **kw: AutoPlanar(m, num_flows=4, **kw),
    "radial": lambda m, **kw: AutoRadial(m, num_flows=4, **kw),
    "iaf": lambda m, **kw: AutoIAF(m, num_flows=2, **kw),
    "cnf": lambda m, **kw: AutoCNF(m, hidden_dims=(16, 16), rtol=1e-3, atol=1e-3, **kw),
    "nsf": lambda m, **kw: AutoNSF(m, num_flows=2, hidden_dims=(16,), **kw),
}


def constrained_model(y=None):
    """Every kind of constrained site Pyro users meet, plus a factor."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    rate = pyro.sample("rate", dist.LogNormal(0.0, 1.0))
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    corr = pyro.sample("corr", dist.LKJCholesky(3, 1.0))
    pyro.factor("penalty", -0.5 * mu**2)
    with pyro.plate("data", 10):
        pyro.sample("y", dist.Normal(mu + rate * p, sigma), obs=y)
    return corr, w


def _train(model, guide, *args, steps=30, loss=None, lr=0.01):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss or Trace_ELBO())
    losses = [svi.step(*args) for _ in range(steps)]
    assert all(math.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("name", FAST_GUIDES)
def test_constrained_sites_and_outputs(name):
    y = torch.randn(10) + 1.0
    guide = FAST_GUIDES[name](constrained_model)
    _train(constrained_model, guide, y)
    sample = guide(y)
    assert set(sample) == {"mu", "sigma", "rate", "p", "w", "corr"}
    assert sample["sigma"] > 0 and sample["rate"] > 0 and 0 < sample["p"] < 1
    torch.testing.assert_close(sample["w"].sum(), torch.tensor(1.0))
    assert dist.constraints.corr_cholesky.check(sample["corr"]).all()
    # latent = 1 + 1 + 1 + 1 + 2 (simplex) + 3 (corr cholesky) = 9
    assert guide.latent_dim == 9
    assert guide.sample_latent(y).shape == (9,)


@pytest.mark.parametrize("name", FAST_GUIDES)
def test_median_and_quantiles(name):
    y = torch.randn(10)
    guide = FAST_GUIDES[name](constrained_model)
    _train(constrained_model, guide, y, steps=5)
    q = guide.quantiles([0.05, 0.5, 0.95], y)
    q_again = guide.quantiles([0.05, 0.5, 0.95], y)
    for k in q:
        torch.testing.assert_close(q[k], q_again[k])  # fixed seed: repeated calls agree
        assert q[k].shape[0] == 3
    assert (q["sigma"][0] < q["sigma"][1]) and (q["sigma"][1] < q["sigma"][2])
    med = guide.median(y)
    torch.testing.assert_close(med["sigma"], q["sigma"][1], atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(med["w"].sum(), torch.tensor(1.0))  # the coupled site stays on the simplex
    # the global RNG is untouched by the seeded summaries
    torch.manual_seed(5)
    a = torch.rand(1)
    torch.manual_seed(5)
    guide.median(y)
    assert torch.rand(1) == a


@pytest.mark.parametrize("name", FAST_GUIDES)
@pytest.mark.parametrize("parallel", [False, True])
def test_predictive(name, parallel):
    y = torch.randn(10)
    guide = FAST_GUIDES[name](constrained_model)
    _train(constrained_model, guide, y, steps=5)
    pred = Predictive(constrained_model, guide=guide, num_samples=7, parallel=parallel)(None)
    normal = AutoNormal(constrained_model)
    reference = Predictive(constrained_model, guide=normal, num_samples=7, parallel=parallel)(None)
    assert {k: v.shape for k, v in pred.items()} == {k: v.shape for k, v in reference.items()}
    assert pred["y"].shape[-1] == 10 and pred["w"].shape[-1] == 3
    assert (pred["sigma"] > 0).all() and pred["sigma"].unique().numel() == 7


def _enum_model(data):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 5.0).to_event(1))
    with pyro.plate("data", len(data)):
        k = pyro.sample("k", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[k], 1.0), obs=data)


@pytest.mark.parametrize(
    "loss",
    [
        Trace_ELBO(),
        TraceGraph_ELBO(),
        Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        JitTrace_ELBO(ignore_jit_warnings=True),
    ],
    ids=["trace", "tracegraph", "vectorized", "jit"],
)
def test_elbo_flavours(loss):
    y = torch.randn(10) + 2.0
    pyro.set_rng_seed(0)
    guide = AutoPlanar(constrained_model, num_flows=3, init=None)  # a poor start: training must lower the loss
    losses = _train(constrained_model, guide, y, steps=40, loss=loss, lr=0.05)
    # means of 5 single-draw losses: one draw's noise (a few nats here) is larger than 20 steps' progress
    assert sum(losses[-5:]) < sum(losses[:5])


def test_trace_enum_elbo_with_enumerated_discrete_site():
    data = torch.cat([torch.randn(20) - 3, torch.randn(20) + 3])
    guide = AutoPlanar(_enum_model, num_flows=2)
    losses = _train(_enum_model, guide, data, steps=60, loss=TraceEnum_ELBO(max_plate_nesting=1), lr=0.05)
    assert "k" not in guide(data)
    assert losses[-1] < losses[0]


def test_discrete_site_not_enumerated_is_an_error():
    def model():
        pyro.sample("n", dist.Poisson(3.0))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'n' is discrete"):
        AutoPlanar(model)()


def test_support_without_bijection_is_an_error():
    class Unregistered(dist.constraints.Constraint):
        def check(self, value):
            return value == value

    class Odd(dist.Normal):
        support = Unregistered()

    def model():
        pyro.sample("s", Odd(0.0, 1.0))

    with pytest.raises(ValueError, match="'s' has support"):
        AutoPlanar(model)()


def test_model_without_latents_is_an_error():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    with pytest.raises(ValueError, match="no latent"):
        AutoPlanar(model)()


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_num_flows(bad):
    with pytest.raises(ValueError, match="num_flows"):
        AutoPlanar(constrained_model, num_flows=bad)


@pytest.mark.parametrize("kw", [{"init_scale": -1.0}, {"base": "dense"}, {"init": "map"}, {"start": "zero"}])
def test_bad_options(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        AutoPlanar(constrained_model, **kw)


def test_cnf_checkpoint_gradient_equals_backprop():
    """AutoCNF(gradient="checkpoint") gives the default's loss and parameter gradients (same steps, exact backward)."""
    grads = {}
    for mode in ("backprop", "checkpoint"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoCNF(constrained_model, hidden_dims=(8,), rtol=1e-4, atol=1e-4, gradient=mode, init_scale=0.5)
        guide()
        assert guide.flow.parts[0].gradient == mode
        with torch.no_grad():  # a non-trivial field: the last layer starts at zero
            for p in guide.flow.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        pyro.set_rng_seed(3)
        loss = Trace_ELBO().differentiable_loss(constrained_model, guide)
        params = {k: v for k, v in guide.named_parameters() if not k.startswith("start_")}  # the start is fixed
        grads[mode] = (loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    (loss_b, g_b), (loss_c, g_c) = grads["backprop"], grads["checkpoint"]
    torch.testing.assert_close(loss_c, loss_b)
    assert g_b.keys() == g_c.keys() and any(g.abs().sum() > 0 for g in g_b.values())
    for name in g_b:
        torch.testing.assert_close(g_c[name], g_b[name], rtol=1e-4, atol=1e-6)


def test_latent_dimension_change_is_an_error():
    def model(x):
        pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))

    guide = AutoPlanar(model, num_flows=2)
    guide(torch.zeros(3))
    guide(torch.ones(3))  # same shapes: fine
    with pytest.raises(ValueError, match="'z' changed shape"):
        guide(torch.zeros(4))


def test_global_latents_in_plates_and_subsample_error():
    def model(y):
        with pyro.plate("groups", 3):
            theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    y = torch.tensor([1.0, -1.0, 2.0])
    guide = AutoPlanar(model, num_flows=3, init=None)  # from a poor start, so that training must lower the loss
    losses = _train(model, guide, y, steps=50, lr=0.05)
    assert losses[-1] < losses[0] and guide(y)["theta"].shape == (3,)
    # summaries of a site inside a plate keep the site's own shape
    assert guide.median(y)["theta"].shape == (3,)
    q = guide.quantiles([0.1, 0.9], y)["theta"]
    assert q.shape == (2, 3) and (q[0] < q[1]).all()

    def local_model(y):
        with pyro.plate("data", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match="subsampled plate 'data'.*AutoGuideList.*AmortizedFlow"):
        AutoPlanar(local_model)(torch.randn(100))


def test_auto_guide_list_and_blocked_submodel():
    def model(y):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.HalfNormal(1.0))
        c = pyro.sample("c", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(a + c, b), obs=y)

    guide = AutoGuideList(model)
    guide.append(AutoPlanar(poutine.block(model, expose=["a", "b"]), num_flows=2))
    guide.append(AutoNormal(poutine.block(model, expose=["c"])))
    _train(model, guide, torch.tensor(0.5), steps=10)
    assert set(guide(torch.tensor(0.5))) == {"a", "b", "c"}

    guide2 = AutoGuideList(model)
    guide2.append(AutoRadial(poutine.block(model, hide=["c"]), num_flows=2))
    guide2.append(AutoDelta(poutine.block(model, expose=["c"])))
    _train(model, guide2, torch.tensor(0.5), steps=10)
    assert set(guide2(torch.tensor(0.5))) == {"a", "b", "c"}


def _same_samples(g1, g2, *args):
    pyro.set_rng_seed(11)
    s1 = g1(*args)
    pyro.set_rng_seed(11)
    s2 = g2(*args)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", FAST_GUIDES)
def test_save_and_load(name, tmp_path):
    y = torch.randn(10)
    guide = FAST_GUIDES[name](constrained_model)
    _train(constrained_model, guide, y, steps=10)

    # whole object
    buf = io.BytesIO()
    torch.save(guide, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _same_samples(guide, loaded, y)

    # state_dict into a fresh guide (needs one call to build its modules)
    fresh = FAST_GUIDES[name](constrained_model)
    fresh(y)
    fresh.load_state_dict(guide.state_dict())
    _same_samples(guide, fresh, y)

    # Pyro's param store
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    other = FAST_GUIDES[name](constrained_model)
    pyro.get_param_store().load(path)
    other(y)
    for k, v in pyro.get_param_store().items():
        torch.testing.assert_close(v.detach(), expected[k])
    _same_samples(guide, other, y)


def test_float64_model_gives_float64_guide():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))

    guide = AutoPlanar(model, num_flows=2)
    guide()
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    assert guide()["z"].dtype == torch.float64


def test_auto_flow_with_explicit_transforms_and_wrong_dim():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = AutoFlow(model, lambda d: [Planar(d), Planar(d)])
    assert guide()["z"].shape == (3,)
    with pytest.raises(ValueError, match="dim=2.*latent dimension is 3"):
        AutoFlow(model, [Planar(2)])()


def test_posterior_log_prob_at_arbitrary_points_matches_cached():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoPlanar(model, num_flows=6, base="full")
    guide()
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.normal_()
    q = guide.get_posterior()
    z, log_q = q.rsample_and_log_prob((50,))
    torch.testing.assert_close(q.log_prob(z.clone()), log_q, atol=1e-4, rtol=1e-4)


@cuda
def test_guide_on_cuda():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2, device="cuda"), 1.0).to_event(1))

    guide = AutoPlanar(model, num_flows=2)
    _train(model, guide, steps=5)
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert guide()["z"].device.type == "cuda"
