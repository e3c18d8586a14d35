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
