"""The documentation stays true to the tree: docs/usage.md is what the parsers give, and every relative
link of README.md, CHANGELOG.md and docs/ leads to a file (and heading) that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, re.sub(r"`[^`]*`", "", line)))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lowercased, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")  # a link's text, code's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if heading and not fenced:
            name = slug(heading.group(1))
            found.add(f"{name}-{seen[name]}" if name in seen else name)
            seen[name] = seen.get(name, 0) + 1
    return found


def test_slugs_follow_github():
    assert slug("2026-11-22: Seq2Seq RL over all 29,000 training pairs, with two MLE controls") == \
        "2026-11-22-seq2seq-rl-over-all-29000-training-pairs-with-two-mle-controls"
    assert slug("The tied Transformer (`--tie_embeddings`)") == "the-tied-transformer---tie_embeddings"
    assert slug("Where continue_train.py takes each option from") == "where-continue_trainpy-takes-each-option-from"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_existing_files_and_headings(path):
    broken = []
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not checked here
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}:{number}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}:{number}: {target}: no such heading in {linked.name}")
    assert not broken, "\n".join(broken)


def test_usage_md_is_what_the_parsers_give_now():
    spec = importlib.util.spec_from_file_location("make_usage", ROOT / "docs" / "make_usage.py")
    make_usage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_usage)
    current = make_usage.USAGE.read_text(encoding="utf-8")
    assert make_usage.usage_text(current) == current, "docs/usage.md is out of date: run python docs/make_usage.py"
