"""What each sample site of a replayed model or guide is to the importance weights.

``log w = log p(x, z) - log q(z)`` sums the model's latent sites the guide provides and its observed sites
(``log p``) against every guide sample site (``log q``); deterministic sites are reported but not weighted,
latent sites missing from the guide are drawn from their priors (part of the proposal, so not in ``w``),
and a subsampling plate's index site is neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyro.poutine.util import prune_subsample_sites


def _is_deterministic(site: dict) -> bool:
    """A ``pyro.deterministic`` site: a function of the latents, reported but not part of ``log p``."""
    return bool(site["infer"].get("_deterministic"))


def _is_subsample(site: dict) -> bool:
    """The index-drawing site a subsampling ``pyro.plate`` records (what ``prune_subsample_sites`` removes)."""
    return site["type"] == "sample" and type(site["fn"]).__name__ == "_Subsample"


def _sample_sites(trace) -> list[dict]:
    """A trace's sample sites, plates' index sites left out."""
    return [s for s in prune_subsample_sites(trace).nodes.values() if s["type"] == "sample"]


def _guide_names(trace) -> list[str]:
    """The guide's sample sites that make up ``log q`` (every sample site but plates' index sites)."""
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not _is_subsample(s)]


def _subsampled_plates(*traces) -> list[str]:
    """``"'name' (size of full_size)"`` for each plate that subsamples in any of ``traces``."""
    found = {}
    for trace in traces:
        for site in trace.nodes.values():
            for f in site.get("cond_indep_stack", ()):
                if f.full_size is not None and f.size != f.full_size:
                    found[f.name] = f"{f.name!r} ({f.size} of {f.full_size})"
    return list(found.values())


def _is_factor(site: dict) -> bool:
    """A ``pyro.factor`` site: it adds to ``log p`` but holds no data (its value is an empty placeholder)."""
    return bool(site["infer"].get("is_auxiliary")) and site["value"].numel() == 0


@dataclass
class _Roles:
    """What each model site is to the diagnostics, in model order."""

    latent: list[str]  # model latent sites the guide provides
    deterministic: list[str]
    observed: list[str]
    unguided: list[str]  # latent sites drawn from their priors by the replay: part of the proposal, not of w
    posterior: list[str]  # latent and deterministic, model order

    @property
    def weighted(self) -> list[str]:
        """The sites of ``log p(x, z)``."""
        return [n for n in self.posterior if n not in self.deterministic] + self.observed


def _roles(model_trace, guide_names: Sequence[str]) -> _Roles:
    """Sort a model trace's sample sites (plates' index sites aside) by what they are to the weights."""
    roles = _Roles([], [], [], [], [])
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or _is_subsample(site):
            continue
        if _is_deterministic(site):
            roles.deterministic.append(name)
        elif site["is_observed"]:
            roles.observed.append(name)
            continue
        elif name not in guide_names:
            roles.unguided.append(name)
            continue
        else:
            roles.latent.append(name)
        roles.posterior.append(name)
    return roles
