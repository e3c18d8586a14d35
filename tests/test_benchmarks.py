"""Smoke tests of the benchmark scripts: a ``--quick`` run of each writes well-formed outputs."""

import importlib
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def _table_rows(path):
    lines = open(path).read().splitlines()
    header = lines[0].count("|") - 1
    rows = [ln for ln in lines[2:] if ln.startswith("|")]
    assert all(r.count("|") - 1 == header for r in rows), "ragged markdown table"
    return rows


def test_energies_quick(bench, tmp_path):
    result = bench("energies").main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "energies.json").read_text())
    assert len(data["rows"]) == len(result["targets"]) * len(result["guides"])
    for row in data["rows"]:
        # KL(q‖p) >= 0 up to the Monte-Carlo error of the ELBO (4 standard errors).
        assert math.isfinite(row["kl"]) and row["kl"] > -4 * row["kl_se"]
        assert row["ms_per_step"] > 0
    assert len(_table_rows(tmp_path / "energies.md")) == len(result["guides"])
    png = (tmp_path / "energies.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_quick(bench, tmp_path):
    result = bench("speed").main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "speed.json").read_text())
    families = {r["family"] for r in data["rows"]}
    assert {"planar4", "radial4", "iaf"} <= families
    assert ("cnf" in families) == (result["note"] is None)
    for row in data["rows"]:
        assert row["vi_ms"] > 0 and row["peer_ms"] > 0 and row["floor_ms"] > 0
        assert row["ratio"] == pytest.approx(row["vi_ms"] / row["peer_ms"])
        assert row["vi_mb"] >= 0
    assert len(_table_rows(tmp_path / "speed.md")) == len(data["rows"])


def test_speed_without_zuko(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zuko", None)  # import zuko now raises ImportError
    result = bench("speed").main(["--quick", "--out", str(tmp_path), "--dims", "2", "--cnf-max-dim", "2"])
    assert "zuko" in result["note"]
    assert all(r["family"] != "cnf" for r in result["rows"])


def test_posteriors_quick(bench, tmp_path):
    bench("posteriors").main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "posteriors.json").read_text())
    rows = data["main"] + data["study"]
    assert rows and all("failed" not in r for r in rows)
    for r in rows:
        assert r["iwae"] >= r["elbo"]  # log-mean-exp >= mean, exactly
        assert r["mean_err_max"] >= r["mean_err_rms"] >= 0
    text = (tmp_path / "posteriors.md").read_text()
    assert text.count("| model |") == 2


@pytest.mark.parametrize("script", ["energies", "posteriors"])
def test_defaults_quick(bench, tmp_path, script):
    # --defaults: AutoX(model) trained by vi_flows.fit's defaults alone (num_steps capped by --quick), own outputs
    module = bench(script)
    module.main(["--defaults", "--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / f"{script}_defaults.json").read_text())
    assert data["defaults"] is True and not (tmp_path / f"{script}.json").exists()
    rows = data["rows"] if script == "energies" else data["main"]
    problem = "target" if script == "energies" else "model"
    problems = list(dict.fromkeys(r[problem] for r in rows))
    assert len(problems) == 2
    pairs = [(r[problem], r["guide"]) for r in rows]
    assert pairs == [(p, g) for p in problems for g in module.DEFAULTS_QUICK_GUIDES]  # one row per guide × problem
    scores = ["kl", "elbo", "iwae", "khat"] if script == "energies" else ["elbo", "iwae", "khat", "mean_err_max"]
    for r in rows:
        assert "failed" not in r
        assert all(math.isfinite(r[k]) for k in scores + ["ms_per_step", "seconds"])
        assert r["steps"] == module.DEFAULTS_QUICK_STEPS and r["seconds"] > 0
        assert r["iwae"] >= r["elbo"]  # log-mean-exp >= mean, exactly
    table = _table_rows(tmp_path / f"{script}_defaults.md")
    assert len(table) == len(rows) // (2 if script == "energies" else 1)
    text = module.docs_text_defaults(data)
    assert "fit`'s defaults" in text and f"python benchmarks/{script}.py --defaults --quick" in text


def test_defaults_refuses_training_options(bench):
    for script in ("energies", "posteriors"):
        with pytest.raises(SystemExit):
            bench(script).main(["--defaults", "--quick", "--lr", "0.1"])


def _density_quick(bench, tmp_path, data, skip):
    rows = bench("density").main(["--quick", "--data", data, "--out", str(tmp_path), "--skip", *skip])
    saved = json.loads((tmp_path / "density-quick.json").read_text())["rows"]
    assert [(r["data"], r["model"]) for r in saved] == [(r["data"], r["model"]) for r in rows]
    assert rows[0]["model"] == "full-covariance Gaussian" and rows[0]["ms_per_step"] is None
    for r in rows:
        assert r["data"] == data and math.isfinite(r["test_nll"])
        assert not any(k in r["model"] for k in skip)
    for r in rows[1:]:
        assert r["ms_per_step"] > 0 and 1 <= r["steps"] <= 40  # --quick: at most 40 steps, early stopping may cut
    table = bench("density").table(rows).splitlines()
    assert len(table) == 2 + len(rows) and all(ln.count("|") == 4 for ln in table)
    other = 3 if data == "moons" else 2  # cells: | model | moons | digits |
    assert all(ln.split("|")[other].strip() == "–" for ln in table[2:])
    return {r["model"] for r in rows}


def test_density_quick(bench, tmp_path):
    # moons only, the slow NSF and numerical-inverse rows left out: the rest runs in seconds
    models = _density_quick(bench, tmp_path, "moons", ["NSF", "planar", "Sylvester"])
    assert {"vi_flows MAF", "Pyro affine coupling"} <= models
    assert any(m.startswith("zuko") for m in models) == bench("_common").zuko_available()


def test_density_quick_without_zuko(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zuko", None)  # import zuko now raises ImportError
    models = _density_quick(bench, tmp_path, "digits", ["invertible linear", "alternating", "Pyro", "NSF"])
    assert models == {"full-covariance Gaussian", "vi_flows MAF"}


def test_density_seeds_and_speed_quick(bench, tmp_path):
    density = bench("density")
    skip = ["NSF", "planar", "Sylvester", "Pyro", "zuko", "linear", "alternating"]
    rows = density.main(["--quick", "--data", "moons", "--seeds", "0", "1", "--out", str(tmp_path), "--skip", *skip])
    assert [(r["seed"], r["model"]) for r in rows] == [
        (s, m) for s in (0, 1) for m in ("full-covariance Gaussian", "vi_flows MAF")
    ]
    assert all("±" in ln for ln in density.table(rows).splitlines()[2:])  # mean ± sd over the two seeds
    if not bench("_common").zuko_available():
        return
    speed = density.main(["--quick", "--speed", "--out", str(tmp_path)])
    assert {r["dim"] for r in speed} == {2, 64} and all(r["ms_per_step"] > 0 for r in speed)
    assert all(r["vs_zuko"] == 1 for r in speed if r["model"].startswith("zuko"))


def test_neutra_quick(bench, tmp_path, monkeypatch):
    neutra = bench("neutra")
    example = neutra._example()
    # the funnel alone: the eight-schools half would double the time and exercise the same code
    monkeypatch.setattr(example, "MODELS", {k: v for k, v in example.MODELS.items() if k.startswith("funnel")})
    monkeypatch.setattr(neutra, "_example", lambda: example)
    out = neutra.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "neutra-quick.json").read_text())
    assert saved["budget"] == {"fit_steps": 50, "warmup": 20, "samples": 20, "max_tree_depth": 4}
    assert len(saved["rows"]) == len(out) == 4  # plain NUTS + 3 NeuTra guides
    assert set(out["model"]) == {"funnel (d=10)"}
    assert set(out["sampler"]) == {"NUTS", "NeuTra AutoIAF", "NeuTra AutoRealNVP", "NeuTra AutoPlanar"}
    for r in saved["rows"]:
        assert isinstance(r["divergences"], int) and 0 <= r["divergences"] <= 20  # counted over the 20 draws
        assert r["min_bulk_ess"] > 0 and r["nuts_s"] > 0
        assert r["ess_per_s"] == pytest.approx(r["min_bulk_ess"] / r["nuts_s"])
        assert (r["fit_s"] == 0) == (r["sampler"] == "NUTS")
    text = neutra.render(out, 50, 20, 20, 4)
    assert len([ln for ln in text.splitlines() if ln.startswith("| ")]) == 1 + len(out)


def test_vae_merge_replaces_same_family_rows_and_keeps_the_rest(bench, tmp_path, monkeypatch):
    vae = bench("vae")
    monkeypatch.setattr(vae, "HERE", str(tmp_path))
    row = dict(
        data=None,
        device="cpu",
        threads=1,
        train_size=10,
        epochs=1,
        batch_size=5,
        lr=1e-3,
        latent_dim=2,
        hidden=4,
        test_size=5,
        iw_samples=3,
        seed=0,
        date="2026-11-25",
        num_flows=1,
        parameters=9,
        train_neg_elbo=1.0,
        test_neg_elbo=1.0,
        test_nll=1.0,
        sec_per_epoch=0.1,
        eval_seconds=1.0,
    )
    runs = iter(
        [
            [dict(row, flow="none"), dict(row, flow="planar")],
            [dict(row, flow="planar", test_nll=0.5)],
            [dict(row, flow="spline")],
        ]
    )
    monkeypatch.setattr(vae, "run", lambda args: next(runs))
    doc = str(tmp_path / "bench.md")
    vae.main(["--doc", doc])
    vae.main(["--doc", doc, "--merge", "--families", "planar"])
    rows = vae.main(["--doc", doc, "--merge", "--families", "spline"])
    assert [(r["flow"], r["test_nll"]) for r in rows] == [("none", 1.0), ("planar", 0.5), ("spline", 1.0)]
    saved = json.loads((tmp_path / "results" / "vae_digits.json").read_text())
    assert saved == rows
    assert open(doc).read().count("| spline |") == 1


def test_posteriordb_merge_keeps_earlier_rows_and_lets_the_new_run_win(bench):
    pdb = bench("posteriordb")

    def row(post, guide, accurate, khat=0.3):
        return {"posterior": post, "guide": guide, "accurate": accurate, "khat": khat, "seconds": 1.0}

    old = {
        "command": "python benchmarks/posteriordb.py --guides vi:iaf,vi:normal",
        "guides": ["vi:iaf", "vi:normal"],
        "posteriors": ["earnings", "kidiq"],
        "rows": [row(p, g, False) for p in ("earnings", "kidiq") for g in ("vi:iaf", "vi:normal")],
    }
    new = {
        "command": "python benchmarks/posteriordb.py --guides vi:iaf",
        "guides": ["vi:iaf"],
        "posteriors": ["earnings", "kidiq"],
        "rows": [row(p, "vi:iaf", True, 0.9) for p in ("earnings", "kidiq")],
    }
    merged = pdb.merge(old, new)
    assert [(r["posterior"], r["guide"], r["accurate"]) for r in merged["rows"]] == [
        ("earnings", "vi:normal", False),  # the table's guide order (GUIDES), not the runs'
        ("earnings", "vi:iaf", True),
        ("kidiq", "vi:normal", False),
        ("kidiq", "vi:iaf", True),
    ]
    summary = {s["guide"]: (s["accurate"], s["khat_ok"]) for s in merged["summary"]}
    assert summary == {"vi:iaf": (2, 0), "vi:normal": (0, 2)}  # recomputed from the merged rows
    assert merged["command"].splitlines() == [old["command"], new["command"]]
