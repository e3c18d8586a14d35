import pytest
import torch

from vi_flows.transforms import InverseAutoregressive, MaskedAutoregressive, maf_stack
from vi_flows.transforms.autoregressive import Autoregressive

from .flow_checks import BATCH_SHAPES, check_ladj, check_round_trip, grid_mass


def _make(d, seed=0, **kwargs):
    torch.manual_seed(seed)
    t = MaskedAutoregressive(d, **kwargs).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return t


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_ladj_and_round_trip(d, batch):
    t = _make(d, seed=d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 2
    check_ladj(t, x)
    check_round_trip(t, x, atol=1e-9)


def test_density_direction_is_one_pass_and_sampling_is_d_passes():
    t = _make(4)
    calls = []
    t.arn.register_forward_hook(lambda *a: calls.append(1))
    y = torch.randn(3, 4, dtype=torch.float64)
    t.inverse_and_ladj(y)
    assert len(calls) == 1
    calls.clear()
    t.call_and_ladj(y)
    assert len(calls) == 4


def test_is_the_iaf_read_backwards():
    """Same network, same order: MAF's density pass is the autoregressive map of its input."""
    t = _make(5, order=[2, 0, 4, 1, 3])
    assert isinstance(t, Autoregressive) and not isinstance(t, InverseAutoregressive)  # siblings, no IAF gate
    assert not hasattr(t, "sigmoid_bias") and not hasattr(t, "_gate")
    torch.testing.assert_close(t.order, torch.tensor([2, 0, 4, 1, 3]))
    y = torch.randn(5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: t.inverse_and_ladj(v)[0], y)
    jac = jac[t.order][:, t.order]  # triangular in the autoregressive order
    torch.testing.assert_close(jac.triu(1), torch.zeros_like(jac))


def test_stack_density_integrates_to_one():
    torch.manual_seed(3)
    flow = maf_stack(2, 4, hidden_dims=(16,)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    mass, dist = grid_mass(flow, lim=12.0, n=480)
    assert abs(mass - 1) < 1e-3, mass  # midpoint rule with cells of 0.05 plus tail mass outside the box
    y, log_q = dist.rsample_and_log_prob((32,))
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=1e-9, rtol=1e-9)


def test_conditional():
    t = _make(3, seed=1, context_dim=2)
    c = torch.randn(4, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    check_ladj(t.condition(c[0]), x)
    check_round_trip(t.condition(c), x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="log_scale_bound"):
        MaskedAutoregressive(3, log_scale_bound=-1.0)
    with pytest.raises(ValueError, match="hidden_dims"):
        MaskedAutoregressive(3, hidden_dims=(2,))
    with pytest.raises(ValueError, match="num_flows"):
        maf_stack(3, 0)


def test_stack_orders():
    """``auto``: seeded random orders above 2-D (no permutation layers), the two reversed orders in 2-D."""
    flow = maf_stack(5, 4, (16,))
    orders = [tuple(p.order.tolist()) for p in flow.parts]
    assert len(flow.parts) == 4 and all(isinstance(p, MaskedAutoregressive) for p in flow.parts)
    assert all(sorted(o) == list(range(5)) for o in orders) and len(set(orders)) > 1
    assert orders == [tuple(p.order.tolist()) for p in maf_stack(5, 4, (16,)).parts]  # same seed, same orders
    assert orders != [tuple(p.order.tolist()) for p in maf_stack(5, 4, (16,), seed=1).parts]
    for flow in (maf_stack(2, 3, (8,)), maf_stack(5, 3, (16,), orders="reverse")):
        assert [type(p).__name__ for p in flow.parts] == ["MaskedAutoregressive", "Reverse"] * 2 + [
            "MaskedAutoregressive"
        ]


def test_random_order_stack_ladj_and_round_trip():
    torch.manual_seed(2)
    flow = maf_stack(5, 3, (16,), orders="random").double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(7, 5, dtype=torch.float64) * 2
    check_ladj(flow, x)
    check_round_trip(flow, x, atol=1e-9)


def test_stack_bad_orders():
    with pytest.raises(ValueError, match="orders"):
        maf_stack(3, 2, orders="shuffled")
    with pytest.raises(ValueError, match="seed"):
        maf_stack(3, 2, seed=0.5)


def test_starts_at_identity_and_trains_every_weight():
    """The last MADE layer starts at zero (identity map); one Adam step then moves the network's weights."""
    torch.manual_seed(0)
    t = MaskedAutoregressive(4, (16,))
    x = torch.randn(8, 4)
    y, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(y, x)
    assert (ladj == 0).all()
    before = torch.cat([p.detach().flatten() for p in t.arn.parameters()])
    optim = torch.optim.Adam(t.parameters(), lr=1e-2)
    for _ in range(2):  # the first step reaches the last layer only (the layers before it see a zero gradient)
        optim.zero_grad()
        t.inverse_and_ladj(torch.randn(8, 4) * 2)[1].pow(2).sum().add(t.inv(x.clone()).pow(2).sum()).backward()
        optim.step()
    after = torch.cat([p.detach().flatten() for p in t.arn.parameters()])
    assert ((after - before).abs() > 0).float().mean() > 0.5  # masked-out entries excepted
