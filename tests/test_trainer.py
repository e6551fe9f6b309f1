"""The MLE engine: it learns, accumulates, clips, schedules and survives non-finite numbers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY
from ignite.engine import Events

from simple_nmt.config import default_config
from simple_nmt.data import PAD, ParallelDataset, TextField, Tokenizer, Vocab, collate
from simple_nmt.models import build_model
from simple_nmt.toy import make_corpus
from simple_nmt.trainer import (
    MaximumLikelihoodEstimationEngine,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    token_losses,
)


def tiny_setup(kind: str, n_pairs: int = 12, **options):
    src, tgt = make_corpus(n_pairs, seed=7)
    fields = [TextField(Tokenizer(), Vocab.build([line.split() for line in lines])) for lines in (src, tgt)]
    dataset = ParallelDataset([fields[0].to_ids(x) for x in src], [fields[1].to_ids(y) for y in tgt])
    config = default_config(**{**TINY[kind], "max_length": 30, **options})
    torch.manual_seed(0)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    return config, model, fields, dataset, src, tgt


@pytest.mark.parametrize("kind", ["transformer", "seq2seq"])
def test_tiny_model_overfits_to_exact_translations(kind):
    config, model, fields, dataset, src, tgt = tiny_setup(kind)
    optimizer = build_optimizer(model, config.replace(optimizer="adam"), lr=1e-2)
    engine = MaximumLikelihoodEstimationEngine(model, optimizer, config, tgt_field=fields[1])
    batch = collate([dataset[i] for i in range(len(dataset))])
    engine.run([batch] * 150, max_epochs=1)
    model.eval()
    ids, _ = model.search(batch["src"], batch["src_lengths"], max_length=30)
    assert [fields[1].to_text(row) for row in ids.tolist()] == tgt
    results = engine.validate([batch], tgt)
    assert results["valid_bleu"] == pytest.approx(100.0)
    assert results["valid_ppl"] < 1.1


class PoisonedEngine(MaximumLikelihoodEstimationEngine):
    """Produces a NaN loss at chosen iterations."""

    poisoned: set[int] = set()

    def compute_loss(self, batch):
        loss, output = super().compute_loss(batch)
        if self.state.iteration in self.poisoned:
            loss = loss * float("nan")
        return loss, output


def test_non_finite_loss_skips_the_update_and_leaves_parameters_unchanged():
    config, model, fields, dataset, *_ = tiny_setup("transformer", max_bad_steps=3)
    optimizer = build_optimizer(model, config.replace(optimizer="adam"), lr=1e-3)
    engine = PoisonedEngine(model, optimizer, config, tgt_field=fields[1])
    engine.poisoned = {2}
    batch = collate([dataset[i] for i in range(4)])
    snapshots = []
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: snapshots.append([p.detach().clone() for p in model.parameters()]))
    engine.run([batch] * 3, max_epochs=1)
    assert engine.state.n_skipped_steps == 1 and engine.state.n_bad_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3 applied
    assert math.isfinite(engine.state.output["loss"])


def test_too_many_bad_steps_in_a_row_stop_with_a_clear_error():
    config, model, fields, dataset, *_ = tiny_setup("transformer", max_bad_steps=3)
    optimizer = build_optimizer(model, config)
    engine = PoisonedEngine(model, optimizer, config, tgt_field=fields[1])
    engine.poisoned = {1, 2, 4, 5, 6}
    batch = collate([dataset[i] for i in range(4)])
    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row .*--max_bad_steps 3"):
        engine.run([batch] * 8, max_epochs=1)
    assert engine.state.iteration == 6 and engine.state.n_skipped_steps == 5


def test_non_finite_gradient_is_skipped():
    config, model, fields, dataset, *_ = tiny_setup("seq2seq")
    optimizer = build_optimizer(model, config)
    engine = MaximumLikelihoodEstimationEngine(model, optimizer, config, tgt_field=fields[1])
    handle = model.generator.weight.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    engine.run([collate([dataset[0], dataset[1]])], max_epochs=1)
    handle.remove()
    assert engine.state.n_skipped_steps == 1
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_gradient_accumulation_updates_every_n_iterations():
    config, model, fields, dataset, *_ = tiny_setup("transformer", iteration_per_update=3)
    optimizer = build_optimizer(model, config, lr=0.1)
    steps = []
    original_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), original_step(*a, **k))[1]
    engine = MaximumLikelihoodEstimationEngine(model, optimizer, config, tgt_field=fields[1])
    engine.run([collate([dataset[i]]) for i in range(7)], max_epochs=1)
    assert len(steps) == 2


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients():
    config, model, fields, dataset, *_ = tiny_setup("transformer", iteration_per_update=2, max_grad_norm=0.0)
    batches = [collate([dataset[0]]), collate([dataset[1]])]
    engine = MaximumLikelihoodEstimationEngine(model, build_optimizer(model, config, lr=1.0), config)
    expected = []
    for batch in batches:
        model.zero_grad()
        loss, _ = engine.compute_loss(batch)
        loss.backward()
        expected.append(model.generator.bias.grad.clone())
    model.zero_grad(set_to_none=True)
    before = model.generator.bias.detach().clone()
    engine.run(batches, max_epochs=1)
    torch.testing.assert_close(before - model.generator.bias.detach(), (expected[0] + expected[1]) / 2)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_token_losses_match_torch_cross_entropy(label_smoothing):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    target = torch.randint(PAD + 1, 11, (3, 5))
    target[0, 3:] = PAD
    target[2, 1:] = PAD
    log_probs = logits.log_softmax(dim=-1).requires_grad_()
    loss, nll, n_tokens = token_losses(log_probs, target, label_smoothing)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD,
                                                 label_smoothing=label_smoothing, reduction="sum")
    expected_nll = torch.nn.functional.nll_loss(log_probs.detach().flatten(0, 1), target.flatten(),
                                                ignore_index=PAD, reduction="sum")
    assert n_tokens == 15 - 2 - 4
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(nll, expected_nll)
    # the gradient through log_softmax equals torch's through logits
    logits_leaf = logits.clone().requires_grad_()
    token_losses(logits_leaf.log_softmax(dim=-1), target, label_smoothing)[0].backward()
    reference = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(reference.flatten(0, 1), target.flatten(), ignore_index=PAD,
                                      label_smoothing=label_smoothing, reduction="sum").backward()
    torch.testing.assert_close(logits_leaf.grad, reference.grad)
    assert log_probs.grad[0, 3:].abs().sum() == 0  # PAD positions get no gradient


def test_schedules():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    warm = build_scheduler(optimizer, {"warmup_steps": 4}, updates_per_epoch=10)
    factors = [warm.lr_lambdas[0](n) for n in range(8)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[7] == pytest.approx(math.sqrt(4 / 8))
    decay = build_scheduler(optimizer, {"lr_step": 2, "lr_gamma": 0.5, "lr_decay_start": 3}, updates_per_epoch=10)
    by_epoch = [decay.lr_lambdas[0](epoch * 10) for epoch in range(6)]  # epochs 1..6
    assert by_epoch == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam)])
def test_optimizer_choice(name, cls):
    model = torch.nn.Linear(2, 2)
    assert isinstance(build_optimizer(model, {"optimizer": name}), cls)
