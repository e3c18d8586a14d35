"""A VAE on binarized images whose posterior q(z|x) is a flow conditioned on x.

Architecture (``H = --hidden``, default 300; ``d = --latent-dim``, default 64; ``D`` pixels):

* encoder: ``x (D) → Linear(D, H) → ReLU → Linear(H, H) → ReLU → c (H)``;
* posterior: :class:`vi_flows.AmortizedFlow` ``(d, H, flow)``: ``N(μ(c), diag σ(c)²)`` from a linear head
  of ``c``, pushed through flows whose parameters depend on ``c`` (planar: per-example ``u, w, b``;
  Sylvester: per-example ``Q, R, R̃, b``; IAF: ``c`` enters every MADE; coupling: ``c`` enters every
  coupling net; CNF: ``c`` gates every layer of the ODE net; none: the Gaussian);
* prior ``p(z) = N(0, I_d)``; decoder ``z → Linear(d, H) → ReLU → Linear(H, H) → ReLU → Linear(H, D)``,
  the logits of independent Bernoulli pixels.

Data: ``--data path.npz`` with arrays ``train`` and ``test`` of ``np.packbits``-ed rows (statically
binarized MNIST: 50k train / 10k test, e.g. ``../shared/data/binarized_mnist.npz``; ``valid`` is not
used). Without it, scikit-learn's ``load_digits`` (1797 images of 8x8, shipped with scikit-learn) is
binarized as ``pixel > 7`` on its 0..16 scale and split 1497 train / 300 test by a fixed permutation.

Training: Pyro's ``SVI`` with ``Trace_ELBO`` and Adam, one pass over a fresh permutation per epoch,
the minibatch given to ``pyro.plate("data", N, subsample=idx)`` in model and guide (so the loss is
the ELBO of the whole training set). A plain loop rather than :func:`vi_flows.fit`: ``fit`` runs a
model with fixed arguments until its ELBO settles, whereas here every step needs the next minibatch
of an epoch and the report needs seconds per epoch.

Evaluation as in the papers, in nats per test image: the negative ELBO (one draw of ``z`` per
image) and ``−log p(x) ≈ −log (1/K) Σ_k p(x, z_k)/q(z_k|x)``, ``z_k ~ q(·|x)``, with ``K = --iw-samples``
(5000 in the papers; Burda et al. 2016) drawn independently of the ELBO's draws. A CNF is trained
with its Hutchinson trace (d > 10) but evaluated with the exact trace, so ``log q`` is exact.

Run: ``python examples/vae.py --flow iaf --epochs 10`` or ``python examples/vae.py --quick``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from vi_flows import AmortizedFlow, fit
from vi_flows.distributed import init, is_main, launched, relaunch
from vi_flows.families import AMORTIZED_NAMES
from vi_flows.transforms import ContinuousFlow

FAMILIES = AMORTIZED_NAMES  # the registry's names, then the older aliases ("none", "coupling", "spline")
DIGITS_TEST = 300


def load_data(path: str | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(train, test)`` binary images as float32 tensors of shape ``(N, D)``."""
    if path is None:
        from sklearn.datasets import load_digits

        x = (load_digits().data > 7).astype(np.float32)
        perm = np.random.default_rng(seed).permutation(len(x))
        x = x[perm]
        return torch.from_numpy(x[DIGITS_TEST:]), torch.from_numpy(x[:DIGITS_TEST])
    with np.load(path) as data:
        missing = {"train", "test"} - set(data.files)
        if missing:
            raise ValueError(f"data: {path!r} has no array(s) {sorted(missing)}; it has {data.files}")
        train, test = data["train"], data["test"]
    unpack = lambda a: torch.from_numpy(np.unpackbits(a, axis=1)[:, :784].astype(np.float32))  # noqa: E731
    return unpack(train), unpack(test)


def mlp(*widths: int) -> nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    """Bernoulli decoder, MLP encoder, :class:`~vi_flows.AmortizedFlow` posterior (see the module docstring)."""

    def __init__(self, data_dim: int, latent_dim: int = 64, hidden: int = 300, flow: str = "none", **posterior):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(mlp(data_dim, hidden, hidden), nn.ReLU())
        self.posterior = AmortizedFlow(latent_dim, hidden, flow, **posterior)
        self.decoder = mlp(latent_dim, hidden, hidden, data_dim)

    def q(self, x: Tensor):
        """``q(z | x)``, batch shape ``x.shape[:-1]``."""
        return self.posterior(self.encoder(x))

    def prior(self, batch_shape) -> dist.Distribution:
        zeros = torch.zeros(self.latent_dim, device=self.decoder[0].weight.device)
        return dist.Normal(zeros, 1.0).to_event(1).expand(batch_shape)

    def likelihood(self, z: Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1)

    def model(self, x: Tensor, idx: Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], subsample=idx):
            z = pyro.sample("z", self.prior((len(idx),)))
            pyro.sample("x", self.likelihood(z), obs=x[idx])

    def guide(self, x: Tensor, idx: Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], subsample=idx):
            pyro.sample("z", self.q(x[idx]))

    def log_weights(self, x: Tensor, num_samples: int) -> Tensor:
        """``log p(x, z_k) − log q(z_k | x)`` for ``z_k ~ q(·|x)``, shape ``(num_samples, B)``."""
        z, log_q = self.q(x).rsample_and_log_prob((num_samples,))
        return self.prior(z.shape[:-1]).log_prob(z) + self.likelihood(z).log_prob(x) - log_q


def evaluate(
    vae: VAE, x: Tensor, iw_samples: int, chunk: int = 20000, seconds: float | None = None
) -> dict[str, float]:
    """Mean negative ELBO and IS estimate of ``−log p(x)`` over the rows of ``x``, in nats.

    Images go through in groups of about ``chunk / K`` and their ``K`` draws in pieces of at most
    ``chunk`` rows, so memory stays bounded for any ``K``. ``seconds``: stop after the group during
    which that much time has passed, so the estimates cover the first ``images`` rows only.
    """
    cnfs = [m for m in vae.modules() if isinstance(m, ContinuousFlow)]
    traces = [m.trace for m in cnfs]
    for m in cnfs:
        m.trace = "exact"
    neg_elbo, nll = [], []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for xb in x.split(max(1, chunk // iw_samples)):
                neg_elbo.append(-vae.log_weights(xb, 1)[0])
                per = max(1, chunk // len(xb))
                log_w = torch.cat([vae.log_weights(xb, min(per, iw_samples - k)) for k in range(0, iw_samples, per)])
                nll.append((math.log(iw_samples) - torch.logsumexp(log_w, 0)).cpu())  # .cpu(): the clock is true
                if seconds is not None and time.perf_counter() - t0 >= seconds:
                    break
    finally:
        for m, t in zip(cnfs, traces):
            m.trace = t
    nll = torch.cat(nll)
    return {"neg_elbo": torch.cat(neg_elbo).mean().item(), "nll": nll.mean().item(), "images": len(nll)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="binarized-MNIST .npz (default: sklearn load_digits, pixel > 7)")
    p.add_argument("--flow", choices=FAMILIES, default="none", help="posterior family (default: none)")
    p.add_argument(
        "--num-flows",
        type=int,
        default=None,
        help="layers (default: planar 10, iaf 2, sylvester 4, coupling 4, spline 4, cnf 1)",
    )
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=300, help="width H of encoder and decoder layers")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-size", type=int, default=None, help="evaluate the first N test images")
    p.add_argument("--iw-samples", type=int, default=5000, help="K, samples per image for -log p(x)")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="wall-clock training budget, counted from the end of the first step: stop at the first step "
        "past it (--epochs is then a maximum)",
    )
    p.add_argument(
        "--eval-seconds",
        type=float,
        default=None,
        help="evaluation budget: stop after the group of test images that passes it (fewer images)",
    )
    p.add_argument("--eval-chunk", type=int, default=20000, help="rows of z per evaluation pass (memory bound)")
    p.add_argument("--cnf-tol", type=float, default=1e-3, help="rtol = atol of the CNF's ODE solver")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 256 train / 64 test images, 1 epoch, K=100")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes (re-launches through torch.distributed.run; the global batch stays "
        "--batch-size, split across the processes)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.batch_size, args.iw_samples = 1, 64, 100
        args.train_size = min(args.train_size or 256, 256)
        args.test_size = min(args.test_size or 64, 64)
    for name in ("epochs", "batch_size", "iw_samples", "latent_dim", "hidden", "eval_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_seconds", "eval_seconds"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    return args


def _train_data_parallel(vae: VAE, train: Tensor, args: argparse.Namespace, log) -> tuple[float, list[float]]:
    """Each process trains on its own shard (DistributedSampler); ``fit`` averages the gradients."""
    world = init(train.device).world_size
    n = train.shape[0]
    indices = torch.arange(n)
    sampler = DistributedSampler(indices, seed=args.seed, drop_last=True)
    loader = DataLoader(indices, batch_size=max(1, args.batch_size // world), sampler=sampler)
    result = fit(
        lambda idx: vae.model(train, idx.to(train.device)),
        lambda idx: vae.guide(train, idx.to(train.device)),
        batches=loader,
        num_steps=args.epochs * len(loader),
        lr=args.lr,
        tol=None,
        seed=args.seed,
        progress=False,
    )
    history = result.history
    epoch_of = (history["step"] - 1) // len(loader)
    per_epoch = history.groupby(epoch_of)
    seconds = per_epoch["elapsed"].max().diff().fillna(per_epoch["elapsed"].max()).tolist()
    for epoch, neg_elbo in enumerate((-per_epoch["elbo"].mean() / n).tolist(), 1):
        if is_main():
            log(f"epoch {epoch}: train -ELBO {neg_elbo:.2f} nats/image, {seconds[epoch - 1]:.1f} s ({world} processes)")
    return float(-per_epoch["elbo"].mean().iloc[-1]), seconds


def main(argv: Sequence[str] | None = None, log=print) -> dict:
    """Train and evaluate; returns the settings and results (nats per image, seconds per epoch)."""
    args = parse_args(argv)
    if args.nproc > 1 and not launched():
        relaunch(args.nproc, [__file__], list(argv) if argv is not None else sys.argv[1:])
        return {}
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = torch.device(args.device)
    train, test = load_data(args.data)
    train, test = train[: args.train_size].to(device), test[: args.test_size].to(device)
    options = {"num_flows": None if args.flow == "none" else args.num_flows}
    if args.flow == "cnf":
        options.update(rtol=args.cnf_tol, atol=args.cnf_tol)
    vae = VAE(train.shape[1], args.latent_dim, args.hidden, args.flow, **options).to(device)
    n = train.shape[0]
    if launched():
        init(device)  # join the group first, so only rank 0 logs
    if is_main():
        shape = f"{n} train / {test.shape[0]} test images of {train.shape[1]} pixels"
        log(f"{args.flow}: {shape}, latent {args.latent_dim}")
    if launched():
        total, seconds = _train_data_parallel(vae, train, args, log)
        epochs_trained = float(len(seconds))
        if not is_main():
            return {}
    else:
        svi = SVI(vae.model, vae.guide, Adam({"lr": args.lr}), Trace_ELBO())
        seconds, seen_total = [], 0
        deadline = math.inf  # --train-seconds counts from the end of the first step (one-time initialization)
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            total, seen = 0.0, 0
            for idx in torch.randperm(n, device=device).split(args.batch_size):
                total += svi.step(train, idx) * len(idx) / n  # each step estimates the whole set's -ELBO
                if args.train_seconds and not seen_total + seen:
                    deadline = time.perf_counter() + args.train_seconds
                seen += len(idx)
                if time.perf_counter() >= deadline:
                    break
            seconds.append((time.perf_counter() - t0) * n / seen)  # a cut epoch: scaled to a whole one
            seen_total += seen
            total *= n / seen  # the mean over the images of this epoch seen so far
            cut = "" if seen == n else f" ({seen} of {n} images: the --train-seconds budget is spent)"
            log(f"epoch {epoch}: train -ELBO {total / n:.2f} nats/image, {seconds[-1]:.1f} s{cut}")
            if seen < n or time.perf_counter() >= deadline:
                break
        epochs_trained = seen_total / n
    t0 = time.perf_counter()
    result = evaluate(vae, test, args.iw_samples, args.eval_chunk, args.eval_seconds)
    eval_seconds = time.perf_counter() - t0
    part = "" if result["images"] == test.shape[0] else f" on the first {result['images']} test images"
    log(
        f"test -ELBO {result['neg_elbo']:.2f}, -log p(x) {result['nll']:.2f} nats (K={args.iw_samples}){part}, "
        f"{eval_seconds:.1f} s"
    )
    return {
        **vars(args),
        "train_size": n,
        "test_size": result["images"],
        "epochs_trained": epochs_trained,
        "train_neg_elbo": total / n,
        "test_neg_elbo": result["neg_elbo"],
        "test_nll": result["nll"],
        "sec_per_epoch": float(np.median(seconds)),
        "eval_seconds": eval_seconds,
        "model": vae,
    }


if __name__ == "__main__":
    main()
