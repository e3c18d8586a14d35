"""``import vi_flows`` stays light: pandas, scipy, torchdiffeq and ArviZ load on first use, not at import.

They took ``import vi_flows`` to about twice ``import pyro`` (6 s against 3 s); the names that need them
(``diagnose``, ``fit_density``, ``AmortizedFlow``, ``transforms.ContinuousFlow``, ...) import them when first used.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("pandas", "scipy", "torchdiffeq", "arviz")
PROBE = f"""
import json, sys
import vi_flows, vi_flows.guides, vi_flows.training
loaded = [m for m in {HEAVY!r} if m in sys.modules]
from vi_flows import AmortizedFlow, diagnose, fit_density, loo
from vi_flows.transforms import ContinuousFlow
import vi_flows.transforms as transforms
assert transforms.ContinuousFlow is ContinuousFlow and "diagnose" in dir(vi_flows)
print(json.dumps(loaded))
"""


def test_import_does_not_load_pandas_scipy_torchdiffeq_or_arviz_and_the_lazy_names_still_import():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
