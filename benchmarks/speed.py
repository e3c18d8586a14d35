"""ms per SVI step and activation memory versus latent dimension: each vi_flows guide against its peer.

Pairs (same family, same size): ``AutoPlanar(K)`` / Pyro ``AutoNormalizingFlow(iterated(K, planar))``,
``AutoRadial(K)`` / the same with ``radial``, ``AutoIAF(2)`` / ``AutoIAFNormal(num_transforms=2, stable=True)``
(both hidden 3d+1), ``AutoNSF(L)`` / ``L`` Pyro ``SplineCoupling`` layers (quadratic order, only the conditioned
half splined, halves reversed between layers), ``AutoRealNVP(L)`` / ``L`` Pyro ``affine_coupling`` layers with
reversals (Pyro has no invertible linear map for vectors, so the vi guide's LU mixing is extra work on its side),
``AutoSylvester(L, num_householder=H)`` / ``iterated(L, sylvester, count_transforms=H)``, ``AutoCNF`` / a guide
on ``zuko.flows.CNF`` at equal tolerances (skipped when zuko is missing, or timed without a peer with
``--cnf-without-peer``). The floor is the same flow in plain torch (no Pyro): draw, forward + log-det, ``log p``,
backward, Adam step. All timings in one process, interleaved in blocks; medians over blocks after warm-up; on
CUDA the clocks are read after ``torch.cuda.synchronize()``.

    python benchmarks/speed.py            # full run
    python benchmarks/speed.py --quick    # CI smoke run
    python benchmarks/speed.py --device cuda --grid gpu --budget 150   # d 10/100/1000 x 1/16/256 particles
"""

from __future__ import annotations

import math
import os
import sys
import time
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms import SplineCoupling, affine_coupling, iterated, sylvester
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.nn import DenseNN
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import vi_flows  # noqa: E402
from vi_flows.transforms import ComposeFlow, Sylvester, coupling_stack, iaf_stack, spline_stack  # noqa: E402
from vi_flows.transforms.continuous import ContinuousFlow  # noqa: E402
from vi_flows.transforms.planar import PlanarStack  # noqa: E402
from vi_flows.transforms.radial import RadialStack  # noqa: E402


def gaussian_model(d: int):
    """``z ~ N(0, diag(s²))`` with scales spread over [0.5, 2]: cheap, so the guide's cost shows."""
    scale = torch.linspace(0.5, 2.0, d)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(d), scale).to_event(1))

    return model, dist.Normal(torch.zeros(d), scale).to_event(1)


class Floor(nn.Module):
    """``z = f(μ + softplus(ρ) ε)`` in plain torch: the math of a guide's step without Pyro."""

    def __init__(self, flow: nn.Module, d: int):
        super().__init__()
        self.flow = flow
        self.loc = nn.Parameter(torch.zeros(d))
        self.rho = nn.Parameter(torch.full((d,), math.log(math.expm1(1.0))))

    def forward(self, target, num_particles: int) -> torch.Tensor:
        eps = torch.randn(num_particles, self.loc.shape[-1])
        scale = nn.functional.softplus(self.rho)
        log_q = -0.5 * (eps * eps).sum(-1) - scale.log().sum() - 0.5 * eps.shape[-1] * math.log(2 * math.pi)
        z, ladj = self.flow.call_and_ladj(self.loc + scale * eps)
        return (log_q - ladj - target.log_prob(z)).mean()


def floor_step(flow: nn.Module, d: int, target, num_particles: int):
    module = Floor(flow, d)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        loss = module(target, num_particles)
        loss.backward()
        opt.step()
        return loss

    return step


class Reverse(TransformModule):
    """Pyro-side reversal of the coordinates between coupling layers (a module, so it sits in a module list)."""

    domain = dist.constraints.real_vector
    codomain = dist.constraints.real_vector
    bijective = True
    volume_preserving = True

    def _call(self, x):
        return x.flip(-1)

    def _inverse(self, y):
        return y.flip(-1)

    def log_abs_det_jacobian(self, x, y):
        return x.new_zeros(x.shape[:-1])


def pyro_couplings(d: int, layers: int, make_layer) -> dist.transforms.ComposeTransformModule:
    parts = []
    for i in range(layers):
        parts += [make_layer(d)] + ([Reverse()] if i < layers - 1 else [])
    return dist.transforms.ComposeTransformModule(parts)


def pyro_spline(d: int, hidden: tuple[int, ...], bins: int, bound: float) -> SplineCoupling:
    """Pyro's rational-quadratic spline coupling, the conditioned half only (as vi_flows' ``SplineCoupling``)."""
    split = d // 2
    n = d - split
    net = DenseNN(split, list(hidden), param_dims=[n * bins, n * bins, n * (bins - 1)])
    return SplineCoupling(d, split, net, bins, bound, order="quadratic", identity=True)


def pairs(
    d: int, k: int, cnf_tol: float, with_cnf: bool, layers: int = 4, hidden: tuple[int, ...] = (64, 64), h: int = 8
) -> list[tuple]:
    """(family, vi guide factory, peer name, peer guide factory or None, floor flow factory).

    Guide factories take the model. ``layers``/``hidden``: spline, coupling and Sylvester stacks;
    ``h``: Householder reflections per Sylvester layer (capped at ``d``; 0: ``d``).
    """
    h = min(h, d) if h else d
    bins, bound = 8, 5.0
    out = [
        (
            f"planar{k}",
            partial(C.make_guide, f"vi:planar{k}"),
            f"pyro:planar{k}",
            partial(C.make_guide, f"pyro:planar{k}"),
            lambda: PlanarStack(d, k),
        ),
        (
            f"radial{k}",
            partial(C.make_guide, f"vi:radial{k}"),
            f"pyro:radial{k}",
            partial(C.make_guide, f"pyro:radial{k}"),
            lambda: RadialStack(d, k),
        ),
        (
            "iaf",
            partial(C.make_guide, "vi:iaf"),
            "pyro:iaf",
            partial(C.make_guide, "pyro:iaf"),
            lambda: iaf_stack(d, 2),
        ),
    ]
    if d >= 2:  # couplings split the vector in two
        out += [
            (
                "spline",
                lambda m: vi_flows.AutoNSF(m, layers, hidden, bins, bound, init_scale=1.0),
                f"pyro:spline_coupling{layers}",
                lambda m: AutoNormalizingFlow(
                    m,
                    partial(
                        pyro_couplings,
                        layers=layers,
                        make_layer=partial(pyro_spline, hidden=hidden, bins=bins, bound=bound),
                    ),
                ),
                lambda: spline_stack(d, layers, hidden, bins, bound),
            ),
            (
                "coupling",
                lambda m: vi_flows.AutoRealNVP(m, layers, hidden, init_scale=1.0),
                f"pyro:affine_coupling{layers}",
                lambda m: AutoNormalizingFlow(
                    m,
                    partial(
                        pyro_couplings, layers=layers, make_layer=partial(affine_coupling, hidden_dims=list(hidden))
                    ),
                ),
                lambda: coupling_stack(d, layers, hidden, linear_init="identity"),
            ),
        ]
    out.append(
        (
            "sylvester",
            lambda m: vi_flows.AutoSylvester(m, layers, num_householder=h, init_scale=1.0),
            f"pyro:sylvester{layers}",
            lambda m: AutoNormalizingFlow(m, partial(iterated, layers, sylvester, count_transforms=h)),
            lambda: ComposeFlow([Sylvester(d, num_householder=h) for _ in range(layers)], d),
        )
    )
    if with_cnf is not False:
        tol = dict(rtol=cnf_tol, atol=cnf_tol)
        peer = partial(C.make_guide, "zuko:cnf", **tol) if with_cnf else None
        out.append(
            (
                "cnf",
                partial(C.make_guide, "vi:cnf", **tol),
                "zuko:cnf" if with_cnf else None,
                peer,
                lambda: ContinuousFlow(d, **tol),
            )
        )
    return out


def cells(args, with_cnf) -> list[tuple[int, int, tuple]]:
    """(d, particles, pair) to time, CNF cells last (the slowest: a budget cut drops them first)."""
    out = []
    for d in args.dims:
        for particles in args.particles:
            for pair in pairs(d, args.k, args.cnf_tol, with_cnf, args.layers, tuple(args.hidden), args.householder):
                family = pair[0]
                if (family == "cnf" and d > args.cnf_max_dim) or (args.families and family not in args.families):
                    continue
                out.append((d, particles, pair))
    return sorted(out, key=lambda c: c[2][0] == "cnf")


def run(args, save=None) -> dict:
    """Time every cell; ``save(result)`` after each row (so a run killed by a timeout keeps its rows)."""
    has_zuko = C.zuko_available()
    with_cnf = True if has_zuko else (None if args.cnf_without_peer else False)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows, skipped = [], []
    note = None
    if not has_zuko:
        note = "zuko is not installed: " + (
            "the CNF rows have no peer (pip install zuko)"
            if args.cnf_without_peer
            else "the CNF comparison was skipped (pip install zuko)"
        )
        print(note)
    result = {
        "machine": C.machine(),
        "device": args.device,
        "rows": rows,
        "skipped": skipped,
        "note": note,
        "k": args.k,
        "layers": args.layers,
        "hidden": list(args.hidden),
        "householder": args.householder,
        "cnf_tol": args.cnf_tol,
    }
    t_start = time.perf_counter()
    for d, particles, (family, make_vi, peer_name, make_peer, make_flow) in cells(args, with_cnf):
        if args.budget and time.perf_counter() - t_start > args.budget:
            skipped.append({"d": d, "particles": particles, "family": family})
            continue
        cnf = family == "cnf"
        model, target = gaussian_model(d)
        pyro.clear_param_store()
        torch.manual_seed(args.seed)
        guides = {"vi": make_vi(model)}
        if make_peer is not None:
            guides["peer"] = make_peer(model)
        fns = {key: C.step_timer(model, g, num_particles=particles) for key, g in guides.items()}
        fns["floor"] = floor_step(make_flow(), d, target, particles)
        steps, repeats = (args.cnf_steps, args.cnf_repeats) if cnf else (args.steps, args.repeats)
        ms = C.interleaved_ms(fns, steps, repeats, sync)
        mem = {key: C.saved_tensor_mb(fn) for key, fn in fns.items()}
        peer_ms = ms.get("peer")
        row = {
            "d": d,
            "particles": particles,
            "family": family,
            "peer": peer_name,
            "vi_ms": ms["vi"],
            "peer_ms": peer_ms,
            "floor_ms": ms["floor"],
            "ratio": ms["vi"] / peer_ms if peer_ms else None,
            "overhead": ms["vi"] / ms["floor"],
            "vi_mb": mem["vi"],
            "peer_mb": mem.get("peer"),
            "floor_mb": mem["floor"],
        }
        if cnf:
            row["vi_nfe"] = getattr(guides["vi"].flow[0], "nfe", None)
        rows.append(row)
        peer_text = f"{peer_ms:8.2f}" if peer_ms else "       –"
        ratio_text = f"{row['ratio']:.2f}" if row["ratio"] else "–"
        print(
            f"d={d:5d} P={particles:3d} {family:9s} vi {ms['vi']:8.2f}  peer {peer_text}  "
            f"floor {ms['floor']:8.2f} ms   ratio {ratio_text}  overhead {row['overhead']:.2f}",
            flush=True,
        )
        if save:
            save(result)
    if skipped:
        print(f"budget of {args.budget:.0f} s spent: {len(skipped)} cell(s) skipped", flush=True)
    result["seconds"] = time.perf_counter() - t_start
    return result


def table(result: dict) -> str:
    cols = [
        "d",
        "particles",
        "family",
        "peer",
        "vi_ms",
        "peer_ms",
        "floor_ms",
        "ratio",
        "overhead",
        "vi_mb",
        "peer_mb",
        "floor_mb",
    ]
    fmt = {c: ".2f" if c.endswith("ms") or c in ("ratio", "overhead") else ".3f" for c in cols[4:]}
    md = C.markdown_table(result["rows"], cols, fmt)
    notes = [result["note"]] if result["note"] else []
    if result.get("skipped"):
        cut = ", ".join(f"{c['family']} d={c['d']} P={c['particles']}" for c in result["skipped"])
        notes.append(f"Not timed (the --budget of the run was spent): {cut}.")
    return md + "".join(f"\n\n{n}" for n in notes)


DOCS_ABOUT = (
    "ms per SVI step (`Trace_ELBO`, vectorized particles, Adam) of each vi_flows guide (**vi**) and its **peer** of "
    "the same family and size (the pairs are listed in the script's docstring), and of the **floor**: the same "
    "flow in plain torch (draw, forward + log-det, `log p`, backward, Adam; no Pyro). The model is "
    "`z ~ N(0, diag(s²))` with s spread over [0.5, 2], so the guide dominates. The three of a row run in one "
    "process, interleaved in blocks after warm-up; medians over blocks. **ratio** = vi / peer (target ≤ 1.0), "
    "**overhead** = vi / floor (target ≤ 1.5 for d ≥ 100). **MB**: distinct storage autograd saves for backward "
    "in one step (activation memory)."
)


def summary(result: dict) -> str:
    """Per family: the range of vi / peer over every row and of vi / floor over the rows with d ≥ 100."""

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}–{max(values):.2f}" if values else "–"

    lines = ["| family | ratio vi / peer, all d and particles | overhead vi / floor, d ≥ 100 |", "|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["family"] == family]
        ratio = span([r["ratio"] for r in rows if r.get("ratio") is not None])
        overhead = span([r["overhead"] for r in rows if r["d"] >= 100 and r.get("overhead") is not None])
        lines.append(f"| {family} | {ratio} | {overhead} |")
    return "\n".join(lines)


def docs_text(result: dict) -> str:
    """The ``speed`` block of ``docs/benchmarks.md``."""
    return "\n\n".join(
        [
            "## Speed versus latent dimension (`benchmarks/speed.py`)",
            "```bash\npython benchmarks/speed.py --docs      # d = 2, 10, 100, 1000; 1 and 16 particles\n```",
            DOCS_ABOUT,
            C.conditions(result["machine"]),
            table(result),
            summary(result),
        ]
    )


GRIDS = {"gpu": ([10, 100, 1000], [1, 16, 256])}


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--particles", type=int, nargs="+", default=None)
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default=None,
        help="preset dims x particles (gpu: d 10/100/1000 x 1/16/256 particles, CNF up to d = 1000)",
    )
    p.add_argument("--k", type=int, default=16, help="planar/radial layers")
    p.add_argument("--layers", type=int, default=4, help="spline/coupling/Sylvester layers")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="spline/coupling networks' widths")
    p.add_argument(
        "--householder",
        type=int,
        default=8,
        help="Householder reflections per Sylvester layer, capped at d (0: d, AutoSylvester's default)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per guide")
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="run only these families (planar16 radial16 iaf spline coupling sylvester cnf)",
    )
    p.add_argument("--cnf-tol", type=float, default=1e-3)
    p.add_argument("--cnf-max-dim", type=int, default=None, help="largest d of the CNF rows (default 100; gpu 1000)")
    p.add_argument("--cnf-steps", type=int, default=None)
    p.add_argument("--cnf-repeats", type=int, default=None)
    p.add_argument("--cnf-without-peer", action="store_true", help="without zuko, time AutoCNF anyway (no ratio)")
    p.add_argument("--budget", type=float, default=0, help="seconds; cells not started by then are listed as skipped")
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md (block speed)")
    args = p.parse_args(argv)
    q = args.quick
    grid_dims, grid_particles = GRIDS.get(args.grid, (None, None))
    args.dims = args.dims or grid_dims or ([2, 10] if q else [2, 10, 100, 1000])
    args.particles = args.particles or grid_particles or ([4] if q else [1, 16])
    args.cnf_max_dim = args.cnf_max_dim or (max(args.dims) if args.grid else 100)
    args.steps = args.steps or (2 if q else 20)
    args.repeats = args.repeats or (2 if q else 5)
    args.cnf_steps = args.cnf_steps or (1 if q else 3)
    args.cnf_repeats = args.cnf_repeats or (1 if q else 3)
    if q:
        args.k = min(args.k, 4)
        args.layers = min(args.layers, 2)
        args.hidden = [min(h, 16) for h in args.hidden]
        args.cnf_max_dim = min(args.cnf_max_dim, 2)
        args.cnf_tol = max(args.cnf_tol, 1e-2)
    C.setup(args)
    path = os.path.join(args.out, "speed.json")
    result = run(args, save=lambda r: C.save_json(r, path))
    C.save_json(result, path)
    md = table(result)
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    if args.docs:
        C.update_docs("speed", docs_text(result))
    return result


if __name__ == "__main__":
    main()
