"""Guards on the private internals of other libraries that vi_flows uses (all in vi_flows._internals).

Each test fails loudly, naming the function to fix, when an installed library moves or changes what it
relies on; nothing else in the package reaches into them.
"""

import ast
import pathlib

import pytest
import torch

from vi_flows import _internals

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vi_flows"


def test_torchdiffeq_methods_come_from_its_private_solver_table():
    pytest.importorskip("torchdiffeq")
    import torchdiffeq

    methods = _internals.torchdiffeq_methods()
    assert {"dopri5", "rk4", "euler", "adaptive_heun"} <= set(methods), (
        f"torchdiffeq {torchdiffeq.__version__} changed torchdiffeq._impl.odeint.SOLVERS: "
        "fix vi_flows._internals.torchdiffeq_methods"
    )
    y = torch.zeros(1)
    for method in ("dopri5", "bosh3"):  # the table is what odeint accepts
        torchdiffeq.odeint(lambda t, y: -y, y, torch.tensor([0.0, 0.1]), method=method)
    with pytest.raises(ValueError, match="Invalid method"):
        torchdiffeq.odeint(lambda t, y: -y, y, torch.tensor([0.0, 0.1]), method="no-such-method")


def test_torchdiffeq_fixed_grid_methods_are_the_fixed_step_solvers():
    pytest.importorskip("torchdiffeq")
    fixed = _internals.torchdiffeq_fixed_grid_methods()
    assert {"euler", "midpoint", "rk4"} <= fixed and not {"dopri5", "dopri8", "bosh3"} & fixed, (
        "torchdiffeq changed torchdiffeq._impl.solvers.FixedGridODESolver: "
        "fix vi_flows._internals.torchdiffeq_fixed_grid_methods"
    )


def test_version_counter_grows_with_in_place_changes_only():
    p = torch.nn.Parameter(torch.zeros(3))
    before = _internals.version_counter(p)
    assert isinstance(before, int), "Tensor._version is gone: fix vi_flows._internals.version_counter"
    _ = p * 2
    assert _internals.version_counter(p) == before
    p.grad = torch.ones(3)
    torch.optim.SGD([p], lr=0.1).step()  # what FlowTransform's cache must notice
    assert _internals.version_counter(p) > before, "Tensor._version no longer counts in-place changes"


def _private_uses(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and "._impl" in f".{node.module}":
            found.append(f"{path.name}:{node.lineno} from {node.module} import")
        if isinstance(node, ast.Attribute) and node.attr == "_version":
            found.append(f"{path.name}:{node.lineno} ._version")
    return found


OWNED = ["transforms/continuous.py", "transforms/autoregressive.py", "transforms/networks.py", "transforms/_ode.py"]


@pytest.mark.parametrize("name", OWNED)
def test_private_internals_are_used_only_through_vi_flows_internals(name):
    assert _private_uses(PACKAGE / name) == []
    assert _private_uses(PACKAGE / "_internals.py")  # the one place they are
