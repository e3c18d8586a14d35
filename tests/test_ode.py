import math

import pytest
import torch

from vi_flows.transforms._ode import dopri5

TOL = 1e-9


def _decay(k):
    """``dy/dt = −k y``: ``y(t) = y(0) exp(−k t)``."""
    return lambda t, y: -k * y


@pytest.mark.parametrize("t0, t1", [(0.0, 1.5), (1.5, 0.0)])
def test_linear_ode_matches_closed_form(t0, t1):
    k = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, -3.0, 0.25], dtype=torch.float64)
    y = dopri5(_decay(k), y0, t0, t1, rtol=TOL, atol=TOL)
    # local errors near TOL (relative) over ~30 steps
    torch.testing.assert_close(y, y0 * torch.exp(-k * (t1 - t0)), atol=0, rtol=100 * TOL)


@pytest.mark.parametrize("t0, t1", [(0.0, 1.5), (1.5, 0.0)])
def test_checkpoint_gradient_is_backprops_and_the_closed_forms(t0, t1):
    grads = []
    for checkpoint in (True, False):
        k = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
        y0 = torch.tensor([1.0, -3.0], dtype=torch.float64, requires_grad=True)
        y = dopri5(_decay(k), y0, t0, t1, (k,), rtol=1e-6, atol=1e-6, checkpoint=checkpoint)
        assert (type(y.grad_fn).__name__ == "_CheckpointedBackward") == checkpoint
        y.square().sum().backward()
        grads.append((k.grad, y0.grad))
    (gk_c, gy_c), (gk_b, gy_b) = grads
    torch.testing.assert_close(gk_c, gk_b, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(gy_c, gy_b, atol=1e-14, rtol=1e-13)
    # d(y²)/dk = −2 (t1 − t0) y(t1)², d(y²)/dy0 = 2 y(t1) e^{−k(t1−t0)}: equal to the solver's accuracy
    with torch.no_grad():
        s = t1 - t0
        y1 = y0 * torch.exp(-k * s)
        torch.testing.assert_close(gk_c, -2 * s * y1.square(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gy_c, 2 * y1 * torch.exp(-k * s), atol=1e-4, rtol=1e-4)


def test_nothing_recorded_without_grad():
    k = torch.tensor([1.0], requires_grad=True)
    with torch.no_grad():
        y = dopri5(_decay(k), torch.ones(1), 0.0, 1.0, (k,))
    assert y.grad_fn is None and not y.requires_grad
    assert abs(y.item() - math.exp(-1)) < 1e-4


def test_errors():
    with pytest.raises(RuntimeError, match="non-finite"):
        dopri5(lambda t, y: y * float("nan"), torch.ones(2), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="max_steps"):
        dopri5(_decay(torch.tensor(50.0)), torch.ones(2), 0.0, 1.0, rtol=1e-9, atol=1e-9, max_steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflowing_trial_step_is_rejected_not_fatal(dtype):
    """dy/dt = −y³, y(0) = 1 on [0, 10]: the first trial step (the whole span) overflows; y = (1 + 2t)^−½."""
    y = dopri5(lambda t, y: -(y**3), torch.ones(1, dtype=dtype), 0.0, 10.0, rtol=1e-7, atol=1e-9)
    assert abs(y.item() - 21**-0.5) < 1e-5


def test_checkpoint_refuses_second_derivatives_and_counts_a_repeated_param_once():
    k = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    y = dopri5(_decay(k), torch.ones(1, dtype=torch.float64), 0.0, 1.0, (k,), rtol=1e-8, atol=1e-8)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(y.sum(), k, create_graph=True)
    twice = dopri5(_decay(k), torch.ones(1, dtype=torch.float64), 0.0, 1.0, (k, k), rtol=1e-8, atol=1e-8)
    (g,) = torch.autograd.grad(twice.sum(), k)
    torch.testing.assert_close(g, -torch.exp(-k.detach()), rtol=1e-6, atol=0)  # d/dk e^{−k} = −e^{−k}


def test_checkpoint_detects_an_input_changed_in_place():
    k = torch.tensor([0.7], requires_grad=True)
    y0 = torch.ones(1)
    y = dopri5(_decay(k), y0, 0.0, 1.0, (k,))
    y0.mul_(2)  # the saved start state of the first step
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_empty_state():
    y = dopri5(_decay(torch.tensor(1.0)), torch.ones(0, 3), 0.0, 1.0)
    assert y.shape == (0, 3)
