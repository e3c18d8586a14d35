"""The registry of flow families (vi_flows.families): one vocabulary for the CLI, AmortizedFlow and the scripts."""

import argparse

import pytest
import torch

import vi_flows
from vi_flows import families
from vi_flows.amortized import DEFAULT_NUM_FLOWS, FLOW_OPTIONS, FLOWS, AmortizedFlow
from vi_flows.families import ALIASES, FAMILIES, NAMES, canonical, family
from vi_flows.transforms.base import ConditionalFlowTransform

FLOW_FAMILIES = [name for name in NAMES if FAMILIES[name].conditional is not None]
SMALL = {"iaf": {"hidden_dims": (8,)}, "realnvp": {"hidden_dims": (8,)}, "nsf": {"hidden_dims": (8,)},
         "cnf": {"hidden_dims": (8,)}}  # fmt: skip


def _guide_choices() -> list[str]:
    from vi_flows.cli import _parser

    fit = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    return list(next(a for a in fit._actions if a.dest == "guide").choices)


def test_cli_guide_choices_are_the_registry_names():
    assert _guide_choices() == list(NAMES)
    assert NAMES == ("normal", "planar", "radial", "iaf", "realnvp", "sylvester", "nsf", "cnf")


def test_every_family_but_the_gaussian_has_a_conditional_flow():
    assert FLOW_FAMILIES == [name for name in NAMES if name != "normal"]
    assert FAMILIES["normal"].guide is vi_flows.AutoFlow and FAMILIES["normal"].num_flows == 0


@pytest.mark.parametrize("name", NAMES)
def test_each_family_names_its_guide_class(name):
    guide = FAMILIES[name].guide
    assert guide is getattr(vi_flows, guide.__name__) and issubclass(guide, vi_flows.AutoFlow)


def test_guide_layer_defaults_come_from_the_guide_signatures():
    assert {n: f.guide_num_flows for n, f in FAMILIES.items()} == {
        "normal": None, "planar": 16, "radial": 16, "iaf": 2, "realnvp": 4, "sylvester": 4, "nsf": 4, "cnf": None,
    }  # fmt: skip


@pytest.mark.parametrize("name", FLOW_FAMILIES)
def test_each_flow_family_builds_an_amortized_flow_that_round_trips(name):
    torch.manual_seed(0)
    q = AmortizedFlow(3, 2, name, **SMALL.get(name, {})).double()
    assert q.flow_name == name and q.num_flows == FAMILIES[name].num_flows
    with torch.no_grad():  # off the identity start, so the round trip tests the flow
        for p in q.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context = torch.randn(4, 2, dtype=torch.float64)
    dist = q(context)
    z, log_q = dist.rsample_and_log_prob((5,))
    assert z.shape == (5, 4, 3) and torch.isfinite(log_q).all()
    torch.testing.assert_close(dist.log_prob(z.detach()), log_q.detach(), atol=1e-5, rtol=1e-5)
    bound = q.flow.condition(context)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(bound.inv(bound(x)), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alias, name", [("none", "normal"), ("coupling", "realnvp"), ("spline", "nsf")])
def test_aliases_mean_the_canonical_family(alias, name):
    assert ALIASES[alias] == name and canonical(alias) == name and family(alias) is FAMILIES[name]
    options = SMALL.get(name, {})
    torch.manual_seed(0)
    old = AmortizedFlow(3, 2, alias, **options)
    torch.manual_seed(0)
    new = AmortizedFlow(3, 2, name, **options)
    assert old.flow_name == name and old.num_flows == new.num_flows
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    assert DEFAULT_NUM_FLOWS[alias] == DEFAULT_NUM_FLOWS[name]


def test_amortized_tables_derive_from_the_registry():
    assert FLOWS == NAMES
    assert all(DEFAULT_NUM_FLOWS[n] == family(n).num_flows for n in families.AMORTIZED_NAMES)
    assert (
        FLOW_OPTIONS["coupling"]
        == FLOW_OPTIONS["realnvp"]
        == {"linear", "linear_init", "activation", "log_scale_bound"}
    )
    assert "cnf" not in FLOW_OPTIONS  # any ContinuousFlow keyword, checked there


def test_unknown_names_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match="realnvp"):
        family("glow")
    with pytest.raises(ValueError, match="flow must be one of"):
        AmortizedFlow(3, 2, "glow")
    with pytest.raises(ValueError, match="flow must be one of"):
        AmortizedFlow(3, 2, None)


def test_conditional_layers_live_beside_their_cores_and_are_re_exported():
    from vi_flows import amortized
    from vi_flows.transforms import continuous, planar, radial, sylvester

    for module, name in (
        (planar, "ConditionalPlanar"),
        (radial, "ConditionalRadial"),
        (sylvester, "ConditionalSylvester"),
    ):
        cls = getattr(module, name)
        assert name in module.__all__ and getattr(amortized, name) is cls
        assert issubclass(cls, ConditionalFlowTransform)
    assert issubclass(continuous.ContinuousFlow, ConditionalFlowTransform)


def test_the_cli_builds_each_family_guide():
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    from vi_flows._cli_run import _make_guide

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    for name in NAMES:
        guide = _make_guide(name, model, None)
        assert type(guide) is (AutoNormal if name == "normal" else FAMILIES[name].guide)
