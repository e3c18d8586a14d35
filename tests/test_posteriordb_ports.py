"""The Pyro ports of the posteriordb posteriors (``benchmarks/pdb``) and the scoring of ``benchmarks/posteriordb.py``.

Needs the development set ``../shared/posteriordb`` (or ``$VI_FLOWS_POSTERIORDB``); users do not have it, so the
whole module skips without it. Each port must give, on Stan's reference draws, a Pyro log joint that differs
from its literal transcription of the Stan model block by one constant, and every reference draw must lie in
its site's support.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import benchmarks.pdb as pdb  # noqa: E402  (by its full name: a bare ``pdb`` is the standard debugger)

pytestmark = pytest.mark.skipif(not pdb.available(), reason="../shared/posteriordb not found")

NUM_DRAWS = 5
# float64: rounding of a sum of N <= 1,200 terms is below N·eps ≈ 3e-13 of |log p|; 1e-8 leaves room for the
# Cholesky / forward recursions of the GP and HMM ports and is far below a real slip (kidiq's half-Cauchy prior
# alone varies by ~0.06 over its draws, 3e-5 of its |log p|).
RTOL64 = 1e-8
# float32 (the ports' own dtype): eps = 1.2e-7; the transcriptions sum N <= 1,200 terms one at a time, so rounding
# lies between √N·eps ≈ 4e-6 (typical) and N·eps ≈ 1.4e-4 (worst case) of |log p|; observed at most 2.1e-5
# (earnings, |log p| ≈ 13,400). Only float64 is sharp enough to see a small missing term.
RTOL32 = 1e-4


def _port(short: str):
    try:
        return pdb.PORTS[short]
    except KeyError:
        pytest.skip(f"port {short} not written yet")


def _cast(data: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}


def _reference_values(reference: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``NUM_DRAWS`` reference draws spread over the ten chains, per site ``(NUM_DRAWS, *shape)``."""
    rows = np.linspace(0, len(next(iter(reference.values()))) - 1, NUM_DRAWS).astype(int)
    picked = {k: v[rows] for k, v in reference.items()}
    return pdb.unflatten(picked, pdb.site_shapes(reference), dtype)


def _log_density_gaps(port, data: dict, values: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per draw: the Pyro model's log joint and (log joint − ``stan_log_density``)."""
    joints, gaps = [], []
    for i in range(NUM_DRAWS):
        v = {k: x[i] for k, x in values.items()}
        joint = poutine.trace(poutine.condition(port.model, v)).get_trace(**data).log_prob_sum()
        joints.append(float(joint))
        gaps.append(float(joint - port.stan_log_density(v, **data)))
    return np.array(joints), np.array(gaps)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, RTOL64), (torch.float32, RTOL32)], ids=["f64", "f32"])
@pytest.mark.parametrize("short", pdb.SHORT_NAMES)
def test_log_density_matches_stan_up_to_a_constant(short, dtype, rtol):
    port = _port(short)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        path = pdb.folder(short)
        data = _cast(port.load_data(path), dtype)
        values = _reference_values(pdb.load_reference(path), dtype)
        joints, gaps = _log_density_gaps(port, data, values)
    finally:
        torch.set_default_dtype(old)
    assert np.isfinite(joints).all() and np.isfinite(gaps).all()
    spread = gaps.max() - gaps.min()
    assert spread <= rtol * (1 + np.abs(joints).max()), f"{short}: log p − Stan varies by {spread:.3g} over draws"


def _batched_log_joint(model, data: dict, values: dict, dim: int) -> torch.Tensor:
    """Per-draw log joint with all draws at once, in a plate at ``dim`` left of the model's plates."""
    batched = {k: x.reshape(x.shape[:1] + (1,) * (-dim - 1) + x.shape[1:]) for k, x in values.items()}
    with pyro.plate("draws", NUM_DRAWS, dim=dim):
        trace = prune_subsample_sites(poutine.trace(poutine.condition(model, batched)).get_trace(**data))
    trace.compute_log_prob()
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    return sum(site["log_prob"].reshape(NUM_DRAWS, -1).sum(-1) for site in sites)


@pytest.mark.parametrize("short", pdb.SHORT_NAMES)
def test_batched_model_gives_each_draws_log_joint(short, float64):
    """``diagnose`` and vectorized particles run the model on a batch of draws: each must get its own log joint."""
    port = _port(short)
    path = pdb.folder(short)
    data = _cast(port.load_data(path), torch.float64)
    values = _reference_values(pdb.load_reference(path), torch.float64)
    joints, _ = _log_density_gaps(port, data, values)
    for dim in (-2, -3):
        batched = _batched_log_joint(port.model, data, values, dim).numpy()
        np.testing.assert_allclose(batched, joints, rtol=RTOL64, err_msg=f"plate at dim {dim}")


def _latent_sites(model, data: dict) -> dict:
    """The unconditioned model's latent sites (runs through :class:`pdb.Flat`'s feasible point)."""
    trace = prune_subsample_sites(poutine.trace(pdb.initializable(model)).get_trace(**data))
    return dict(trace.iter_stochastic_nodes())


@pytest.mark.parametrize("short", pdb.SHORT_NAMES)
def test_sites_are_stan_parameters_and_hold_every_reference_draw(short, float64):
    port = _port(short)
    path = pdb.folder(short)
    reference = pdb.load_reference(path)
    shapes = pdb.site_shapes(reference)
    sites = _latent_sites(port.model, _cast(port.load_data(path), torch.float64))
    assert sorted(sites) == sorted(shapes), "one latent site per Stan parameter, same names"
    draws = pdb.unflatten(reference, shapes, torch.float64)
    for name, site in sites.items():
        assert tuple(site["value"].shape) == shapes[name] and not site["fn"].batch_shape, name
        assert tuple(site["fn"].event_shape) == shapes[name], f"{name}: one site, event shape = Stan's shape"
        x = draws[name]
        support = site["fn"].support
        assert bool(support.check(x).all()), f"{name}: a reference draw lies outside {support}"
        t = biject_to(support)  # onto Stan's space: every draw is the image of its own preimage
        torch.testing.assert_close(t(t.inv(x)), x, rtol=1e-6, atol=1e-9)


def test_flatten_names_are_stan_names():
    samples = {"beta": torch.arange(6.0).reshape(3, 2), "sigma": torch.ones(3), "theta": torch.zeros(3, 2, 3)}
    flat = pdb.flatten(samples)
    assert list(flat)[:3] == ["beta[1]", "beta[2]", "sigma"]
    assert "theta[2,3]" in flat and len(flat) == 2 + 1 + 6
    np.testing.assert_array_equal(flat["beta[2]"], [1.0, 3.0, 5.0])
    back = pdb.unflatten(flat, pdb.site_shapes(flat))
    torch.testing.assert_close(back["beta"], samples["beta"])


# ------------------------------------------------------------------------------------------------------ the harness
@pytest.fixture(scope="module")
def harness():
    bench = os.path.join(REPO, "benchmarks")
    sys.path.insert(0, bench)
    try:
        import posteriordb

        yield posteriordb
    finally:
        sys.path.remove(bench)


def test_score_of_the_reference_itself_is_perfect_and_a_shift_is_seen(harness):
    reference = pdb.load_reference(pdb.folder("kidiq"))
    perfect = harness.score(reference, reference)
    assert perfect["max_mean_err"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["sd_ratio_min"] == pytest.approx(1.0) and perfect["sd_ratio_max"] == pytest.approx(1.0)
    assert perfect["max_w1"] == pytest.approx(0.0, abs=1e-12) and perfect["accurate"]
    sd = reference["sigma"].std()
    shifted = dict(reference, sigma=reference["sigma"] + 0.5 * sd)  # half an sd off: not accurate
    worse = harness.score(shifted, reference)
    assert worse["params"]["sigma"]["mean_err"] == pytest.approx(0.5) and not worse["accurate"]
    assert worse["params"]["sigma"]["w1"] == pytest.approx(0.5)
    wide = harness.score(dict(reference, sigma=1.5 * reference["sigma"]), reference)
    assert wide["sd_ratio_max"] == pytest.approx(1.5) and not wide["accurate"]


@pytest.mark.filterwarnings("ignore:k-hat from .* draws is not reliable")  # 100 draws: a smoke run, not a reading
def test_quick_harness_run_writes_finite_scores(harness, tmp_path):
    result = harness.main(
        ["--quick", "--guides", "vi:normal", "--posteriors", "mesquite", "--draws", "100", "--out", str(tmp_path)]
    )
    (row,) = json.loads((tmp_path / "posteriordb.json").read_text())["rows"]
    assert "error" not in row, row.get("error")
    assert row["steps"] == harness.QUICK_STEPS and row["seconds"] > 0
    for key in ("max_mean_err", "sd_ratio_min", "sd_ratio_max", "max_w1", "khat"):
        assert math.isfinite(row[key]), key
    assert set(row["params"]) == {"beta[1]", "beta[2]", "sigma"}
    assert result["summary"][0]["failures"] == 0
    assert "| mesquite | vi:normal |" in (tmp_path / "posteriordb.md").read_text()
