"""Real posteriors: final ELBO, IWAE bound, k̂, and posterior mean/sd errors against a reference.

Models: eight schools (centered, non-centered), Neal's funnel (d = 10), Bayesian logistic regression on
scikit-learn's breast cancer data (standardized predictors). References: NUTS (cached as summaries in
``benchmarks/cache/``, so it runs once), or the closed form where one exists (funnel, linear regression).

A second study (``--study``) asks what ``base="full"`` and ``init="laplace"`` buy on narrow, strongly
correlated posteriors: linear and logistic regression on the *unscaled* breast cancer predictors.

Errors are per latent element, in the constrained space: ``|mean_q − mean_ref| / sd_ref`` (max and RMS over
elements) and ``|log(sd_q / sd_ref)|`` (max).

    python benchmarks/posteriors.py            # full run (main table and study)
    python benchmarks/posteriors.py --quick    # CI smoke run (tiny NUTS into --out if the cache is missing)

``--defaults`` measures what a user gets untuned, on the main table's models (no study): every guide of
:data:`_common.DEFAULT_GUIDES` (Pyro's ``AutoNormal``/``AutoMultivariateNormal``/``AutoIAFNormal`` and each vi_flows
family) is built as ``AutoX(model)`` and trained by ``vi_flows.fit(model, guide, seed=..., progress=False)`` alone
(``--quick`` adds ``num_steps=20``). It writes ``posteriors_defaults.{json,md}`` and, with ``--docs``, the block
``posteriors-defaults``; the training options (``--steps``, ``--particles``, ``--lr``, ...) are refused with it.

    python benchmarks/posteriors.py --defaults --docs    # fit's defaults, all guides and models
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from vi_flows import diagnose  # noqa: E402

GUIDES = ["pyro:normal", "pyro:mvn", "pyro:iaf", "pyro:planar16", "vi:planar16", "vi:radial16", "vi:iaf"]
QUICK_GUIDES = ["pyro:normal", "vi:planar4"]
STUDY_FLOWS = ["vi:planar16", "vi:iaf"]
STUDY_VARIANTS = {
    "default": {},
    "full": {"base": "full"},
    "laplace": {"init": "laplace"},
    "full+laplace": {"base": "full", "init": "laplace"},
}

# ----------------------------------------------------------------------------------------------------------- models
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools_centered():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def schools_noncentered():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def funnel():
    """Neal's funnel, d = 10: ``v ~ N(0, 3²)``, ``x_i | v ~ N(0, e^v)``, i = 1..9."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (9,))
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def funnel_reference() -> dict:
    # mean 0; sd(v) = 3, sd(x_i) = sqrt(E[e^v]) = exp(9/4)
    return {"v": (np.zeros(()), np.full((), 3.0)), "x": (np.zeros(9), np.full(9, math.exp(9 / 4)))}


def breast_cancer(standardize: bool, features: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data[:, :features] if features else data.data
    if standardize:
        x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(data.target, dtype=torch.float32)


def _logits(alpha: torch.Tensor, beta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``α + x β`` with the data along the last dim: ``beta`` of shape ``batch + (1, p)`` (vectorized particles
    put a size-1 dim for the data plate before the event dim) or ``(p,)``."""
    return alpha + (beta.squeeze(-2) if beta.dim() > 1 else beta) @ x.T


def logistic_model(x: torch.Tensor, y: torch.Tensor, prior_scale: float):
    def model():
        alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1]), prior_scale).to_event(1))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=_logits(alpha, beta, x)), obs=y)

    return model


def linear_model(x: torch.Tensor, y: torch.Tensor, prior_scale: float, noise: float):
    def model():
        alpha = pyro.sample("alpha", dist.Normal(0.0, prior_scale))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1]), prior_scale).to_event(1))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Normal(_logits(alpha, beta, x), noise), obs=y)

    return model


def linear_reference(x: torch.Tensor, y: torch.Tensor, prior_scale: float, noise: float) -> dict:
    """The exact Gaussian posterior of the conjugate model (float64)."""
    a = torch.cat([torch.ones(len(x), 1), x], 1).double()
    precision = a.T @ a / noise**2 + torch.eye(a.shape[1], dtype=torch.float64) / prior_scale**2
    cov = torch.linalg.inv(precision)
    mean = cov @ a.T @ y.double() / noise**2
    sd = cov.diagonal().sqrt()
    return {"alpha": (mean[0].numpy(), sd[0].numpy()), "beta": (mean[1:].numpy(), sd[1:].numpy())}


# ------------------------------------------------------------------------------------------------------- reference
def nuts_reference(name: str, model, args, sites: list[str], transform=None) -> dict:
    """Posterior means and sds of ``sites`` from NUTS, cached in ``benchmarks/cache/nuts_<name>.npz``.

    ``transform(samples) -> samples`` maps NUTS draws of ``model`` to the sites compared (for a
    reparameterized run). Quick runs without a cache use a tiny chain written under ``--out``.
    """
    path = os.path.join(C.CACHE, f"nuts_{name}.npz")
    if not os.path.exists(path) and args.quick:
        path = os.path.join(args.out, f"nuts_{name}_quick.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {s: (z[f"{s}_mean"], z[f"{s}_sd"]) for s in sites}
    warmup, samples = (30, 30) if args.quick else (1000, 2000)
    pyro.set_rng_seed(args.seed)
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model, full_mass=True), warmup_steps=warmup, num_samples=samples, disable_progbar=True)
    mcmc.run()
    draws = {k: v.detach() for k, v in mcmc.get_samples().items()}
    if transform is not None:
        draws = transform(draws)
    out = {}
    for s in sites:
        out[f"{s}_mean"] = draws[s].mean(0).double().numpy()
        out[f"{s}_sd"] = draws[s].std(0).double().numpy()
    out["num_samples"] = np.array(samples)
    out["seconds"] = np.array(time.perf_counter() - t0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **out)
    print(f"NUTS reference {name}: {samples} draws in {out['seconds']:.0f} s -> {path}", flush=True)
    return {s: (out[f"{s}_mean"], out[f"{s}_sd"]) for s in sites}


def schools_transform(draws: dict) -> dict:
    draws = dict(draws)
    draws["theta"] = draws["mu"].unsqueeze(-1) + draws["tau"].unsqueeze(-1) * draws["theta_tilde"]
    return draws


def raw_logistic_nuts(x_raw: torch.Tensor, y: torch.Tensor, prior_scale: float):
    """The raw-predictor logistic posterior, sampled in standardized coordinates (a linear reparameterization).

    ``β_raw = b / s``, ``α_raw = a − Σ b m / s``; the map is linear, so its Jacobian is constant and the
    posterior of ``(α_raw, β_raw)`` is exactly the image of the one sampled here.
    """
    m, s = x_raw.mean(0), x_raw.std(0)
    x_std = (x_raw - m) / s
    carrier = 100.0

    def raw(a, b):
        return a - (b * (m / s)).sum(-1), b / s

    def model():
        a = pyro.sample("a", dist.Normal(0.0, carrier))
        b = pyro.sample("b", dist.Normal(torch.zeros(x_raw.shape[1]), carrier).to_event(1))
        alpha, beta = raw(a, b)
        prior = dist.Normal(0.0, 10.0).log_prob(alpha) + dist.Normal(0.0, prior_scale).log_prob(beta).sum(-1)
        pyro.factor(
            "prior", prior - dist.Normal(0.0, carrier).log_prob(a) - dist.Normal(0.0, carrier).log_prob(b).sum()
        )
        with pyro.plate("data", x_raw.shape[0], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=_logits(a, b, x_std)), obs=y)

    def transform(draws):
        alpha, beta = raw(draws["a"], draws["b"])
        return {"alpha": alpha, "beta": beta}

    return model, transform


# ------------------------------------------------------------------------------------------------------------ fits
def errors(diag, reference: dict) -> dict:
    z_err, sd_err = [], []
    for site, (ref_mean, ref_sd) in reference.items():
        st = diag.sites[site]
        z_err.append(np.atleast_1d(np.abs(st["guide_mean"] - ref_mean) / ref_sd))
        sd_err.append(np.atleast_1d(np.abs(np.log(st["guide_sd"] / ref_sd))))
    z, s = np.concatenate(z_err), np.concatenate(sd_err)
    return {
        "mean_err_max": float(z.max()),
        "mean_err_rms": float(np.sqrt((z**2).mean())),
        "sd_logratio_max": float(s.max()),
    }


def fit_one(model, reference: dict, name: str, args, label: str, **options) -> dict:
    guide = C.make_guide(name, model, init_scale=0.1, **options)
    t0 = time.perf_counter()
    failed = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = C.train(
                model,
                guide,
                num_steps=args.steps,
                num_particles=args.particles,
                lr=args.lr,
                lr_final=args.lr_final,
                seed=args.seed,
            )
            diag = diagnose(model, guide, num_samples=args.draws, seed=args.seed + 1)
    except (ValueError, RuntimeError, FloatingPointError) as e:  # a diverged fit is a result, not a crash
        failed = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    row = {"model": label, "guide": name, "seconds": time.perf_counter() - t0}
    if failed:
        row["failed"] = failed
        print(f"{label:22s} {name:22s} FAILED {failed}", flush=True)
        return row
    row.update(
        elbo=diag.elbo, iwae=diag.iwae, khat=diag.khat, ms_per_step=fit["ms_per_step"], **errors(diag, reference)
    )
    print(
        f"{label:22s} {name:22s} ELBO {diag.elbo:10.2f}  IWAE {diag.iwae:10.2f}  k̂ {diag.khat:5.2f}  "
        f"mean err {row['mean_err_max']:.2f} sd  sd err {row['sd_logratio_max']:.2f}  ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def fit_one_defaults(model, reference: dict, name: str, args, label: str) -> dict:
    """``--defaults``: the guide ``AutoX(model)`` trained by ``vi_flows.fit`` with its defaults only, scored."""
    t0 = time.perf_counter()
    failed = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guide = C.make_default_guide(name, model)
            quick_steps = DEFAULTS_QUICK_STEPS if args.quick else None
            fit = C.fit_defaults(model, guide, seed=args.seed, quick_steps=quick_steps)
            diag = diagnose(model, guide, num_samples=args.draws, seed=args.seed + 1)
    except (ValueError, RuntimeError, FloatingPointError) as e:  # a diverged fit is a result, not a crash
        failed = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    row = {"model": label, "guide": name}
    if failed:
        row.update(failed=failed, seconds=time.perf_counter() - t0)
        print(f"{label:22s} {name:22s} FAILED {failed}", flush=True)
        return row
    row.update(
        elbo=diag.elbo,
        iwae=diag.iwae,
        khat=diag.khat,
        steps=fit["steps"],
        converged=fit["converged"],
        ms_per_step=fit["ms_per_step"],
        seconds=fit["seconds"],
        **errors(diag, reference),
    )
    print(
        f"{label:22s} {name:22s} ELBO {diag.elbo:10.2f}  IWAE {diag.iwae:10.2f}  k̂ {diag.khat:5.2f}  "
        f"mean err {row['mean_err_max']:.2f} sd  sd err {row['sd_logratio_max']:.2f}  "
        f"{fit['steps']} steps ({fit['seconds']:.0f} s)",
        flush=True,
    )
    return row


def main_table(args) -> list[dict]:
    x, y = breast_cancer(standardize=True)
    schools_sites = ["mu", "tau", "theta"]
    problems = [
        (
            "schools_centered",
            schools_centered,
            nuts_reference("schools", schools_noncentered, args, schools_sites + ["theta_tilde"], schools_transform),
            schools_sites,
        ),
        (
            "schools_noncentered",
            schools_noncentered,
            nuts_reference("schools", schools_noncentered, args, schools_sites + ["theta_tilde"], schools_transform),
            ["mu", "tau", "theta_tilde"],
        ),
        ("funnel10", funnel, funnel_reference(), ["v", "x"]),
        (
            "logistic_std",
            logistic_model(x, y, 1.0),
            nuts_reference("logistic_std", logistic_model(x, y, 1.0), args, ["alpha", "beta"]),
            ["alpha", "beta"],
        ),
    ]
    if args.quick:
        problems = [problems[1], problems[2]]
    elif args.models:
        problems = [pr for pr in problems if pr[0] in args.models]
    rows = []
    for label, model, ref, sites in problems:
        ref = {s: ref[s] for s in sites}
        for name in args.guides:
            rows.append((fit_one_defaults if args.defaults else fit_one)(model, ref, name, args, label))
    return rows


def study(args) -> list[dict]:
    """Defaults vs ``base="full"`` / ``init="laplace"`` on unscaled, collinear predictors."""
    features = 10
    x_raw, y = breast_cancer(standardize=False, features=features)
    nuts_model, transform = raw_logistic_nuts(x_raw, y, prior_scale=10.0)
    problems = [
        ("linear_raw", linear_model(x_raw, y, 10.0, 0.3), linear_reference(x_raw, y, 10.0, 0.3)),
        (
            "logistic_raw",
            logistic_model(x_raw, y, 10.0),
            nuts_reference(f"logistic_raw{features}", nuts_model, args, ["alpha", "beta"], transform),
        ),
    ]
    rows = []
    flows = ["vi:planar4"] if args.quick else args.study_flows
    variants = {k: STUDY_VARIANTS[k] for k in (["default", "full+laplace"] if args.quick else STUDY_VARIANTS)}
    for label, model, ref in problems:
        for name in ["pyro:normal", "pyro:mvn"]:
            rows.append(fit_one(model, ref, name, args, label) | {"variant": "-"})
        for name in flows:
            for variant, options in variants.items():
                rows.append(fit_one(model, ref, f"{name}", args, label, **options) | {"variant": variant})
    return rows


COLUMNS = ["model", "guide", "elbo", "iwae", "khat", "mean_err_max", "mean_err_rms", "sd_logratio_max", "ms_per_step"]
FMT = {
    "elbo": ".2f",
    "iwae": ".2f",
    "khat": ".2f",
    "mean_err_max": ".2f",
    "mean_err_rms": ".2f",
    "sd_logratio_max": ".2f",
    "ms_per_step": ".2f",
}


DOCS_ABOUT = (
    "Every guide is trained by the same loop: `Trace_ELBO` with {particles} vectorized particles, {steps} steps of "
    "Adam with lr decayed exponentially from {lr} to {lr_final}, seed 0; vi_flows guides and "
    "`AutoNormal`/`AutoMultivariateNormal` start at `init_scale=0.1` (Pyro's flow guides have a fixed N(0, I) "
    "base). **elbo**, **iwae** (bound with K = 4000) and **khat** (PSIS k̂) from `vi_flows.diagnose` with 4000 "
    "draws. **mean_err**: |mean_q − mean_ref| / sd_ref per latent element in the constrained space (max and RMS "
    "over elements); **sd_logratio_max**: max |log(sd_q / sd_ref)|. References: NUTS (Pyro, dense mass matrix, "
    "1000 warm-up + 2000 draws, cached as means/sds in `benchmarks/cache/nuts_*.npz`) and the funnel's closed "
    "form (sd(v) = 3, sd(xᵢ) = e^(9/4)). Eight schools: both parameterizations on their own sites against one "
    "non-centered NUTS run. Logistic regression: 30 standardized predictors of scikit-learn's breast cancer data, "
    "α ~ N(0, 10²), β ~ N(0, 1)."
)


def docs_text(result: dict) -> str:
    """The ``posteriors`` block of ``docs/benchmarks.md``: the main table, and the study where it was run."""
    lr, lr_final = result["lr"]
    about = DOCS_ABOUT.format(particles=result["particles"], steps=result["steps"], lr=lr, lr_final=lr_final)
    only = "" if "main" in result and "study" in result else " --only " + ("main" if "main" in result else "study")
    parts = [
        "## Real posteriors (`benchmarks/posteriors.py`)",
        f"```bash\npython benchmarks/posteriors.py{only} --docs\n```",
        about,
        C.conditions(result["machine"]),
    ]
    if "main" in result:
        parts.append(C.markdown_table(result["main"], COLUMNS, FMT))
    if "study" in result:
        parts += [
            'Study: narrow, correlated posteriors (`--only study`), guide variants `base="full"` and `init="laplace"`:',
            C.markdown_table(result["study"], ["model", "guide", "variant"] + COLUMNS[2:], FMT),
        ]
    return "\n\n".join(parts)


DEFAULTS_QUICK_GUIDES = ["pyro:normal", "vi:planar"]
DEFAULTS_QUICK_STEPS = 20  # --quick --defaults: fit(num_steps=20), the one departure from fit's defaults
DEFAULTS_COLUMNS = [*COLUMNS[:-1], "steps", "seconds"]
TRAINING_OPTIONS = ["steps", "particles", "lr", "lr_final", "only", "study_flows"]


def docs_text_defaults(result: dict) -> str:
    """The ``posteriors-defaults`` block of ``docs/benchmarks.md``."""
    rows = result["main"]
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    command = "python benchmarks/posteriors.py --defaults" + (" --quick" if result["num_steps"] is not None else "")
    if guides != C.DEFAULT_GUIDES:
        command += " --guides " + " ".join(guides)
    if len(models) < 4 and result["num_steps"] is None:  # --quick runs its own two models
        command += " --models " + " ".join(models)
    about = (
        f"{C.DEFAULTS_ABOUT} The main table's models, references and scores (as in the `posteriors` block; "
        f"`vi_flows.diagnose` with {result['draws']:,} draws); no study. **steps**: the steps `fit` ran (the "
        "stopping rule can end a fit before 2000); **seconds**: wall time of the `fit` call, the automatic start "
        "included. `vi:normal` is `AutoFlow(model)`, the Gaussian base alone; `pyro:iaf` is `AutoIAFNormal(model)`."
    )
    failed = [f"{r['guide']} on {r['model']}: {r['failed']}" for r in rows if r.get("failed")]
    parts = [
        "## Real posteriors with `fit`'s defaults (`benchmarks/posteriors.py --defaults`)",
        f"```bash\n{command} --docs\n```",
        about,
        C.conditions(result["machine"]),
        C.markdown_table(rows, DEFAULTS_COLUMNS, FMT | {"seconds": ".0f"}),
    ]
    if failed:
        parts.append("Failed fits (–): " + "; ".join(failed) + ".")
    return "\n\n".join(parts)


def main_defaults(p, args) -> dict:
    """``--defaults``: the main table only, its own guides, ``posteriors_defaults.*``, block ``posteriors-defaults``."""
    C.refuse_with_defaults(p, args, TRAINING_OPTIONS)
    args.guides = args.guides or (DEFAULTS_QUICK_GUIDES if args.quick else C.DEFAULT_GUIDES)
    unknown = [g for g in args.guides if g not in C.DEFAULT_GUIDES]
    if unknown:
        p.error(f"--defaults: unknown guide(s) {unknown}; choose from {' '.join(C.DEFAULT_GUIDES)}")
    args.draws = args.draws or (200 if args.quick else 4000)
    C.setup(args)
    result = {
        "machine": C.machine(),
        "defaults": True,
        "num_steps": DEFAULTS_QUICK_STEPS if args.quick else None,
        "draws": args.draws,
        "main": main_table(args),
    }
    C.save_json(result, os.path.join(args.out, "posteriors_defaults.json"))
    md = C.markdown_table(result["main"], DEFAULTS_COLUMNS, FMT | {"seconds": ".0f"})
    with open(os.path.join(args.out, "posteriors_defaults.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    if args.docs:
        C.update_docs("posteriors-defaults", docs_text_defaults(result))
    return result


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lr-final", type=float, default=1e-3)
    p.add_argument("--draws", type=int, default=None)
    p.add_argument("--guides", nargs="+", default=None)
    p.add_argument("--models", nargs="+", default=None, help="main-table models to run (default: all)")
    p.add_argument("--study-flows", nargs="+", default=STUDY_FLOWS, help="flow guides of the study")
    p.add_argument("--only", choices=["main", "study"], default=None, help="run one part only")
    p.add_argument("--docs", action="store_true", help="write the tables into docs/benchmarks.md (block posteriors)")
    p.add_argument(
        "--defaults",
        action="store_true",
        help="each guide AutoX(model) trained by vi_flows.fit's defaults only, main table only "
        "(posteriors_defaults.*, block posteriors-defaults); --quick adds num_steps=20",
    )
    args = p.parse_args(argv)
    if args.defaults:
        return main_defaults(p, args)
    args.steps = args.steps or (20 if args.quick else 2000)
    args.draws = args.draws or (200 if args.quick else 4000)
    args.guides = args.guides or (QUICK_GUIDES if args.quick else GUIDES)
    C.setup(args)
    result = {"machine": C.machine(), "steps": args.steps, "particles": args.particles, "lr": [args.lr, args.lr_final]}
    md = []
    if args.only in (None, "main"):
        result["main"] = main_table(args)
        md.append(C.markdown_table(result["main"], COLUMNS, FMT))
    if args.only in (None, "study"):
        result["study"] = study(args)
        md.append(C.markdown_table(result["study"], ["model", "guide", "variant"] + COLUMNS[2:], FMT))
    C.save_json(result, os.path.join(args.out, "posteriors.json"))
    with open(os.path.join(args.out, "posteriors.md"), "w") as f:
        f.write("\n\n".join(md) + "\n")
    print("\n\n".join(md))
    if args.docs:
        C.update_docs("posteriors", docs_text(result))
    return result


if __name__ == "__main__":
    main()
