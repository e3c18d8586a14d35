"""Every ```python block in docs/*.md and README.md runs, so the documentation cannot rot.

Blocks of one page run in order in one namespace (a page reads like a
session). A block whose first line is ``# doctest: skip`` is not run: use it
only for code that needs data or a GPU this test cannot have. Blocks run in a
scratch folder, with ``pyro.clear_param_store()`` before each page.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pyro
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = "# doctest: skip"


def blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each python block of ``page``."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_extractor_finds_blocks_and_skips_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\n# doctest: skip\nboom()\n```\n")
    found = blocks(page)
    assert [line for line, _ in found] == [3, 10]
    assert found[0][1] == "x = 1\n" and found[1][1].startswith(SKIP)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    found = blocks(page)
    if not found:
        pytest.skip(f"{page.name} has no python blocks")
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in found:
        if code.lstrip().startswith(SKIP):
            continue
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, block at line {line} failed: {type(e).__name__}: {e}") from e


def test_readme_five_lines_run(tmp_path, monkeypatch):
    """The README's "Five lines" block, with a model and data defined first (it assumes them)."""
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five lines", 1)[1]
    code = FENCE.search(section).group(1).replace("num_steps=2000", "num_steps=50")
    setup = (
        "import torch, pyro, pyro.distributions as dist\n"
        "def model(y):\n"
        "    mu = pyro.sample('mu', dist.Normal(0., 10.))\n"
        "    with pyro.plate('n', len(y)):\n"
        "        pyro.sample('y', dist.Normal(mu, 1.), obs=y)\n"
        "data = torch.tensor([1.0, 2.0, 0.5])\n"
    )
    pyro.clear_param_store()
    exec(compile(setup + code, "README.md:five-lines", "exec"), {"__name__": "readme"})
