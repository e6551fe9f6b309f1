"""README's examples run as written."""

from __future__ import annotations

import re

from conftest import ROOT


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].endswith("python examples/quickstart.py")
    assert block[1].endswith("python -m pytest -q tests")
    assert "python -m pytest -q tests" in (ROOT / ".ci" / "run").read_text()


def test_research_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## RL fine-tuning in research code.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'reward'" in printed and "'no_eos'" in printed
