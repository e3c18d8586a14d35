"""Run folders are safe to resume and to rerun into: ``vi-flows fit --resume`` / ``--overwrite``, damaged checkpoints.

Every case runs the command line in-process on a copy of one fitted 2-layer IAF run (or refuses before
fitting anything): a refusal is one line on stderr, exit code 2, and leaves the folder's files as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from vi_flows import AutoPlanar
from vi_flows.cli import main
from vi_flows.training import fit

MODELS = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist


    def regression(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)


    def wider(x, y):  # another model on the same data: three latents, so the IAF's weights have other shapes
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        s = pyro.sample("s", dist.HalfNormal(2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, s), obs=y)
    """
)
STEPS = 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "models.py").write_text(MODELS)
    x = np.random.default_rng(0).normal(size=20)
    (root / "data.csv").write_text("x,y\n" + "".join(f"{a},{1 + 2 * a}\n" for a in x))
    (root / "more.csv").write_text("x,y\n" + "".join(f"{a},{1 + 2 * a}\n" for a in np.r_[x, x]))
    return root


def fit_argv(inputs, out, *extra, model="regression", data="data.csv"):
    return ["fit", f"{inputs}/models.py:{model}", "--data", f"{inputs}/{data}", "--out", out, "--samples", "16",
            "--quiet", *extra]  # fmt: skip


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def iaf_run(inputs, tmp_path_factory):
    """A finished 2-layer IAF run of STEPS steps."""
    out = tmp_path_factory.mktemp("iaf") / "run"
    assert main([str(a) for a in fit_argv(inputs, out, "--guide", "iaf", "--flows", "2", "--steps", STEPS)]) == 0
    return out


@pytest.fixture
def copy(iaf_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(iaf_run, folder)
    return folder


def snapshot(folder) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- what would change the parameters or the trajectory is refused, naming the run's value ------------------------


def test_resume_with_more_flows_is_refused_naming_the_saved_value(inputs, copy, capsys):
    before = snapshot(copy)
    code, _, err = run([*fit_argv(inputs, copy, "--resume", "--flows", "3")], capsys)
    assert code == 2
    assert "--flows 3 differs from the run's 2" in one_line(err)
    assert snapshot(copy) == before


def test_resume_with_another_lr_is_refused_naming_the_saved_value(inputs, copy, capsys):
    before = snapshot(copy)
    code, _, err = run([*fit_argv(inputs, copy, "--resume", "--lr", "0.5")], capsys)
    assert code == 2
    assert "--lr 0.5 differs from the run's 0.01" in one_line(err) and "optimizer" in err
    assert snapshot(copy) == before


def test_resume_with_data_of_other_shapes_is_refused(inputs, copy, capsys):
    code, _, err = run([*fit_argv(inputs, copy, "--resume", data="more.csv")], capsys)
    assert code == 2
    assert "data 'x' is float32 of shape (40,), the run's was float32 of shape (20,)" in one_line(err)


def test_a_run_without_its_settings_is_still_refused_by_the_checkpoint(inputs, copy, capsys):
    """Folders written before run.json: the checkpoint's parameters catch the extra layer."""
    for name in ("run.json", "diagnostics.json"):
        (copy / name).unlink()
    code, _, err = run([*fit_argv(inputs, copy, "--resume", "--guide", "iaf", "--flows", "3")], capsys)
    assert code == 2
    line = one_line(err)
    assert "guide.pt' was made for another model or guide" in line and "create parameters it lacks" in line


def test_resume_takes_the_runs_settings_and_records_a_change_that_takes_effect(inputs, copy, capsys):
    code, _, err = run([*fit_argv(inputs, copy, "--resume", "--steps", STEPS + 10, "--particles", "2")], capsys)
    assert code == 0, err
    settings = json.loads((copy / "run.json").read_text())
    assert settings["guide"] == "iaf" and settings["flows"] == 2 and settings["lr"] == 0.01  # the run's, not defaults
    changed = {"particles": ["auto", 2]}  # fit's default, then the given value
    assert settings["particles"] == 2 and settings["resumes"] == [{"step": STEPS, "changed": changed}]
    record = json.loads((copy / "diagnostics.json").read_text())["run"]
    assert record["particles"] == 2 and record["resumes"] == settings["resumes"] and record["steps"] == STEPS + 10
    assert list(pd.read_csv(copy / "elbo.csv")["step"]) == list(range(1, STEPS + 11))


def test_a_run_records_its_tails_and_averaging_and_a_change_is_refused(inputs, copy, capsys):
    settings = json.loads((copy / "run.json").read_text())
    assert settings["tails"] is True and settings["tail_average"] is True  # the defaults, written down
    before = snapshot(copy)
    for flag, words in [("--no-tails", "--tails False differs from the run's True"),
                        ("--no-tail-average", "--tail-average False differs from the run's True")]:  # fmt: skip
        code, _, err = run([*fit_argv(inputs, copy, "--resume", flag)], capsys)
        assert code == 2 and words in one_line(err)
    assert snapshot(copy) == before


def test_a_run_json_from_before_tails_and_averaging_resumes_as_it_was_made(inputs, tmp_path, capsys):
    """run.json without the keys: a planar run then had no tails layer and no averaging; it resumes so."""
    out = tmp_path / "old"
    argv = fit_argv(inputs, out, "--guide", "planar", "--flows", "2", "--no-tails", "--no-tail-average")
    assert run([*argv, "--steps", STEPS], capsys)[0] == 0
    settings = json.loads((out / "run.json").read_text())
    del settings["tails"], settings["tail_average"]
    (out / "run.json").write_text(json.dumps(settings))
    code, _, err = run([*fit_argv(inputs, out, "--resume", "--steps", STEPS + 10)], capsys)
    assert code == 0, err  # with the new defaults the guide would have a tails layer the checkpoint lacks
    record = json.loads((out / "diagnostics.json").read_text())["run"]
    assert record["tails"] is False and record["tail_average"] is False and record["steps"] == STEPS + 10


def test_tails_for_the_gaussian_guide_is_a_usage_error(inputs, tmp_path, capsys):
    code, _, err = run([*fit_argv(inputs, tmp_path / "n", "--guide", "normal", "--no-tails")], capsys)
    assert code == 2 and "apply to flow guides" in one_line(err)
    assert not (tmp_path / "n").exists()


# ---- a run folder is never overwritten silently ------------------------------------------------------------------


def test_fit_into_a_run_folder_is_refused_without_overwrite(inputs, copy, capsys):
    before = snapshot(copy)
    code, _, err = run([*fit_argv(inputs, copy, "--guide", "normal", "--steps", "5")], capsys)
    assert code == 2
    line = one_line(err)
    assert f"already holds a run (guide.pt at step {STEPS})" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(copy) == before  # not one file touched


def test_overwrite_replaces_the_run(inputs, copy, capsys):
    code, _, err = run([*fit_argv(inputs, copy, "--guide", "normal", "--steps", "5", "--overwrite")], capsys)
    assert code == 0, err
    assert torch.load(copy / "guide.pt", weights_only=True)["step"] == 5
    assert json.loads((copy / "run.json").read_text())["guide"] == "normal"
    assert len(pd.read_csv(copy / "elbo.csv")) == 5


def test_resume_and_overwrite_exclude_each_other(inputs, copy, capsys):
    code, _, err = run([*fit_argv(inputs, copy, "--resume", "--overwrite")], capsys)
    assert code == 2 and "give one of them" in one_line(err)


# ---- a resume with nothing to do says so ---------------------------------------------------------------------------


def test_resume_to_fewer_steps_than_the_run_has_says_nothing_was_trained(inputs, copy, capsys):
    code, _, err = run([*fit_argv(inputs, copy, "--resume", "--steps", "10")], capsys)
    assert code == 0, err
    assert f"the run already has {STEPS} steps (>= --steps 10); nothing was trained" in err
    record = json.loads((copy / "diagnostics.json").read_text())["run"]
    assert record["steps"] == STEPS and record["trained"] == 0
    assert torch.load(copy / "guide.pt", weights_only=True)["step"] == STEPS


# ---- damaged and foreign checkpoints: one line naming the file and what is wrong -----------------------------------


def damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(len(data))}[how])


@pytest.mark.parametrize("how, words", [("truncated", "is damaged (truncated or corrupted"),
                                        ("random", "is not a vi_flows checkpoint")])  # fmt: skip
def test_a_damaged_checkpoint_is_one_line_naming_the_file(inputs, copy, capsys, how, words):
    damage(copy / "guide.pt", how)
    for argv in (fit_argv(inputs, copy, "--resume"), ["diagnose", copy]):
        code, _, err = run(argv, capsys)
        assert code == 2
        line = one_line(err)
        assert "guide.pt" in line and words in line
        assert "weights_only" not in line and "Errno" not in line and "PytorchStreamReader" not in line


def test_another_models_checkpoint_names_the_parameter_and_shapes(inputs, copy, capsys):
    before = snapshot(copy)
    code, _, err = run([*fit_argv(inputs, copy, "--resume", model="wider")], capsys)
    assert code == 2
    line = one_line(err)
    assert "guide.pt' was made for another model or guide: parameter 'AutoIAF." in line
    assert "has shape" in line and "there and" in line and "here" in line
    assert snapshot(copy) == before


# ---- the same through fit(resume=path) -------------------------------------------------------------------------------


def small(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def two(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    fit(small, AutoNormal(small), torch.tensor(0.5), num_steps=3, progress=False, checkpoint=path)
    pyro.clear_param_store()
    return path


@pytest.mark.parametrize(
    "how, words",
    [("truncated", "is damaged (truncated or corrupted"), ("random", "is not a vi_flows checkpoint"),
     ("empty", "is empty"), ("missing", "does not exist")],
)  # fmt: skip
def test_fit_resume_from_a_damaged_checkpoint_is_a_one_line_value_error(checkpoint, how, words):
    if how == "empty":
        checkpoint.write_bytes(b"")
    elif how == "missing":
        checkpoint.unlink()
    else:
        damage(checkpoint, how)
    with pytest.raises(ValueError) as info:
        fit(small, AutoNormal(small), torch.tensor(0.5), num_steps=5, progress=False, resume=checkpoint)
    message = str(info.value)
    assert "\n" not in message and repr(str(checkpoint)) in message and words in message
    assert "weights_only" not in message


def test_fit_resume_from_another_models_checkpoint_names_the_parameter(checkpoint):
    with pytest.raises(ValueError, match=r"made for another model or guide: parameter 'AutoNormal.locs.mu' has shape "
                                         r"\(\) there and \(2,\) here"):  # fmt: skip
        fit(two, AutoNormal(two), torch.tensor(0.5), num_steps=5, progress=False, resume=checkpoint)


def test_a_checkpoint_from_before_the_tails_default_says_to_build_without_them(tmp_path):
    path = tmp_path / "old.pt"
    fit(small, AutoPlanar(small, num_flows=1, tails=False), torch.tensor(0.5), num_steps=3, progress=False,
        checkpoint=path)  # fmt: skip
    pyro.clear_param_store()
    with pytest.raises(
        ValueError, match=r"lacks: \[.*raw_tail.*skew'\]; saved before .* build the guide with tails=False"
    ):
        fit(small, AutoPlanar(small, num_flows=1), torch.tensor(0.5), num_steps=5, progress=False, resume=path)
