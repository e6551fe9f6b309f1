"""README's commands and versions; every code block of README.md and docs/ marked runnable runs as written.

A block is runnable when the line before its opening ```python is the marker ``<!-- runnable -->``
(an HTML comment, invisible on the repository page). Mark only blocks that run in a few seconds
without data or network. A block that loads ``HuggingFaceModel.from_pretrained("NAME")`` gets a tiny
Marian model saved as NAME in the folder it runs in (nothing is downloaded).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

RUNNABLE = "<!-- runnable -->"


def markdown_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def runnable_blocks() -> list[tuple[str, str]]:
    """(FILE:LINE of the block's first line of code, its code) for every block marked runnable."""
    blocks = []
    for path in markdown_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != RUNNABLE:
                continue
            where = f"{path.relative_to(ROOT)}:{i + 3}"
            assert i + 1 < len(lines) and lines[i + 1] == "```python", f"{where}: {RUNNABLE} must precede ```python"
            end = lines.index("```", i + 2)
            blocks.append((where, "\n".join(lines[i + 2: end]) + "\n"))
    return blocks


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].endswith("python examples/quickstart.py")
    assert block[1].endswith("python -m pytest -q tests")
    assert "python -m pytest -q tests" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_python_examples_are_marked_runnable():
    text = (ROOT / "README.md").read_text()
    for section in ("## RL fine-tuning in research code", "## Hugging Face models"):
        body = re.search(rf"^{section}\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
        assert f"{RUNNABLE}\n```python\n" in body, section


def save_tiny_hf_models(code: str, folder: Path) -> None:
    """A tiny Marian model for each ``from_pretrained("NAME")`` of ``code``, saved as ``folder / NAME``, whose
    word-level tokenizer knows the words of the block's string literals."""
    pytest.importorskip("transformers")
    from hf_tiny import make_model, make_tokenizer

    from simple_nmt.hf import HuggingFaceModel

    words = sorted(set(re.findall(r"[a-zA-Z]+", " ".join(re.findall(r'"([^"]*)"', code)))))
    for name in re.findall(r'from_pretrained\("([^"]+)"\)', code):
        HuggingFaceModel(make_model("marian", std=0.1, words=words), make_tokenizer("marian", words)).save_pretrained(
            folder / name)


@pytest.mark.parametrize("where, code", runnable_blocks(), ids=[where for where, _ in runnable_blocks()])
def test_runnable_block_runs(where, code, tmp_path, monkeypatch, capsys):
    if "from_pretrained(" in code:
        save_tiny_hf_models(code, tmp_path)
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays in the test's folder
    exec(compile(code, where, "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    if "MinimumRiskTrainingEngine" in code and "engine.state.output" in code:
        assert "'reward'" in printed and "'no_eos'" in printed
    for name in re.findall(r'save_pretrained\("([^"]+)"\)', code):
        assert (tmp_path / name / "config.json").is_file()


def test_setup_lower_bounds_are_the_versions_the_readme_says_were_checked():
    setup = (ROOT / "setup.py").read_text()
    install = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
    bounds = dict(re.findall(r'"([\w-]+)>=([\w.]+)', install))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Supported versions"):readme.index("## Tests")]
    checked = dict(re.findall(r"^\| ([\w-]+) \| ([\w.]+) \|$", section, re.M))
    assert bounds == checked and len(bounds) == 6
