"""Checkpoints: plain data, atomic writes, refusal of anything that needs pickle."""

from __future__ import annotations

import pathlib

import pytest
import torch

from simple_nmt.checkpoint import AtomicSaver, CheckpointError, load_checkpoint, save_checkpoint


def plain_checkpoint() -> dict:
    return {
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "meta": {"config": {"hidden_size": 8, "lr": None}, "src_vocab": ["<pad>", "a"], "tgt_vocab": ["<pad>"],
                 "src_spm": b"\x00model", "tgt_spm": None},
        "trainer": {"epoch": 2, "iteration": 10},
    }


def test_round_trip_is_plain_data(tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(plain_checkpoint(), path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], plain_checkpoint()["model"]["w"])
    assert loaded["meta"] == plain_checkpoint()["meta"] and loaded["trainer"] == plain_checkpoint()["trainer"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary file left


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_needing_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({**plain_checkpoint(), "extra": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: the checkpoint needs \S+; only plain data"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_missing_and_foreign_files(tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(plain_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pth: truncated or corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"m\.pth: truncated or corrupted"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pth")
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a simple-nmt checkpoint"):
        load_checkpoint(path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    save_checkpoint(plain_checkpoint(), path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "meta": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_atomic_saver_removes_superseded_files_only_after_writing(tmp_path):
    saver = AtomicSaver(tmp_path)
    saver(plain_checkpoint(), "a.pth")
    saver.remove("a.pth")  # ignite asks for removal before it saves the replacement
    assert (tmp_path / "a.pth").exists()
    saver(plain_checkpoint(), "b.pth")
    assert not (tmp_path / "a.pth").exists() and (tmp_path / "b.pth").exists()
    saver.remove("b.pth")  # replaced by a file of the same name: never removed
    saver(plain_checkpoint(), "b.pth")
    assert (tmp_path / "b.pth").exists()
