"""Draws per site as arrays with named dimensions: what a replay keeps and what ArviZ receives.

A site value of a vectorized replay has shape ``batch + event`` with the ``S`` draws at batch dim
``-(max_plate_nesting + 1)``. :func:`_named` moves the draws first and names every remaining axis: after
its plate where one is there (``pyro.plate("school", 8)`` -> ``"school"``), else ``{site}_dim_{i}``;
broadcast-only axes of size 1 are dropped. :class:`_Draws` holds one replay's per-draw log densities,
shape (S,), and each ArviZ group's named arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .plan import PARTICLE_PLATE
from .sites import _Roles

Arrays = dict[str, tuple[np.ndarray, list[str]]]  # site -> (array with the draws first, its dim names)


@dataclass
class _Draws:
    """``S`` guide draws replayed through the model: per-draw log densities and each group's named arrays."""

    log_p: np.ndarray  # (S,) log p(x, z_s), float64
    log_q: np.ndarray  # (S,) log q(z_s)
    roles: _Roles
    max_plate_nesting: int
    posterior: Arrays  # latent and deterministic sites, model order
    log_lik: Arrays  # unscaled log p(y_i | z_s) per observed site
    observed_data: Arrays  # observed values (no draw axis)
    predictive: Arrays | None = None  # observed sites redrawn, with posterior_predictive
    fallback: str | None = None  # why the vectorized replay was not used, if it was not
    guide_looped: bool = False  # the guide, too, was run once per draw

    @property
    def num_samples(self) -> int:
        return len(self.log_p)

    @property
    def log_w(self) -> np.ndarray:
        return self.log_p - self.log_q

    @property
    def latent(self) -> list[str]:
        return self.roles.latent

    @property
    def deterministic(self) -> list[str]:
        return self.roles.deterministic

    @property
    def observed(self) -> list[str]:
        return self.roles.observed


def _named(
    site: dict,
    value: Tensor,
    event_dim: int,
    max_plate_nesting: int,
    num_samples: int | None,
    batch_shape: torch.Size | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``value`` of ``site`` as an array with (when ``num_samples``) the particle axis first, and its dim names.

    ``value``'s batch part is first broadcast to ``batch_shape`` if given. Batch axes inside a plate are
    named after the plate; other batch axes of size 1 (broadcasting only) are dropped; remaining axes are
    named ``{site}_dim_{i}``.
    """
    name = site["name"]
    frames = site["cond_indep_stack"]
    plates = {f.dim: f.name for f in frames if f.vectorized and f.dim is not None and f.name != PARTICLE_PLATE}
    pdim = -(max_plate_nesting + 1)
    value = value.detach().cpu()
    if batch_shape is not None:
        shape = value.shape[: value.dim() - event_dim]
        target = torch.broadcast_shapes(shape, batch_shape)
        value = value.expand(target + value.shape[value.dim() - event_dim :])
    batch_ndim = value.dim() - event_dim
    dims, keep, k = [], [], 0
    particle_axis = None
    for axis in range(batch_ndim):
        rel = axis - batch_ndim
        if num_samples is not None and rel == pdim:
            particle_axis = axis
        elif rel in plates:
            dims.append(plates[rel])
            keep.append(axis)
        elif value.shape[axis] == 1:
            continue
        elif rel <= pdim:
            raise ValueError(
                f"site {name!r} has a batch dimension of size {value.shape[axis]} at dim {rel}, left of "
                f"max_plate_nesting={max_plate_nesting}; pass a larger max_plate_nesting"
            )
        else:
            dims.append(f"{name}_dim_{k}")
            keep.append(axis)
            k += 1
    for axis in range(batch_ndim, value.dim()):
        dims.append(f"{name}_dim_{k}")
        keep.append(axis)
        k += 1
    if particle_axis is None and num_samples is not None:
        raise ValueError(f"site {name!r} has no particle dimension at dim {pdim}; is max_plate_nesting too small?")
    if particle_axis is not None:
        value = value.movedim(particle_axis, 0)
        shape = [num_samples] + [value.shape[a + (a < particle_axis)] for a in keep]
    else:
        shape = [value.shape[a] for a in keep]
    return value.reshape(shape).double().numpy() if value.is_floating_point() else value.reshape(shape).numpy(), dims


def _sampled(site: dict, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    """A sampled site's value, broadcast to its distribution's batch shape, as a named array, draws first."""
    fn = site["fn"]
    return _named(site, site["value"], fn.event_dim, max_plate_nesting, num_samples, fn.batch_shape)


def _deterministic(site: dict, value: Tensor, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    """A deterministic site's ``value`` as a named array, draws first (repeated where it has no draw axis).

    ``pyro.deterministic`` declares every dim an event dim, so the particle axis is found from the value
    itself: the leftmost non-singleton axis, if it has size S; axes right of it are batch (plates) then event.
    """
    mpn = max_plate_nesting
    wide = [a for a in range(value.dim()) if value.shape[a] != 1]
    if wide and value.shape[wide[0]] == num_samples:
        a = wide[0]
        right = value.dim() - 1 - a
        if right < mpn:  # trailing singleton batch dims were squeezed away
            value = value.reshape(value.shape[: a + 1] + (1,) * (mpn - right) + value.shape[a + 1 :])
        event_dim = max(right - mpn, 0)
    else:  # the same for every draw
        event_dim = value.dim()
        value = value.reshape((1,) * (mpn + 1) + value.shape).expand((num_samples,) + (1,) * mpn + value.shape)
    return _named(site, value, event_dim, mpn, num_samples)


def _log_lik(site: dict, max_plate_nesting: int, num_samples: int) -> tuple[np.ndarray, list[str]]:
    """An observed site's unscaled pointwise ``log p(y_i | z_s)``, draws first."""
    lp = site["unscaled_log_prob"].expand(site["fn"].batch_shape)
    return _named(site, lp, 0, max_plate_nesting, num_samples, site["fn"].batch_shape)


def _observed(site: dict, max_plate_nesting: int) -> tuple[np.ndarray, list[str]]:
    """An observed site's data as a named array (no draw axis)."""
    return _named(site, site["value"], site["fn"].event_dim, max_plate_nesting, None)


def _latent_arrays(draws: _Draws, include_deterministic: bool = True) -> Arrays:
    """The posterior group's named arrays; deterministic sites too unless ``include_deterministic`` is False
    (the default keeps them: ArviZ's posterior group reports them; PSIS moments need the latents only)."""
    return {n: v for n, v in draws.posterior.items() if include_deterministic or n not in draws.deterministic}
