import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.autograd.functional import jacobian

from vi_flows import AmortizedFlow
from vi_flows.amortized import ConditionalPlanar, ConditionalRadial, ConditionalSylvester
from vi_flows.distributions import FlowDistribution, StandardNormal
from vi_flows.transforms.base import Conditioned

from .flow_checks import check_round_trip

FAMILIES = ["planar", "radial", "sylvester", "iaf", "coupling", "spline", "cnf"]
# dopri5 at rtol = atol = 1e-9: the solution and log-determinant carry a global error of ~100x that
CNF_OPTIONS = {"rtol": 1e-9, "atol": 1e-9}


def _amortized(flow, d=3, c=2, seed=0, std=0.5, **kw):
    """Every parameter ~ N(0, std²): far from the identity the flows start at, so contexts matter."""
    torch.manual_seed(seed)
    if flow == "cnf":
        kw = {"hidden_dims": (8, 8), **CNF_OPTIONS, **kw}
    elif flow in ("iaf", "coupling", "spline"):
        kw = {"hidden_dims": (8,), **kw}
    q = AmortizedFlow(d, c, flow, num_flows=1 if flow == "cnf" else 3, **kw).double()
    with torch.no_grad():
        for p in q.parameters():
            p.normal_(0, std)
    return q


def _slogdet_per_example(flow, x, context):
    """Brute-force log|det J| of the flow bound to context[b] at x[..., b, :]."""
    out = torch.empty(x.shape[:-1], dtype=x.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).reshape(-1, x.dim() - 1):
        idx = tuple(idx.tolist())
        bound = flow.condition(context[idx[-1]])
        out[idx] = torch.linalg.slogdet(jacobian(lambda v, bound=bound: bound.call_and_ladj(v)[0], x[idx]))[1]
    return out


def _tol(flow):
    return 1e-6 if flow == "cnf" else 1e-9


# ---------------------------------------------------------------- conditional transforms


@pytest.mark.parametrize(
    "flow, x_batch",
    # (S, B) batches for all but the CNF, whose brute-force Jacobians (an ODE solve each) are the slow part
    [(f, b) for f in FAMILIES for b in [(4,), (2, 4)] if (f, b) != ("cnf", (2, 4))],
)
def test_ladj_per_example_matches_brute_force(flow, x_batch):
    q = _amortized(flow, seed=1)
    context = torch.randn(4, 2, dtype=torch.float64)
    x = torch.randn(*x_batch, 3, dtype=torch.float64)
    bound = q.flow.condition(context)
    y, ladj = bound.call_and_ladj(x)
    assert y.shape == x.shape and ladj.shape == x_batch
    torch.testing.assert_close(ladj, _slogdet_per_example(q.flow, x, context), atol=_tol(flow), rtol=1e-7)
    # pairing x[..., b, :] with context[b] equals binding that one context
    torch.testing.assert_close(y[..., 1, :], q.flow.condition(context[1]).call_and_ladj(x[..., 1, :])[0])


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester", "coupling", "spline"])
def test_round_trip_at_arbitrary_points(flow):
    # spline at std 0.2: at 0.5 some bins are so steep (forward Jacobian singular values up to 5e6) that the
    # round trip through them magnifies float64 rounding of the intermediate point to 1e-9–1e-7
    q = _amortized(flow, seed=2, std=0.2 if flow == "spline" else 0.5)
    bound = q.flow.condition(torch.randn(4, 2, dtype=torch.float64))
    # coupling: the randomized LU factors make W⁻¹ stretch these points to |x| ~ 1e5, and the round trip
    # back carries float64 rounding of that size (~1e-11 relative): a looser absolute tolerance
    check_round_trip(bound, torch.randn(5, 4, 3, dtype=torch.float64) * 3, atol=1e-7 if flow == "coupling" else 1e-9)


@pytest.mark.parametrize("flow", FAMILIES)
def test_contexts_give_different_transforms_and_gradients_reach_context(flow):
    q = _amortized(flow, seed=3)
    x = torch.randn(3, dtype=torch.float64).expand(5, 3)  # one point under five contexts
    context = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y, ladj = q.flow.condition(context).call_and_ladj(x)
    gaps = (y.unsqueeze(0) - y.unsqueeze(1)).abs().amax(-1) + torch.eye(5)
    assert (gaps > 1e-6).all()
    (y.square().sum() + ladj.sum()).backward()
    assert context.grad is not None and (context.grad.abs().sum(-1) > 0).all()
    for name, p in q.flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester", "coupling", "spline", "cnf"])
def test_flows_start_as_identity_for_every_context(flow):
    torch.manual_seed(4)
    q = AmortizedFlow(3, 2, flow, num_flows=2).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y, ladj = q.flow.condition(torch.randn(6, 2, dtype=torch.float64) * 3).call_and_ladj(x)
    # Sylvester's R_ii = 0 comes from a float32 init of softplus⁻¹(1 − δ): exact up to its rounding
    atol = 1e-7 if flow == "sylvester" else 1e-12
    torch.testing.assert_close(y, x, atol=atol, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(6, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize("flow", ["none", *FAMILIES])
def test_distribution_shapes_and_log_prob_of_own_and_other_points(flow):
    q = _amortized(flow, seed=5) if flow != "none" else AmortizedFlow(3, 2, "none").double()
    context = torch.randn(4, 2, dtype=torch.float64)
    d = q(context)
    assert isinstance(d, FlowDistribution) and d.batch_shape == (4,) and d.event_shape == (3,)
    z, log_q = d.rsample_and_log_prob((5,))
    assert z.shape == (5, 4, 3) and log_q.shape == (5, 4)
    # log_prob of a fresh copy goes through the inverses and must give the same density
    torch.testing.assert_close(d.log_prob(z.clone()), log_q, atol=1e-6 if flow == "cnf" else 1e-9, rtol=1e-9)
    e = d.expand((2, 4))
    assert e.batch_shape == (2, 4) and e.rsample().shape == (2, 4, 3)


@pytest.mark.parametrize("flow", ["none", "planar", "radial", "sylvester", "iaf", "coupling", "spline"])
def test_density_integrates_to_one(flow):
    # one context, d = 2: ∫ q over [-8, 8]² by the midpoint rule; the base has scale ≲ 1, so the
    # mass outside is < 1e-6 and the 200² grid's error on these smooth densities is below 1e-3
    # (coupling at std 0.2: its randomized InvertibleLinear factors at 0.4 stretch mass far outside the grid;
    # spline at std 0.2: at 0.4 its steepest bins make spikes narrower than a grid cell, off by 0.05 on 200²)
    std = 0.2 if flow in ("coupling", "spline") else 0.4
    q = _amortized(flow, d=2, seed=6, std=std) if flow != "none" else AmortizedFlow(2, 2, "none").double()
    context = torch.randn(2, dtype=torch.float64)
    edges = torch.linspace(-8, 8, 201, dtype=torch.float64)
    mid = 0.5 * (edges[1:] + edges[:-1])
    grid = torch.stack(torch.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        d = q(context)
        assert d.batch_shape == ()
        mass = (d.log_prob(grid).exp().sum() * (16 / 200) ** 2).item()
    assert abs(mass - 1) < 2e-3


def test_pyro_guide_under_subsampled_plate_with_vectorized_particles():
    n, b, particles = 50, 8, 3
    torch.manual_seed(7)
    data = torch.randn(n, 4)
    encoder = torch.nn.Linear(4, 5)
    q = AmortizedFlow(2, 5, "planar", num_flows=2)
    seen = {}

    def model(x):
        with pyro.plate("data", n, subsample_size=b) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample(
                "x", dist.Normal(z.sum(-1, keepdim=True), 1.0).expand([*z.shape[:-1], 4]).to_event(1), obs=x[idx]
            )

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("q", q)
        with pyro.plate("data", n, subsample_size=b) as idx:
            z = pyro.sample("z", q(encoder(x[idx])))
            seen["idx"], seen["z"] = idx, z

    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
        model, guide, data
    )
    assert torch.isfinite(loss)
    assert seen["z"].shape == (particles, b, 2) and seen["idx"].shape == (b,)
    loss.backward()
    for name, p in [*encoder.named_parameters(), *q.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- accuracy on a known posterior


def _toy():
    """z ~ N(0, I₂), x | z ~ N(Az, σ²I₃): p(z | x) = N(ΣAᵀx/σ², Σ), Σ = (I + AᵀA/σ²)⁻¹ (correlation −0.82)."""
    a = torch.tensor([[1.0, 1.0], [0.5, 1.0], [1.0, 0.6]])
    sigma = 0.5
    precision = torch.eye(2) + a.T @ a / sigma**2
    cov = torch.linalg.inv(precision)
    return a, sigma, precision, cov


# Tolerances as fractions of the diagonal family's KL. IAF (affine in z₂ given z₁ and the context) can
# represent the posterior exactly: a tenth on average (mean KL 0.02 to 0.03 nats over seeds 1, 2, 3, 8 after 600
# steps). Planar tanh ridges only approximate the linear shear and vary more with the seed (0.03 to 0.12):
# three tenths. The tails of x, where the context heads extrapolate, are worse, so 90% of x within twice that.
@pytest.mark.parametrize("flow, num_flows, tol", [("iaf", 2, 0.1), ("planar", 6, 0.3)])
def test_matches_exact_gaussian_posterior(flow, num_flows, tol):
    a, sigma, precision, cov = _toy()
    # the best diagonal Gaussian has KL = ½ (Σ log Λ_ii − log det Λ) = 0.56 nats: only the flow can close it
    kl_diagonal = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    assert kl_diagonal > 0.5
    torch.manual_seed(8)
    kw = {"hidden_dims": (16,)} if flow == "iaf" else {}
    q = AmortizedFlow(2, 3, flow, num_flows=num_flows, **kw)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    prior = StandardNormal(2)
    for _ in range(600):
        z0 = torch.randn(128, 2)
        x = z0 @ a.T + sigma * torch.randn(128, 3)
        z, log_q = q(x).rsample_and_log_prob()
        log_lik = torch.distributions.Normal(z @ a.T, sigma).log_prob(x).sum(-1)
        loss = -(prior.log_prob(z) + log_lik - log_q).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # KL(q ‖ p(z|x)) on 200 held-out x, 256 draws each; as q → p the integrand log q − log p tends to a
    # constant 0, so its Monte-Carlo error is far below the tolerance
    x = torch.randn(200, 2) @ a.T + sigma * torch.randn(200, 3)
    posterior = torch.distributions.MultivariateNormal((x @ a / sigma**2) @ cov, cov)
    with torch.no_grad():
        z, log_q = q(x).rsample_and_log_prob((256,))
        kl = (log_q - posterior.log_prob(z)).mean(0)
    assert kl.mean().item() < tol * kl_diagonal, kl.mean().item()
    assert kl.quantile(0.9).item() < 2 * tol * kl_diagonal, kl.quantile(0.9).item()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": 2.5}, "latent_dim"),
        ({"context_dim": 0}, "context_dim"),
        ({"context_dim": "a"}, "context_dim"),
        ({"flow": "glow"}, "flow"),
        ({"flow": None}, "flow"),
        ({"num_flows": -1}, "num_flows"),
        ({"num_flows": 0}, "num_flows"),
        ({"flow": "none", "num_flows": 2}, "num_flows"),
        ({"hidden_dims": (8,)}, "hidden_dims"),
        ({"flow": "iaf", "hidden_dims": (0,)}, "hidden_dims"),
        ({"trace": "exact"}, "options"),
        ({"flow": "coupling", "num_householder": 2}, "options"),
        ({"flow": "sylvester", "linear": False}, "options"),
        ({"flow": "sylvester", "hidden_dims": (8,)}, "hidden_dims"),
        ({"flow": "sylvester", "num_householder": 0}, "num_householder"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {"latent_dim": 3, "context_dim": 2, "flow": "planar", **kwargs}
    with pytest.raises(ValueError, match=name):
        AmortizedFlow(**args)


def test_bad_context():
    q = AmortizedFlow(3, 2, "planar")
    with pytest.raises(ValueError, match="context"):
        q(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context"):
        q([0.0, 1.0])
    with pytest.raises(ValueError, match="context"):
        q.flow.condition(torch.randn(4, 2))(torch.randn(5, 3))  # batch 4 does not broadcast with 5
    with pytest.raises(ValueError, match=r"condition\(context\)"):
        q.flow(torch.randn(4, 3))
    for cls in (ConditionalPlanar, ConditionalRadial):
        with pytest.raises(ValueError, match="num_flows"):
            cls(3, 0, 2)
        assert isinstance(cls(3, 1, 2).condition(torch.randn(2)), Conditioned)
    assert math.isfinite(q(torch.randn(2)).sample().sum().item())


# ---------------------------------------------------------------- Sylvester and coupling specifics


def test_sylvester_amortizes_q_and_its_inverse_gradient_is_implicit():
    """``Q(c)`` differs per example and stays orthogonal; ``log_prob`` through the numerical inverse has the
    implicit-function gradient with respect to the context (checked against finite differences)."""
    q = _amortized("sylvester", seed=9, std=0.4)
    context = torch.randn(4, 2, dtype=torch.float64)
    qs = torch.stack([p[0] for p in q.flow.params(context)])  # (K, B, d, d)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(qs @ qs.mT, eye.expand_as(qs))
    assert (qs[:, 0] - qs[:, 1]).abs().amax() > 1e-3
    y = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c: q(c).log_prob(y.clone()), (context.clone().requires_grad_(),))


def test_sylvester_heads_move_per_example_parameters_by_lr_not_lr_times_context_norm():
    """The heads read ``c/√C``: one Adam step moves each weight by at most ``lr``, so ``R``'s per-example
    entries (linear in the heads) move by at most ``lr (1 + ‖c‖₁/√C)``; unscaled heads would move them
    by up to ``lr (1 + ‖c‖₁)``, ~17× that for this 300-wide context (the VAE's)."""
    torch.manual_seed(0)
    dim, width, lr = 4, 300, 1e-3
    flow = ConditionalSylvester(dim, 2, width).double()
    context = torch.randn(8, width, dtype=torch.float64).relu()  # an encoder's ReLU outputs

    def r_upper():
        return torch.stack([p[1] for p in flow.params(context)]).triu(1)  # (K, B, d, d)

    before = r_upper().detach()
    y, ladj = flow.condition(context).call_and_ladj(torch.randn(8, dim, dtype=torch.float64))
    (y.square().sum() / 2 - ladj.sum()).backward()
    torch.optim.Adam(flow.parameters(), lr=lr).step()
    change = (r_upper().detach() - before).abs().amax((0, -2, -1))  # per example
    bound = lr * (1 + context.abs().sum(-1) / math.sqrt(width))
    assert (change <= bound * (1 + 1e-9)).all()
    # the step does move R (R = 0 at the start has a nonzero gradient): the bound is not vacuous
    assert (change > 0.5 * bound).all()


def test_coupling_is_the_conditional_coupling_stack():
    q = AmortizedFlow(4, 2, "coupling", num_flows=3, hidden_dims=(8,))
    couplings = [p for p in q.flow.parts if type(p).__name__ == "AffineCoupling"]
    assert len(couplings) == 3 and all(c.context_dim == 2 for c in couplings)
    assert [c.swap for c in couplings] == [False, True, False]  # alternating halves
    assert len(AmortizedFlow(4, 2, "coupling", num_flows=3, linear=False).flow.parts) == 3
