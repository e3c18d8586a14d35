"""ms per SVI step and activation memory versus latent dimension: each vi_flows guide against its peer.

Pairs (same family, same size): ``AutoPlanar(K)`` / Pyro ``AutoNormalizingFlow(iterated(K, planar))``,
``AutoRadial(K)`` / the same with ``radial``, ``AutoIAF(2)`` / ``AutoIAFNormal(num_transforms=2, stable=True)``
(both hidden 3d+1), ``AutoCNF`` / a guide on ``zuko.flows.CNF`` at equal tolerances (skipped when zuko is
missing). The floor is the same flow in plain torch (no Pyro): draw, forward + log-det, ``log p``, backward,
Adam step. All timings in one process, interleaved in blocks; medians over blocks after warm-up.

    python benchmarks/speed.py            # full run
    python benchmarks/speed.py --quick    # CI smoke run
"""

from __future__ import annotations

import math
import os
import sys

import pyro
import pyro.distributions as dist
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from vi_flows.transforms import iaf_stack  # noqa: E402
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


def pairs(d: int, k: int, cnf_tol: float, with_cnf: bool) -> list[tuple[str, str, str, dict, callable]]:
    """(family, vi name, peer name, vi options, floor flow factory)."""
    out = [
        (f"planar{k}", f"vi:planar{k}", f"pyro:planar{k}", {}, lambda: PlanarStack(d, k)),
        (f"radial{k}", f"vi:radial{k}", f"pyro:radial{k}", {}, lambda: RadialStack(d, k)),
        ("iaf", "vi:iaf", "pyro:iaf", {}, lambda: iaf_stack(d, 2)),
    ]
    if with_cnf:
        tol = dict(rtol=cnf_tol, atol=cnf_tol)
        out.append(("cnf", "vi:cnf", "zuko:cnf", tol, lambda: ContinuousFlow(d, **tol)))
    return out


def run(args) -> dict:
    has_zuko = C.zuko_available()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    for d in args.dims:
        model, target = gaussian_model(d)
        for particles in args.particles:
            for family, vi_name, peer_name, options, make_flow in pairs(d, args.k, args.cnf_tol, has_zuko):
                cnf = family == "cnf"
                if (cnf and d > args.cnf_max_dim) or (args.families and family not in args.families):
                    continue
                pyro.clear_param_store()
                torch.manual_seed(args.seed)
                guides = {
                    "vi": C.make_guide(vi_name, model, **dict(options)),
                    "peer": C.make_guide(peer_name, model, **dict(options)),
                }
                fns = {key: C.step_timer(model, g, num_particles=particles) for key, g in guides.items()}
                fns["floor"] = floor_step(make_flow(), d, target, particles)
                steps, repeats = (args.cnf_steps, args.cnf_repeats) if cnf else (args.steps, args.repeats)
                ms = C.interleaved_ms(fns, steps, repeats, sync)
                mem = {key: C.saved_tensor_mb(fn) for key, fn in fns.items()}
                row = {
                    "d": d,
                    "particles": particles,
                    "family": family,
                    "peer": peer_name,
                    "vi_ms": ms["vi"],
                    "peer_ms": ms["peer"],
                    "floor_ms": ms["floor"],
                    "ratio": ms["vi"] / ms["peer"],
                    "overhead": ms["vi"] / ms["floor"],
                    "vi_mb": mem["vi"],
                    "peer_mb": mem["peer"],
                    "floor_mb": mem["floor"],
                }
                if cnf:
                    row["vi_nfe"] = getattr(guides["vi"].flow[0], "nfe", None)
                rows.append(row)
                print(
                    f"d={d:5d} P={particles:3d} {family:9s} vi {ms['vi']:8.2f}  peer {ms['peer']:8.2f}  "
                    f"floor {ms['floor']:8.2f} ms   ratio {row['ratio']:.2f}  overhead {row['overhead']:.2f}",
                    flush=True,
                )
    note = None if has_zuko else "zuko is not installed: the CNF comparison was skipped (pip install zuko)"
    if note:
        print(note)
    return {"machine": C.machine(), "rows": rows, "note": note, "k": args.k, "cnf_tol": args.cnf_tol}


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
    return md + (f"\n\n{result['note']}" if result["note"] else "")


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--particles", type=int, nargs="+", default=None)
    p.add_argument("--k", type=int, default=16, help="planar/radial layers")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per guide")
    p.add_argument("--families", nargs="+", default=None, help="run only these families (e.g. planar16 cnf)")
    p.add_argument("--cnf-tol", type=float, default=1e-3)
    p.add_argument("--cnf-max-dim", type=int, default=100)
    p.add_argument("--cnf-steps", type=int, default=None)
    p.add_argument("--cnf-repeats", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.dims = args.dims or ([2, 10] if q else [2, 10, 100, 1000])
    args.particles = args.particles or ([4] if q else [1, 16])
    args.steps = args.steps or (2 if q else 20)
    args.repeats = args.repeats or (2 if q else 5)
    args.cnf_steps = args.cnf_steps or (1 if q else 3)
    args.cnf_repeats = args.cnf_repeats or (1 if q else 3)
    if q:
        args.k = min(args.k, 4)
        args.cnf_max_dim = min(args.cnf_max_dim, 2)
        args.cnf_tol = max(args.cnf_tol, 1e-2)
    C.setup(args)
    result = run(args)
    C.save_json(result, os.path.join(args.out, "speed.json"))
    md = table(result)
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
