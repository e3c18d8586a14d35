"""Shared pieces of the benchmarks: guide factories (vi_flows and its Pyro/zuko peers), one training loop, timing.

Every guide is trained by the same loop (:func:`train`): ``Trace_ELBO`` with vectorized particles, Adam with an
exponential learning-rate decay, so differences come from the guide alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import iterated, planar, radial
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous, AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow
from pyro.infer.autoguide.initialization import init_to_median

import vi_flows
from vi_flows.families import FAMILIES, NAMES

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
RESULTS = os.path.join(HERE, "results")


# ------------------------------------------------------------------------------------------------------------ CLI
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="CI-sized run (seconds): tiny budgets, same outputs")
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON/markdown/PNG outputs")
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: steady timings on a shared machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args: argparse.Namespace) -> None:
    logging.getLogger("pyro").setLevel(logging.WARNING)  # "Guessed max_plate_nesting" on every Predictive
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.set_default_device(args.device)
    os.makedirs(args.out, exist_ok=True)


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import zuko

        info["zuko"] = zuko.__version__
    except ImportError:
        info["zuko"] = None
    return info


def save_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)


def markdown_table(rows: list[dict], columns: list[str], fmt: dict[str, str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``."""
    fmt = fmt or {}

    def cell(row, c):
        v = row.get(c)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- guides
class _CachedSample(dist.TorchDistribution):
    """Wrap a torch distribution with ``rsample_and_log_prob`` so Pyro's ``log_prob`` of the draw is free."""

    arg_constraints = {}
    support = dist.constraints.real_vector
    has_rsample = True

    def __init__(self, base):
        self.base = base
        self._cache = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        x, log_q = self.base.rsample_and_log_prob(sample_shape)
        self._cache = (x, log_q)
        return x

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        if self._cache is not None and value is self._cache[0]:
            return self._cache[1]
        return self.base.log_prob(value)


class ZukoCNFGuide(AutoContinuous):
    """A CNF guide on zuko's ``zuko.flows.CNF`` (FFJORD, N(0, I) base), the peer of :class:`vi_flows.AutoCNF`."""

    def __init__(self, model, hidden_dims=(64, 64), rtol: float = 1e-5, atol: float = 1e-5, exact: bool | None = None):
        self._options = dict(hidden_features=tuple(hidden_dims), rtol=rtol, atol=atol)
        self._exact = exact
        super().__init__(model, init_loc_fn=init_to_median)

    def _setup_prototype(self, *args, **kwargs):
        import zuko

        super()._setup_prototype(*args, **kwargs)
        # None: exact trace up to d = 10, Hutchinson above, as AutoCNF(trace="auto")
        exact = self.latent_dim <= 10 if self._exact is None else self._exact
        self.cnf = zuko.flows.CNF(self.latent_dim, exact=exact, **self._options)

    def get_posterior(self, *args, **kwargs):
        return _CachedSample(self.cnf())


def zuko_available() -> bool:
    try:
        import zuko  # noqa: F401
    except ImportError:
        return False
    return True


def make_guide(name: str, model: Callable, d: int | None = None, **options):
    """Build a guide by its benchmark name: ``"pyro:<family>"``, ``"vi:<family>"`` or ``"zuko:cnf"``.

    Families: ``normal``, ``mvn`` (Pyro only), ``planar<K>``, ``radial<K>``, ``iaf`` (2 layers, hidden 3d+1,
    gated), ``cnf``. vi_flows guides take ``options`` (``init_scale``, ``base``, ``init``, CNF tolerances).
    """
    lib, family = name.split(":")
    scale = options.pop("init_scale", 1.0)
    if lib == "pyro":
        if family == "normal":
            return AutoNormal(model, init_scale=scale)
        if family == "mvn":
            return AutoMultivariateNormal(model, init_scale=scale)
        if family == "iaf":
            return AutoIAFNormal(model, num_transforms=2, stable=True)
        if family.startswith("planar"):
            return AutoNormalizingFlow(model, partial(iterated, int(family[6:]), planar))
        if family.startswith("radial"):
            return AutoNormalizingFlow(model, partial(iterated, int(family[6:]), radial))
    elif lib == "vi":
        if family.startswith("planar"):
            return vi_flows.AutoPlanar(model, int(family[6:]), init_scale=scale, **options)
        if family.startswith("radial"):
            return vi_flows.AutoRadial(model, int(family[6:]), init_scale=scale, **options)
        if family == "iaf":
            return vi_flows.AutoIAF(model, num_flows=2, init_scale=scale, **options)
        if family == "cnf":
            return vi_flows.AutoCNF(model, init_scale=scale, **options)
    elif lib == "zuko" and family == "cnf":
        tol = {k: options[k] for k in ("rtol", "atol") if k in options}
        return ZukoCNFGuide(model, **tol)
    raise ValueError(f"unknown guide name {name!r}")


# ------------------------------------------------------------------------------------------------------- training
def train(
    model: Callable,
    guide,
    *args,
    num_steps: int,
    num_particles: int = 8,
    lr: float = 1e-2,
    lr_final: float = 1e-3,
    seed: int = 0,
    anneal: int = 0,
    late_particles: int | None = None,
    late_fraction: float = 0.25,
    **kwargs,
) -> dict:
    """SVI with Adam(lr) decayed exponentially to ``lr_final``; returns the ELBO trace and ms per step.

    ``anneal``: train on ``β_t log p`` with ``fit(anneal=...)``'s schedule (:func:`vi_flows.training.anneal_beta`);
    ``late_particles``: that many particles for the last ``late_fraction`` of the steps.
    """
    from vi_flows.training import Tempered, anneal_beta

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    gamma = (lr_final / lr) ** (1.0 / max(num_steps - 1, 1))
    optim = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "gamma": gamma})
    tempered = Tempered(model)

    def svi(n: int) -> SVI:
        return SVI(tempered, guide, optim, Trace_ELBO(num_particles=n, vectorize_particles=n > 1))

    early = svi(num_particles)
    late = svi(late_particles) if late_particles else early
    switch = num_steps - int(late_fraction * num_steps) if late_particles else num_steps
    elbos, times = [], []
    for t in range(num_steps):
        t0 = time.perf_counter()
        tempered.beta = anneal_beta(t + 1, anneal)
        value = (early if t < switch else late).step(*args, **kwargs)
        optim.step()
        times.append(time.perf_counter() - t0)
        elbos.append(-value)
    warm = times[min(10, len(times) // 2) :]
    return {"elbo_trace": elbos, "ms_per_step": 1e3 * statistics.median(warm), "seconds": sum(times)}


def step_timer(model: Callable, guide, *args, num_particles: int = 8, lr: float = 1e-3, **kwargs) -> Callable:
    """A zero-argument function doing one SVI step (for interleaved timing); the guide is set up first."""
    optim = pyro.optim.Adam({"lr": lr})
    loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    svi = SVI(model, guide, optim, loss)
    svi.step(*args, **kwargs)
    return lambda: svi.step(*args, **kwargs)


def interleaved_ms(fns: dict[str, Callable], steps: int, repeats: int, sync: Callable = lambda: None) -> dict:
    """Median ms per call of each function, alternating blocks of ``steps`` calls ``repeats`` times (after warm-up)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    blocks = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            blocks[k].append(1e3 * (time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in blocks.items()}


def saved_tensor_mb(fn: Callable) -> float:
    """MB of distinct tensors autograd saves for backward during ``fn()`` (the activation memory of one step)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            try:
                key = t.untyped_storage().data_ptr()
            except RuntimeError:
                key = id(t)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    except RuntimeError:  # code under torch.func (a peer's jacrev, say) refuses saved-tensor hooks
        return float("nan")
    return sum(seen.values()) / 2**20


# ------------------------------------------------------------------------------------------------------------ docs
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")
DOCS_HEADER = """# Benchmarks

Measurements of vi_flows guides against Pyro's own autoguides and zuko. Each section below is written by its
script in `benchmarks/` between `<!-- name:start -->` and `<!-- name:end -->` markers; run the command at the top
of a section to regenerate it. `--quick` is a CI smoke run (seconds) that leaves this file alone.
"""


def conditions(info: dict) -> str:
    """The one line of conditions under a docs table, from a result's ``machine`` record (:func:`machine`)."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    zuko = f", zuko {info['zuko']}" if info.get("zuko") else ""
    return (
        f"Machine: {info['cpu_count']} CPU cores ({info['cpu']}){gpu}, {info['torch_threads']} torch thread(s) per "
        f"process; Python {info['python']}, torch {info['torch']}, pyro {info['pyro']}{zuko}."
    )


def update_docs(block: str, text: str, path: str = DOCS) -> None:
    """Replace the text between ``<!-- block:start -->`` and ``<!-- block:end -->`` (appending the block if new)."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    doc = open(path).read() if os.path.exists(path) else DOCS_HEADER
    new = f"{start}\n{text.strip()}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + new + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + new + "\n"
    with open(path, "w") as f:
        f.write(doc)


# ------------------------------------------------------------------------------------- fit's defaults (--defaults)
#: The guides of a ``--defaults`` run: Pyro's AutoNormal, AutoMultivariateNormal and AutoIAFNormal, then every
#: vi_flows family of the registry (``vi:normal`` is ``AutoFlow``: the Gaussian base alone), each ``AutoX(model)``.
DEFAULT_GUIDES = ["pyro:normal", "pyro:mvn", "pyro:iaf", *(f"vi:{name}" for name in NAMES)]

DEFAULTS_ABOUT = (
    "**`fit`'s defaults**: every guide is built with its class's defaults only (`vi_flows.AutoIAF(model)`, "
    '`AutoNormal(model)`, ...; the vi_flows guides start at `init="auto"`, the Pathfinder/Laplace start) and '
    "trained by `vi_flows.fit(model, guide, seed=0, progress=False)` and nothing else: at most 2000 steps with "
    'the automatic stopping rule (`tol="auto"`), Adam at lr 0.01 decayed to 0.001, `Trace_ELBO` with '
    '`num_particles="auto"` (8 vectorized draws per step where the model vectorizes them, else 1), ending at '
    "the mean of the iterates the stopping rule judged flat (`tail_average=True`); the vi_flows guides end with "
    "their heavy-tails layer (`tails=True`). Pyro's guides go through the same call. This is what a user gets "
    "without tuning, not the hand-tuned budget "
    "of the script's main table."
)


def make_default_guide(name: str, model: Callable):
    """The guide ``name`` of :data:`DEFAULT_GUIDES` for ``model``, with its class's defaults: ``AutoX(model)``."""
    factories = {
        "pyro:normal": AutoNormal,
        "pyro:mvn": AutoMultivariateNormal,
        "pyro:iaf": AutoIAFNormal,
        **{f"vi:{n}": f.guide for n, f in FAMILIES.items()},
    }
    if name not in factories:
        raise ValueError(f"unknown guide {name!r} for --defaults; choose from {', '.join(DEFAULT_GUIDES)}")
    return factories[name](model)


def fit_defaults(model: Callable, guide, *args, seed: int = 0, quick_steps: int | None = None, **kwargs) -> dict:
    """``vi_flows.fit(model, guide, *args, seed=seed, progress=False, **kwargs)`` and nothing else.

    ``quick_steps`` (``--quick`` only) adds ``num_steps=quick_steps``. Returns the steps run, whether the
    stopping rule fired, the ELBO trace, the median ms per step and the wall seconds of the call (the guide's
    automatic start included).
    """
    pyro.clear_param_store()
    extra = {} if quick_steps is None else {"num_steps": quick_steps}
    t0 = time.perf_counter()
    result = vi_flows.fit(model, guide, *args, seed=seed, progress=False, **extra, **kwargs)
    seconds = time.perf_counter() - t0
    elapsed = result.history["elapsed"].to_numpy()
    steps_ms = 1e3 * (elapsed[1:] - elapsed[:-1])
    warm = steps_ms[min(10, len(steps_ms) // 2) :]
    return {
        "steps": int(result.num_steps),
        "converged": bool(result.converged),
        "elbo_trace": result.history["elbo"].tolist(),
        "ms_per_step": float(statistics.median(warm)) if len(warm) else float("nan"),
        "seconds": seconds,
    }


def refuse_with_defaults(p: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    """``p.error`` if ``--defaults`` comes with any of the training options ``names`` set (``fit`` sets them)."""
    given = [n for n in names if getattr(args, n) != p.get_default(n)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        p.error(f"--defaults trains with vi_flows.fit's defaults; {flags} cannot be set with it")


def steps_range(rows: list[dict]) -> str:
    """``"min–max"`` of the rows' ``steps`` (one number when they agree)."""
    steps = [r["steps"] for r in rows if "steps" in r]
    if not steps:
        return "–"
    lo, hi = min(steps), max(steps)
    return str(lo) if lo == hi else f"{lo}–{hi}"
