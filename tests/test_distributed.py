"""Two processes under torchrun (gloo, CPU): ranks stay in step and equal one process accumulating their batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_TRANSFORMER, run_script
from test_cli import train_args

from simple_nmt.checkpoint import load_checkpoint

# no dropout, so that a single process can see the same numbers; SGD, as Adam would magnify
# the rounding differences of gradients summed in another order (Adam's step is ~lr even for a ~1e-9 gradient)
ARCH = [*TINY_TRANSFORMER[:-2], "--dropout", "0.0", "--optimizer", "sgd", "--lr", "1.0"]


def helper(out_dir, *args, n_processes: int = 1) -> subprocess.CompletedProcess:
    """tests/distributed_run.py in one process, or in ``n_processes`` under torchrun."""
    out_dir.mkdir()
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_processes)]
    command = [sys.executable, *(launcher if n_processes > 1 else []), str(ROOT / "tests" / "distributed_run.py"),
               str(out_dir), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def final_state(out_dir, phase: str, rank: int = 0) -> dict:
    return torch.load(out_dir / f"{phase}.rank{rank}.pth", weights_only=True)


def assert_ranks_identical(out_dir, phase: str) -> None:
    rank0, rank1 = final_state(out_dir, phase, 0), final_state(out_dir, phase, 1)
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])
    assert rank0["metrics"] == rank1["metrics"]  # validation over the whole set, the same on both ranks


@pytest.mark.parametrize("iteration_per_update", [1, 2])
def test_two_processes_equal_one_accumulating_both_shares(toy_dir, tmp_path, iteration_per_update):
    # 600 pairs in batches of 30: 20 batches, 10 per rank; one update of 2 ranks x k batches
    # averages the same gradients as one process accumulating 2k batches
    args = train_args(toy_dir, tmp_path / "m.pth", "--batch_size", "30", "--n_epochs", "1", "--verbose", "1", *ARCH)
    single = tmp_path / "single"
    helper(single, "train", *args, "--model_fn", str(single / "m.pth"),
           "--iteration_per_update", str(2 * iteration_per_update))
    dist = tmp_path / "dist"
    proc = helper(dist, "train", *args, "--model_fn", str(dist / "m.pth"), "--iteration_per_update",
                  str(iteration_per_update), "--rl_n_epochs", "1", "--rl_n_samples", "2", n_processes=2)

    assert_ranks_identical(dist, "mle")
    assert_ranks_identical(dist, "rl")
    expected, got = final_state(single, "mle"), final_state(dist, "mle")
    for k in expected["model"]:
        torch.testing.assert_close(got["model"][k], expected["model"][k], atol=1e-5, rtol=0)
    for k in ("valid_loss", "valid_bleu"):
        assert got["metrics"][k] == pytest.approx(expected["metrics"][k], rel=1e-5)
    # rank 0 alone prints and writes checkpoints, of the model without its DDP wrapper
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch 1: loss=")]
    assert len(epoch_lines) == 2 and " ppl=" in epoch_lines[0] and " reward=" in epoch_lines[1]  # MLE, RL
    checkpoint = load_checkpoint(dist / "m.epoch1.pth")
    assert all(torch.equal(v, got["model"][k]) for k, v in checkpoint["model"].items())
    assert checkpoint["trainer"]["epoch_length"] == 10
    out = run_script("translate.py", "--model_fn", str(dist / "m.rl.pth"), stdin="a dog sees the cat\n").stdout
    assert len(out.split("\n")) == 2


def test_rl_under_torchrun_continues_a_single_process_checkpoint(toy_dir, tmp_path):
    model_fn = tmp_path / "mle.pth"
    run_script("train.py", *train_args(toy_dir, model_fn, "--n_epochs", "1", *ARCH))
    dist = tmp_path / "dist"
    helper(dist, "continue", "--load_fn", str(model_fn), "--model_fn", str(dist / "rl.pth"), "--rl_n_epochs", "1",
           "--rl_n_samples", "2", "--rl_mle_weight", "0.5", "--iteration_per_update", "2", "--verbose", "0",
           n_processes=2)
    assert_ranks_identical(dist, "rl")
    assert not all(torch.equal(v, load_checkpoint(model_fn)["model"][k])
                   for k, v in final_state(dist, "rl")["model"].items())
    resumed = run_script("continue_train.py", "--load_fn", str(dist / "rl.epoch1.pth"), "--model_fn",
                         str(tmp_path / "more.pth"), "--rl_n_epochs", "2", "--verbose", "1")
    assert any(line.startswith("epoch 2: loss=") and " reward=" in line for line in resumed.stdout.splitlines())
