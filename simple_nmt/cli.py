"""The entry points of the scripts (train.py, continue_train.py, translate.py, average_checkpoints.py,
export_ctranslate2.py): parse, run, and report a user's mistake as one line."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from simple_nmt.checkpoint import CheckpointError, average_checkpoints, save_checkpoint
from simple_nmt.config import (
    Config,
    ConfigError,
    ExportOptions,
    TranslateOptions,
)
from simple_nmt.ctranslate2 import CTranslate2Error, export, load_ctranslate2
from simple_nmt.data import (
    DataError,
    read_lines,
)
from simple_nmt.distributed import process_group
from simple_nmt.hf import HuggingFaceError
from simple_nmt.loading import check_translatable, load
from simple_nmt.options import average_parser, continue_parser, export_parser, train_parser, translate_parser
from simple_nmt.precision import PrecisionError
from simple_nmt.runs import check_output_path, check_training_outputs, continue_training, pick_device, run_training
from simple_nmt.trainer import (
    NonFiniteLossError,
    TrainingInterrupted,
)


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def reported_errors() -> Iterator[None]:
    """User errors as one line on stderr and exit status 1; Ctrl-C or SIGTERM (checkpoint saved) as 128 + signal;
    warnings as one line on stderr."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            yield
    except (DataError, CheckpointError, ConfigError, NonFiniteLossError, PrecisionError, HuggingFaceError,
            CTranslate2Error) as e:
        _fail(str(e))
    except TrainingInterrupted as e:
        _fail(str(e), code=128 + e.signum)  # 130 for Ctrl-C, 143 for SIGTERM


def main_train(argv: Sequence[str] | None = None) -> None:
    """Entry point of train.py."""
    given = vars(train_parser().parse_args(argv))
    with reported_errors():
        config = Config.from_dict(given)
        check_training_outputs(config)
        with process_group(use_gpu=config.gpu_id >= 0):
            run_training(config, None, rl_only=False)


def main_continue(argv: Sequence[str] | None = None) -> None:
    """Entry point of continue_train.py: resume the checkpoint's phase, or RL if --rl_n_epochs is given."""
    given = vars(continue_parser().parse_args(argv))  # bad values are reported before any work
    load_fn = given.pop("load_fn", None)
    reset_optimizer = given.pop("reset_optimizer", False)  # not kept in the new checkpoints' config
    with reported_errors():
        continue_training(given, load_fn, reset_optimizer)


def main_translate(argv: Sequence[str] | None = None) -> None:
    """Entry point of translate.py."""
    given = vars(translate_parser().parse_args(argv))
    with reported_errors():
        config = TranslateOptions.from_dict(given)  # options that do not fit together: one line
        check_output_path(config.output, "--output")
        if config.ctranslate2:
            loaded = load_ctranslate2(config.ctranslate2, pick_device(config.gpu_id), config.precision)
        else:
            loaded = load(config.model_fn or config.hf_model, pick_device(config.gpu_id), config.precision,
                          tgt_lang=config.hf_tgt_lang)
        if config.input:
            lines, _ = read_lines(config.input, "replace")
        else:
            lines = [line.rstrip("\r\n") for line in sys.stdin.buffer.read().decode("utf-8", "replace").split("\n")]
            if lines and lines[-1] == "":
                lines.pop()
        torch.manual_seed(config.seed)  # the samples of --mbr
        outputs = loaded.translate_n_best(lines, config)
    text = "".join("\t".join(per_line) + "\n" for per_line in outputs)
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(text, encoding="utf-8")
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader has gone (e.g. `| head -1`): end quietly, without a second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main_average(argv: Sequence[str] | None = None) -> None:
    """Entry point of average_checkpoints.py."""
    config = vars(average_parser().parse_args(argv))
    with reported_errors():
        check_output_path(config["output"], "--output")
        if any(Path(p).resolve() == Path(config["output"]).resolve() for p in config["inputs"]):
            raise ConfigError(f"--output {config['output']} is one of the inputs; write the average elsewhere")
        save_checkpoint(average_checkpoints(config["inputs"], check=check_translatable), config["output"])
    print(f"{config['output']}: the average of {len(config['inputs'])} checkpoints")


def main_export(argv: Sequence[str] | None = None) -> None:
    """Entry point of export_ctranslate2.py."""
    given = vars(export_parser().parse_args(argv))
    with reported_errors():
        options = ExportOptions.from_dict(given)
        source = options.model_fn or options.hf_model
        path = export(source, options.output_dir, options.quantization, options.max_positions, options.force)
    print(f"{path}: the CTranslate2 model of {source} ({options.quantization or 'weights as stored'})")
