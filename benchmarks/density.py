"""Density estimation benchmark: held-out NLL and ms/step of vi_flows vs zuko and Pyro flows.

Data: two moons (2-D, ``make_moons(noise=0.05)``; 4000 training and 2000 test points) and digits (64-D,
``load_digits``, uniformly dequantized; 80 % train / 20 % test), both standardized with the training
statistics; NLL is reported in nats per example in the data's original units (the standardization's
``Σ log σ_j`` added back). Every flow: 5 layers of hidden (128, 128), Adam 1e-3, batch 256, up to
3000 steps, 10 % of the training split held out and scored every 100 steps, test NLL at the best held-out
step. vi_flows flows train with :func:`vi_flows.fit_density` (early stopping, patience 10 evaluations;
``--patience 0``: run all steps); peers with the same loop run all steps. ms/step counts training steps only
(evaluations excluded). With several ``--seeds`` (data draw, split, initialization and batches all follow the
seed) the table gives mean ± sd over seeds. ``--speed`` times vi_flows against zuko side by side instead (one
process, interleaved blocks of training steps, medians): the only ms/step comparison to trust on a shared machine.

    python benchmarks/density.py --seeds 0 1 2   # the full protocol, three seeds
    python benchmarks/density.py --speed         # ms/step ratios to zuko, d = 2 and 64
    python benchmarks/density.py --quick         # CI smoke test: 40 steps, small data
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    conditions,
    interleaved_ms,
    machine,
    parser,
    save_json,
    setup,
    update_docs,
    zuko_available,
)

import vi_flows  # noqa: E402
from vi_flows.density import FlowDensity, evaluate_nll  # noqa: E402
from vi_flows.transforms import ComposeFlow, PlanarStack, Sylvester, coupling_stack, maf_stack, spline_stack  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = (128, 128)
LAYERS = 5


# ------------------------------------------------------------------------------------------------------------ data
def load(name: str, quick: bool, seed: int) -> dict:
    """Standardized train/test tensors and the log-Jacobian of the standardization (nats to add back)."""
    from sklearn.datasets import load_digits, make_moons

    rng = np.random.default_rng(seed)
    if name == "moons":
        n_train, n_test = (800, 400) if quick else (4000, 2000)
        train = make_moons(n_train, noise=0.05, random_state=seed)[0]
        test = make_moons(n_test, noise=0.05, random_state=seed + 1)[0]
    else:
        x = load_digits().data
        x = x + rng.uniform(size=x.shape)  # uniform dequantization of the 0..16 pixel values
        perm = rng.permutation(len(x))
        n_test = len(x) // 5
        test, train = x[perm[:n_test]], x[perm[n_test:]]
    mean, std = train.mean(0), train.std(0)
    to_t = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return dict(train=to_t(train), test=to_t(test), log_std=float(np.log(std).sum()), dim=train.shape[1])


def gaussian_nll(data: dict) -> float:
    """Test NLL of the maximum-likelihood full-covariance Gaussian (original units)."""
    x = data["train"].double()
    cov = torch.cov(x.T) * (len(x) - 1) / len(x)
    mvn = torch.distributions.MultivariateNormal(x.mean(0), covariance_matrix=cov)
    return -mvn.log_prob(data["test"].double()).mean().item() + data["log_std"]


# ----------------------------------------------------------------------------------------------------------- peers
def zuko_flow(kind: str, d: int):
    import zuko

    cls = dict(MAF=zuko.flows.MAF, RealNVP=zuko.flows.RealNVP, NSF=zuko.flows.NSF)[kind]
    flow = cls(d, 0, transforms=LAYERS, hidden_features=HIDDEN)
    return flow, lambda x: flow().log_prob(x)


def pyro_flow(kind: str, d: int):
    import pyro.distributions as dist
    from pyro.distributions.transforms import Permute, affine_autoregressive, affine_coupling

    layers, parts = [], []
    for k in range(LAYERS):
        if k:
            parts.append(Permute(torch.arange(d - 1, -1, -1)))
        t = (
            affine_coupling(d, hidden_dims=list(HIDDEN))
            if kind == "coupling"
            else affine_autoregressive(d, hidden_dims=list(HIDDEN))
        )
        layers.append(t)
        # MAF direction: the data-to-noise map is the autoregressive pass, so the density costs one pass
        parts.append(t if kind == "coupling" else t.inv)
    base = dist.Normal(torch.zeros(d), torch.ones(d)).to_event(1)
    module = torch.nn.ModuleList(layers)

    def log_prob(x):
        return dist.TransformedDistribution(base, parts).log_prob(x)

    return module, log_prob


def train_peer(module: torch.nn.Module, log_prob: Callable, data: dict, steps: int, seed: int) -> dict:
    """The loop of :func:`vi_flows.fit_density`, for a peer's ``log_prob``: same split, batches, evaluation."""
    train, valid = _split(data["train"], seed)
    optim = torch.optim.Adam(module.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, elapsed, pos = math.inf, None, 0.0, 0
    order = torch.randperm(len(train), generator=gen)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        if pos + 256 > len(train):
            order, pos = torch.randperm(len(train), generator=gen), 0
        loss = -log_prob(train[order[pos : pos + 256]]).mean()
        pos += 256
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        elapsed += time.perf_counter() - start
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                v = -log_prob(valid.clone()).mean().item()  # a fresh tensor: Pyro's transforms cache by identity
            if math.isfinite(v) and v < best:
                best, best_state = v, {k: t.clone() for k, t in module.state_dict().items()}
    module.load_state_dict(best_state)
    with torch.no_grad():
        test = -log_prob(data["test"].clone()).mean().item()
    return dict(test_nll=test + data["log_std"], ms_per_step=1000 * elapsed / steps, steps=steps)


def _split(train: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the split fit_density makes for the same seed
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_valid = int(round(0.1 * len(train)))
    return train[perm[n_valid:]], train[perm[:n_valid]]


def train_vi(flow, data: dict, steps: int, seed: int, patience: int | None = 10) -> dict:
    torch.manual_seed(seed)
    fit = vi_flows.fit_density(
        flow, data["train"], num_steps=steps, batch_size=256, lr=1e-3, seed=seed, patience=patience, progress=False
    )
    test = evaluate_nll(fit.density, data["test"])
    return dict(test_nll=test + data["log_std"], ms_per_step=1000 * fit.elapsed / fit.num_steps, steps=fit.num_steps)


def vi_flows_models(d: int, moons: bool) -> dict[str, Callable[[], FlowDensity]]:
    models = {
        # random orders per layer in 64-D, alternating in 2-D (maf_stack's default)
        "vi_flows MAF": lambda: FlowDensity(maf_stack(d, LAYERS, HIDDEN)),
        # odd/even halves alternating, zuko RealNVP's masks
        "vi_flows RealNVP (coupling, alternating odd/even halves)": lambda: FlowDensity(
            coupling_stack(d, LAYERS, HIDDEN, linear=False, interleave=True)
        ),
        "vi_flows RealNVP (coupling + invertible linear)": lambda: FlowDensity(coupling_stack(d, LAYERS, HIDDEN)),
        # rational-quadratic splines, 8 bins on [-5, 5], odd/even halves alternating
        "vi_flows NSF (spline coupling)": lambda: FlowDensity(spline_stack(d, LAYERS, HIDDEN, bins=8)),
    }
    if moons:  # the O(d) families, trained through their numerical inverses
        models["vi_flows planar (32 layers)"] = lambda: FlowDensity(PlanarStack(d, 32))
        models["vi_flows Sylvester (8 layers)"] = lambda: FlowDensity(ComposeFlow([Sylvester(d) for _ in range(8)]))
    return models


def run(
    name: str, quick: bool, seed: int, steps: int = 3000, skip: tuple[str, ...] = (), patience: int | None = 10
) -> list[dict]:
    data = load(name, quick, seed)
    d, steps = data["dim"], 40 if quick else steps
    gauss = dict(data=name, model="full-covariance Gaussian", test_nll=gaussian_nll(data), ms_per_step=None)
    rows = [dict(gauss, seed=seed)]
    for model, make in vi_flows_models(d, name == "moons").items():
        if any(k in model for k in skip):
            continue
        torch.manual_seed(seed)  # the initialization, as for the peers
        rows.append(dict(data=name, model=model, seed=seed, **train_vi(make(), data, steps, seed, patience)))
        print(rows[-1], flush=True)
    peers = []
    if zuko_available():
        peers += [(f"zuko {k}", lambda k=k: zuko_flow(k, d)) for k in ("MAF", "RealNVP", "NSF")]
    else:
        print("zuko not installed: skipping the zuko rows", flush=True)
    peers += [
        ("Pyro affine coupling", lambda: pyro_flow("coupling", d)),
        ("Pyro affine autoregressive (MAF direction)", lambda: pyro_flow("autoregressive", d)),
    ]
    for model, make in peers:
        if any(k in model for k in skip):
            continue
        torch.manual_seed(seed)
        module, log_prob = make()
        rows.append(dict(data=name, model=model, seed=seed, **train_peer(module, log_prob, data, steps, seed)))
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Mean ± sd over seeds of the test NLL, median ms/step, mean steps run (one seed: the values)."""
    df = pd.DataFrame(rows)
    n_seeds = df["seed"].nunique() if "seed" in df else 1
    out = ["| model | moons NLL / ms per step | digits NLL / ms per step |", "|---|---|---|"]
    for model in dict.fromkeys(df["model"]):
        cells = []
        for name in ("moons", "digits"):
            r = df[(df["model"] == model) & (df["data"] == name)]
            if r.empty:
                cells.append("–")
                continue
            nll = f"{r['test_nll'].mean():.3f}"
            if n_seeds > 1:
                nll += f" ± {r['test_nll'].std(ddof=1):.3f}" if len(r) > 1 else " (1 seed)"
            ms = r["ms_per_step"].dropna()
            ms = "–" if ms.empty else f"{ms.median():.1f}"
            steps = r["steps"].dropna() if "steps" in r else pd.Series(dtype=float)
            steps = "" if steps.empty else f" ({steps.mean():.0f} steps)"
            cells.append(f"{nll} / {ms}{steps}")
        out.append(f"| {model} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def speed(steps: int = 40, repeats: int = 5, dims: tuple[int, ...] = (2, 64), skip: tuple[str, ...] = ()) -> list[dict]:
    """ms per training step (batch 256, Adam) of vi_flows vs zuko, interleaved in one process: medians."""
    rows = []
    for d in dims:
        x = torch.randn(4096, d)

        def stepper(module: torch.nn.Module, log_prob: Callable, x: torch.Tensor = x) -> Callable:
            optim = torch.optim.Adam(module.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(0)

            def step():
                loss = -log_prob(x[torch.randint(len(x), (256,), generator=gen)]).mean()
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()

            return step

        fns = {}
        for model, make in vi_flows_models(d, moons=False).items():
            if not any(k in model for k in skip):
                density = make()
                fns[model] = stepper(density, density.log_prob)
        for kind in ("MAF", "RealNVP", "NSF"):
            if not any(k in f"zuko {kind}" for k in skip):
                fns[f"zuko {kind}"] = stepper(*zuko_flow(kind, d))
        ms = interleaved_ms(fns, steps, repeats)
        for model, value in ms.items():
            peer = next(f"zuko {k}" for k in ("NSF", "MAF", "RealNVP") if k in model or k == "RealNVP")
            rows.append(dict(dim=d, model=model, ms_per_step=value, vs_zuko=value / ms[peer] if peer in ms else None))
            print(rows[-1], flush=True)
    return rows


DOCS_MODELS = (
    "vi_flows MAF: `maf_stack(d, 5, (128, 128))`, a random autoregressive order per layer in 64-D (the two "
    "reversed orders in 2-D), the last MADE layer zero-initialized. RealNVP: `coupling_stack(d, 5, (128, 128), "
    "linear=False, interleave=True)` (odd/even halves, zuko's masks); the second RealNVP row puts an "
    "`InvertibleLinear` before every coupling (first/last halves). NSF: `spline_stack(d, 5, (128, 128), bins=8)`, "
    "rational-quadratic spline couplings on [−5, 5] with odd/even halves alternating, the last layer "
    "zero-initialized; zuko's NSF is autoregressive (every layer transforms all coordinates), so in 2-D it applies "
    "twice as many splines. The moons law's own entropy is about 0.289 nats."
)


def docs_text(rows: list[dict], seeds: list[int], steps: int, skip: list[str], patience: int | None, info: dict) -> str:
    """The ``density`` block of ``docs/benchmarks.md``."""
    command = f"python benchmarks/density.py --seeds {' '.join(map(str, seeds))}" + (
        f" --patience {patience}" if patience else " --patience 0"
    )
    command += (f" --skip {' '.join(skip)}" if skip else "") + " --docs"
    about = (
        f"Test NLL (nats per example, original units; mean ± sd over seeds {', '.join(map(str, seeds))}: each seed "
        "draws its own data, split, initialization and batches) / median ms per training step (rows run one after "
        "another: compare speeds with `--speed`). Protocol in the script's docstring: 5 layers of hidden (128, 128), "
        f"Adam 1e-3, batch 256, at most {steps} steps, test NLL at the best held-out step"
        + (
            f"; vi_flows rows stop early on held-out NLL (patience {patience}; mean steps run in parentheses)."
            if patience
            else "; every row runs all steps (steps in parentheses)."
        )
    )
    return "\n\n".join(
        [
            "## Density estimation (`benchmarks/density.py`)",
            f"```bash\n{command}\n```",
            about,
            conditions(info),
            table(rows),
            DOCS_MODELS,
        ]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", choices=["moons", "digits", "both"], default="both")
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--steps", type=int, default=3000, help="training steps (the protocol: 3000)")
    p.add_argument("--skip", nargs="*", default=[], help="skip models whose name contains any of these")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds (default: --seed)")
    p.add_argument("--patience", type=int, default=10, help="vi_flows early-stopping patience (0: run all steps)")
    p.add_argument("--speed", action="store_true", help="only the side-by-side ms/step comparison with zuko")
    args = p.parse_args(argv)
    setup(args)
    tag = "-quick" if args.quick else ""
    if args.speed:
        rows = speed(steps=5 if args.quick else 40, repeats=2 if args.quick else 5, skip=tuple(args.skip))
        save_json(dict(machine=machine(), rows=rows), os.path.join(args.out, f"density-speed{tag}.json"))
        return rows
    seeds = args.seeds or [args.seed]
    names = ["moons", "digits"] if args.data == "both" else [args.data]
    patience = args.patience or None
    rows = [
        r
        for seed in seeds
        for name in names
        for r in run(name, args.quick, seed, args.steps, tuple(args.skip), patience)
    ]
    md = table(rows)
    print(md)
    save_json(dict(machine=machine(), seeds=seeds, rows=rows), os.path.join(args.out, f"density{tag}.json"))
    if args.docs:
        update_docs("density", docs_text(rows, seeds, args.steps, args.skip, patience, machine()))
    return rows


if __name__ == "__main__":
    main()
