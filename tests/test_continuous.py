import math

import pytest
import torch
from torchdiffeq import odeint

from vi_flows.distributions import FlowDistribution, StandardNormal
from vi_flows.transforms.continuous import ContinuousFlow

from .flow_checks import BATCH_SHAPES, brute_force_ladj, grid_mass

# dopri5 keeps each step's local error near atol + rtol|z|; over the ~10-20 steps of these solves the
# global error of z and of the log-determinant stays below 100x that (measured: 1e-7 to 3e-7 at tol 1e-8).
TOL = 1e-8
GLOBAL = 100 * TOL


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronization (4x slower on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(d, context_dim=0, seed=0, scale=0.5, **kw):
    """A CNF with every parameter ~ N(0, scale²): far from the identity it starts at."""
    torch.manual_seed(seed)
    kw = {"rtol": TOL, "atol": TOL, **kw}
    t = ContinuousFlow(d, (16, 16), context_dim, **kw).double()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, scale)
    return t


def _solution_map(t):
    """z(0) ↦ z(t₁) of dz/dt = f(z, t) alone (no trace in the state), solved by odeint directly."""
    times = torch.tensor([0.0, t.t1], dtype=torch.float64)
    return lambda x: odeint(lambda s, z: t.net(s, z), x, times, rtol=TOL, atol=TOL)[-1]


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_exact_ladj_matches_slogdet_of_solution_map(d, batch):
    t = _make(d, seed=d, trace="exact")
    x = torch.randn(*batch, d, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    assert y.shape == x.shape and ladj.shape == x.shape[:-1]
    solve = _solution_map(t)
    torch.testing.assert_close(y, solve(x), atol=GLOBAL, rtol=0)
    torch.testing.assert_close(ladj, brute_force_ladj(solve, x), atol=GLOBAL, rtol=0)
    assert t.log_abs_det_jacobian(x, y) is ladj  # cached
    torch.testing.assert_close(t.log_abs_det_jacobian(x.clone(), y.clone()), ladj, atol=GLOBAL, rtol=0)


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("batch", BATCH_SHAPES)
def test_round_trip_at_arbitrary_points(d, batch):
    t = _make(d, seed=10 + d)
    x = torch.randn(*batch, d, dtype=torch.float64) * 3
    y, ladj = t.call_and_ladj(x)
    x_back, ladj_back = t.inverse_and_ladj(y.clone())  # a fresh tensor: not from the cache
    torch.testing.assert_close(x_back, x, atol=GLOBAL, rtol=0)
    torch.testing.assert_close(ladj_back, ladj, atol=GLOBAL, rtol=0)
    y2 = t(t.inv(x.clone()).clone())
    torch.testing.assert_close(y2, x, atol=GLOBAL, rtol=0)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    d, reps = 5, 2000
    t = _make(d, seed=3, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, d, dtype=torch.float64)
    with torch.no_grad():
        exact = t.call_and_ladj(x)[1]
        t.trace, t.noise = "hutchinson", noise
        torch.manual_seed(4)
        y, est = t.call_and_ladj(x.expand(reps, 3, d).clone())
    torch.testing.assert_close(y, t.call_and_ladj(x)[0].expand_as(y), atol=1e-3, rtol=0)
    sd = est.std(0)
    assert (sd > 1e-3).all()  # a real estimate, not the exact value in disguise
    # 5 standard errors of the Monte-Carlo mean (~0.07 here): fails by chance with probability ~6e-7 per
    # point; 1e-3 covers the solver error (100x the tolerance 1e-5) of the two solves.
    assert ((est.mean(0) - exact).abs() < 5 * sd / math.sqrt(reps) + 1e-3).all(), (est.mean(0) - exact, sd)


def test_hutchinson_rademacher_is_exact_in_one_dimension():
    t = _make(1, seed=5)
    x = torch.randn(6, 1, dtype=torch.float64)
    exact = t.call_and_ladj(x)[1]
    t.trace = "hutchinson"
    torch.testing.assert_close(t.call_and_ladj(x.clone())[1], exact, atol=GLOBAL, rtol=0)  # ε² = 1


def _displacement_bound(t):
    """sup |f_i| over all z, t ∈ [0, 1] per coordinate: tanh hidden units and sigmoid gates lie in [-1, 1]."""
    last = t.net.layers[-1]
    return last.linear.weight.abs().sum(1) + last.linear.bias.abs() + last.shift.weight.abs().sum(1)


def test_density_integrates_to_one_and_log_prob_agrees_with_samples():
    t = _make(2, seed=6, scale=0.7)
    # y = x + ∫ f dt, so |y_i - x_i| <= t1 sup|f_i| = r_i, and the mass outside [-lim, lim]² is at most
    # Σ_i P(|x_i| > lim - r_i), x ~ N(0, I). Scale the last layer to r_max = 3 and take lim = 10: below 3e-12.
    with torch.no_grad():
        last = t.net.layers[-1]
        factor = 3.0 / _displacement_bound(t).max()
        for p in (last.linear.weight, last.linear.bias, last.shift.weight):
            p.mul_(factor)
    assert _displacement_bound(t).max().item() == pytest.approx(3.0)
    # The integrand is smooth and vanishes at the edges, so the midpoint rule converges faster than any power
    # of the cell width: cells of 0.2 agree with cells of 0.1 to 1e-11 here, far below the solver's error
    # in log q (~1e-7 at tolerance 1e-8).
    mass, dist = grid_mass(t, lim=10.0, n=100)
    assert abs(mass - 1) < 1e-6, mass
    y, log_q = dist.rsample_and_log_prob((64,))
    x, ladj = t.inverse_and_ladj(y.clone())
    assert (y - x).abs().max() > 0.5 and ladj.abs().max() > 0.1  # the flow is far from the identity
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=GLOBAL, rtol=0)


@pytest.mark.parametrize("d, trace", [(3, "exact"), (5, "exact"), (3, "hutchinson")])  # d=5: the vmap-ed trace
def test_gradients_reach_every_parameter_and_adjoint_agrees(d, trace):
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    grads = []
    for adjoint in (False, True):
        t = _make(d, seed=7, trace=trace, adjoint=adjoint)
        assert t.gradient == ("adjoint" if adjoint else "backprop")
        torch.manual_seed(8)  # the same Hutchinson probe in both runs
        y, ladj = t.call_and_ladj(x)
        (y.sin().sum() + ladj.sum()).backward()
        for name, p in t.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 0, name
        grads.append([x.grad.clone()] + [p.grad for p in t.parameters()])
        x.grad = None
    # Backprop through our dopri5 and torchdiffeq's adjoint solve are two discretizations of the same gradient, each
    # accurate to about GLOBAL relative to the gradient's size; 10x that leaves room for the adjoint solve,
    # whose error control also weighs the parameters' adjoints.
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5 * (1 + a.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_float32_works(gradient):
    torch.manual_seed(9)
    t = ContinuousFlow(3, (16, 16), gradient=gradient)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(4, 3)
    y, ladj = t.call_and_ladj(x)
    assert y.dtype == ladj.dtype == torch.float32
    (y.sum() + ladj.sum()).backward()
    assert all(p.grad is not None for p in t.parameters())
    x_back, ladj_back = t.inverse_and_ladj(y.detach().clone())
    # default rtol = atol = 1e-5: global error up to ~100x that, as for GLOBAL; float32 rounding is far smaller.
    assert (x_back - x).abs().max() < 1e-3
    assert (ladj_back - ladj).abs().max() < 1e-3


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
@pytest.mark.parametrize("d", [3, 5])
def test_works_without_grad(d, gradient):
    t = _make(d, seed=10, gradient=gradient)
    x = torch.randn(2, d, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    for trace in ("exact", "hutchinson"):
        t.trace = trace
        with torch.no_grad():
            y0, ladj0 = t.call_and_ladj(x.clone())
            x0, ladj_inv = t.inverse_and_ladj(y0.clone())
        assert not (y0.requires_grad or ladj0.requires_grad or x0.requires_grad or ladj_inv.requires_grad)
        assert y0.grad_fn is ladj0.grad_fn is x0.grad_fn is ladj_inv.grad_fn is None
        assert torch.isfinite(ladj0).all() and torch.isfinite(ladj_inv).all()
        torch.testing.assert_close(y0, y.detach(), atol=GLOBAL, rtol=0)
        torch.testing.assert_close(x0, x, atol=GLOBAL, rtol=0)
        if trace == "exact":
            torch.testing.assert_close(ladj0, ladj.detach(), atol=GLOBAL, rtol=0)
            torch.testing.assert_close(ladj_inv, ladj.detach(), atol=GLOBAL, rtol=0)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("d", [3, 5])
def test_inference_mode_gives_the_no_grad_result(d, trace):
    """Under torch.inference_mode autograd cannot run; the forward-mode trace needs none: the no_grad values."""
    t = _make(d, seed=11)
    t.trace = trace
    x = torch.randn(3, d, dtype=torch.float64)
    torch.manual_seed(5)  # the same Hutchinson probe in both solves
    with torch.no_grad():
        y, ladj = t.call_and_ladj(x)
    torch.manual_seed(5)
    with torch.inference_mode():
        y_inf, ladj_inf = t.call_and_ladj(x)
    torch.testing.assert_close(y_inf, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj_inf, ladj, atol=1e-12, rtol=0)


def test_starts_as_identity():
    t = ContinuousFlow(4, context_dim=2).condition(torch.randn(2))
    x = torch.randn(3, 4)
    y, ladj = t.call_and_ladj(x)
    assert torch.equal(ladj, torch.zeros(3))
    # f ≡ 0; dopri5's dense-output interpolation at t1 still rounds at a few float32 ulps
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_nfe_grows_when_tolerance_shrinks():
    t = _make(2, seed=12, rtol=1e-3, atol=1e-3)
    x = torch.randn(8, 2, dtype=torch.float64)
    t.call_and_ladj(x)
    loose = t.nfe
    t.rtol = t.atol = 1e-9
    t.call_and_ladj(x.clone())
    assert 0 < loose < t.nfe


def test_trace_auto_threshold():
    assert ContinuousFlow(3, exact_trace_max_dim=3).trace == "exact"
    assert ContinuousFlow(4, exact_trace_max_dim=3).trace == "hutchinson"
    assert ContinuousFlow(4, exact_trace_max_dim=3, trace="exact").trace == "exact"


@pytest.mark.parametrize("d, adjoint", [(3, False), (3, True), (5, False)])
def test_conditional(d, adjoint):
    c = 2
    t = _make(d, context_dim=c, seed=13, adjoint=adjoint)
    x = torch.randn(5, 4, d, dtype=torch.float64)  # (S, B, d)
    ctx = torch.randn(4, c, dtype=torch.float64, requires_grad=True)  # (B, c)
    y1, ladj1 = t.condition(ctx).call_and_ladj(x)
    y2, ladj2 = t.condition(ctx + 1).call_and_ladj(x)
    assert (y1 - y2).abs().min() > 1e-6 and (ladj1 - ladj2).abs().min() > 1e-6
    (y1.sum() + ladj1.sum()).backward()
    assert ctx.grad is not None and (ctx.grad.abs() > 0).all()
    # broadcasting the context equals repeating it
    y3 = t.condition(ctx.detach().expand(5, 4, c)).call_and_ladj(x)[0]
    torch.testing.assert_close(y3, y1.detach(), atol=GLOBAL, rtol=0)
    x_back = t.condition(ctx).inv(y1.detach().clone())
    torch.testing.assert_close(x_back, x, atol=GLOBAL, rtol=0)


def test_conditional_errors():
    t = ContinuousFlow(3, (8,), context_dim=2)
    with pytest.raises(ValueError, match=r"\.condition\(context\)"):
        t(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context"):
        t.condition(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context"):
        t.condition(torch.randn(5, 2))(torch.randn(4, 3))
    with pytest.raises(ValueError, match="context_dim"):
        ContinuousFlow(3).condition(torch.randn(2))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"hidden_dims": ()}, "hidden_dims"),
        ({"hidden_dims": (8, 0)}, "hidden_dims"),
        ({"context_dim": -1}, "context_dim"),
        ({"trace": "stochastic"}, "trace"),
        ({"noise": "uniform"}, "noise"),
        ({"solver": "lsoda"}, "solver"),
        ({"solver": "scipy_solver"}, "solver"),
        ({"solver": "rk4"}, "step_size"),
        ({"rtol": 0.0}, "rtol"),
        ({"atol": -1e-5}, "atol"),
        ({"t1": 0}, "t1"),
        ({"t1": float("inf")}, "t1"),
        ({"exact_trace_max_dim": -1}, "exact_trace_max_dim"),
        ({"activation": "relu"}, "activation"),
        ({"gradient": "exact"}, "gradient"),
        ({"gradient": "backprop", "adjoint": True}, "adjoint"),
        ({"gradient": "checkpoint", "solver": "bosh3"}, "solver"),
        ({"options": {"step_t": [0.5]}}, "step_t"),
        ({"trace_weight": 0}, "trace_weight"),
    ],
)
def test_bad_arguments(kwargs, name):
    kwargs = {"dim": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        ContinuousFlow(**kwargs)


def test_fixed_step_solver_with_step_size():
    t = _make(2, seed=14, solver="rk4", options={"step_size": 0.05})
    x = torch.randn(3, 2, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    assert t.nfe == 4 * 20  # four stages per step, 20 steps of 0.05
    # RK4's global error is O(h⁴) = 6e-6 times derivatives of f of order 1 here.
    torch.testing.assert_close(ladj, brute_force_ladj(_solution_map(t), x), atol=1e-5, rtol=0)


def test_empty_batch():
    y, ladj = _make(2).call_and_ladj(torch.zeros(0, 2, dtype=torch.float64))
    assert y.shape == (0, 2) and ladj.shape == (0,)


def test_wrong_last_dimension():
    t = ContinuousFlow(3)
    with pytest.raises(ValueError, match="last dimension 3"):
        t(torch.randn(4, 2))
    with pytest.raises(ValueError, match="last dimension 3"):
        t.inv(torch.randn(4, 2))


def test_flow_distribution_with_conditioned_flow():
    t = _make(2, context_dim=1, seed=15)
    ctx = torch.randn(3, 1, dtype=torch.float64)
    dist = FlowDistribution(StandardNormal(2, (3,), dtype=torch.float64), t.condition(ctx))
    y, log_q = dist.rsample_and_log_prob((4,))
    assert y.shape == (4, 3, 2) and log_q.shape == (4, 3)
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=GLOBAL, rtol=0)


def _graph_size(out: torch.Tensor) -> int:
    """The number of autograd nodes ``out`` reaches."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize(
    "d, trace, context_dim, reverse",
    [(3, "exact", 0, False), (6, "exact", 2, False), (4, "hutchinson", 2, False), (3, "exact", 0, True)],
)
def test_checkpoint_gradients_equal_backprop(d, trace, context_dim, reverse):
    """Both modes take the same steps, so re-running each step in the backward gives backprop's gradient."""
    x0 = torch.randn(5, d, dtype=torch.float64)
    c0 = torch.randn(5, context_dim, dtype=torch.float64)
    runs = {}
    for gradient in ("backprop", "checkpoint"):
        t = _make(d, context_dim, seed=16, trace=trace, gradient=gradient, rtol=1e-6, atol=1e-6)
        x, c = x0.clone().requires_grad_(), c0.clone().requires_grad_()
        flow = t.condition(2 * c) if context_dim else t  # a non-leaf context, as an encoder's output
        torch.manual_seed(17)  # the same Hutchinson probe in both runs
        y, ladj = flow.inverse_and_ladj(x) if reverse else flow.call_and_ladj(x)
        nodes = _graph_size(ladj)
        (y.sin().sum() + ladj.square().sum()).backward()
        grads = [x.grad, *([c.grad] if context_dim else []), *(p.grad for p in t.parameters())]
        runs[gradient] = (t.nfe, y.detach(), ladj.detach(), grads, nodes)
    (nfe_b, y_b, ladj_b, grads_b, nodes_b), (nfe_c, y_c, ladj_c, grads_c, nodes_c) = runs.values()
    assert nfe_b == nfe_c > 7  # the same steps, and more than one
    torch.testing.assert_close(y_c, y_b, atol=1e-14, rtol=0)
    torch.testing.assert_close(ladj_c, ladj_b, atol=1e-14, rtol=0)
    # no graph of the solve: the checkpoint node, the input's reshape/cat and one leaf per parameter/input
    assert nodes_c <= len(grads_c) + 8 < nodes_b / 10, (nodes_c, nodes_b)
    for a, b in zip(grads_b, grads_c):
        assert b is not None and a.abs().max() > 0
        # the same arithmetic in another order: rounding only (measured 3e-16 relative)
        torch.testing.assert_close(b, a, atol=1e-11 * a.abs().max().item(), rtol=0)


def test_checkpoint_round_trip_and_ladj():
    t = _make(3, seed=18, gradient="checkpoint")
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y, ladj = t.call_and_ladj(x)
    solve = _solution_map(t)
    torch.testing.assert_close(ladj.detach(), brute_force_ladj(solve, x.detach()), atol=GLOBAL, rtol=0)
    x_back, ladj_back = t.inverse_and_ladj(y.detach().clone())
    torch.testing.assert_close(x_back.detach(), x.detach(), atol=GLOBAL, rtol=0)
    torch.testing.assert_close(ladj_back.detach(), ladj.detach(), atol=GLOBAL, rtol=0)


def test_identity_takes_one_step():
    """At f ≡ 0 the first step, the whole span, is exact: 7 evaluations (torchdiffeq's start of 1e-6 took 44)."""
    t = ContinuousFlow(3, rtol=1e-5, atol=1e-5)
    y, ladj = t.call_and_ladj(torch.randn(4, 3))
    assert t.nfe == 7  # f at the start, 5 stages, f at the end (the error estimate)
    assert torch.equal(ladj, torch.zeros(4))


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])  # our dopri5, and torchdiffeq's norm option
def test_trace_weight_relaxes_the_step_size_control(solver):
    t = _make(4, seed=19, scale=1.0, solver=solver, rtol=1e-6, atol=1e-6)
    x = torch.randn(8, 4, dtype=torch.float64)  # after _make's seed: this field and these points
    _, ladj = t.call_and_ladj(x)
    strict = t.nfe
    t.trace_weight = 1e-2
    _, ladj_loose = t.call_and_ladj(x.clone())
    assert t.nfe < 0.9 * strict, (t.nfe, strict)  # the log-det's error limits the steps on this field
    # still a solve: the log-det's local error may reach 100x the tolerance 1e-6, its global error ~10x that
    torch.testing.assert_close(ladj_loose, ladj, atol=1e-3, rtol=0)
