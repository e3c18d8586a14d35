"""Brute-force checks shared by the transform tests."""

from __future__ import annotations

import math

import torch
from torch.autograd.functional import jacobian

from vi_flows.distributions import FlowDistribution, StandardNormal

BATCH_SHAPES = [(), (7,), (3, 4)]


def brute_force_ladj(forward, x: torch.Tensor) -> torch.Tensor:
    """log|det J| from the full Jacobian of ``forward`` at each point of ``x``."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    out = []
    for xi in flat:
        J = jacobian(forward, xi)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out).reshape(x.shape[:-1])


def check_ladj(t, x, atol=1e-9):
    y, ladj = t.call_and_ladj(x)
    assert y.shape == x.shape
    assert ladj.shape == x.shape[:-1]
    expected = brute_force_ladj(lambda v: t.call_and_ladj(v)[0], x)
    torch.testing.assert_close(ladj, expected, atol=atol, rtol=1e-7)
    # the Transform API agrees with the fused path, cached and uncached
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), ladj)
    torch.testing.assert_close(t.log_abs_det_jacobian(x.clone(), y.clone()), ladj, atol=atol, rtol=1e-7)


def check_round_trip(t, x, atol=1e-9):
    y = t(x)
    x_back = t.inv(y.clone())  # a fresh tensor: the inverse must not come from the cache
    assert (x_back - x).abs().max().item() < atol, (x_back - x).abs().max().item()
    y2 = t(t.inv(x.clone()).clone())
    assert (y2 - x).abs().max().item() < atol
    return (x_back - x).abs().max().item()


def grid_mass(flow, lim=6.0, n=400):
    """∫ q over [-lim, lim]² by the midpoint rule (2-D flows)."""
    dist = FlowDistribution(StandardNormal(2, dtype=torch.float64), flow)
    edges = torch.linspace(-lim, lim, n + 1, dtype=torch.float64)
    mid = 0.5 * (edges[1:] + edges[:-1])
    zz = torch.stack(torch.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_q = dist.log_prob(zz)
    cell = (2 * lim / n) ** 2
    return math.fsum((log_q.exp() * cell).tolist()), dist


def check_grid_density(flow, lim: float, n: int, tol: float = 1e-3):
    """A 2-D flow's density sums to 1 within ``tol`` on a grid, and ``log_prob`` of its draws agrees with theirs."""
    mass, dist = grid_mass(flow, lim=lim, n=n)
    assert abs(mass - 1) < tol, mass
    y, log_q = dist.rsample_and_log_prob((32,))
    torch.testing.assert_close(dist.log_prob(y.clone()), log_q, atol=1e-9, rtol=1e-9)


def check_interleaved_halves(t, dim: int, swap: bool):
    """Odd/even coupling: ``y₁ = x₁`` and each ``y₂[i]`` reads its own ``x₂[i]`` and every coordinate of ``x₁``."""
    x = torch.randn(dim, dtype=torch.float64)
    jac = jacobian(lambda v: t(v), x)
    evens, odds = torch.arange(0, dim, 2), torch.arange(1, dim, 2)
    keep, change = (evens, odds) if swap else (odds, evens)
    torch.testing.assert_close(jac[keep], torch.eye(dim, dtype=torch.float64)[keep])
    block = jac[change][:, change]
    torch.testing.assert_close(block, torch.diag(block.diagonal()))
    assert jac[change][:, keep].abs().min() > 0
