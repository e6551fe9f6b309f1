"""SIGKILL at random moments, including during a save, never leaves a broken checkpoint in place."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_script

from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.toy import write_corpus

# big enough that a save takes a while (Adam state included), small enough that an epoch is short
MODEL = ["--word_vec_size", "64", "--hidden_size", "512", "--n_layers", "1", "--dropout", "0.0"]


def start(toy_dir, model_fn, load_fn=None):
    script, load = ("continue_train.py", ["--load_fn", str(load_fn)]) if load_fn else ("train.py", [])
    args = [*load, "--model_fn", str(model_fn), "--train", str(toy_dir / "train"), "--valid",
            str(toy_dir / "valid"), "--batch_size", "64", "--n_epochs", "1000", "--verbose", "0",
            "--optimizer", "adam", "--lr", "1e-3", *([] if load_fn else MODEL)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def latest_epoch_file(folder):
    files = sorted(folder.glob("m.epoch*.pth"), key=lambda p: int(p.name[len("m.epoch"):-len(".pth")]))
    return files[-1] if files else None


def kill_when(proc, ready, timeout, interval=0.0):
    """Kill the process the moment ``ready()`` holds (or when it ends or times out); return whether it held.

    ``interval``: seconds between checks (0 catches short states, such as a save, at the cost of a busy core).
    """
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(interval)
    proc.send_signal(signal.SIGKILL)
    return False


def saving(folder):
    """A temporary checkpoint file exists: a save is under way."""
    return any(name.endswith(".tmp") for name in os.listdir(folder))


def test_random_kills_never_leave_a_broken_checkpoint(tmp_path):
    toy_dir = write_corpus(tmp_path / "data", {"train": 120, "valid": 8}, seed=5)  # short epochs
    tmp_path = tmp_path / "run"
    tmp_path.mkdir()
    rng = random.Random(0)
    kills, during_save = 0, 0
    previous = {}
    for round_ in range(14):
        load_fn = latest_epoch_file(tmp_path)
        proc = start(toy_dir, tmp_path / "m.pth", load_fn)
        if round_ == 0:  # one epoch checkpoint first, however slow the machine, so that later rounds resume
            kill_when(proc, lambda: latest_epoch_file(tmp_path) is not None, timeout=300, interval=0.1)
        elif round_ % 2:
            during_save += kill_when(proc, lambda: saving(tmp_path), timeout=60)
        else:
            time.sleep(rng.uniform(1.5, 5.0))
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for path in tmp_path.glob("*.pth"):  # every checkpoint in place loads, and none went backwards
            checkpoint = load_checkpoint(path)
            iteration = checkpoint["trainer"]["iteration"]
            assert iteration >= previous.get(path.name, 0)
            previous[path.name] = iteration
    assert kills >= 14 and during_save >= 4
    last = latest_epoch_file(tmp_path)
    assert last is not None
    done = load_checkpoint(last)["trainer"]["iteration"] // load_checkpoint(last)["trainer"]["epoch_length"]
    run_script("continue_train.py", "--load_fn", str(last), "--model_fn", str(tmp_path / "final.pth"),
               "--n_epochs", str(done + 1), "--verbose", "0")
    assert load_checkpoint(tmp_path / f"final.epoch{done + 1}.pth")["trainer"]["iteration"] > 0
