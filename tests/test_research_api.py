"""The engines and handlers used from Python, as a research user does: checkpoints that the scripts
resume and translate, models of their own, what the step reports, and skipped updates."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, run_main, toy_data, with_handlers

from simple_nmt import cli
from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.config import default_config
from simple_nmt.models import Transformer, build_model
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine


def test_handlers_write_checkpoints_that_the_scripts_resume_and_translate(toy_dir, tmp_path):
    fields, train, valid, references = toy_data(toy_dir)
    config = default_config(**TINY["transformer"], optimizer="adam", verbose=0, max_length=30,
                            train=str(toy_dir / "train"), valid=str(toy_dir / "valid"))
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    engine = MaximumLikelihoodEstimationEngine(model, torch.optim.Adam(model.parameters(), lr=3e-3), config,
                                               tgt_field=fields[1])  # no scheduler
    with_handlers(engine, config, fields, valid, references, tmp_path / "mine.pth")
    engine.run(train, max_epochs=1)
    checkpoint = load_checkpoint(tmp_path / "mine.epoch1.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "trainer", "meta"} <= checkpoint.keys()
    proc = run_main(cli.main_continue, "--load_fn", str(tmp_path / "mine.epoch1.pth"), "--model_fn",
                    str(tmp_path / "more.pth"), "--n_epochs", "2", "--verbose", "1")
    assert "epoch 2: loss=" in proc.stdout and "epoch 1:" not in proc.stdout
    out = run_main(cli.main_translate, "--model_fn", str(tmp_path / "more.pth"), stdin="a dog sees the cat\n").stdout
    assert len(out.split("\n")) == 2


class IdsOnlySearch(Transformer):
    """A research model whose search returns the ids alone."""

    def search(self, *args, **kwargs):
        return super().search(*args, **kwargs)[0]


@pytest.mark.parametrize("engine_class", [MaximumLikelihoodEstimationEngine, MinimumRiskTrainingEngine])
def test_a_search_that_returns_ids_only_trains_and_validates(toy_dir, tmp_path, engine_class):
    fields, train, valid, references = toy_data(toy_dir, n_train=100)
    config = default_config(verbose=0, max_length=30, rl_n_samples=2)
    model = IdsOnlySearch(len(fields[0].vocab), len(fields[1].vocab), hidden_size=32, n_splits=2, n_layers=1)
    engine = engine_class(model, torch.optim.Adam(model.parameters(), lr=1e-3), config, tgt_field=fields[1])
    with_handlers(engine, config, fields, valid, references, tmp_path / "m.pth")
    engine.run(train, max_epochs=1)
    assert 0.0 <= engine.state.metrics["valid_bleu"] <= 100.0 and (tmp_path / "m.pth").is_file()


def test_the_rl_step_reports_its_loss_and_the_spread_of_the_advantages(toy_dir):
    fields, train, _, _ = toy_data(toy_dir, n_train=50)
    config = default_config(**TINY["seq2seq"], max_length=20, rl_n_samples=3, rl_baseline="loo")
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    engine = MinimumRiskTrainingEngine(model, torch.optim.SGD(model.parameters(), lr=1e-3), config)
    losses = []
    original = engine.compute_loss

    def recording(batch):
        loss, output = original(batch)
        losses.append(float(loss.detach()))
        return loss, output

    engine.compute_loss = recording
    engine.run(train, max_epochs=1)
    output = engine.state.output
    assert output["loss"] == losses[-1]
    # leave-one-out advantages average to zero; their spread is what carries the signal
    assert output["advantage"] == pytest.approx(0.0, abs=1e-4) and output["adv_std"] > 0


class LogitsForward(Transformer):
    """A research model whose forward returns logits without taking ``normalize``."""

    def forward(self, src, src_lengths, tgt_in):
        return self.decode(tgt_in, self.encode(src, src_lengths))


@pytest.mark.parametrize("engine_class", [MaximumLikelihoodEstimationEngine, MinimumRiskTrainingEngine])
def test_a_forward_that_returns_logits_is_refused(toy_dir, engine_class):
    fields, train, _, _ = toy_data(toy_dir, n_train=50)
    model = LogitsForward(len(fields[0].vocab), len(fields[1].vocab), hidden_size=32, n_splits=2, n_layers=1)
    engine = engine_class(model, torch.optim.SGD(model.parameters(), lr=1e-3), {"max_length": 20})
    with pytest.raises(ValueError, match="did not return log-probabilities"):
        engine.run(train, max_epochs=1)


class PoisonedEngine(MaximumLikelihoodEstimationEngine):
    """A non-finite loss at the iterations in ``poisoned``."""

    poisoned: set[int] = set()

    def compute_loss(self, batch):
        loss, output = super().compute_loss(batch)
        return (loss * float("nan") if self.state.iteration in self.poisoned else loss), output


def test_a_skipped_first_update_and_the_skip_counters_survive_handlers_and_resume(toy_dir, tmp_path):
    fields, train, valid, references = toy_data(toy_dir)  # 4 batches an epoch
    config = default_config(**TINY["transformer"], verbose=2, max_length=30)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    engine = PoisonedEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), config, tgt_field=fields[1])
    engine.poisoned = {1, 3}
    with_handlers(engine, config, fields, valid, references, tmp_path / "m.pth")
    engine.run(train, max_epochs=1)
    assert engine.state.n_skipped_steps == 2
    trainer_state = load_checkpoint(tmp_path / "m.epoch1.pth")["trainer"]
    assert trainer_state["n_skipped_steps"] == 2 and trainer_state["n_bad_steps"] == 0

    resumed = MaximumLikelihoodEstimationEngine(model, torch.optim.Adam(model.parameters()), config)
    resumed.load_state_dict(trainer_state)
    assert resumed.state.n_skipped_steps == 2 and resumed.state.epoch == 1
    earlier = {k: v for k, v in trainer_state.items() if k not in ("n_skipped_steps", "n_bad_steps")}
    resumed.load_state_dict(earlier)  # a checkpoint of an earlier version, without the counters
    assert resumed.state.n_skipped_steps == 0
