import importlib.util
import math
import os

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def vae():
    """examples/vae.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("vae_example", os.path.join(HERE, "..", "examples", "vae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result):
    assert math.isfinite(result["test_neg_elbo"]) and math.isfinite(result["test_nll"])
    # log (1/K) Σ_k w_k is a lower bound on log p(x) tighter than the ELBO in expectation (Burda et al. 2016);
    # the ELBO here uses its own draws, so a log q that is not a normalized density could break the order
    assert result["test_nll"] <= result["test_neg_elbo"]


@pytest.mark.parametrize("flow", ["none", "planar", "iaf"])
def test_quick_run_on_digits(vae, flow):
    result = vae.main(["--quick", "--flow", flow, "--num-flows", "2"], log=lambda *a: None)
    _check(result)
    assert result["train_size"] == 256 and result["test_size"] == 64 and result["iw_samples"] == 100
    assert result["model"].decoder[-1].out_features == 64  # 8x8 digits


def test_quick_run_cnf(vae):
    argv = ["--quick", "--flow", "cnf", "--train-size", "64", "--test-size", "8", "--iw-samples", "20"]
    result = vae.main([*argv, "--latent-dim", "12", "--hidden", "32"], log=lambda *a: None)
    _check(result)
    # d = 12 > 10 trains with the Hutchinson trace; evaluation switched to the exact trace and back
    assert result["model"].posterior.flow.trace == "hutchinson"


def test_binarized_npz(vae, tmp_path):
    rng = np.random.default_rng(0)
    images = (rng.random((50, 784)) < 0.2).astype(np.uint8)
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        train=np.packbits(images[:40], axis=1),
        valid=np.packbits(images[:5], axis=1),
        test=np.packbits(images[40:], axis=1),
    )
    train, test = vae.load_data(str(path))
    assert train.shape == (40, 784) and test.shape == (10, 784)
    torch.testing.assert_close(test, torch.from_numpy(images[40:].astype(np.float32)))
    argv = ["--data", str(path), "--quick", "--test-size", "4", "--iw-samples", "10", "--hidden", "16"]
    result = vae.main([*argv, "--latent-dim", "3", "--flow", "planar"], log=lambda *a: None)
    assert math.isfinite(result["test_neg_elbo"]) and math.isfinite(result["test_nll"])
    assert result["train_size"] == 40 and result["model"].decoder[-1].out_features == 784
    np.savez(path, train=np.packbits(images, axis=1))
    with pytest.raises(ValueError, match="data"):
        vae.load_data(str(path))


def test_digits_are_binarized_above_7(vae):
    from sklearn.datasets import load_digits

    train, test = vae.load_data(None)
    assert train.shape == (1797 - 300, 64) and test.shape == (300, 64)
    assert set(torch.cat([train, test]).unique().tolist()) == {0.0, 1.0}
    # the split is a permutation: the pixel totals equal those of the thresholded data set
    assert torch.cat([train, test]).sum().item() == (load_digits().data > 7).sum()


def test_vae_with_two_processes(tmp_path):
    """``--nproc 2`` re-launches through torchrun's engine; the shards train one model (gloo, loopback)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "vae.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--flow", "iaf", "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert sum("train -ELBO" in line for line in lines) == 1  # one epoch, logged by rank 0 only
    assert any("(2 processes)" in line for line in lines)
    assert any(line.startswith("test -ELBO") for line in lines)
