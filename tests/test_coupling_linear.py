import pytest
import torch

from vi_flows.transforms import (
    AffineCoupling,
    ComposeFlow,
    InverseAutoregressive,
    InvertibleLinear,
    SplineCoupling,
    coupling_stack,
)

from .flow_checks import (
    BATCH_SHAPES,
    check_grid_density,
    check_interleaved_halves,
    check_ladj,
    check_round_trip,
)


def _perturbed(t, scale=0.5, seed=0):
    """Move every parameter off its identity initialization so the checks see a non-trivial map."""
    torch.manual_seed(seed)
    t = t.double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


MAKERS = {
    "coupling": lambda d: AffineCoupling(d, (8,)),
    "coupling-swap": lambda d: AffineCoupling(d, (8, 8), swap=True),
    "coupling-interleave": lambda d: AffineCoupling(d, (8,), interleave=True),
    "coupling-interleave-swap": lambda d: AffineCoupling(d, (8,), swap=True, interleave=True),
    "linear": InvertibleLinear,
    "stack": lambda d: coupling_stack(d, 3, (8,)),
}


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_ladj_and_round_trip(kind, d, batch):
    t = _perturbed(MAKERS[kind](d), scale=0.3, seed=d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 3
    check_ladj(t, x)
    check_round_trip(t, x, atol=1e-9)


@pytest.mark.parametrize("linear", [True, False])
def test_stack_density_integrates_to_one(linear):
    torch.manual_seed(1)
    flow = _perturbed(coupling_stack(2, 4, (16,), linear=linear), scale=0.2, seed=3)
    # midpoint rule with cells of 0.05 plus the tail mass outside the box: both below 1e-3 here
    check_grid_density(flow, lim=15.0, n=600)


def test_coupling_starts_at_identity_and_log_scale_is_bounded():
    t = AffineCoupling(4, (8,), log_scale_bound=2.0).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(y, x)
    assert (ladj == 0).all()
    with torch.no_grad():
        t.net[-1].bias.fill_(1e3)  # raw log-scales of 1000
    y, ladj = t.call_and_ladj(x)
    assert torch.isfinite(y).all()
    assert (ladj <= 2 * 2.0).all()  # two transformed coordinates, each |s| < 2
    t.net[-1].bias.grad = None
    ladj.sum().backward()
    assert torch.isfinite(t.net[-1].bias.grad).all()


@pytest.mark.parametrize("swap", [False, True])
def test_interleaved_halves(swap):
    """``interleave``: the odd coordinates condition the even ones (``swap``: the reverse), seen in the Jacobian."""
    t = _perturbed(AffineCoupling(5, (8,), interleave=True, swap=swap), seed=4)
    check_interleaved_halves(t, 5, swap)
    # one coordinate: nothing to condition on, the interleaved layer is the usual learned affine map
    one = AffineCoupling(1, (8,), interleave=True, swap=swap)
    assert not one.interleave and one.net(torch.zeros(0)).shape == (2,)


@pytest.mark.parametrize("bound, finite", [(3.0, True), (1e6, False)])
def test_deep_coupling_stack_stays_finite_only_with_the_bound(bound, finite):
    """The failure the bound prevents: 32 layers in 19-D with N(0, 1) weights overflow unbounded."""
    torch.manual_seed(0)
    flow = coupling_stack(19, 32, (32,), linear=False, log_scale_bound=bound).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 1.0)
    x = torch.randn(64, 19, dtype=torch.float64)
    y, ladj = flow.call_and_ladj(x)
    assert bool(torch.isfinite(y).all() and torch.isfinite(ladj).all()) == finite
    if finite:
        assert (ladj.abs() <= 32 * 10 * bound).all()  # 10 transformed coordinates per layer, |s| < bound


def test_invertible_linear_structure():
    torch.manual_seed(1)
    t = InvertibleLinear(6).double()
    w = t.weight()
    # a random rotation at initialization
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)  # float32 init
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    w = t.weight()
    torch.testing.assert_close(t.log_scale.sum(), torch.linalg.slogdet(w)[1])
    y = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(t.inv(y), torch.linalg.solve(w, y.T).T)


def test_conditional_coupling():
    torch.manual_seed(2)
    t = _perturbed(AffineCoupling(3, (8,), context_dim=2), seed=2)
    c = torch.randn(5, 2, dtype=torch.float64)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    check_ladj(t.condition(c[0]), x[0])
    bound = t.condition(c)
    check_round_trip(bound, x)
    y0 = bound(x)
    y1 = t.condition(c + 1)(x)
    assert (y0 - y1).abs().max() > 1e-3  # the context changes the map
    with pytest.raises(ValueError, match="context"):
        t(x[0])
    flow = coupling_stack(3, 2, (8,), context_dim=2)
    assert flow.condition(c.float())(x[0].float()).shape == (5, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(dim=3, hidden_dims=()), "hidden_dims"),
        (dict(dim=3, context_dim=-1), "context_dim"),
        (dict(dim=3, log_scale_bound=0.0), "log_scale_bound"),
        (dict(dim=3, swap=1), "swap"),
        (dict(dim=3, interleave="yes"), "interleave"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AffineCoupling(**kwargs)


def test_bad_arguments_linear_and_stack():
    with pytest.raises(ValueError, match="dim"):
        InvertibleLinear(2.5)
    with pytest.raises(ValueError, match="num_flows"):
        coupling_stack(3, 0)
    with pytest.raises(ValueError, match="last dimension 3"):
        InvertibleLinear(3).inv(torch.randn(2, 4))


def test_compose_with_other_families():
    from vi_flows.transforms import Planar

    flow = _perturbed(ComposeFlow([InvertibleLinear(3), Planar(3), AffineCoupling(3, (8,))]), seed=5)
    x = torch.randn(4, 3, dtype=torch.float64)
    check_ladj(flow, x)
    check_round_trip(flow, x, atol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda act: AffineCoupling(4, (8,), activation=act),
        lambda act: SplineCoupling(4, (8,), activation=act),
        lambda act: InverseAutoregressive(4, (8,), activation=act),
    ],
    ids=["coupling", "spline", "iaf"],
)
def test_activation_by_name_or_class(make):
    """A name from ACTIVATIONS and the nn.Module class build the same network; anything else is a ValueError."""
    torch.manual_seed(0)
    by_name = make("tanh")
    torch.manual_seed(0)
    by_class = make(torch.nn.Tanh)
    assert any(isinstance(m, torch.nn.Tanh) for m in by_name.modules())
    for p, q in zip(by_name.parameters(), by_class.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="activation must be one of .*'tanh'.*got 'tanhh'"):
        make("tanhh")
