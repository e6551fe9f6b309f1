"""Damaged checkpoints: every variant of a real checkpoint either works or is refused in one line.

A real checkpoint is corrupted at many random positions (bit flips, truncations) and in its
structure (keys removed, values of another type); translate.py, continue_train.py and
average_checkpoints.py must then either run, or exit 1 with ``error: FILE: ...`` on one
line, never with a traceback.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import TINY_TRANSFORMER, run_script

from simple_nmt import cli
from simple_nmt.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def real(toy_dir, tmp_path_factory):
    """A tiny SentencePiece Transformer trained for one epoch, and 5 lines to translate."""
    folder = tmp_path_factory.mktemp("real")
    run_script("train.py", "--model_fn", str(folder / "m.pth"), "--train", str(toy_dir / "train"), "--valid",
               str(toy_dir / "valid"), "--n_epochs", "1", "--verbose", "0", "--spm_vocab_size", "80",
               "--batch_size", "64", *TINY_TRANSFORMER)
    source = folder / "in.en"
    source.write_text("\n".join((toy_dir / "test.en").read_text().splitlines()[:5]) + "\n")
    return folder / "m.pth", source


def outcome(main, argv, path, capsys) -> str:
    """``ok``, or ``refused`` after checking that the error is one line naming ``path``."""
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as stop:
        err = capsys.readouterr().err
        assert stop.code == 1, err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}"), err
        return "refused"
    return "ok"


def translate(path, source, capsys) -> str:
    out = path.with_suffix(".de")
    result = outcome(cli.main_translate, ["--model_fn", str(path), "--input", str(source), "--output", str(out),
                                          "--beam_size", "2", "--max_length", "20"], path, capsys)
    if result == "ok":
        assert len(out.read_text(encoding="utf-8").split("\n")) == 6
    return result


def test_bit_flips_and_truncations(real, tmp_path, capsys):
    model_fn, source = real
    raw = model_fn.read_bytes()
    rng = random.Random(0)
    results = []
    for i in range(60):
        damaged = bytearray(raw)
        position = rng.randrange(len(raw))
        damaged[position] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{i}.pth"
        path.write_bytes(bytes(damaged))
        results.append(translate(path, source, capsys))
    for i in range(20):
        path = tmp_path / f"cut{i}.pth"
        path.write_bytes(raw[: rng.randrange(len(raw))])
        assert translate(path, source, capsys) == "refused"
    assert "refused" in results  # some flips hit the archive's structure


def damaged_variants(checkpoint: dict, rng: random.Random, n: int):
    """Copies of ``checkpoint`` with one entry removed or replaced by a value of another type."""
    paths = [(k,) for k in checkpoint]
    paths += [("meta", k) for k in checkpoint["meta"]]
    paths += [("meta", "config", k) for k in checkpoint["meta"]["config"]]
    paths += [("model", k) for k in list(checkpoint["model"])[:5]]
    paths += [("trainer", k) for k in checkpoint["trainer"]]
    replacements = [None, "text", 7, -1, 2.5, [1, 2], {"a": 1}, b"\x00\x01", torch.zeros(2), True]
    for _ in range(n):
        variant = copy.deepcopy(checkpoint)
        *parents, key = rng.choice(paths)
        holder = variant
        for p in parents:
            holder = holder[p]
        if rng.random() < 0.3:
            del holder[key]
        else:
            holder[key] = rng.choice(replacements)
        yield variant


def test_removed_and_retyped_entries(real, tmp_path, capsys):
    model_fn, source = real
    checkpoint = load_checkpoint(model_fn)
    rng = random.Random(1)
    for i, variant in enumerate(damaged_variants(checkpoint, rng, 80)):
        path = tmp_path / f"edit{i}.pth"
        torch.save(variant, path)
        translate(path, source, capsys)
    for i, variant in enumerate(damaged_variants(checkpoint, rng, 12)):
        path = tmp_path / f"resume{i}.pth"
        torch.save(variant, path)
        # an exact resume of the one epoch done: everything is read and checked, nothing is trained
        outcome(cli.main_continue, ["--load_fn", str(path), "--model_fn", str(tmp_path / "out" / "r.pth"),
                                    "--n_epochs", "1", "--verbose", "0"], path, capsys)
        outcome(cli.main_average, [str(model_fn), str(path), "--output", str(tmp_path / "avg.pth")], path, capsys)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["meta"]["config"].pop("hidden_size"), "its weights do not fit its config"),
    (lambda c: c["meta"]["config"].update(hidden_size=64), "its weights do not fit its config"),
    (lambda c: c["meta"]["config"].update(hidden_size=2**30), "its config: no such model can be built"),
    (lambda c: c["meta"]["config"].update(n_splits=3), "hidden_size must be divisible by --n_splits"),
    (lambda c: c["meta"].update(src_vocab=["a", "b"]), "its src_vocab does not start with the special tokens"),
    (lambda c: c["meta"].update(tgt_spm=b"not a model"), "its tgt_spm is not a SentencePiece model"),
    (lambda c: c.update(model=[1, 2]), "its model weights are not a state dict of tensors"),
    (lambda c: c["meta"]["config"].update(dropout="high"), "its config: dropout: must be a number"),
    (lambda c: c["trainer"].pop("iteration"), "its trainer state has no iteration or epoch count"),
    (lambda c: c["trainer"].update(epoch_length=0), "its trainer state has no epoch length"),
])
def test_each_kind_of_damage_is_named(real, tmp_path, capsys, edit, message):
    model_fn, source = real
    checkpoint = load_checkpoint(model_fn)
    edit(checkpoint)
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    assert translate(path, source, capsys) == "refused"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main_translate(["--model_fn", str(path), "--input", str(source)])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not a usable simple-nmt checkpoint: ") and message in err, err
    # averaging refuses it alike, before writing anything
    assert outcome(cli.main_average, [str(model_fn), str(path), "--output", str(tmp_path / "avg.pth")], path,
                   capsys) == "refused"
    assert not (tmp_path / "avg.pth").exists()
