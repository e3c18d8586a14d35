import pytest
import torch

from vi_flows.transforms import SplineCoupling, rq_spline, spline_stack

from .flow_checks import (
    BATCH_SHAPES,
    check_grid_density,
    check_interleaved_halves,
    check_ladj,
    check_round_trip,
)


def _perturbed(t, scale=0.1, seed=0):
    """Move every parameter off its identity initialization so the checks see a non-trivial map.

    0.1 keeps the log-slopes of a 3-layer stack within about ±10 at |x| ≲ 12: the float64
    round-trip error (roundoff times the local condition number) then stays far below 1e-10.
    """
    torch.manual_seed(seed)
    t = t.double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


def _params(shape, bins, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    raw = lambda k: scale * torch.randn(*shape, k, generator=g, dtype=torch.float64)  # noqa: E731
    return raw(bins), raw(bins), raw(bins - 1)


MAKERS = {
    "coupling": lambda d: SplineCoupling(d, (8,)),
    "coupling-swap": lambda d: SplineCoupling(d, (8, 8), bins=5, swap=True),
    "coupling-halves": lambda d: SplineCoupling(d, (8,), bound=3.0, interleave=False),
    "stack": lambda d: spline_stack(d, 3, (8,)),
}


@pytest.mark.parametrize("inverse", [False, True])
def test_rq_spline_derivative_and_inverse(inverse):
    """Per-element log-slope against autograd, and the two directions undo each other, inside and outside [-B, B]."""
    bound = 2.0
    x = torch.linspace(-3, 3, 601, dtype=torch.float64).requires_grad_(True)  # knots, ±B and the tails included
    w, h, d = _params(x.shape, 6, seed=1)
    y, ladj = rq_spline(x, w, h, d, bound, inverse)
    (slope,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ladj, slope.log(), atol=1e-9, rtol=1e-9)
    assert (slope > 0).all()  # monotonic
    x_back, ladj_back = rq_spline(y.detach(), w, h, d, bound, not inverse)
    torch.testing.assert_close(x_back, x.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj_back, -ladj.detach(), atol=1e-9, rtol=0)
    outside = x.detach().abs() > bound
    assert (y[outside] == x[outside]).all() and (ladj[outside] == 0).all()
    edge = torch.tensor([-bound, bound], dtype=torch.float64)
    torch.testing.assert_close(rq_spline(edge, w[:2], h[:2], d[:2], bound, inverse)[0], edge)  # knots at ±B


def test_rq_spline_continuous_slope_at_the_bounds_and_floors():
    """Slope 1 at ±B (joins the identity tails); with extreme logits the floors keep the spline a bijection."""
    bound = 4.0
    w, h, d = _params((2,), 8, seed=2, scale=3.0)
    x = torch.tensor([-bound + 1e-9, bound - 1e-9], dtype=torch.float64)
    torch.testing.assert_close(rq_spline(x, w, h, d, bound)[1], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    # logits of ±1e4: half the bins at the width floor and full height, the others the reverse; derivatives at the floor
    big = 1e4 * torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1], dtype=torch.float64)
    x = torch.linspace(-bound, bound, 2001, dtype=torch.float64).requires_grad_(True)
    y, ladj = rq_spline(x, big, -big, -big[:7].abs(), bound)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    assert (y.diff() > 0).all()  # still strictly increasing
    (slope,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ladj, slope.log(), atol=1e-8, rtol=1e-8)
    x_back = rq_spline(y.detach(), big, -big, -big[:7].abs(), bound, inverse=True)[0]
    # condition number up to ~1e6 here (slopes between 1e-3 and 1e3): roundoff of 1e-16 grows to ~1e-10
    torch.testing.assert_close(x_back, x.detach(), atol=1e-8, rtol=0)


def test_zero_parameters_are_the_identity():
    zeros = torch.zeros(10, 8, dtype=torch.float64)
    x = torch.linspace(-7, 7, 10, dtype=torch.float64)
    for inverse in (False, True):
        y, ladj = rq_spline(x, zeros, zeros, zeros[:, :7], 5.0, inverse)
        torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros_like(x), atol=1e-14, rtol=0)
    t = spline_stack(4, 3, (8,)).double()
    x = 3 * torch.randn(10, 4, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(y, x, atol=1e-13, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(10, dtype=torch.float64), atol=1e-13, rtol=0)


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_ladj_and_round_trip(kind, d, batch):
    t = _perturbed(MAKERS[kind](d), seed=d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 4  # about a third of the points fall outside [-B, B]
    check_ladj(t, x)
    check_round_trip(t, x, atol=1e-10)


def test_stack_density_integrates_to_one():
    flow = _perturbed(spline_stack(2, 4, (16,), bound=3.0), seed=3)
    # midpoint rule on cells of 0.04 (the density is piecewise smooth, its kinks at the knots are O(cell²)
    # errors) plus the Gaussian tail mass outside the box: both far below 1e-3 here
    check_grid_density(flow, lim=12.0, n=600)


@pytest.mark.parametrize("swap", [False, True])
def test_interleaved_halves(swap):
    """Odd coordinates condition the even ones (``swap``: the reverse), seen in the Jacobian."""
    t = _perturbed(SplineCoupling(5, (8,), bound=10.0, swap=swap), scale=0.5, seed=4)
    check_interleaved_halves(t, 5, swap)


def test_conditional_spline_coupling():
    t = _perturbed(SplineCoupling(3, (8,), context_dim=2), seed=2)
    c = torch.randn(5, 2, dtype=torch.float64)
    x = 3 * torch.randn(4, 5, 3, dtype=torch.float64)
    check_ladj(t.condition(c[0]), x[0])
    check_round_trip(t.condition(c), x, atol=1e-10)
    assert (t.condition(c)(x) - t.condition(c + 1)(x)).abs().max() > 1e-3  # the context changes the map
    with pytest.raises(ValueError, match="context"):
        t(x[0])
    flow = spline_stack(3, 2, (8,), context_dim=2)
    assert flow.condition(c.float())(x[0].float()).shape == (5, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(dim=3, hidden_dims=()), "hidden_dims"),
        (dict(dim=3, bins=1), "bins"),
        (dict(dim=3, bins=4.0), "bins"),
        (dict(dim=3, bound=0.0), "bound"),
        (dict(dim=3, bound=float("inf")), "bound"),
        (dict(dim=3, context_dim=-1), "context_dim"),
        (dict(dim=3, interleave="yes"), "interleave"),
        (dict(dim=3, swap=1), "swap"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplineCoupling(**kwargs)


def test_bad_arguments_stack_and_input():
    with pytest.raises(ValueError, match="num_flows"):
        spline_stack(3, 0)
    with pytest.raises(ValueError, match="bins"):
        spline_stack(3, 2, bins=0)
    with pytest.raises(ValueError, match="last dimension 3"):
        SplineCoupling(3).inv(torch.randn(2, 4))
