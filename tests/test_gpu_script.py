"""benchmarks/gpu.sh (issue 19): its syntax, its steps, the grid it asks of speed.py, its report, and the budget
flags of examples/vae.py it relies on. The script itself needs a GPU (``--quick`` runs it on the CPU in 2-3 minutes,
too long for the suite)."""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")
BENCH = os.path.join(ROOT, "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def test_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_steps_cover_tests_speed_and_vae():
    text = open(SCRIPT).read()
    steps = re.search(r'^STEPS="([^"]*)"', text, re.M).group(1).split()
    assert steps == ["tests", "speed", "vae", "report"]
    for step in steps[:3]:
        assert re.search(rf"^run_step {step} ", text, re.M), f"step {step} is not run under run_step"
    assert "timeout -k" in text  # every step is time-boxed
    assert "pytest" in text and "-k cuda" in text
    assert "benchmarks/speed.py --device" in text and "--grid gpu" in text
    assert "benchmarks/vae.py" in text and "--families none planar iaf sylvester" in text and "--families cnf" in text
    assert 'C.update_docs("gpu"' in text


def test_gpu_tests_are_selected_by_name():
    # -m cuda would select nothing: tests/conftest.py's `cuda` is a skipif, not pytest.mark.cuda
    names = []
    for f in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if f.startswith("test_") and f.endswith(".py"):
            names += re.findall(r"^@cuda\s*\n(?:@.*\n)*def (\w+)", open(os.path.join(ROOT, "tests", f)).read(), re.M)
    assert names and all("cuda" in n for n in names)


def test_speed_gpu_grid_covers_every_family(bench):
    speed = bench("speed")
    args = argparse.Namespace(
        dims=[10, 100, 1000],
        particles=[1, 16, 256],
        k=16,
        cnf_tol=1e-3,
        layers=4,
        hidden=[64, 64],
        householder=8,
        cnf_max_dim=1000,
        families=None,
    )
    cells = speed.cells(args, with_cnf=None)
    families = {c[2][0] for c in cells}
    assert families == {"planar16", "radial16", "iaf", "spline", "coupling", "sylvester", "cnf"}
    assert {(d, p) for d, p, _ in cells} == {(d, p) for d in args.dims for p in args.particles}
    assert len(cells) == 7 * 9
    assert [c[2][0] == "cnf" for c in cells] == sorted(c[2][0] == "cnf" for c in cells)  # CNF cells last
    assert speed.GRIDS["gpu"] == ([10, 100, 1000], [1, 16, 256])


def test_vae_published_figures(bench):
    published = bench("vae").PUBLISHED_NEG_ELBO
    canonical = {"normal": 86.55, "planar": 86.06, "iaf": 84.20, "sylvester": 83.32, "cnf": 82.82}
    assert {k: v for k, v in published.items() if k in canonical} == canonical
    assert published["none"] == canonical["normal"]  # the old amortized name keeps its figure
    assert set(published) == {*canonical, "none"}


def test_vae_example_time_budgets():
    spec = importlib.util.spec_from_file_location("vae_example_budget", os.path.join(ROOT, "examples", "vae.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--quick", "--epochs", "50", "--train-seconds", "1e-4", "--eval-seconds", "1e-4", "--eval-chunk", "1000"]
    result = example.main(argv, log=lambda msg: None)
    # the clock starts after the first step and is read after each: 2 of the 4 steps of 64 images, one epoch
    assert result["epochs_trained"] == pytest.approx(128 / 256)
    assert result["test_size"] == 1000 // 100  # one group of chunk / K images, then the evaluation budget is spent
    assert result["sec_per_epoch"] > 0 and result["test_nll"] > 0


def test_report_writes_the_gpu_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    env = dict(
        python="3.12.3",
        torch="2.11.0",
        cuda="13.0",
        pyro="1.9.2",
        vi_flows="0.1.0",
        cpu_count=16,
        device="cuda",
        gpu="NVIDIA H200",
        gpu_memory_gib=139.8,
        capability="9.0",
        driver="580",
        zuko="1.6.0",
    )
    steps = [dict(step=s, status="ok", seconds=1, timeout=60, command="x") for s in ("tests", "speed", "vae")]
    (run / "gpu.json").write_text(
        json.dumps(
            dict(env=env, steps=steps, command="bash benchmarks/gpu.sh", mode="full", data=None, date="2026-12-03")
        )
    )
    counts = dict(passed=8, failed=0, error=0, skipped=1)
    (run / "tests.json").write_text(json.dumps(dict(counts=counts, tests=[])))
    row = dict(
        d=10,
        particles=1,
        family="iaf",
        peer="pyro:iaf",
        vi_ms=1.0,
        peer_ms=2.0,
        floor_ms=0.5,
        ratio=0.5,
        overhead=2.0,
        vi_mb=0.1,
        peer_mb=0.1,
        floor_mb=0.1,
    )
    (run / "speed.json").write_text(
        json.dumps(
            dict(rows=[row], skipped=[], note=None, k=16, layers=4, hidden=[64, 64], householder=8, cnf_tol=1e-3)
        )
    )
    vae_row = dict(
        flow="iaf",
        data="mnist.npz",
        device="cuda",
        threads=4,
        train_size=50000,
        epochs=1000,
        train_seconds=30.0,
        epochs_trained=12.5,
        batch_size=100,
        lr=1e-3,
        latent_dim=64,
        hidden=300,
        test_size=10000,
        iw_samples=5000,
        seed=0,
        date="2026-12-03",
        num_flows=2,
        parameters=9,
        train_neg_elbo=95.0,
        test_neg_elbo=96.0,
        test_nll=91.0,
        sec_per_epoch=2.4,
        eval_seconds=8.0,
    )
    (run / "vae.json").write_text(json.dumps([vae_row]))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- gpu:start -->\nPLACEHOLDER\n<!-- gpu:end -->\n")
    before = (run / "gpu.json").read_text()
    os.chmod(run, 0o555)  # the fetched folder is read-only
    try:
        subprocess.run(
            ["bash", SCRIPT, "--report", str(run)],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHON=sys.executable, GPU_DOCS=str(doc)),
            timeout=120,
        )
    finally:
        os.chmod(run, 0o755)
    text = doc.read_text()
    assert "PLACEHOLDER" not in text and text.count("<!-- gpu:start -->") == 1
    assert (run / "gpu.json").read_text() == before  # root ignores 0o555: check that nothing was written
    assert "NVIDIA H200" in text and "8 passed" in text
    assert "| 10 | 1 | iaf | pyro:iaf |" in text
    assert "| iaf | 2 | 9 |" in text and "84.20" in text and "30 s of training" in text
