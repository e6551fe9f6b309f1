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


def test_setup_lower_bounds_are_the_versions_the_readme_says_were_checked():
    setup = (ROOT / "setup.py").read_text()
    install = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
    bounds = dict(re.findall(r'"([\w-]+)>=([\w.]+)', install))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Supported versions"):readme.index("## Tests")]
    checked = dict(re.findall(r"^\| ([\w-]+) \| ([\w.]+) \|$", section, re.M))
    assert bounds == checked and len(bounds) == 6


def test_hugging_face_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Hugging Face example, on a tiny Marian model saved where it looks (nothing downloaded)."""
    from hf_tiny import make_model, make_tokenizer

    from simple_nmt.hf import HuggingFaceModel

    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Hugging Face models.*?```python\n(.*?)```", text, re.S).group(1)
    words = sorted(set(re.findall(r"[a-zA-Z]+", " ".join(re.findall(r'\("([^"]+)", "([^"]+)"\)', code)[0]
                                                                + re.findall(r'\("([^"]+)", "([^"]+)"\)', code)[1]))))
    HuggingFaceModel(make_model("marian", std=0.1, words=words), make_tokenizer("marian", words)).save_pretrained(
        tmp_path / "opus-mt-en-de")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'reward'" in printed and "'no_eos'" in printed
    assert (tmp_path / "opus-mt-en-de.rl" / "config.json").is_file()
