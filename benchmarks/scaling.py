"""Examples per second of data-parallel ``fit`` with 1 and 2 processes (one torch thread each), in one run.

    python benchmarks/scaling.py                # both models, 3 repeats, median
    python benchmarks/scaling.py --quick        # fewer steps, 1 repeat (smoke test)

Two models, each rank with the same per-rank minibatch (weak scaling: two
processes see twice the examples per step):

* ``logreg``: Bayesian logistic regression, N = 1,000,000 rows every rank holds,
  ``pyro.plate(subsample_size=B)``, AutoNormal guide.
* ``vae``: a small VAE (64-pixel binary data, 8-d latent) whose amortized
  Gaussian posterior is followed by a 4-layer planar flow, fed through
  ``fit(batches=DataLoader(..., sampler=DistributedSampler))``.

One process runs plain ``fit`` (no process group); two run under
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (gloo on
loopback). Time is taken from ``history["elapsed"]`` after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import pyro
import pyro.distributions as dist
import torch
from torch import nn

N_LOGREG, D_LOGREG = 1_000_000, 50
N_VAE, X_DIM, Z_DIM = 20_000, 64, 8


def logreg_problem(batch: int):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_LOGREG, D_LOGREG, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.randn(D_LOGREG, generator=g) / D_LOGREG**0.5), generator=g)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D_LOGREG]).to_event(1))
        with pyro.plate("data", N_LOGREG, subsample_size=batch) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])

    from pyro.infer.autoguide import AutoNormal

    return model, AutoNormal(model), (X, y), {}


class FlowVAE(nn.Module):
    """Bernoulli decoder; guide ``z = f(μ(x) + σ(x) ε)`` with ``f`` a planar flow shared by all rows."""

    def __init__(self, hidden: int = 128, flows: int = 4):
        super().__init__()
        from vi_flows.transforms import PlanarStack

        self.encoder = nn.Sequential(nn.Linear(X_DIM, hidden), nn.ReLU(), nn.Linear(hidden, 2 * Z_DIM))
        self.decoder = nn.Sequential(nn.Linear(Z_DIM, hidden), nn.ReLU(), nn.Linear(hidden, X_DIM))
        self.flow = PlanarStack(Z_DIM, flows)

    def model(self, idx, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", N_VAE, subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, idx, x):
        from vi_flows.distributions import FlowDistribution

        pyro.module("encoder", self.encoder)
        pyro.module("flow", self.flow)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", N_VAE, subsample=idx):
            base = dist.Normal(loc, log_scale.exp()).to_event(1)
            pyro.sample("z", FlowDistribution(base, self.flow))


def vae_problem(batch: int):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    g = torch.Generator().manual_seed(0)
    z = torch.randn(N_VAE, Z_DIM, generator=g)
    x = torch.bernoulli(torch.sigmoid(z @ torch.randn(Z_DIM, X_DIM, generator=g)), generator=g)
    data = TensorDataset(torch.arange(N_VAE), x)
    distributed = torch.distributed.is_initialized()
    sampler = DistributedSampler(data, seed=0) if distributed else torch.utils.data.RandomSampler(data)
    vae = FlowVAE()
    return vae.model, vae.guide, (), {"batches": DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)}


PROBLEMS = {"logreg": (logreg_problem, (1000, 50000)), "vae": (vae_problem, (256, 4096))}  # per-rank batches


def worker(name: str, batch: int, steps: int, warmup: int) -> None:
    """One rank: fit for ``warmup + steps`` steps; rank 0 prints a JSON line with examples/s."""
    torch.set_num_threads(1)
    from vi_flows import distributed as vd
    from vi_flows.training import fit

    launched = vd.launched()
    if launched:
        vd.init()
    make = PROBLEMS[name][0]
    pyro.set_rng_seed(0)
    model, guide, args, kw = make(batch)
    result = fit(model, guide, *args, num_steps=warmup + steps, lr=1e-3, tol=None, progress=False, seed=0, **kw)
    elapsed = result.history["elapsed"].to_numpy()
    seconds = elapsed[-1] - elapsed[warmup - 1]
    world = torch.distributed.get_world_size() if launched else 1
    if vd.is_main():
        numel = sum(p.numel() for p in pyro.get_param_store().values())
        print(json.dumps({"model": name, "nproc": world, "batch_per_rank": batch, "steps": steps,
                          "examples_per_s": world * batch * steps / seconds, "ms_per_step": 1e3 * seconds / steps,
                          "allreduce_bytes": 4 * (numel + 4)}))  # fmt: skip


def launch(name: str, batch: int, nproc: int, steps: int, warmup: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "VI_FLOWS_BIND_CPUS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    me = [
        os.path.abspath(__file__),
        "--worker",
        name,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


DOCS_TITLE = "## Data-parallel scaling (`benchmarks/scaling.py`)"
DOCS_ABOUT = (
    "Examples per second of `fit` with 1 process (plain) and 2 processes (`python -m torch.distributed.run "
    "--standalone --nproc_per_node 2`, gloo on loopback, each rank pinned to its own core with "
    "`VI_FLOWS_BIND_CPUS=1`), one torch thread each, the same minibatch per rank (weak scaling); timed steps after "
    "the warm-up steps, median of alternating runs (**speedup**: the median of the per-run ratios, runs listed). "
    "Models: **logreg**, Bayesian logistic regression (N = 1,000,000, D = 50, `AutoNormal`, "
    "`pyro.plate(subsample_size=B)`); **vae**, a flow-posterior VAE (64 → 8, 4 planar layers, fed through a "
    "`DistributedSampler`). **all-reduce/step**: the bytes each rank synchronizes per step."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="60 steps, 1 repeat, the small batch")
    parser.add_argument("--batch", type=int, nargs="+", help="per-rank batch sizes (default: each model's two)")
    parser.add_argument("--worker", choices=list(PROBLEMS), help=argparse.SUPPRESS)
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md (block scaling)")
    a = parser.parse_args()
    if a.quick:
        a.steps, a.warmup, a.repeat = 60, 10, 1
    if a.worker:
        worker(a.worker, a.batch[0], a.steps, a.warmup)
        return
    table = ["| model | batch a rank | examples/s, 1 process | examples/s, 2 processes | speedup | ms/step (1 → 2) "
             "| all-reduce/step |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(table))
    for name, batch in [(n, b) for n in a.models for b in (a.batch or PROBLEMS[n][1][: 1 if a.quick else None])]:
        runs = {1: [], 2: []}
        for _ in range(a.repeat):  # alternate, so a burst of load from elsewhere hits both
            for nproc in (1, 2):
                runs[nproc].append(launch(name, batch, nproc, a.steps, a.warmup))
        rate = {n: statistics.median(r["examples_per_s"] for r in runs[n]) for n in runs}
        ms = {n: statistics.median(r["ms_per_step"] for r in runs[n]) for n in runs}
        speedups = [r2["examples_per_s"] / r1["examples_per_s"] for r1, r2 in zip(runs[1], runs[2])]
        table.append(f"| {name} | {batch:,} | {rate[1]:,.0f} | {rate[2]:,.0f} | {statistics.median(speedups):.2f}× "
                     f"(runs: {', '.join(f'{s:.2f}' for s in speedups)}) | {ms[1]:.2f} → {ms[2]:.2f} "
                     f"| {runs[2][0]['allreduce_bytes'] / 1024:.1f} KiB |")  # fmt: skip
        print(table[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    footer = (f"{os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the end; torch {torch.__version__}; "
              f"{a.steps} timed steps after {a.warmup}, median of {a.repeat} alternating runs.")  # fmt: skip
    print(f"\n{footer}")
    if a.docs:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _common

        command = f"python benchmarks/scaling.py --models {' '.join(a.models)} --steps {a.steps} --repeat {a.repeat}"
        command += (f" --batch {' '.join(map(str, a.batch))}" if a.batch else "") + " --docs"
        text = "\n\n".join([DOCS_TITLE, f"```bash\n{command}\n```", DOCS_ABOUT, footer, "\n".join(table)])
        _common.update_docs("scaling", text)


if __name__ == "__main__":
    main()
