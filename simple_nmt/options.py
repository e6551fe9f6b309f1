"""The command lines of the scripts, generated from ``simple_nmt.config``: one argparse flag per option."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from simple_nmt.config import (
    CONFIG_GROUPS,
    FIXED,
    INHERITED,
    LOCAL,
    Config,
    ExportOptions,
    TranslateOptions,
    check_value,
    value_type,
)


def _parse_text(f: dataclasses.Field, hint: Any) -> Callable[[str], Any]:
    """argparse's ``type`` for option ``f``: the text converted and checked like a value given in Python."""
    kind, _ = value_type(hint)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            return check_value(f, hint, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_option(group: argparse._ActionsContainer, f: dataclasses.Field, hint: Any, required: bool = False,
               show_default: bool = True) -> None:
    """The command-line flag of one option (and its aliases); nothing is set when it is not given,
    so that the parsed namespace holds exactly the options written on the command line."""
    kind, _ = value_type(hint)
    help_text = f.metadata["help"] + ("" if f.default is None or not show_default else f" (default: {f.default})")
    if kind is bool:
        group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
    else:
        choices = f.metadata["choices"]
        group.add_argument(f"--{f.name}", type=_parse_text(f, hint), default=argparse.SUPPRESS,
                           required=required, help=help_text,
                           metavar="{" + ",".join(map(str, choices)) + "}" if choices else None)
    for alias, value in f.metadata["aliases"].items():
        group.add_argument(f"--{alias}", dest=f.name, action="store_const", const=value,
                           default=argparse.SUPPRESS, help=f"same as --{f.name} {value}")


def train_parser() -> argparse.ArgumentParser:
    """train.py's options, generated from ``simple_nmt.config``, a group per option class."""
    p = argparse.ArgumentParser(description="Train an NMT model by maximum likelihood (then RL, with --rl_n_epochs).")
    hints, seen = typing.get_type_hints(Config), set()
    for cls in CONFIG_GROUPS:
        group = p.add_argument_group(cls.__doc__)
        for f in dataclasses.fields(cls):
            if f.name not in seen:  # a group class also has its bases' fields (RunOptions: DeviceOptions')
                add_option(group, f, hints[f.name], required=f.name == "model_fn")
                seen.add(f.name)
    return p


CONTINUE_GROUPS = {
    FIXED: "fixed by the checkpoint (architecture, vocabularies, tokenizers): a different value is an error",
    INHERITED: "taken from the checkpoint unless given here (data, training, RL)",
    LOCAL: "from this command line and its defaults only, never from the checkpoint",
}


def continue_parser() -> argparse.ArgumentParser:
    """continue_train.py's options: train.py's, grouped by where they come from, and ``--load_fn``."""
    p = argparse.ArgumentParser(
        description="Resume training from a checkpoint, or fine-tune it with RL when --rl_n_epochs is given.",
        epilog="From the checkpoint come the architecture, the vocabularies and tokenizers, the data, training "
               "and RL settings not given here, and (to resume exactly) the optimizer, schedule and epoch count. "
               "Where to run, what to log and where to write come from this command line and its defaults.",
    )
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--load_fn", help="the checkpoint to start from")
    p.add_argument("--reset_optimizer", action="store_true", default=argparse.SUPPRESS,
                   help="keep only the checkpoint's weights and vocabularies: a fresh optimizer, schedule and "
                        "epoch count, e.g. to train --n_epochs more MLE epochs at a new --lr")
    hints = typing.get_type_hints(Config)
    groups = {source: p.add_argument_group(title) for source, title in CONTINUE_GROUPS.items()}
    for f in dataclasses.fields(Config):
        source = f.metadata["source"]
        group = start if f.name == "hf_model" else groups[source]  # where to start from: one of the two
        add_option(group, f, hints[f.name], required=f.name == "model_fn", show_default=source == LOCAL)
    return p


def options_parser(options: type, description: str, sources: tuple[str, ...], required: tuple[str, ...] = ()
                   ) -> argparse.ArgumentParser:
    """A script's options, generated from the option class ``options``: exactly one of ``sources`` (what to
    read the model from) is given, and every one of ``required``."""
    p = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(options)
    group = p.add_argument_group(options.__doc__)
    model = group.add_mutually_exclusive_group(required=True)
    for f in dataclasses.fields(options):
        add_option(model if f.name in sources else group, f, hints[f.name], required=f.name in required)
    return p


def translate_parser() -> argparse.ArgumentParser:
    """translate.py's options, generated from ``simple_nmt.config.TranslateOptions``: a checkpoint, a Hugging Face
    model folder or a CTranslate2 model folder."""
    return options_parser(TranslateOptions, "Translate stdin (or --input) to stdout (or --output), line by line.",
                          ("model_fn", "hf_model", "ctranslate2"))


def export_parser() -> argparse.ArgumentParser:
    """export_ctranslate2.py's options, generated from ``simple_nmt.config.ExportOptions``."""
    return options_parser(ExportOptions, "Export a checkpoint's Transformer, or a Hugging Face model, to a "
                                         "CTranslate2 model folder (translate.py --ctranslate2 translates with it).",
                          ("model_fn", "hf_model"), required=("output_dir",))


def average_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Average the weights of checkpoints of one run, e.g. its last epochs.")
    p.add_argument("inputs", nargs="+", help="checkpoints to average, e.g. runs/model.epoch{21..30}.pth")
    p.add_argument("--output", required=True, help="the averaged checkpoint to write")
    return p
