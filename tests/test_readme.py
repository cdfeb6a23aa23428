"""The README's example of the interp modules on a HookedTransformer + SAELens SAE runs as written."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- tested by tests/test_readme.py -->"


def test_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MARK in text
    block = re.search(r"```python\n(.*?)```", text.split(MARK, 1)[1], re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example uses paths relative to the repository root
    try:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "saint-malo" in out and "<eos>" in out
    assert out.strip().splitlines()[-1].startswith("saint")
