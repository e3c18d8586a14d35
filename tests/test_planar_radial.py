import pytest
import torch

from vi_flows.distributions import FlowDistribution, StandardNormal
from vi_flows.transforms import ComposeFlow, Planar, PlanarStack, Radial, RadialStack

from .conftest import cuda
from .flow_checks import BATCH_SHAPES, check_ladj, check_round_trip, grid_mass

FAMILIES = [Planar, Radial]


def test_stacks_equal_their_layers_composed():
    """PlanarStack/RadialStack (packed parameters) compute exactly the composed single layers."""
    torch.manual_seed(7)
    for stack_cls, layer_cls, names in [
        (PlanarStack, Planar, ("u", "w", "b")),
        (RadialStack, Radial, ("x0", "alpha_raw", "beta_raw")),
    ]:
        packed = stack_cls(3, 4).double()
        with torch.no_grad():
            for p in packed.parameters():
                p.normal_(0, 0.7)
        layers = []
        for k in range(4):
            layer = layer_cls(3).double()
            with torch.no_grad():
                for n in names:
                    getattr(layer, n).copy_(getattr(packed, n)[k])
            layers.append(layer)
        x = torch.randn(10, 3, dtype=torch.float64)
        y, ladj = packed.call_and_ladj(x)
        y_ref, ladj_ref = ComposeFlow(layers).call_and_ladj(x)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ladj, ladj_ref)
        check_ladj(packed, x[:3])
        check_round_trip(packed, x)


def _make(cls, d, seed=0):
    torch.manual_seed(seed)
    t = cls(d).double()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 1.0)
    return t


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_ladj_matches_brute_force(cls, d, batch):
    t = _make(cls, d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 2
    check_ladj(t, x)


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_round_trip_at_arbitrary_points(cls, d, batch):
    t = _make(cls, d, seed=d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 3
    check_round_trip(t, x, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_planar_constraint_holds_when_wu_far_below_minus_one(d):
    torch.manual_seed(1)
    t = Planar(d).double()
    with torch.no_grad():
        t.w.normal_()
        t.u.copy_(-50.0 * t.w / (t.w @ t.w))  # wᵀu = -50
    assert (t.w @ t.u).item() == pytest.approx(-50.0)
    assert (t.w @ t.u_hat()).item() >= -1.0 + 0.99e-4  # the margin δ of Planar
    x = torch.randn(200, d, dtype=torch.float64) * 4
    check_ladj(t, x[:10])
    check_round_trip(t, x, atol=1e-9)


def test_planar_inverse_far_from_origin():
    torch.manual_seed(2)
    t = _make(Planar, 3)
    x = torch.randn(100, 3, dtype=torch.float64) * 1e4
    check_round_trip(t, x, atol=1e-7)


def test_planar_stable_when_w_is_zero():
    t = Planar(3).double()
    with torch.no_grad():
        t.w.zero_()
    x = torch.randn(5, 3, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    check_round_trip(t, x)


def test_planar_no_overflow_for_large_wu():
    t = Planar(2).double()
    with torch.no_grad():
        t.w.copy_(torch.tensor([30.0, 0.0]))
        t.u.copy_(torch.tensor([40.0, 1.0]))  # wᵀu = 1200: exp overflows, softplus must not
    assert torch.isfinite(t.u_hat()).all()
    x = torch.randn(4, 2, dtype=torch.float64)
    check_ladj(t, x)


def test_radial_constraint_beta_ge_minus_alpha():
    t = Radial(4).double()
    with torch.no_grad():
        t.beta_raw.fill_(-40.0)
        t.alpha_raw.fill_(3.0)
    alpha, beta = t.alpha_beta()
    assert beta.item() >= -alpha.item()
    x = torch.randn(50, 4, dtype=torch.float64)
    check_ladj(t, x[:5])
    check_round_trip(t, x)


@pytest.mark.parametrize("cls", FAMILIES)
def test_stack_density_integrates_to_one(cls):
    torch.manual_seed(3)
    layers = []
    for _ in range(8):
        layer = cls(2).double()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.7)
        layers.append(layer)
    mass, dist = grid_mass(ComposeFlow(layers), lim=10.0, n=500)
    assert abs(mass - 1) < 1e-3, mass
    # the cached log-density of samples equals the log-density recomputed through the inverses
    y, log_q = dist.rsample_and_log_prob((64,))
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=1e-9, rtol=1e-9)


def test_planar_inverse_gradient_matches_finite_differences():
    """The implicit-function gradient of the numerical inverse, for maximum likelihood."""
    torch.manual_seed(4)
    t = _make(Planar, 3)
    y = torch.randn(5, 3, dtype=torch.float64)

    def nll():
        dist = FlowDistribution(StandardNormal(3, dtype=torch.float64), t)
        return -dist.log_prob(y.clone()).sum()

    params = tuple(p.detach().clone().requires_grad_() for p in (t.u, t.w, t.b))
    assert torch.autograd.gradcheck(lambda u, w, b: _with_params(t, u, w, b, nll), params)


def _with_params(t, u, w, b, fn):
    saved = t.u, t.w, t.b
    del t.u, t.w, t.b
    t.u, t.w, t.b = u, w, b
    try:
        t._last = None
        t._cached_x_y = None, None
        return fn()
    finally:
        del t.u, t.w, t.b
        t.u, t.w, t.b = saved


@pytest.mark.parametrize("cls", [Planar, lambda d, **kw: PlanarStack(d, 6, **kw)])
def test_planar_starts(cls):
    """identity: y = x exactly; random: u, w, b ~ U(−1/√d, 1/√d) as Pyro's Planar, and not the identity."""
    torch.manual_seed(3)
    x = torch.randn(50, 4, dtype=torch.float64)
    ident = cls(4).double()
    y, ladj = ident.call_and_ladj(x)
    # û = 0 up to float32 rounding of the u that makes it so (the parameters are made in float32)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(50, dtype=torch.float64), atol=1e-6, rtol=0)
    rand = cls(4, start="random").double()
    for p in (rand.u, rand.w, rand.b):
        assert 0 < p.abs().max() <= 0.5  # s = 1/√4
    assert rand.u.abs().max() > 0.25  # 4+ uniform draws all below s/2: probability 2⁻⁴ (fixed seed)
    y, ladj = rand.call_and_ladj(x)
    assert (y - x).abs().max() > 0.1 and ladj.abs().max() > 0.01
    check_ladj(rand, x[:3])
    check_round_trip(rand, x)


def test_planar_bad_start_and_scale():
    with pytest.raises(ValueError, match="start must be one of"):
        PlanarStack(2, 3, start="zeros")
    with pytest.raises(ValueError, match="init_scale must be a positive"):
        Planar(2, init_scale=0.0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_dim(bad):
    for cls in FAMILIES:
        with pytest.raises(ValueError, match="dim"):
            cls(bad)


def test_wrong_last_dimension():
    t = Planar(3)
    with pytest.raises(ValueError, match="last dimension 3"):
        t(torch.randn(4, 2))
    with pytest.raises(ValueError, match="last dimension 3"):
        t.inv(torch.randn(4, 2))


@cuda
@pytest.mark.parametrize("cls", [Planar, PlanarStack, Radial, RadialStack])
def test_math_on_cuda(cls):
    torch.manual_seed(0)
    t = (cls(3, 4) if cls in (PlanarStack, RadialStack) else cls(3)).double().cuda()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.7)
    x = torch.randn(6, 3, dtype=torch.float64, device="cuda")
    check_ladj(t, x)
    check_round_trip(t, x, atol=1e-9)


@pytest.mark.parametrize("cls", FAMILIES)
def test_cache_is_not_stale_after_an_optimizer_step(cls):
    """Fitting a fixed data tensor: the same tensor object must not hit a cache from before the step."""
    torch.manual_seed(5)
    t = cls(2).double()
    data = torch.randn(50, 2, dtype=torch.float64)
    dist = lambda: FlowDistribution(StandardNormal(2, dtype=torch.float64), t)  # noqa: E731
    opt = torch.optim.SGD(t.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = -dist().log_prob(data).mean()
        loss.backward()  # a stale cache would backward through a freed graph here
        opt.step()
    fresh = -dist().log_prob(data.clone()).mean()
    again = -dist().log_prob(data).mean()
    torch.testing.assert_close(again, fresh)
    y = t(data)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1)
    assert not torch.equal(t(data), y)
