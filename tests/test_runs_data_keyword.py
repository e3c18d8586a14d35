"""A model argument named ``data`` (Pyro's tutorials' ``def model(data)``) reaches the model; minibatches: ``batches=``.

``fit(..., data=...)`` used to be fit's own keyword for minibatches, so ``fit(model, guide, data=x)`` iterated over
``x`` as batches and ``vi-flows fit`` on such a model always failed ("len() of a 0-d tensor").
"""

from __future__ import annotations

import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule

from vi_flows.cli import main
from vi_flows.training import fit

X = torch.tensor([2.5, 3.5, 3.0, 2.0, 4.0])  # mean 3, so the posterior mean of mu is 3 · 5 / (5 + 1/25) ≈ 2.98


def model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("obs", len(data)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


class Model(PyroModule):
    def forward(self, data):
        return model(data)


def subsampled(idx, x):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("obs", len(X), subsample=idx):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def posterior_mean(m) -> float:
    fit(m, AutoNormal(m), data=X, num_steps=150, lr=0.1, tol=None, progress=False, seed=0)
    return pyro.param("AutoNormal.locs.mu").item()


@pytest.mark.parametrize("make", [lambda: model, Model], ids=["function", "PyroModule"])
def test_a_models_data_argument_reaches_the_model(make):
    assert posterior_mean(make()) == pytest.approx(2.98, abs=0.2)  # it trained on the data, not on batches of it


def test_batches_feed_minibatches():
    batches = [(torch.tensor([i, i + 1]), X[i : i + 2]) for i in (0, 2)]
    result = fit(subsampled, AutoNormal(subsampled), batches=batches, num_steps=4, progress=False)
    assert result.num_steps == 4


def test_data_is_still_the_minibatches_of_a_model_without_a_data_parameter():
    batches = [(torch.tensor([0, 1]), X[:2])]
    with pytest.warns(FutureWarning, match="pass them as batches="):
        result = fit(subsampled, AutoNormal(subsampled), data=batches, num_steps=3, progress=False)
    assert result.num_steps == 3


def test_data_and_batches_together_are_refused():
    batches = [(torch.tensor([0, 1]), X[:2])]
    with pytest.raises(ValueError, match="batches= and data= were both given"):
        fit(subsampled, AutoNormal(subsampled), data=batches, batches=batches, num_steps=3, progress=False)


def test_the_command_line_fits_a_model_of_data(tmp_path, capsys):
    (tmp_path / "tutorial.py").write_text(textwrap.dedent(
        """
        import pyro
        import pyro.distributions as dist


        def model(data, lr):  # names that fit also takes: both are the model's
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0 * lr))
            with pyro.plate("obs", len(data)):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=data)
        """
    ))  # fmt: skip
    (tmp_path / "data.json").write_text('{"data": [2.5, 3.5, 3.0, 2.0, 4.0], "lr": 1.0}')
    argv = ["fit", f"{tmp_path}/tutorial.py:model", "--data", f"{tmp_path}/data.json", "--guide", "normal",
            "--steps", "150", "--lr", "0.1", "--samples", "64", "--out", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "guide.pt", weights_only=True)
    assert state["params"]["AutoNormal.locs.mu"].item() == pytest.approx(2.98, abs=0.2)
