import pytest
import torch

from vi_flows.distributions import FlowDistribution, StandardNormal
from vi_flows.transforms import ComposeFlow, Sylvester
from vi_flows.transforms.sylvester import householder_product

from .flow_checks import BATCH_SHAPES, check_ladj, check_round_trip, grid_mass


def _make(d, seed=0, scale=1.0, **kwargs):
    torch.manual_seed(seed)
    t = Sylvester(d, **kwargs).double()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, scale)
    return t


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_ladj_matches_brute_force(d, batch):
    t = _make(d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 2
    check_ladj(t, x)


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_round_trip_at_arbitrary_points(d, batch):
    t = _make(d, seed=d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 3
    # back substitution solves each coordinate to a few ulps; 1e-10 leaves room for d = 5 propagated errors
    check_round_trip(t, x, atol=1e-10)


def test_inverse_near_singular_and_far_away():
    t = _make(4, seed=1)
    with torch.no_grad():
        t.diag_raw.fill_(-30.0)  # R_ii R̃_ii = −1 + 1e-4: the steepest allowed fold
        t.log_rt_diag.fill_(2.0)
    assert ((t.matrices()[1].diagonal() * t.matrices()[2].diagonal()) > -1).all()
    x = torch.randn(200, 4, dtype=torch.float64) * 3
    check_ladj(t, x[:5])
    check_round_trip(t, x, atol=1e-8)
    check_round_trip(t, x * 1e4, atol=1e-6)


def test_householder_product_is_orthogonal():
    torch.manual_seed(0)
    q = householder_product(torch.randn(3, 5, dtype=torch.float64))
    torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64))
    assert torch.linalg.det(q).item() == pytest.approx(-1.0)  # an odd number of reflections


def test_starts_at_identity():
    t = Sylvester(3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(ladj, torch.zeros(4, dtype=torch.float64))


def test_stack_density_integrates_to_one():
    flow = ComposeFlow([_make(2, seed=k, scale=0.7) for k in range(3)])
    mass, dist = grid_mass(flow, lim=10.0, n=300)
    assert abs(mass - 1) < 1e-3, mass  # midpoint rule, cells of 0.067, smooth tanh density
    y, log_q = dist.rsample_and_log_prob((64,))
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=1e-9, rtol=1e-9)


def test_inverse_gradient_matches_finite_differences():
    """The implicit-function gradient of the numerical inverse, for maximum likelihood."""
    t = _make(3, seed=4, scale=0.8, num_householder=2)
    y = torch.randn(5, 3, dtype=torch.float64)
    names = [n for n, _ in t.named_parameters()]
    saved = {n: p for n, p in t.named_parameters()}

    def nll(*params):
        for n in names:
            delattr(t, n)
        for n, p in zip(names, params):
            setattr(t, n, p)
        try:
            t._last, t._cached_x_y = None, (None, None)
            dist = FlowDistribution(StandardNormal(3, dtype=torch.float64), t)
            return -dist.log_prob(y.clone()).sum()
        finally:
            for n in names:
                delattr(t, n)
                setattr(t, n, saved[n])

    params = tuple(saved[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(nll, params)
    # and with respect to the data point
    y_var = y.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: t.inv(v.clone()), (y_var,))  # clone: skip the cache


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="dim"):
        Sylvester(bad)
    with pytest.raises(ValueError, match="num_householder"):
        Sylvester(3, num_householder=bad)


def test_wrong_last_dimension():
    with pytest.raises(ValueError, match="last dimension 3"):
        Sylvester(3).inv(torch.randn(2, 4))
