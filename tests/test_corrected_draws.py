"""PSIS-corrected draws (issue 15, item 7): offered where k̂ says they are valid, refused where it does not.

The reference is a conjugate Normal-Normal model, whose posterior mean and sd are known in closed form, with
a Gaussian guide set off on purpose: its mean 0.5 posterior sd too high and its sd 1.3 times too wide. A
wider guide has bounded weights, so k̂ is far below 0.7 and the correction is valid; its draws miss the
posterior's moments by 0.5 sd and 0.3 sd, and resampling them with the PSIS weights must recover both.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import replace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_value

import vi_flows
from vi_flows.cli import main
from vi_flows.diagnostics import (
    KHAT_OK,
    RESAMPLING,
    UnreliableWeightsError,
    _stratified,
    diagnose,
    khat_threshold,
    load_inference_data,
    psis_resample,
    to_inference_data,
)

# mu ~ N(0, PRIOR_SD), y_n | mu ~ N(mu, NOISE_SD), n = 1..N
N, PRIOR_SD, NOISE_SD = 10, 2.0, 1.0
Y = torch.randn(N, generator=torch.Generator().manual_seed(0)) + 1.0
PREC = 1 / PRIOR_SD**2 + N / NOISE_SD**2
POST_MEAN, POST_SD = float(Y.sum()) / NOISE_SD**2 / PREC, PREC**-0.5
SHIFT, WIDTH = 0.5, 1.3  # the guide's mean is POST_MEAN + SHIFT * POST_SD, its sd WIDTH * POST_SD
S = 20_000
# ∫ p²/q for p = N(0, 1), q = N(SHIFT, WIDTH²): WIDTH / √(2 - 1/WIDTH²) · exp(SHIFT² / (2 WIDTH² - 1)) = 1.217,
# so the importance-sampling ESS is S / 1.217 ≈ 0.82 S
ESS_FRAC = 1 / (WIDTH / math.sqrt(2 - 1 / WIDTH**2) * math.exp(SHIFT**2 / (2 * WIDTH**2 - 1)))


def normal_mean(y):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    pyro.deterministic("mu2", 2 * mu)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, NOISE_SD), obs=y)


def off_guide():
    """``AutoFlow`` without flow layers (so ``q`` is exactly Gaussian) started off, and not trained."""
    pyro.clear_param_store()
    start = init_to_value(values={"mu": torch.tensor(POST_MEAN + SHIFT * POST_SD)})
    guide = vi_flows.AutoFlow(normal_mean, init=None, init_loc_fn=start, init_scale=WIDTH * POST_SD)
    guide(Y)
    return guide


def heavy_tail():
    pyro.sample("z", dist.StudentT(1.5, 0.0, 1.0))


def narrow_guide():
    pyro.sample("z", dist.Normal(0.0, 0.5))


def wide_guide():
    pyro.sample("z", dist.StudentT(1.5, 0.0, 1.2))  # the posterior's tail, a little wider: bounded weights


@pytest.fixture(scope="module")
def off():
    guide = off_guide()
    return guide, diagnose(normal_mean, guide, Y, num_samples=S, seed=0)


# ---- corrected draws recover the posterior where the guide's draws do not ------------------------------------------


def test_the_guide_is_off_as_built(off):
    guide, d = off
    assert float(guide.loc.detach()) == pytest.approx(POST_MEAN + SHIFT * POST_SD, rel=1e-5)
    assert float(guide.scale.detach()) == pytest.approx(WIDTH * POST_SD, rel=1e-5)
    # a wider-than-posterior Gaussian has bounded weights: k̂ far below KHAT_OK, and the ESS the closed form says
    assert d.khat < 0.5 and d.reading == "good" and d.corrected_valid
    assert d.ess / S == pytest.approx(ESS_FRAC, abs=0.03)  # the estimate's own noise is below 0.01 at 20000 draws


def _assert_corrected(plain: np.ndarray, corrected: np.ndarray) -> None:
    """Plain draws miss the posterior by the guide's offsets; corrected ones hit it within Monte-Carlo error.

    Monte-Carlo error, in posterior sds: the plain mean has sd WIDTH/√S = 0.009 and the plain sd
    WIDTH/√(2S) = 0.0065, so 0.4 and 0.25 leave ≥ 10 of them inside the offsets 0.5 and 0.3. The corrected
    mean has sd ≈ 1/√ESS = 0.008 from the weights plus at most 1/√S = 0.007 from resampling (multinomial's;
    stratified is below it), ≤ 0.011 together: 0.05 is ~5 of them; the corrected sd ≈ 1/√(2 ESS) = 0.0055
    plus ≤ 0.005: 0.04 is ~5 of them.
    """
    assert abs(plain.mean() - POST_MEAN) > 0.4 * POST_SD
    assert abs(plain.std() - POST_SD) > 0.25 * POST_SD
    assert abs(corrected.mean() - POST_MEAN) < 0.05 * POST_SD
    assert abs(corrected.std() - POST_SD) < 0.04 * POST_SD


def test_corrected_draws_match_the_conjugate_posterior_where_guide_draws_do_not(off):
    _, d = off
    corrected = d.corrected_draws(seed=0)
    assert set(corrected) == {"mu"} and corrected["mu"].shape == (S,)
    _assert_corrected(d.draws["mu"], corrected["mu"])
    assert np.isin(corrected["mu"], d.draws["mu"]).all()  # resampled guide draws, not new ones
    np.testing.assert_array_equal(d.corrected_draws(seed=0)["mu"], corrected["mu"])  # seed fixes the resampling
    df = d.to_dataframe()  # the weighted moments agree with the resampled ones
    assert abs(df["psis_mean"][0] - POST_MEAN) < 0.05 * POST_SD and abs(df["psis_sd"][0] - POST_SD) < 0.04 * POST_SD


def test_inference_data_corrected_is_flagged_and_resamples_every_group(off):
    guide, d = off
    plain = to_inference_data(normal_mean, guide, Y, num_samples=S, seed=0)
    corrected = to_inference_data(normal_mean, guide, Y, num_samples=S, seed=0, corrected=True)
    assert plain.posterior.attrs["vi_flows_draws"] == "guide"
    attrs = corrected.posterior.attrs
    assert attrs["vi_flows_draws"] == "psis-resampled" and attrs["vi_flows_resampling"] == RESAMPLING
    assert attrs["vi_flows_khat"] == pytest.approx(d.khat) == plain.posterior.attrs["vi_flows_khat"]  # same draws
    assert attrs["vi_flows_reading"] == "good" and attrs["vi_flows_khat_threshold"] == KHAT_OK
    assert attrs["vi_flows_is_ess"] == pytest.approx(d.ess)
    mu = corrected.posterior["mu"].values
    assert mu.shape == (1, S)
    _assert_corrected(plain.posterior["mu"].values[0], mu[0])
    # every group with draws is resampled alike: guide_draw indexes the plain draws, the deterministic follows
    index = corrected.sample_stats["guide_draw"].values[0]
    assert (np.diff(index) >= 0).all()  # guide-draw order: repeats sit together
    np.testing.assert_array_equal(mu[0], plain.posterior["mu"].values[0, index])
    np.testing.assert_array_equal(corrected.posterior["mu2"].values, 2 * mu)
    np.testing.assert_array_equal(corrected.log_likelihood["y"].values[0], plain.log_likelihood["y"].values[0, index])
    np.testing.assert_array_equal(corrected.observed_data["y"].values, plain.observed_data["y"].values)
    with pytest.raises(ValueError, match="PSIS-resampled already"):
        psis_resample(corrected)


# ---- where k̂ says the correction is not valid, nothing corrected is offered ----------------------------------------


def test_unreliable_khat_offers_no_corrected_draws_or_moments():
    d = diagnose(heavy_tail, narrow_guide, num_samples=4000, seed=0)
    # w ∝ exp(z²/(2·0.5²)) / (1 + z²/1.5)^1.25 grows without bound: k̂ far above 0.7 at any seed
    assert d.khat > KHAT_OK and not d.corrected_valid
    with pytest.raises(UnreliableWeightsError) as refused:
        d.corrected_draws(seed=0)
    message = str(refused.value)
    assert "\n" not in message and f"k-hat {d.khat:.3g} > 0.7" in message and "misses posterior mass" in message
    df = d.to_dataframe()
    assert df["psis_mean"].isna().all() and df["psis_sd"].isna().all() and df["guide_mean"].notna().all()
    assert "withheld" in str(d)
    plain = to_inference_data(heavy_tail, narrow_guide, num_samples=4000, seed=0)
    assert plain.posterior.attrs["vi_flows_draws"] == "guide" and plain.posterior.attrs["vi_flows_reading"] == "bad"
    with pytest.raises(UnreliableWeightsError, match="k-hat"):
        to_inference_data(heavy_tail, narrow_guide, num_samples=4000, seed=0, corrected=True)
    with pytest.raises(UnreliableWeightsError, match="k-hat"):
        psis_resample(plain)


def test_one_unreliable_chain_refuses_them_all_and_names_it():
    guides = [wide_guide, narrow_guide]
    with pytest.raises(UnreliableWeightsError, match=r"\(chain 1 of 2\)"):
        to_inference_data(heavy_tail, guides, num_samples=2500, seed=0, corrected=True)
    plain = to_inference_data(heavy_tail, [wide_guide, wide_guide], num_samples=2500, seed=0)
    both = psis_resample(plain, seed=0)
    assert both.posterior["z"].shape == (2, 2500) and both.posterior.attrs["vi_flows_reading"] == "good"
    index = both.sample_stats["guide_draw"].values
    for c in range(2):  # each chain resampled from its own draws
        np.testing.assert_array_equal(both.posterior["z"].values[c], plain.posterior["z"].values[c, index[c]])


def test_validity_follows_the_module_thresholds_at_the_sample_size(off):
    _, d = off
    assert replace(d, khat=0.69, num_samples=4000).corrected_valid
    assert not replace(d, khat=0.71, num_samples=4000).corrected_valid
    # 500 draws vouch for k̂ up to khat_threshold(500) = 0.629 only; 0.65 needs 10^(1/0.35) = 720 draws
    assert khat_threshold(500) == pytest.approx(0.629, abs=1e-3)
    assert replace(d, khat=0.62, num_samples=500).corrected_valid
    short = replace(d, khat=0.65, num_samples=500)
    assert not short.corrected_valid and short.to_dataframe()["psis_mean"].isna().all()
    with pytest.raises(UnreliableWeightsError, match=r"0\.65 > 0\.629.*reliable from 720 draws"):
        short.corrected_draws()
    with pytest.raises(UnreliableWeightsError, match="undefined"):
        replace(d, khat=math.nan).corrected_draws()


def test_stratified_resampling_keeps_each_draw_its_expected_count_within_two():
    rng = np.random.default_rng(0)
    w = rng.gamma(0.5, size=50)
    w[7] = 0.0
    w /= w.sum()
    M = 1000
    with np.errstate(divide="ignore"):
        index = _stratified(np.log(w), M, np.random.default_rng(1))
    counts = np.bincount(index, minlength=50)
    # one uniform per stratum: draw s covers M w_s strata, so it is picked floor(M w_s) - 1 to ceil(M w_s) + 1
    # times; multinomial resampling would miss by ~√(M w_s), up to 4-5 here
    assert counts.sum() == M and counts[7] == 0
    assert np.abs(counts - M * w).max() < 2
    assert (np.diff(index) >= 0).all()


# ---- the CLI writes posterior_psis.nc only where valid and prints the verdict ---------------------------------------

MODELS = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist


    def normal_mean(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


    def heavy_tail():
        pyro.sample("z", dist.StudentT(1.5, 0.0, 1.0))
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrected_cli")
    (root / "models.py").write_text(MODELS)
    (root / "data.csv").write_text("y\n" + "".join(f"{v}\n" for v in Y.tolist()))
    return root


def _fit(argv, capsys) -> tuple[str, dict]:
    assert main([str(a) for a in argv]) == 0
    out, _ = capsys.readouterr()
    return out, json.loads((argv[argv.index("--out") + 1] / "diagnostics.json").read_text())


def test_cli_writes_corrected_draws_when_valid_with_the_default_draws(files, tmp_path, capsys, recwarn):
    # iaf starts at the Laplace approximation, exact for this conjugate model: k̂ good after 5 steps
    argv = ["fit", f"{files}/models.py:normal_mean", "--data", f"{files}/data.csv", "--steps", "5", "--out", tmp_path]
    out, record = _fit(argv, capsys)
    assert record["num_samples"] == 4000 and record["khat_threshold"] == KHAT_OK  # the default reads against 0.7
    assert not [w for w in recwarn if "k-hat from" in str(w.message)]  # no too-few-draws warning
    assert record["reading"] == "good"
    assert "good (< 0.5 good, 0.5-0.7 ok, > 0.7 unreliable at 4000 draws)" in out
    assert record["draws"] == {"posterior.nc": "guide", "posterior_psis.nc": "psis-resampled"}
    assert "PSIS draws   posterior_psis.nc" in out
    written = load_inference_data(tmp_path / "posterior_psis.nc")
    assert written.posterior.attrs["vi_flows_draws"] == "psis-resampled"
    assert written.posterior.attrs["vi_flows_khat"] == pytest.approx(record["khat"])
    plain = load_inference_data(tmp_path / "posterior.nc")
    assert plain.posterior.attrs["vi_flows_draws"] == "guide"
    # the file is psis_resample of posterior.nc with the run's seed, after the netCDF round trip too
    np.testing.assert_array_equal(psis_resample(plain, seed=0).posterior["mu"].values, written.posterior["mu"].values)
    assert main(["diagnose", str(tmp_path)]) == 0
    assert "PSIS draws   posterior_psis.nc" in capsys.readouterr()[0]


def test_cli_writes_no_corrected_draws_when_unreliable_and_removes_stale_ones(files, tmp_path, capsys):
    argv = ["fit", f"{files}/models.py:heavy_tail", "--guide", "normal", "--steps", "2", "--out", tmp_path]
    out, record = _fit(argv, capsys)  # AutoNormal's start (sd 0.1) against a Student-t: k̂ ≈ 1
    assert record["khat"] > KHAT_OK and record["reading"] == "bad"
    assert "unreliable (< 0.5 good, 0.5-0.7 ok, > 0.7 unreliable at 4000 draws)" in out
    assert "PSIS draws   none written" in out
    assert record["draws"] == {"posterior.nc": "guide"} and not (tmp_path / "posterior_psis.nc").exists()
    (tmp_path / "posterior_psis.nc").write_text("an earlier report's")  # a --resume rewrites the report
    _fit([*argv, "--resume"], capsys)
    assert not (tmp_path / "posterior_psis.nc").exists()


@pytest.mark.filterwarnings("ignore:k-hat from 500 draws:UserWarning")  # expected: that is the point here
def test_cli_verdict_reads_against_the_lower_threshold_of_few_draws(files, tmp_path, capsys):
    argv = ["fit", f"{files}/models.py:normal_mean", "--data", f"{files}/data.csv", "--steps", "5",
            "--samples", "500", "--out", tmp_path]  # fmt: skip
    out, record = _fit(argv, capsys)
    assert record["khat_threshold"] == pytest.approx(khat_threshold(500))
    assert "(< 0.5 good, 0.5-0.629 ok, > 0.629 unreliable at 500 draws; 0.7 needs 2155 draws)" in out
