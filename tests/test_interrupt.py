"""SIGINT and SIGTERM at every moment of a short run: the resumed run does every epoch's end work
exactly once and ends with the weights of an uninterrupted run, for MLE and for RL."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import TINY_SEQ2SEQ

from simple_nmt import cli
from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine

N_EPOCHS, EPOCH_LENGTH = 2, 3  # 600 pairs in batches of 200


def options(toy_dir):
    return ["--train", str(toy_dir / "train"), "--valid", str(toy_dir / "valid"), "--batch_size", "200",
            "--max_length", "30", "--verbose", "0", "--optimizer", "adam", "--lr", "3e-3", "--dropout", "0.1",
            "--rl_n_samples", "2", "--rl_lr", "1e-3"]


class Moments:
    """Sends a signal at one moment of training, and counts the validations (the epochs' end work)."""

    def __init__(self, monkeypatch):
        self.when, self.signum, self.validations = None, signal.SIGINT, []
        step, validate = MaximumLikelihoodEstimationEngine.train_step, MaximumLikelihoodEstimationEngine.validate
        moments = self

        def train_step(engine, batch):
            moments.maybe_signal(("step", engine.state.iteration))
            return step(engine, batch)

        def counted_validate(engine, *args):
            moments.validations.append(engine.state.epoch)
            moments.maybe_signal(("validation", engine.state.epoch))
            return validate(engine, *args)

        monkeypatch.setattr(MaximumLikelihoodEstimationEngine, "train_step", train_step)
        monkeypatch.setattr(MaximumLikelihoodEstimationEngine, "validate", counted_validate)

    def maybe_signal(self, moment):
        if moment == self.when:
            self.when = None
            os.kill(os.getpid(), self.signum)


def weights(path):
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def mle_start(toy_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("start") / "mle.pth"
    cli.main_train(["--model_fn", str(path), *options(toy_dir), *TINY_SEQ2SEQ, "--n_epochs", "1"])
    return path


MOMENTS = [("step", i) for i in range(1, N_EPOCHS * EPOCH_LENGTH + 1)] + [("validation", e) for e in (1, 2)]


@pytest.mark.parametrize("phase", ["mle", "rl"])
def test_interrupted_anywhere_and_resumed_equals_uninterrupted(toy_dir, mle_start, tmp_path, monkeypatch, phase):
    moments = Moments(monkeypatch)
    epochs = "--rl_n_epochs" if phase == "rl" else "--n_epochs"

    rl_data = tmp_path / "rl_train"  # RL on half the pairs, in batches of 100: three an epoch too
    for lang in ("en", "de"):
        lines = (toy_dir / f"train.{lang}").read_text().splitlines()[:300]
        rl_data.with_suffix(f".{lang}").write_text("\n".join(lines) + "\n")

    def start(model_fn):
        if phase == "rl":
            cli.main_continue(["--load_fn", str(mle_start), "--model_fn", str(model_fn), *options(toy_dir),
                               "--train", str(rl_data), "--batch_size", "100", epochs, str(N_EPOCHS)])
        else:
            cli.main_train(["--model_fn", str(model_fn), *options(toy_dir), *TINY_SEQ2SEQ, epochs, str(N_EPOCHS)])

    start(tmp_path / "straight" / "m.pth")
    expected = weights(tmp_path / "straight" / f"m.epoch{N_EPOCHS}.pth")
    assert moments.validations == [1, 2]
    for k, moment in enumerate(MOMENTS):
        moments.validations, moments.when = [], moment
        moments.signum = signal.SIGTERM if k % 3 == 2 else signal.SIGINT
        run = tmp_path / f"run{k}"
        with pytest.raises(SystemExit) as stop:
            start(run / "m.pth")
        assert stop.value.code == 128 + moments.signum, moment
        interrupted = run / "m.interrupted.pth"
        cli.main_continue(["--load_fn", str(interrupted), "--model_fn", str(run / "m.pth"), epochs, str(N_EPOCHS),
                           "--verbose", "0"])
        assert moments.validations == [1, 2], moment  # each epoch validated once, interrupted or not
        for epoch in range(1, N_EPOCHS + 1):
            assert (run / f"m.epoch{epoch}.pth").is_file(), (moment, epoch)
        got = weights(run / f"m.epoch{N_EPOCHS}.pth")
        assert all(torch.equal(got[name], value) for name, value in expected.items()), moment
        assert torch.equal(weights(run / "m.pth")["generator.weight"],
                           weights(tmp_path / "straight" / "m.pth")["generator.weight"]), moment
