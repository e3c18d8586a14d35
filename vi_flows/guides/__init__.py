"""Flow autoguides: drop-in replacements for Pyro's ``AutoNormal``.

Every guide here is an :class:`~pyro.infer.autoguide.AutoContinuous`: the
model's latent sites are mapped to one unconstrained vector ``z ∈ R^d`` through
``biject_to(support)``, and the posterior over ``z`` is

.. math::  z = μ + L f_K ∘ … ∘ f_1(ε),\\qquad ε ~ N(0, I),

standard noise warped by ``K`` flow layers, then mapped by a learnable affine ``μ + L ·`` whose start
``(μ_0, L_0)`` is found from the model (Pathfinder / Laplace) and whose parameters the optimizer sees
in units of that start (see :class:`AutoFlow`).
Sampling and ``log q`` cost one pass through the stack.
"""

from .autoflow import AutoFlow
from .presets import AutoCNF, AutoIAF, AutoNSF, AutoPlanar, AutoRadial, AutoRealNVP, AutoSylvester

__all__ = ["AutoFlow", "AutoPlanar", "AutoRadial", "AutoIAF", "AutoCNF", "AutoRealNVP", "AutoSylvester", "AutoNSF"]
