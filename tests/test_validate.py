"""The shared argument checks (vi_flows.validate), the shared networks' old import paths, and the deprecated
aliases kept for old code."""

import math
import warnings

import pyro.distributions as dist
import pytest
import torch

from vi_flows import validate
from vi_flows.transforms import AffineCoupling, SplineCoupling, maf_stack, spline_stack
from vi_flows.transforms.autoregressive import (
    AffineInverseAutoregressive,
    Autoregressive,
    InverseAutoregressive,
    MaskedAutoregressive,
)


def _message(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message  # one line
    return message


# ------------------------------------------------------------------------------------------ messages


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3", None])
def test_positive_int_names_the_argument_the_rule_an_example_and_the_value(bad):
    message = _message(lambda: validate.check_positive_int(bad, "num_flows", example=4))
    assert message == f"num_flows must be an integer >= 1 (e.g. num_flows=4), got {bad!r}"


def test_int_checks_return_plain_ints_and_accept_numpy_integers():
    np = pytest.importorskip("numpy")
    assert validate.check_positive_int(np.int64(3), "n") == 3 and type(validate.check_positive_int(3, "n")) is int
    assert validate.check_nonneg_int(0, "context_dim") == 0
    assert validate.check_int(-5, "seed", None) == -5


def test_nonneg_int_explains_the_special_value():
    message = _message(lambda: validate.check_nonneg_int(-1, "context_dim", note="0: no context"))
    assert message == "context_dim must be an integer >= 0 (e.g. context_dim=0; 0: no context), got -1"


def test_any_int_rejects_non_integers_only():
    assert _message(lambda: validate.check_int(1.5, "seed", None)) == "seed must be an integer (e.g. seed=0), got 1.5"


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, True, "1"])
def test_positive_float(bad):
    message = _message(lambda: validate.check_positive_float(bad, "bound", example=5.0))
    assert message == f"bound must be a positive finite number (e.g. bound=5.0), got {bad!r}"


def test_float_in_an_interval_shows_the_interval():
    message = _message(lambda: validate.check_float(1.0, "min_scale", low=0.0, high=1.0, high_open=True, example=1e-3))
    assert message == "min_scale must be a finite number in [0, 1) (e.g. min_scale=0.001), got 1.0"
    assert validate.check_float(0, "min_scale", low=0.0, high=1.0, high_open=True) == 0.0
    assert "a finite real number" in _message(lambda: validate.check_float(math.nan, "sigmoid_bias"))


@pytest.mark.parametrize("bad", [(), [], (8, 0), (8, -1), (2.0,), 5, None, (True,)])
def test_hidden_dims(bad):
    message = _message(lambda: validate.check_hidden_dims(bad))
    assert (
        message == f"hidden_dims must be a non-empty sequence of positive ints (e.g. hidden_dims=(64, 64)), got {bad!r}"
    )
    assert validate.check_hidden_dims([8, 4]) == (8, 4)


def test_made_hidden_dims_say_why_they_must_reach_dim():
    message = _message(lambda: InverseAutoregressive(5, (4,)))
    assert "hidden_dims must be a non-empty sequence of ints >= 5" in message
    assert "hidden_dims=(16,)" in message and "MADE needs >= dim=5 units per layer" in message


def test_choice_and_bool_and_activation():
    assert _message(lambda: validate.check_choice("x", ("a", "b"), "orders")) == (
        "orders must be one of ['a', 'b'], got 'x'"
    )
    assert _message(lambda: validate.check_bool(1, "swap")) == "swap must be True or False, got 1"
    message = _message(lambda: validate.check_activation("tanhh", {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}))
    assert (
        message
        == "activation must be one of ['relu', 'tanh'] or an nn.Module class (e.g. activation='tanh'), got 'tanhh'"
    )
    assert validate.check_activation(torch.nn.ELU, {}) is torch.nn.ELU


@pytest.mark.parametrize(
    "call, start",
    [
        (lambda: AffineCoupling(3, (8,), context_dim=-1), "context_dim must be an integer >= 0"),
        (lambda: AffineCoupling(3, (8,), swap=1), "swap must be True or False"),
        (lambda: AffineCoupling(3, (8,), log_scale_bound=0), "log_scale_bound must be a positive finite number"),
        (lambda: SplineCoupling(3, (8,), bins=1), "bins must be an integer >= 2 (e.g. bins=8)"),
        (lambda: spline_stack(3, 0), "num_flows must be an integer >= 1 (e.g. num_flows=4)"),
        (lambda: maf_stack(3, 2, orders="sorted"), "orders must be one of ['auto', 'reverse', 'random']"),
        (lambda: maf_stack(3, 2, seed="0"), "seed must be an integer"),
        (lambda: InverseAutoregressive(3, min_scale=1), "min_scale must be a finite number in [0, 1)"),
    ],
)
def test_layers_use_the_shared_messages(call, start):
    assert _message(call).startswith(start)


def test_cnf_options_are_checked_without_a_network():
    pytest.importorskip("torchdiffeq")
    from vi_flows.transforms.continuous import ContinuousFlow, check_options

    checked = check_options((8,), gradient="checkpoint", rtol=1e-3)
    assert checked["hidden_dims"] == (8,) and checked["gradient"] == "checkpoint" and checked["rtol"] == 1e-3
    assert check_options()["gradient"] == "backprop"
    flow = ContinuousFlow(3, **checked)  # what a preset builds later, per model: the normalized options fit
    assert flow.gradient == "checkpoint" and flow.rtol == 1e-3 and flow.trace == "exact"
    assert _message(lambda: check_options(solver="euler")).startswith("solver='euler' takes fixed steps")
    assert _message(lambda: check_options(rtol=0)).startswith("rtol must be a positive finite number")
    assert _message(lambda: check_options(gradient="exact")).startswith("gradient must be one of")


def test_spline_options_are_checked_without_a_network():
    from vi_flows.transforms.spline import check_spline_options

    assert check_spline_options(4, 3) == (4, 3.0)
    assert _message(lambda: check_spline_options(bound=-1.0)).startswith("bound must be a positive finite number")


# ------------------------------------------------------------------------------------------ discrete sites


def test_one_discrete_site_advice_with_pyros_tutorial_and_our_ways_out():
    message = validate.discrete_site_advice("k", dist.Categorical(torch.ones(3)), owner="AutoIAF")
    assert "\n" not in message
    assert message.startswith("AutoIAF: latent site 'k' is discrete (Categorical)")
    assert "https://pyro.ai/examples/enumeration.html" in message and validate.ENUMERATION_TUTORIAL in message
    for advice in ("TraceEnum_ELBO", "config_enumerate", "poutine.block(model, hide=['k'])", "AutoGuideList"):
        assert advice in message
    assert validate.discrete_site_advice("k", dist.Bernoulli(0.5)).startswith("latent site 'k' is discrete")


def test_check_continuous_site():
    validate.check_continuous_site("z", dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match=r"'n' is discrete \(Poisson\).*enumeration\.html"):
        validate.check_continuous_site("n", dist.Poisson(1.0), owner="diagnostics")


# ------------------------------------------------------------------------------------------ structure


def test_maf_and_iaf_are_siblings_on_one_autoregressive_base():
    assert issubclass(InverseAutoregressive, Autoregressive) and issubclass(MaskedAutoregressive, Autoregressive)
    assert not issubclass(MaskedAutoregressive, InverseAutoregressive)
    assert issubclass(AffineInverseAutoregressive, MaskedAutoregressive)
    assert not hasattr(MaskedAutoregressive, "_gate") and hasattr(InverseAutoregressive, "_gate")


def test_networks_live_in_one_module_and_old_paths_still_work():
    from vi_flows.transforms import coupling, made, networks

    assert made.MADE is networks.MADE and made.PACK_LIMIT == networks.PACK_LIMIT
    assert coupling.mlp is networks.mlp and coupling.soft_bound is networks.soft_bound
    pytest.importorskip("torchdiffeq")
    from vi_flows.transforms import continuous

    assert continuous.ODENet is networks.ODENet and continuous.ConcatSquash is networks.ConcatSquash
    assert continuous.forward_mode_trace is networks.forward_mode_trace


# ------------------------------------------------------------------------------------------ deprecated aliases


def test_conditioned_flow_is_a_deprecated_alias_of_conditioned():
    pytest.importorskip("torchdiffeq")
    from vi_flows.transforms import continuous
    from vi_flows.transforms.base import Conditioned

    with pytest.warns(DeprecationWarning, match="ConditionedFlow is deprecated.*Conditioned"):
        alias = continuous.ConditionedFlow
    assert alias is Conditioned
    assert "ConditionedFlow" not in continuous.__all__
    with pytest.raises(AttributeError):
        continuous.NoSuchName  # noqa: B018


def test_adjoint_flag_is_a_deprecated_alias_of_gradient():
    pytest.importorskip("torchdiffeq")
    from vi_flows.transforms.continuous import ContinuousFlow

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without the flag
        plain = ContinuousFlow(2, (4,), gradient="adjoint")
    with pytest.warns(DeprecationWarning, match="adjoint flag is deprecated.*gradient='adjoint'"):
        flow = ContinuousFlow(2, (4,), adjoint=True)
    assert flow.gradient == plain.gradient == "adjoint"
    with pytest.warns(DeprecationWarning):
        assert ContinuousFlow(2, (4,), adjoint=False).gradient == "backprop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading is silent: torch.jit.trace_module probes attributes
        assert flow.adjoint is True
    with pytest.warns(DeprecationWarning):
        flow.adjoint = False
    assert flow.gradient == "backprop"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts adjoint=True"):
        ContinuousFlow(2, (4,), adjoint=True, gradient="checkpoint")
