"""Write the option tables of docs/usage.md from the scripts' parsers in simple_nmt/cli.py.

    python docs/make_usage.py            # rewrite docs/usage.md below its marker line
    python docs/make_usage.py --check    # exit 1 if docs/usage.md is not what the parsers give now

Everything above the marker line of docs/usage.md is written by hand and kept as it is; everything
below it is generated, one section per script and one table per option group, in the order and with
the help text that ``--help`` prints. ``tests/test_docs.py`` checks that the file is current.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = ROOT / "docs" / "usage.md"
MARKER = ("<!-- Generated below this line by docs/make_usage.py from the parsers in simple_nmt/options.py: "
          "do not edit by hand, run python docs/make_usage.py -->")


def _cell(text: str, code: bool = False) -> str:
    """Text for a Markdown table cell, on one line: in a code span only the table's pipes are escaped,
    elsewhere also the characters Markdown would read as markup or HTML."""
    text = " ".join(text.split())
    if code:
        return text.replace("|", "\\|")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\|*\[\]`])", r"\\\1", text)


def parser_section(script: str, parser: argparse.ArgumentParser) -> list[str]:
    """The Markdown of one script: its description, a table per option group, its epilog."""
    formatter = parser._get_formatter()
    lines = [f"## {script}", "", _cell(parser.description or ""), ""]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            names = ", ".join(f"`{a.option_strings[0]}`" for a in group._group_actions)
            lines += [f"Exactly one of {names} is required.", ""]
    general = [a for g in parser._action_groups if g.title in ("positional arguments", "options")
               for a in g._group_actions]  # argparse's own two groups, shown as one
    groups = [("arguments", general)] + [(g.title, g._group_actions) for g in parser._action_groups
                                         if g.title not in ("positional arguments", "options")]
    for title, group_actions in groups:
        actions = [a for a in group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"### {_cell(title)}", "", "| option | meaning |", "|---|---|"]
        for action in actions:
            invocation = formatter._format_action_invocation(action)
            meaning = formatter._expand_help(action) if action.help else ""
            if action.required:
                meaning += " (required)"
            lines.append(f"| `{_cell(invocation, code=True)}` | {_cell(meaning)} |")
        lines.append("")
    if parser.epilog:
        lines += [_cell(parser.epilog), ""]
    return lines


def generated() -> str:
    """The generated part of docs/usage.md, marker line included."""
    sys.path.insert(0, str(ROOT))
    from simple_nmt.options import average_parser, continue_parser, export_parser, train_parser, translate_parser

    lines = [MARKER, ""]
    for script, parser in (("train.py", train_parser()), ("continue_train.py", continue_parser()),
                           ("translate.py", translate_parser()), ("average_checkpoints.py", average_parser()),
                           ("export_ctranslate2.py", export_parser())):
        lines += parser_section(script, parser)
    return "\n".join(lines).rstrip("\n") + "\n"


def usage_text(current: str) -> str:
    """docs/usage.md as it should be: the hand-written part of ``current`` above the marker, then the tables."""
    if MARKER not in current:
        raise SystemExit(f"{USAGE}: the marker line is missing:\n{MARKER}")
    return current[: current.index(MARKER)] + generated()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that docs/usage.md is current")
    check = p.parse_args(argv).check
    current = USAGE.read_text(encoding="utf-8")
    wanted = usage_text(current)
    if check:
        if wanted != current:
            raise SystemExit(f"{USAGE} is out of date: run python docs/make_usage.py")
        return
    USAGE.write_text(wanted, encoding="utf-8")


if __name__ == "__main__":
    main()
