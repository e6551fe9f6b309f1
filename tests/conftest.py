"""Shared fixtures: a small generated corpus and tiny model settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simple_nmt.toy import write_corpus

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated corpus: train (600 pairs), valid (40), test (40)."""
    return write_corpus(tmp_path_factory.mktemp("toy"), {"train": 600, "valid": 40, "test": 40}, seed=3)


@pytest.fixture(scope="session")
def tiny_checkpoint(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Transformer trained by train.py for two epochs on the toy corpus (Adam)."""
    from simple_nmt import cli

    model_fn = tmp_path_factory.mktemp("tiny") / "mle.pth"
    run_main(cli.main_train, "--model_fn", str(model_fn), "--train", str(toy_dir / "train"), "--valid",
             str(toy_dir / "valid"), "--max_length", "30", "--verbose", "0", "--optimizer", "adam", "--lr", "3e-3",
             "--n_epochs", "2", *TINY_TRANSFORMER)
    return model_fn


# tiny model sizes, as config entries (engine tests) and as command-line options (script tests)
TINY = {
    "transformer": {"use_transformer": True, "hidden_size": 32, "n_layers": 1, "n_splits": 2, "dropout": 0.0},
    "seq2seq": {"use_transformer": False, "word_vec_size": 32, "hidden_size": 64, "n_layers": 1, "dropout": 0.0},
}
TINY_TRANSFORMER = ["--use_transformer", "--hidden_size", "32", "--n_layers", "1", "--n_splits", "2",
                    "--dropout", "0.1"]
TINY_SEQ2SEQ = ["--word_vec_size", "16", "--hidden_size", "32", "--n_layers", "1", "--dropout", "0.1"]


def make_tiny_model(cls: type, src_vocab: int, tgt_vocab: int, seed: int = 0) -> torch.nn.Module:
    """A small Seq2Seq or Transformer with 2 layers, in eval mode."""
    from simple_nmt.models import Seq2Seq

    torch.manual_seed(seed)
    if cls is Seq2Seq:
        return Seq2Seq(src_vocab, tgt_vocab, word_vec_size=16, hidden_size=32, n_layers=2, dropout=0.1).eval()
    return cls(src_vocab, tgt_vocab, hidden_size=32, n_splits=4, n_layers=2, dropout=0.1).eval()


def run_script(script: str, *args: str, stdin: str | None = None, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_main(main, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Call a script's entry point (``simple_nmt.cli.main_*``) in this process, as ``run_script`` runs the
    script: its exit status and what it printed. Faster than a subprocess, for the tests of error paths."""
    import contextlib
    import io

    out, err, code = io.StringIO(), io.StringIO(), 0
    old_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.stdin = old_stdin
    if check and code != 0:
        raise AssertionError(f"{main.__name__} failed ({code}):\n{out.getvalue()}\n{err.getvalue()}")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_in_process(script: str, *args: str, stdin: str | None = None, check: bool = True
                   ) -> subprocess.CompletedProcess:
    """``run_script`` for train.py, continue_train.py, translate.py and average_checkpoints.py, run
    through their entry points in this process (``run_main``): the same results without starting Python."""
    from simple_nmt import cli

    mains = {"train.py": cli.main_train, "continue_train.py": cli.main_continue, "translate.py": cli.main_translate,
             "average_checkpoints.py": cli.main_average}
    return run_main(mains[script], *args, stdin=stdin, check=check)


def toy_data(toy_dir: Path, n_train: int = 200):
    """Whitespace fields built from the toy corpus, loaders of its first ``n_train`` training pairs (batches
    of 50) and of its validation pairs (batches of 20), and the validation references."""
    from torch.utils.data import DataLoader

    from simple_nmt.data import ParallelDataset, TextField, Tokenizer, Vocab, collate, read_parallel

    src, tgt, _ = read_parallel(str(toy_dir / "train"), "ende")
    fields = tuple(TextField(Tokenizer(), Vocab.build([line.split() for line in lines])) for lines in (src, tgt))
    train = ParallelDataset([fields[0].to_ids(x) for x in src[:n_train]], [fields[1].to_ids(y) for y in tgt[:n_train]])
    v_src, v_tgt, _ = read_parallel(str(toy_dir / "valid"), "ende")
    valid = ParallelDataset([fields[0].to_ids(x) for x in v_src], [fields[1].to_ids(y) for y in v_tgt])
    return fields, DataLoader(train, batch_size=50, collate_fn=collate), DataLoader(valid, batch_size=20,
                                                                                      collate_fn=collate), v_tgt


def with_handlers(engine, config, fields, valid_loader, references, model_fn, log=lambda _: None):
    """``attach_handlers`` as a research script calls it, checkpoints to ``model_fn``, quiet unless ``log``."""
    from simple_nmt.trainer import attach_handlers

    return attach_handlers(engine, config, on_epoch_start=lambda epoch: None, valid_loader=valid_loader,
                           valid_references=references, fields=fields, model_fn=str(model_fn), log=log)
