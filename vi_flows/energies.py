"""The 2-D test energies of Rezende & Mohamed (2015, Table 1) as Pyro models.

``p(z) ∝ exp(−(U(z) + (z₁/4)⁸))``. U2–U4 are flat in ``z₁`` and not
normalizable alone; the envelope ``(z₁/4)⁸`` fixes that while leaving the
paper's ``[−4, 4]²`` pictures unchanged (it is < 0.004 for ``|z₁| ≤ 2``).
``LOG_Z`` holds ``log ∫ exp(−(U + envelope))`` from Riemann sums on fine grids
(identical to 6 decimals for ``L = 6, 8, 10``), so ``KL(q‖p) = log Z − ELBO``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["ENERGIES", "LOG_Z", "energy", "energy_model", "log_density", "grid_log_z"]


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def _w2(z1: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z1 - 1) / 0.3)


def _u1(z: Tensor) -> Tensor:
    z1 = z[..., 0]
    ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
    bumps = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    return ring - bumps


def _u2(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2


def _u3(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    a = z2 - _w1(z1)
    return -torch.logaddexp(-0.5 * (a / 0.35) ** 2, -0.5 * ((a + _w2(z1)) / 0.35) ** 2)


def _u4(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    a = z2 - _w1(z1)
    return -torch.logaddexp(-0.5 * (a / 0.4) ** 2, -0.5 * ((a + _w3(z1)) / 0.35) ** 2)


ENERGIES: dict[str, Callable[[Tensor], Tensor]] = {"U1": _u1, "U2": _u2, "U3": _u3, "U4": _u4}

#: log normalizer of exp(−(U + envelope)); shared/targets/energies.json (Riemann sums, 6 decimals).
LOG_Z: dict[str, float] = {"U1": 1.873041, "U2": 2.022066, "U3": 2.581682, "U4": 2.650675}


def energy(name: str, z: Tensor) -> Tensor:
    """``U(z) + (z₁/4)⁸`` for ``z`` of shape ``(..., 2)``."""
    if name not in ENERGIES:
        raise ValueError(f"unknown energy {name!r}; choose one of {sorted(ENERGIES)}")
    return ENERGIES[name](z) + (z[..., 0] / 4) ** 8


def log_density(name: str, z: Tensor) -> Tensor:
    """Normalized ``log p(z)``."""
    return -energy(name, z) - LOG_Z[name]


def energy_model(name: str, carrier_scale: float = 4.0) -> Callable[[], Tensor]:
    """A Pyro model whose posterior over ``z`` is ``p(z) ∝ exp(−U(z) − envelope)``.

    A flat prior cannot be Pyro's ``ImproperUniform`` here (autoguides'
    ``init_loc_fn`` must draw from it), so ``z`` carries a wide Normal prior
    whose log-density the ``pyro.factor`` subtracts again: the joint is
    exactly ``−U(z) − envelope`` and ``log p(x) = log Z``.
    """
    if name not in ENERGIES:
        raise ValueError(f"unknown energy {name!r}; choose one of {sorted(ENERGIES)}")

    def model() -> Tensor:
        carrier = dist.Normal(torch.zeros(2), carrier_scale).to_event(1)
        z = pyro.sample("z", carrier)
        pyro.factor("energy", -energy(name, z) - carrier.log_prob(z))
        return z

    model.__name__ = f"energy_{name}"
    return model


def grid_log_z(name: str, lim: float = 6.0, n: int = 1500) -> float:
    """``log ∫ exp(−U − envelope)`` by the midpoint rule on ``[−lim, lim]²`` (float64)."""
    edges = torch.linspace(-lim, lim, n + 1, dtype=torch.float64)
    mid = 0.5 * (edges[1:] + edges[:-1])
    zz = torch.stack(torch.meshgrid(mid, mid, indexing="ij"), -1)
    return (torch.logsumexp(-energy(name, zz).reshape(-1), 0) + 2 * math.log(2 * lim / n)).item()
