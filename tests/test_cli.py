"""The ``vi-flows`` command line, run in-process through ``main(argv)``: end to end, and every bad input."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from vi_flows.cli import main
from vi_flows.diagnostics import load_inference_data
from vi_flows.io import load_data

MODELS = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist
    import torch


    def regression(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        s = pyro.sample("s", dist.HalfNormal(2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, s), obs=y)


    def fixed_scale(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)


    def no_latent(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


    def discrete(y):
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(k, 1.0), obs=y)


    def broken(y):
        raise RuntimeError("shapes do not match\\nsecond line")


    def nan_density():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("bad", -torch.exp(1e4 * z.abs()))  # -inf (float32 overflow) almost surely: passes validation


    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "models.py").write_text(MODELS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = 1.0 + 2.0 * x + 0.5 * rng.normal(size=20)
    (root / "data.csv").write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x, y)))
    (root / "y.json").write_text(json.dumps({"y": 0.3}))
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--steps", "30", "--samples", "64", "--quiet"]


@pytest.fixture(scope="module")
def fitted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["fit", f"{files}/models.py:regression", "--data", f"{files}/data.csv", "--guide", "planar", "--flows", "2"]
    code = main([*argv, "--out", str(out), *FAST])
    assert code == 0
    return out


def test_fit_writes_the_run_folder(fitted):
    record = json.loads((fitted / "diagnostics.json").read_text())
    psis = ["posterior_psis.nc"] if record["reading"] in ("good", "ok") else []  # written only where k-hat allows
    assert sorted(p.name for p in fitted.iterdir()) == sorted(
        ["diagnostics.json", "elbo.csv", "elbo.png", "guide.pt", "posterior.nc", "run.json", "summary.csv", *psis]
    )
    assert record["draws"] == {"posterior.nc": "guide", **dict.fromkeys(psis, "psis-resampled")}
    assert record["run"]["guide"] == "planar" and record["run"]["steps"] == 30
    assert math.isfinite(record["elbo"]) and record["iwae"] >= record["elbo"]  # IWAE ≥ ELBO on the same draws
    history = pd.read_csv(fitted / "elbo.csv")
    assert list(history["step"]) == list(range(1, 31))
    summary = pd.read_csv(fitted / "summary.csv", index_col=0)
    assert list(summary.index) == ["a", "b", "s"]
    idata = load_inference_data(fitted / "posterior.nc")
    assert idata["posterior"]["a"].shape == (1, 64)
    assert "log_importance_weight" in idata["sample_stats"]
    # the summary is of the saved draws
    np.testing.assert_allclose(summary.loc["b", "mean"], float(idata["posterior"]["b"].mean()), atol=1e-3)
    state = torch.load(fitted / "guide.pt", weights_only=True)
    assert state["step"] == 30


def test_diagnose_rereads_the_run(fitted, capsys):
    code, out, err = run(["diagnose", fitted], capsys)
    assert code == 0, err
    record = json.loads((fitted / "diagnostics.json").read_text())
    assert f"{record['elbo']:.4f}" in out and f"{record['iwae']:.4f}" in out
    assert "1 chain x 64 draws" in out and "weights_only=True" in out


def test_resume_continues_the_checkpoint(files, tmp_path, capsys):
    common = [
        "fit",
        f"{files}/models.py:regression",
        "--data",
        f"{files}/data.csv",
        "--guide",
        "normal",
        "--out",
        tmp_path,
        "--samples",
        "16",
        "--quiet",
    ]
    assert run([*common, "--steps", "20"], capsys)[0] == 0
    first = pd.read_csv(tmp_path / "elbo.csv")
    assert run([*common, "--steps", "35", "--resume"], capsys)[0] == 0
    resumed = pd.read_csv(tmp_path / "elbo.csv")
    assert list(resumed["step"]) == list(range(1, 36))
    np.testing.assert_array_equal(resumed["elbo"][:20], first["elbo"])


def test_data_conventions(tmp_path):
    (tmp_path / "d.json").write_text('{"n": 3, "scale": 2.5, "y": [[1, 2], [3, 4]]}')
    data = load_data(tmp_path / "d.json")
    assert data["n"] == 3 and isinstance(data["n"], int) and data["scale"] == 2.5
    assert data["y"].dtype == torch.get_default_dtype() and data["y"].shape == (2, 2)
    np.savez(tmp_path / "d.npz", idx=np.array([0, 1, 1]), x=np.array([0.5, 1.5]), k=np.array(4))
    data = load_data(tmp_path / "d.npz")
    assert data["idx"].dtype == torch.int64 and data["x"].dtype == torch.get_default_dtype() and data["k"] == 4


# ---- bad input: one line on stderr, the right exit code, no traceback ------------------------------------------------


def _bad_files(root):
    (root / "bad_cell.csv").write_text("x,y\n1.0,2.0\n3.0,abc\n")
    (root / "ragged.csv").write_text("x,y\n1.0,2.0\n3.0\n")
    (root / "nan.csv").write_text("x,y\n1.0,2.0\n\n3.0,nan\n")
    (root / "bad_header.csv").write_text("x,my y\n1.0,2.0\n")
    (root / "syntax.json").write_text('{"x": [1.0, 2.0],\n "y": [1.0 2.0]}')
    (root / "inf.json").write_text('{"x": [1.0, Infinity], "y": [1.0, 2.0]}')
    np.savez(root / "nan.npz", x=np.array([1.0, np.nan]), y=np.array([1.0, 2.0]))
    (root / "fake.npz").write_bytes(b"not a zip")
    (root / "data.txt").write_text("x\n1\n")
    (root / "binary.csv").write_bytes(b"x,y\n1.0,2.0\n\xff\xfe,3\n")
    (root / "nul.csv").write_bytes(b"x,y\n1.0,2.0\n3.0,\x00\n")
    (root / "syntax_error.py").write_text("import pyro\ndef model(:\n    pass\n")


CASES = [
    # (id, argv after "fit", exit code, words the message must contain)
    ("no colon", ["{r}/models.py"], 2, ["MODULE:FUNCTION"]),
    ("missing file", ["{r}/nope.py:regression"], 2, ["no such file"]),
    ("missing module", ["no_such_module_xyz:model"], 2, ["no module named 'no_such_module_xyz'"]),
    ("missing function", ["{r}/models.py:nope"], 2, ["no function 'nope'", "regression"]),
    ("not a function", ["{r}/models.py:NOT_A_FUNCTION"], 2, ["not a function"]),
    ("unparseable cell", ["{r}/models.py:regression", "--data", "{r}/bad_cell.csv"], 2, ["line 3, column 2", "'abc'"]),
    ("ragged row", ["{r}/models.py:regression", "--data", "{r}/ragged.csv"], 2, ["line 3", "1 fields"]),
    ("bad header", ["{r}/models.py:regression", "--data", "{r}/bad_header.csv"], 2, ["line 1, column 2"]),
    ("nan in csv", ["{r}/models.py:regression", "--data", "{r}/nan.csv"], 2, ["line 4, column 2", "finite"]),
    ("binary csv", ["{r}/models.py:regression", "--data", "{r}/binary.csv"], 2, ["line 3", "UTF-8"]),
    ("nul in csv", ["{r}/models.py:regression", "--data", "{r}/nul.csv"], 2, ["line 3"]),
    ("json syntax", ["{r}/models.py:regression", "--data", "{r}/syntax.json"], 2, ["line 2, column"]),
    ("inf in json", ["{r}/models.py:regression", "--data", "{r}/inf.json"], 2, ["'x'", "inf", "index (1,)"]),
    ("nan in npz", ["{r}/models.py:regression", "--data", "{r}/nan.npz"], 2, ["'x'", "nan", "index (1,)"]),
    ("not an npz", ["{r}/models.py:regression", "--data", "{r}/fake.npz"], 2, ["not a readable .npz"]),
    ("data suffix", ["{r}/models.py:regression", "--data", "{r}/data.txt"], 2, [".csv, .json, .npz"]),
    ("missing data", ["{r}/models.py:regression"], 2, ["needs 'x', 'y'"]),
    ("extra data", ["{r}/models.py:no_latent", "--data", "{r}/data.csv"], 2, ["'x' is not a parameter"]),
    ("unknown guide", ["{r}/models.py:regression", "--guide", "maf"], 2, ["invalid choice: 'maf'"]),
    ("negative steps", ["{r}/models.py:regression", "--steps", "-5"], 2, ["--steps", "positive integer"]),
    ("bad particles", ["{r}/models.py:regression", "--particles", "many"], 2, ["--particles", "integer or auto"]),
    (
        "flows for cnf",
        ["{r}/models.py:regression", "--data", "{r}/data.csv", "--guide", "cnf", "--flows", "3"],
        2,
        ["--flows"],
    ),
    ("no latent", ["{r}/models.py:no_latent", "--data", "{r}/y.json"], 1, ["no latent"]),
    ("discrete latent", ["{r}/models.py:discrete", "--data", "{r}/y.json"], 1, ["'k' is discrete", "Bernoulli"]),
    ("model raises", ["{r}/models.py:broken", "--data", "{r}/y.json"], 1, ["RuntimeError: shapes do not match"]),
    ("nan guard", ["{r}/models.py:nan_density", "--guide", "normal"], 1, ["non-finite loss", "step 1"]),
    (
        "lr too large",
        ["{r}/models.py:fixed_scale", "--data", "{r}/data.csv", "--guide", "planar", "--flows", "2", "--lr", "1000"],
        1,
        ["non-finite", "try lowering lr by 10x (lr="],
    ),
]


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, argv, code, words):
    _bad_files(files)
    argv = [a.format(r=files) for a in argv]
    got, out, err = run(["fit", *argv, "--out", tmp_path / "run", *FAST], capsys)
    assert got == code, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    for word in words:
        assert word in message, message
    if code == 1:
        assert len(err.strip().splitlines()) == 1  # exactly one line, no torch internals


def test_a_syntax_error_in_the_model_file_names_its_line_once(files, tmp_path, capsys):
    _bad_files(files)
    code, _, err = run(["fit", f"{files}/syntax_error.py:model", "--out", tmp_path / "run", *FAST], capsys)
    assert code == 2
    assert "SyntaxError: invalid syntax (syntax_error.py, line 2)" in err and err.count("line 2") == 1, err


def test_traceback_flag_shows_the_cause(files, tmp_path, capsys):
    code, _, err = run(
        ["fit", f"{files}/models.py:broken", "--data", f"{files}/y.json", "--out", tmp_path, "--traceback", *FAST],
        capsys,
    )
    assert code == 1 and "Traceback" in err and "shapes do not match" in err


def test_diagnose_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run(["diagnose", tmp_path], capsys)
    assert code == 2 and "missing" in err and "Traceback" not in err
    code, _, err = run(["diagnose", tmp_path / "absent"], capsys)
    assert code == 2 and "no such folder" in err


def test_usage_and_help_codes(capsys):
    assert run([], capsys)[0] == 2
    code, out, _ = run(["fit", "--help"], capsys)
    assert code == 0 and "--guide" in out and "--data" in out
    code, out, _ = run(["demo", "--help"], capsys)
    assert code == 0 and "--quick" in out


def test_interrupted_fit_points_to_resume(files, tmp_path, capsys, monkeypatch):
    import vi_flows.training

    def interrupted(*args, checkpoint=None, **kwargs):
        checkpoint.write_bytes(b"")  # fit leaves its last checkpoint behind
        raise KeyboardInterrupt

    monkeypatch.setattr(vi_flows.training, "fit", interrupted)
    code, _, err = run(
        ["fit", f"{files}/models.py:regression", "--data", f"{files}/data.csv", "--out", tmp_path, *FAST], capsys
    )
    assert code == 130 and "interrupted" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(files, tmp_path, capsys):
    code, _, err = run(
        [
            "fit",
            f"{files}/models.py:regression",
            "--data",
            f"{files}/data.csv",
            "--device",
            "cuda",
            "--out",
            tmp_path,
            *FAST,
        ],
        capsys,
    )
    assert code == 2 and "CUDA is not available" in err


def test_fit_with_two_processes(files, tmp_path):
    """``--nproc 2`` re-launches through torchrun's engine (gloo on loopback); rank 0 writes the run folder."""
    import subprocess
    import sys

    argv = [
        sys.executable,
        "-m",
        "vi_flows",
        "fit",
        f"{files}/models.py:regression",
        "--data",
        f"{files}/data.csv",
        "--guide",
        "planar",
        "--flows",
        "2",
        "--nproc",
        "2",
        "--out",
        str(tmp_path / "run"),
        *FAST,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert record["run"]["steps"] == 30 and math.isfinite(record["elbo"])
    assert list(pd.read_csv(tmp_path / "run" / "elbo.csv")["step"]) == list(range(1, 31))


@pytest.mark.parametrize(
    "name, guide_cls, layer_cls",
    [
        ("planar", "AutoPlanar", "PlanarStack"),
        ("radial", "AutoRadial", "RadialStack"),
        ("iaf", "AutoIAF", "AffineInverseAutoregressive"),
        ("realnvp", "AutoRealNVP", "AffineCoupling"),
        ("sylvester", "AutoSylvester", "Sylvester"),
        ("nsf", "AutoNSF", "SplineCoupling"),
    ],
)
def test_every_flow_guide_name_builds_that_guide_with_its_flows(name, guide_cls, layer_cls):
    import pyro
    import pyro.distributions as dist

    import vi_flows
    from vi_flows._cli_run import _make_guide

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = _make_guide(name, model, 3)
    assert type(guide) is getattr(vi_flows, guide_cls)
    guide()
    layers = [m for m in guide.flow.modules() if type(m).__name__ == layer_cls]
    assert sum(getattr(m, "num_flows", 1) for m in layers) == 3


# ---- the run folder keeps the history when the report fails ----------------------------------------------------------


def test_a_failing_report_keeps_the_history_and_diagnose_reads_the_folder(files, tmp_path, capsys, monkeypatch):
    import vi_flows.diagnostics

    def broken(*args, **kwargs):
        raise RuntimeError("no draws today")

    monkeypatch.setattr(vi_flows.diagnostics, "diagnose", broken)
    argv = ["fit", f"{files}/models.py:regression", "--data", f"{files}/data.csv", "--guide", "normal",
            "--out", tmp_path, *FAST]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "report failed: RuntimeError: no draws today" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elbo.csv", "elbo.png", "guide.pt", "run.json"]
    assert list(pd.read_csv(tmp_path / "elbo.csv")["step"]) == list(range(1, 31))

    code, out, err = run(["diagnose", tmp_path], capsys)
    assert code == 0, err
    assert "Report files missing: posterior.nc, summary.csv, diagnostics.json" in out and "step 30" in out

    monkeypatch.undo()  # --resume with the same --steps trains nothing and writes the report
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0 and "nothing was trained" in err
    assert all((tmp_path / name).exists() for name in ("posterior.nc", "summary.csv", "diagnostics.json"))


# ---- pipes, help, README -------------------------------------------------------------------------------------------


def test_a_closed_stdout_ends_quietly_with_sigpipes_code(fitted, capsys, monkeypatch):
    import io
    import sys

    class ClosedPipe(io.TextIOBase):  # what `vi-flows diagnose run | head -1` writes into once head has exited
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["diagnose", str(fitted)]) == 141  # 128 + SIGPIPE, as a Unix tool killed by it
    assert capsys.readouterr().err == ""


def test_a_real_closed_pipe_ends_quietly(tmp_path):
    """``vi-flows diagnose RUN | head`` in a subprocess, on a folder whose report is missing (no ArviZ to import)."""
    import subprocess
    import sys

    torch.save({"format": "vi_flows.fit/1", "step": 3, "params": {}}, tmp_path / "guide.pt")
    (tmp_path / "elbo.csv").write_text("step,elbo\n1,-3.0\n2,-2.0\n3,-1.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "vi_flows", "diagnose", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # before the interpreter has even started: its every write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141 and err == b"", err.decode()


def test_the_readme_lists_the_guides_that_help_lists(capsys):
    import re
    from pathlib import Path

    from vi_flows.cli import GUIDES

    code, out, _ = run(["fit", "--help"], capsys)
    assert code == 0
    listed = re.search(r"--guide \{([a-z,]+)\}", out).group(1).split(",")
    assert listed == list(GUIDES)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    assert [name for name in listed if f"`{name}`" not in section] == []


# ---- Ctrl-C under --nproc 2 ------------------------------------------------------------------------------------------

INTERRUPTING = textwrap.dedent(
    """
    import os
    import signal

    import pyro
    import pyro.distributions as dist

    CALLS = [0]


    def model(x, y):  # rank 0 presses Ctrl-C, i.e. signals the launcher, a few steps into the fit
        CALLS[0] += 1
        if os.environ.get("RANK") == "0" and CALLS[0] == 30:
            os.kill(os.getppid(), signal.SIGINT)
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)
    """
)


def test_ctrl_c_under_two_processes_is_one_line_and_130(files, tmp_path):
    """The launcher forwards the SIGINT; the ranks finish the step they agree on, save it and exit 130."""
    import subprocess
    import sys

    (tmp_path / "interrupting.py").write_text(INTERRUPTING)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "vi_flows", "fit", f"{tmp_path}/interrupting.py:model", "--data",
            f"{files}/data.csv", "--guide", "normal", "--steps", "3000", "--nproc", "2", "--out", str(out),
            "--quiet"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr[-3000:]
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("vi-flows fit: warning:")]
    assert lines == [f"vi-flows fit: interrupted; the last checkpoint is {out / 'guide.pt'}, continue with --resume"]
    state = torch.load(out / "guide.pt", weights_only=True)
    assert 0 < state["step"] < 3000 and len(state["rng_ranks"]) == 2
