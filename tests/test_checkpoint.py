"""Checkpoints: plain data, atomic writes, refusal of anything that needs pickle."""

from __future__ import annotations

import pathlib

import pytest
import torch

from simple_nmt.checkpoint import (
    AtomicSaver,
    CheckpointError,
    average_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def plain_checkpoint() -> dict:
    return {
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "meta": {"config": {"hidden_size": 8, "lr": None}, "src_vocab": ["<pad>", "a"], "tgt_vocab": ["<pad>"],
                 "src_spm": b"\x00model", "tgt_spm": None},
        "trainer": {"epoch_length": 5, "iteration": 10, "max_epochs": 2},
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
    with pytest.raises(CheckpointError, match=r"m\.pth: not a usable simple-nmt checkpoint: truncated"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"m\.pth: not a usable simple-nmt checkpoint: truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pth")
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a usable simple-nmt checkpoint: it lacks model weights"):
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


def epoch_checkpoints(tmp_path, n: int) -> list[pathlib.Path]:
    """``n`` checkpoints of one run: different float weights, the same integer buffer and meta."""
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        checkpoint = plain_checkpoint()
        checkpoint["model"] = {"w": torch.randn(2, 3), "h": torch.randn(4).half(), "steps": torch.tensor([7, 1])}
        checkpoint["optimizer"] = {"state": {}, "param_groups": []}
        paths.append(tmp_path / f"m.epoch{i + 1}.pth")
        save_checkpoint(checkpoint, paths[-1])
    return paths


def test_average_is_the_mean_of_the_weights_in_their_own_dtype(tmp_path):
    paths = epoch_checkpoints(tmp_path, 3)
    average = average_checkpoints(paths)
    weights = [load_checkpoint(p)["model"] for p in paths]
    for key in ("w", "h"):
        expected = torch.stack([w[key].float() for w in weights]).mean(0)
        assert average["model"][key].dtype == weights[0][key].dtype
        assert torch.allclose(average["model"][key].float(), expected, atol=1e-3 if key == "h" else 1e-6)
    assert torch.equal(average["model"]["steps"], torch.tensor([7, 1]))
    assert average["meta"]["averaged_from"] == [str(p) for p in paths]
    assert average["meta"]["src_vocab"] == plain_checkpoint()["meta"]["src_vocab"]
    assert "optimizer" not in average and "trainer" not in average  # nothing to resume
    save_checkpoint(average, tmp_path / "avg.pth")
    assert torch.equal(load_checkpoint(tmp_path / "avg.pth")["model"]["w"], average["model"]["w"])
    assert torch.equal(average_checkpoints(paths[:1])["model"]["w"], weights[0]["w"])


@pytest.mark.parametrize("change, message", [
    (lambda c: c["meta"].update(tgt_vocab=["<pad>", "b"]), "its tgt_vocab differs from"),
    (lambda c: c["model"].update(w=torch.zeros(3, 2)), "its weights differ in names or shapes"),
    (lambda c: c["model"].pop("h"), "its weights differ in names or shapes"),
    (lambda c: c["model"].update(steps=torch.tensor([7, 2])), "its non-float tensor steps differs"),
])
def test_average_refuses_checkpoints_of_another_run(tmp_path, change, message):
    paths = epoch_checkpoints(tmp_path, 2)
    other = load_checkpoint(paths[1])
    change(other)
    save_checkpoint(other, paths[1])
    with pytest.raises(CheckpointError, match=rf"m\.epoch2\.pth: {message} .*m\.epoch1\.pth's"):
        average_checkpoints(paths)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([])
