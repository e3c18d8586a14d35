import copy

import pytest
import torch
from torch.autograd.functional import jacobian

from vi_flows.distributions import FlowDistribution, StandardNormal
from vi_flows.transforms.autoregressive import Conditioned, InverseAutoregressive, iaf_stack
from vi_flows.transforms.base import ComposeFlow
from vi_flows.transforms.permute import Permute, Reverse
from vi_flows.transforms.stack import ConditionalComposeFlow, stack

from .flow_checks import BATCH_SHAPES, check_ladj, check_round_trip, grid_mass

DIMS = [1, 2, 5]


def _randomize(t, std=0.7):
    """Weights far from the near-identity initialization, so σ, m vary strongly with x."""
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, std)
    return t


def _iaf(d, seed=0, context_dim=0, order=None, dtype=torch.float64):
    torch.manual_seed(seed)
    return _randomize(InverseAutoregressive(d, context_dim=context_dim, order=order).to(dtype))


def _shuffled(d, seed):
    return torch.randperm(d, generator=torch.Generator().manual_seed(seed))


def _slogdet_per_example(t, x, context):
    """Brute-force log|det J| of the layer bound to context[b] at x[..., b, :]."""
    out = torch.empty(x.shape[:-1], dtype=x.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).reshape(-1, x.dim() - 1):
        idx = tuple(idx.tolist())
        bound = t.condition(context[idx[-1]])
        out[idx] = torch.linalg.slogdet(jacobian(lambda v, bound=bound: bound(v), x[idx]))[1]
    return out


# ---------------------------------------------------------------- single layer


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_ladj_matches_brute_force(d, batch):
    t = _iaf(d, seed=d, order=_shuffled(d, d))
    x = torch.randn(*batch, d, dtype=torch.float64) * 2
    check_ladj(t, x)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_round_trip_at_arbitrary_points(d, batch):
    t = _iaf(d, seed=10 + d, order=_shuffled(d, d))
    x = torch.randn(*batch, d, dtype=torch.float64) * 2
    check_round_trip(t, x, atol=1e-10)
    # the inverse's last network pass yields the forward log-determinant at x
    y, ladj = t.call_and_ladj(x)
    x_back, ladj_back = t.inverse_and_ladj(y.clone())
    torch.testing.assert_close(ladj_back, ladj, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("d", [2, 5])
def test_jacobian_is_triangular_in_made_order(d):
    order = _shuffled(d, 3)
    t = _iaf(d, seed=3, order=order)
    assert torch.equal(t.order, order)
    J = jacobian(lambda v: t(v), torch.randn(d, dtype=torch.float64))
    J_ordered = J[order][:, order]  # row k: y_order[k]; column j: x_order[j]
    assert (J_ordered.triu(1) == 0).all(), "y depends on a later coordinate in the MADE order"
    assert (J_ordered.tril(-1) != 0).any(), "y should depend on earlier coordinates"
    assert (J_ordered.diagonal() > 0).all() and (J_ordered.diagonal() < 1).all()  # σ ∈ (0, 1)


def test_inverse_is_differentiable_with_the_inverse_jacobian():
    t = _iaf(4, seed=5)
    x = torch.randn(4, dtype=torch.float64)
    y = t(x).detach()
    J_inv = jacobian(lambda v: t.inv(v), y)
    torch.testing.assert_close(J_inv, torch.linalg.inv(jacobian(lambda v: t(v), x)), atol=1e-10, rtol=1e-9)


def test_state_dict_and_deepcopy_round_trip():
    t = _iaf(3, seed=1, order=[2, 0, 1])
    fresh = InverseAutoregressive(3, order=[2, 0, 1]).double()
    fresh.load_state_dict(t.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), t(x))
    torch.testing.assert_close(copy.deepcopy(t)(x.clone()), t(x))


# ---------------------------------------------------------------- permutations and stacks


def test_permute():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    r = Reverse(4)
    y, ladj = r.call_and_ladj(x)
    assert torch.equal(y, x.flip(-1)) and torch.equal(ladj, torch.zeros(2, 3, dtype=torch.float64))
    p = Permute(4, [2, 0, 3, 1])
    y, ladj = p.call_and_ladj(x)
    assert torch.equal(y, x[..., [2, 0, 3, 1]]) and (ladj == 0).all()
    assert torch.equal(p.inv(y.clone()), x)
    x_back, ladj_back = p.inverse_and_ladj(y.clone())
    assert torch.equal(x_back, x) and (ladj_back == 0).all()
    # buffers: in the state dict, restored by load_state_dict
    assert set(p.state_dict()) == {"permutation", "inv_permutation"}
    q = Permute(4)
    q.load_state_dict(p.state_dict())
    assert torch.equal(q(x), p(x))


@pytest.mark.parametrize("bad", [[0, 1], [0, 0, 1], [1, 2, 3], [0.0, 1.0, 2.0], "abc", [[0, 1, 2]]])
def test_bad_permutation(bad):
    with pytest.raises(ValueError, match="permutation"):
        Permute(3, bad)
    with pytest.raises(ValueError, match="order"):
        InverseAutoregressive(3, order=bad)


def test_stack_lets_every_output_depend_on_every_input():
    torch.manual_seed(4)
    s = _randomize(iaf_stack(3, 2).double())
    assert isinstance(s, ComposeFlow) and not isinstance(s, ConditionalComposeFlow)
    assert [type(p) for p in s.parts] == [InverseAutoregressive, Reverse, InverseAutoregressive]
    J = jacobian(lambda v: s(v), torch.randn(3, dtype=torch.float64))
    assert (J != 0).all()
    one = _randomize(InverseAutoregressive(3).double())
    assert (jacobian(lambda v: one(v), torch.randn(3, dtype=torch.float64)).triu(1) == 0).all()


def test_generic_stack():
    s = stack(lambda: Permute(3, [1, 2, 0]), 3, dim=3)
    assert len(s) == 3 and all(isinstance(p, Permute) for p in s.parts)
    x = torch.randn(3)
    torch.testing.assert_close(s(x), x)  # a 3-cycle applied three times
    s = stack(lambda: InverseAutoregressive(2), 3, dim=2, permute=True)
    assert len(s) == 5 and isinstance(s[1], Reverse) and isinstance(s[3], Reverse)


def test_stack_density_integrates_to_one():
    torch.manual_seed(3)
    # std 0.5 keeps the preimage of the grid within float range; at larger weights the exact
    # inverse of points far outside the flow's bulk overflows (a property of IAF, not of the grid).
    s = _randomize(iaf_stack(2, 4).double(), std=0.5)
    mass, dist = grid_mass(s, lim=8.0, n=400)
    assert abs(mass - 1) < 1e-3, mass
    y, log_q = dist.rsample_and_log_prob((64,))
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stack_round_trip(dtype):
    torch.manual_seed(6)
    s = _randomize(iaf_stack(5, 4).to(dtype), std=0.5)
    eps = torch.finfo(dtype).eps
    x = torch.randn(1000, 5, dtype=dtype)
    with torch.no_grad():
        y, ladj = s.call_and_ladj(x)
        err = (s.inv(y.clone()) - x).abs().amax(-1)
        # y carries a rounding error ~ eps (1 + |x|); the inverse expands volumes by |det J|⁻¹ = exp(−ladj),
        # which sets (up to a modest constant, 4 here) how much of it comes back in x
        assert (err <= 4 * eps * torch.exp(-ladj) * (1 + x.abs().amax(-1))).all()
        # on the image the other way round: f contracts the error of f⁻¹ back to rounding level
        y_back = s(s.inv(y.clone()).clone())
        assert (y_back - y).abs().max() < 16 * eps * (1 + y.abs().max())


# ---------------------------------------------------------------- context


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("x_batch", [(4,), (2, 4)])
def test_conditional_ladj_per_example(d, x_batch):
    t = _iaf(d, seed=7, context_dim=2)
    context = torch.randn(4, 2, dtype=torch.float64)
    x = torch.randn(*x_batch, d, dtype=torch.float64)
    bound = t.condition(context)
    assert isinstance(bound, Conditioned)
    y, ladj = bound.call_and_ladj(x)
    assert y.shape == x.shape and ladj.shape == x_batch
    torch.testing.assert_close(ladj, _slogdet_per_example(t, x, context), atol=1e-9, rtol=1e-7)
    # broadcasting pairs x[..., b, :] with context[b]
    torch.testing.assert_close(y[..., 1, :], t.condition(context[1])(x[..., 1, :]))
    check_round_trip(bound, x, atol=1e-10)


@pytest.mark.parametrize("d", [1, 3])
def test_context_changes_output_and_receives_gradient(d):
    t = _iaf(d, seed=8, context_dim=2)
    x = torch.randn(d, dtype=torch.float64).expand(5, d)
    context = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y, ladj = t.condition(context).call_and_ladj(x)
    # the same x under five contexts: in every coordinate, the five outputs are pairwise different
    gaps = (y.unsqueeze(0) - y.unsqueeze(1)).abs() + torch.eye(5).unsqueeze(-1)
    assert (gaps > 1e-6).all()
    (y.square().sum() + ladj.sum()).backward()
    assert context.grad is not None and (context.grad.abs().sum(-1) > 0).all()
    assert all(p.grad is not None for p in t.parameters())


def test_conditional_stack():
    torch.manual_seed(9)
    s = _randomize(iaf_stack(3, 3, context_dim=2).double(), std=0.5)
    assert isinstance(s, ConditionalComposeFlow) and s.context_dim == 2
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="condition"):
        s(x)
    context = torch.randn(4, 2, dtype=torch.float64)
    bound = s.condition(context)
    _, ladj = bound.call_and_ladj(x)
    torch.testing.assert_close(ladj, _slogdet_per_example(s, x, context), atol=1e-9, rtol=1e-7)
    check_round_trip(bound, x, atol=1e-10)
    assert {id(p) for p in bound.parameters()} == {id(p) for p in s.parameters()}
    # an amortized posterior: S samples for each of B contexts, log q recomputed through the inverse
    dist = FlowDistribution(StandardNormal(3, (4,), dtype=torch.float64), bound)
    z, log_q = dist.rsample_and_log_prob((5,))
    assert z.shape == (5, 4, 3) and log_q.shape == (5, 4)
    torch.testing.assert_close(dist.log_prob(z.clone()), log_q, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_dim(bad):
    with pytest.raises(ValueError, match="dim"):
        InverseAutoregressive(bad)
    with pytest.raises(ValueError, match="dim"):
        Permute(bad)
    with pytest.raises(ValueError, match="dim"):
        iaf_stack(bad, 2)


@pytest.mark.parametrize("bad", [(), [], (0,), (8, -1), (2,), 5])
def test_bad_hidden_dims(bad):
    with pytest.raises(ValueError, match="hidden_dims"):
        InverseAutoregressive(3, bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"context_dim": -1}, "context_dim"),
        ({"context_dim": 1.5}, "context_dim"),
        ({"sigmoid_bias": float("nan")}, "sigmoid_bias"),
    ],
)
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        InverseAutoregressive(3, **kwargs)


def test_wrong_last_dimension():
    t = InverseAutoregressive(3)
    with pytest.raises(ValueError, match="last dimension 3"):
        t(torch.randn(4, 2))
    with pytest.raises(ValueError, match="last dimension 3"):
        t.inv(torch.randn(4, 2))
    with pytest.raises(ValueError, match="last dimension 3"):
        InverseAutoregressive(3, context_dim=2).condition(torch.randn(2))(torch.randn(4, 2))


def test_bad_context():
    t = InverseAutoregressive(3, context_dim=2)
    with pytest.raises(ValueError, match=r"condition\(context\)"):
        t(torch.randn(3))
    with pytest.raises(ValueError, match=r"condition\(context\)"):
        t.inv(torch.randn(3))
    with pytest.raises(ValueError, match="context"):
        t.condition(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context"):
        t.condition([0.0, 1.0])
    with pytest.raises(ValueError, match="context"):
        t.condition(torch.randn(4, 2))(torch.randn(5, 3))  # batch 4 does not broadcast with 5
    with pytest.raises(ValueError, match="context"):
        InverseAutoregressive(3).condition(torch.randn(2))


@pytest.mark.parametrize("bad", [0, -2, 1.0, True])
def test_bad_num_flows(bad):
    with pytest.raises(ValueError, match="num_flows"):
        iaf_stack(3, bad)
    with pytest.raises(ValueError, match="num_flows"):
        stack(lambda: Reverse(3), bad, dim=3)


def test_stack_rejects_bad_layers():
    with pytest.raises(ValueError, match="make_layer"):
        stack(lambda: torch.nn.Linear(2, 2), 2, dim=2)
    with pytest.raises(ValueError, match="dim"):
        stack(lambda: Reverse(3), 2, dim=2)
    with pytest.raises(ValueError, match="context_dim"):
        ConditionalComposeFlow([InverseAutoregressive(2, context_dim=1), InverseAutoregressive(2, context_dim=3)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    s = iaf_stack(4, 3, context_dim=2).cuda()
    x = torch.randn(8, 4, device="cuda")
    bound = s.condition(torch.randn(8, 2, device="cuda"))
    y, ladj = bound.call_and_ladj(x)
    assert y.device.type == "cuda" and ladj.device.type == "cuda"
    assert (bound.inv(y.clone()) - x).abs().max() < 1e-4
    p = Permute(4, [1, 0, 3, 2]).cuda()
    assert p.permutation.device.type == "cuda" and torch.equal(p(x), x[..., [1, 0, 3, 2]])
