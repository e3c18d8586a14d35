"""The quick-start demo (``vi-flows demo``), at its ``--quick`` size."""

import math

from vi_flows.demo import PROBLEMS, _guides, _jobs, demo_row, run_demo


def test_quick_demo_table_and_picture(tmp_path, capsys):
    table = run_demo(quick=True, seed=0, out=tmp_path, progress=False, workers=1)  # CI's cores go to xdist
    guides = ["AutoNormal", "AutoPlanar", "AutoIAF", "AutoNSF"]
    assert table.loc[table["problem"] == "energy U3", "guide"].tolist() == [*guides, "AutoCNF"]
    assert table.loc[table["problem"] == "eight schools", "guide"].tolist() == guides  # the CNF: the energy only
    # IWAE and ELBO come from the same draws, so IWAE >= ELBO exactly (Jensen), whatever the fit.
    assert (table["IWAE"] >= table["ELBO"]).all() and table["ELBO"].map(math.isfinite).all()
    kl = table[table["problem"] == "energy U3"].set_index("guide")["KL(q||p)"]
    # KL >= 0 up to the ELBO's Monte-Carlo error (10,000 draws: s.e. about 0.01 on U3).
    assert (kl > -0.05).all()
    # U3 is bimodal and curved: mean-field ends near KL 1.5 (1.9 at the quick size). With every default the full
    # demo's AutoCNF ends at KL 0.25 and AutoNSF at 0.30 (CHANGELOG); at the quick size (500 steps) the best flow
    # must still beat mean-field by a clear margin.
    assert kl[["AutoPlanar", "AutoIAF", "AutoNSF"]].min() < kl["AutoNormal"] - 0.3, kl
    assert (tmp_path / "demo_densities.png").stat().st_size > 10_000
    assert "KL(q||p)" in capsys.readouterr().out


def test_full_demo_eight_schools_iaf_is_near_the_psis_threshold_and_far_above_mean_field():
    """The full demo's eight-schools row for AutoIAF (the row the demo prints, fitted by the same code).

    Centered eight schools is a funnel: guides that collapse into its neck read k̂ 0.88–1.02 in the full demo
    (AutoNormal 1.02 at ELBO −36.5, AutoPlanar 0.95, AutoCNF 0.88). With the sinh-arcsinh tails and the averaged
    iterates AutoIAF reads 0.68 at seed 0 (ELBO −31.67), but k̂ at 10,000 draws moves with the diagnostics' seed
    for one fit: 0.68 / 0.49 / 0.65 / 0.71 at seeds 0–3 (0.80 / 0.63 / 0.71 at 0–2 without the tails). So the
    bound is 0.8, above that spread and below every collapsed guide; a bound of 0.7 would test the estimator's
    noise. The ELBO bound: −33 is 3.5 nats above AutoNormal's and 1.3 below this fit's.
    """
    row, _ = demo_row("eight schools", "AutoIAF", quick=False, seed=0)
    assert row["k_hat"] < 0.8, row
    assert row["ELBO"] > -33.0, row
    assert row["IWAE"] >= row["ELBO"]


def test_the_fits_are_shared_longest_first_each_once():
    """The two worker processes take the fits in this order, so the ODE flow (the longest) must come first."""
    jobs = _jobs(quick=False)
    assert sorted(jobs) == sorted((problem, name) for problem in PROBLEMS for name in _guides(False, problem))
    assert len(set(jobs)) == len(jobs)
    assert jobs[0] == ("energy U3", "AutoCNF")
