"""Eight schools, centered: the funnel where mean-field VI fails, and what PSIS k-hat says about it.

The centered parameterization couples ``theta`` and ``tau`` in a funnel. A
factorized Gaussian (AutoNormal) cannot follow it; flows bend with it and
reach a higher ELBO and IWAE bound. For each guide: ELBO, IWAE bound and k-hat
(< 0.5 good, > 0.7 unreliable), then the ArviZ summary of the guide with the
highest IWAE bound. In our full runs (3000 steps, seed 0) AutoPlanar(16) gained
1.5 nats of ELBO over AutoNormal, yet every guide kept k-hat > 0.7: the
funnel's neck (small ``tau``) is still missed, which the ELBO alone would not
reveal. Non-centering the model is the real fix.

    python examples/eight_schools.py           # about 1 min of CPU time
    python examples/eight_schools.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import pyro
import torch
from pyro.infer.autoguide import AutoNormal

from vi_flows import AutoIAF, AutoPlanar, diagnose, fit, to_inference_data
from vi_flows.demo import eight_schools
from vi_flows.diagnostics import summary


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 steps per guide (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 200 if args.quick else 3000
    draws = 1000 if args.quick else 10000
    guides = {
        "AutoNormal": AutoNormal,
        "AutoPlanar(16)": lambda m: AutoPlanar(m, num_flows=16),
        "AutoIAF(2)": lambda m: AutoIAF(m, num_flows=2, hidden_dims=(32, 32)),
    }
    rows, fitted = [], {}
    for name, make in guides.items():
        pyro.clear_param_store()
        guide = make(eight_schools)
        start = time.perf_counter()
        fit(
            eight_schools,
            guide,
            num_steps=steps,
            lr=2e-2,
            lr_decay=0.1,
            num_particles=4,
            seed=args.seed,
            progress=False,
            tol=None,
        )
        diag = diagnose(eight_schools, guide, num_samples=draws, seed=args.seed)
        rows.append(
            {
                "guide": name,
                "seconds": round(time.perf_counter() - start, 1),
                "ELBO": round(diag.elbo, 2),
                "IWAE": round(diag.iwae, 2),
                "k_hat": round(diag.khat, 2),
                "reading": diag.reading,
            }
        )
        fitted[name] = guide
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    best = table.loc[table["IWAE"].idxmax(), "guide"]
    idata = to_inference_data(eight_schools, fitted[best], num_samples=draws, seed=args.seed)
    print(f"\nArviZ summary of {best} (highest IWAE bound):")
    print(summary(idata, kind="stats").to_string())
    return table


if __name__ == "__main__":
    main()
