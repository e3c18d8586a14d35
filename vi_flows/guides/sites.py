"""What a flow guide cannot cover, found at the first call, with the way out in the error.

A flow guide is one continuous vector over the model's latent sites: a discrete site, a local site of a
subsampled plate, or a support with no bijection to ``R^d`` is refused at setup with a one-line
``ValueError`` naming the site and the fix (Pyro's own advice where Pyro has one).
"""

from __future__ import annotations

import pyro
from torch.distributions import biject_to

from ..validate import discrete_site_advice


class SiteChecks:
    """Mixin of :class:`~vi_flows.guides.AutoFlow`: the checks of the prototype trace's latent sites."""

    @staticmethod
    def _prototype_hide_fn(msg) -> bool:
        # Discrete sites the model enumerates are summed out by TraceEnum_ELBO, not guided.
        if msg["type"] == "sample" and not msg["is_observed"] and msg["infer"].get("enumerate") == "parallel":
            return True
        return pyro.infer.autoguide.guides.prototype_hide_fn(msg)

    def _check_prototype_sites(self):
        """Raise a ``ValueError`` naming the first latent site a flow guide cannot cover, and what to do."""
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(discrete_site_advice(name, fn, type(self).__name__))
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"{type(self).__name__}: latent site '{name}' is inside the subsampled plate "
                        f"'{frame.name}' ({frame.size} of {frame.full_size}). A global flow cannot cover "
                        "local latents of a subsampled plate: guide them with AutoNormal in an AutoGuideList "
                        "(poutine.block the flow guide to the global sites), or use vi_flows.AmortizedFlow."
                    )
            try:
                biject_to(fn.support)
            except NotImplementedError:
                raise ValueError(self._unsupported_support_advice(name, fn)) from None

    def _unsupported_support_advice(self, name: str, fn) -> str:
        """The error for a site whose support has no bijection to ``R^d``; a sphere (``ProjectedNormal``) gets
        Pyro's advice, ``ProjectedNormalReparam``."""
        message = f"{type(self).__name__}: latent site '{name}' has support {fn.support}, which has no bijection to R^d"
        if "sphere" in repr(fn.support).lower():
            return (
                f"{message}; continuous inference cannot handle spherical sample sites. Use the ProjectedNormal "
                "distribution together with its reparameterizer, e.g. "
                f"poutine.reparam(model, config={{'{name}': ProjectedNormalReparam()}}) "
                "(from pyro.infer.reparam), or guide the site separately with AutoGuideList."
            )
        return f"{message}; reparameterize the site or guide it separately with AutoGuideList."
