"""Bad input and faults end in one line naming the file or option, before any work, and lose nothing."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import TINY_TRANSFORMER, run_main

from simple_nmt import cli
from simple_nmt.checkpoint import CheckpointError, save_checkpoint
from simple_nmt.data import DataError, read_lines, read_parallel


def one_line_error(proc, text: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert text in proc.stderr, proc.stderr


def write_pair(folder, stem, src: str | bytes, tgt: str | bytes):
    folder.mkdir(parents=True, exist_ok=True)
    for lang, text in (("en", src), ("de", tgt)):
        path = folder / f"{stem}.{lang}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder / stem


def test_a_byte_order_mark_is_not_text(tmp_path):
    prefix = write_pair(tmp_path, "c", b"\xef\xbb\xbfa b\nc\n", "x y\nz\n")
    src, tgt, _ = read_parallel(str(prefix), "ende")
    assert src == ["a b", "c"] and tgt == ["x y", "z"]
    assert read_lines(tmp_path / "c.en")[0][0] == "a b"


@pytest.mark.parametrize("side", ["en", "de"])
def test_a_file_of_blank_lines_is_an_error_naming_it(tmp_path, side):
    blank, text = " \n\n\t\n", "a\nb\nc\n"
    prefix = write_pair(tmp_path, "c", blank if side == "en" else text, blank if side == "de" else text)
    with pytest.raises(DataError, match=rf"c\.{side}: every line is blank"):
        read_parallel(str(prefix), "ende")


def test_a_sentencepiece_size_it_cannot_train_is_a_one_line_error(toy_dir, tmp_path):
    proc = run_main(cli.main_train, "--model_fn", str(tmp_path / "m.pth"), "--train", str(toy_dir / "train"),
                      "--valid", str(toy_dir / "valid"), "--spm_vocab_size", "5", *TINY_TRANSFORMER, check=False)
    one_line_error(proc, f"--spm_vocab_size 5: too small for SentencePiece on {toy_dir / 'train'}.en; "
                         "it needs at least")
    assert not list(tmp_path.iterdir())


def training(toy_dir, *options):
    return run_main(cli.main_train, "--train", str(toy_dir / "train"), "--valid", str(toy_dir / "valid"),
                      "--n_epochs", "1", "--verbose", "0", *TINY_TRANSFORMER, *options, check=False)


def test_training_outputs_that_cannot_be_written_are_refused_before_any_work(toy_dir, tmp_path):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    one_line_error(training(toy_dir, "--model_fn", str(tmp_path / "a_dir")),
                   f"--model_fn {tmp_path / 'a_dir'}: is a directory")
    one_line_error(training(toy_dir, "--model_fn", str(tmp_path / "a_file" / "sub" / "m.pth")),
                   f"{tmp_path / 'a_file'} is a file, not a folder")
    one_line_error(training(toy_dir, "--model_fn", str(tmp_path / "m.pth"), "--tensorboard_dir",
                            str(tmp_path / "a_file")), f"--tensorboard_dir {tmp_path / 'a_file'}: is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]


@pytest.fixture(scope="module")
def checkpoint(toy_dir, tmp_path_factory):
    model_fn = tmp_path_factory.mktemp("ckpt") / "m.pth"
    assert training(toy_dir, "--model_fn", str(model_fn)).returncode == 0
    return model_fn


def test_translation_and_averaging_outputs_are_checked_first(checkpoint, tmp_path):
    (tmp_path / "a_dir").mkdir()
    proc = run_main(cli.main_translate, "--model_fn", str(checkpoint), "--output", str(tmp_path / "a_dir"),
                    stdin="a\n", check=False)
    one_line_error(proc, f"--output {tmp_path / 'a_dir'}: is a directory")
    proc = run_main(cli.main_average, str(checkpoint), "--output", str(tmp_path / "a_dir"), check=False)
    one_line_error(proc, f"--output {tmp_path / 'a_dir'}: is a directory")
    # a folder that does not exist yet is made
    out = tmp_path / "new" / "folder" / "out.de"
    run_main(cli.main_translate, "--model_fn", str(checkpoint), "--output", str(out), stdin="a dog\n")
    assert len(out.read_text().splitlines()) == 1


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                  "failed writing file data/0: file write failed")])
def test_a_full_disk_during_a_save_leaves_the_good_checkpoint_and_no_temporary_file(tmp_path, monkeypatch,
                                                                                    failure):
    path = tmp_path / "m.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def full_disk(data, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"m\.pth: could not write the checkpoint .*unchanged"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["m.pth"]
