"""The RL step's two extension points, ``rollout`` and ``loss``, and the inputs, names and checks of rewards."""

from __future__ import annotations

import pytest
import sacrebleu
import torch
from test_rl import VOCAB, Unigram, count_token_4, engine_for, make_batch, unigram_log_p

from simple_nmt.config import default_config
from simple_nmt.data import EOS, PAD, UNK, ParallelDataset, TextField, Tokenizer, Vocab, collate
from simple_nmt.rewards import REWARD_INPUTS, strip_eos
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine, Rollout, sequence_log_probs

# ---------------------------------------------------------------- rollout alone


@pytest.mark.parametrize("options", [
    {"rl_baseline": "mean"},
    {"rl_baseline": "loo", "rl_kl_weight": 0.5},
    {"rl_baseline": "greedy"},
    {"rl_baseline": "greedy", "rl_kl_weight": 0.5},
    {"rl_baseline": "none"},
    {"rl_objective": "mrt", "rl_n_best": 2},
])
def test_rollout_alone_holds_no_graph_and_the_rewards_of_its_candidates(options):
    torch.manual_seed(0)
    model = Unigram()
    engine = engine_for(model, MinimumRiskTrainingEngine, **options)
    batch = make_batch(3)
    rollout = engine.rollout(batch)  # with gradients enabled: it makes none
    tensors = {name: value for name, value in vars(rollout).items() if value is not None}
    assert not any(t.requires_grad or t.grad_fn is not None for t in tensors.values())
    n = 4 + options.get("rl_n_best", 0)
    assert rollout.candidates.size(0) == 3 * n
    assert rollout.rewards.shape == rollout.scores.shape == rollout.baselines.shape == (3, n)
    assert rollout.actors.shape == (n,) and rollout.actors.dtype == torch.bool
    torch.testing.assert_close(rollout.rewards, count_token_4(strip_eos(rollout.candidates), None).view(3, n))
    kl = "rl_kl_weight" in options
    assert (rollout.log_ratio is not None) == kl
    if kl:  # the scores are the rewards shaped by the log-ratio to the start model (equal to the model here)
        assert rollout.log_ratio.shape == (3, n)
        torch.testing.assert_close(rollout.scores, rollout.rewards - 0.5 * rollout.log_ratio)
    else:
        assert rollout.scores is rollout.rewards
    if options.get("rl_baseline") == "greedy":  # scored once, with the KL penalty where it is on
        greedy, greedy_log_probs = model.search(batch["src"], batch["src_lengths"], max_length=6)
        expected = count_token_4(strip_eos(greedy), None)
        if kl:
            start_log_p = sequence_log_probs(engine.reference, batch["src"], batch["src_lengths"], greedy)
            expected = expected - 0.5 * (greedy_log_probs.sum(dim=1) - start_log_p)
        torch.testing.assert_close(rollout.greedy_scores, expected)
        torch.testing.assert_close(rollout.baselines, rollout.greedy_scores[:, None].expand(-1, n))
    else:
        assert rollout.greedy_scores is None
    if options.get("rl_baseline") == "mean":
        assert rollout.actors.tolist() == [True, False, False, False]
        torch.testing.assert_close(rollout.baselines[:, 0], rollout.scores[:, 1:].mean(dim=1))
    if options.get("rl_objective") == "mrt":
        assert rollout.actors.all() and not rollout.baselines.any()


# ---------------------------------------------------------------- loss alone


def hand_made_rollout(actors: list[bool]) -> Rollout:
    """Two sources, two candidates each: (4 4 EOS), (5 EOS) | (6 EOS), (EOS)."""
    candidates = torch.tensor([[4, 4, EOS], [5, EOS, PAD], [6, EOS, PAD], [EOS, PAD, PAD]])
    rewards = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    return Rollout(candidates, rewards, rewards, torch.tensor(actors), torch.tensor([[0.5, 0.5], [1.0, 2.5]]))


@pytest.mark.parametrize("objective, actors", [("reinforce", [True, True]), ("reinforce", [True, False]),
                                               ("mrt", [True, True])])
def test_loss_alone_of_a_hand_made_rollout(objective, actors):
    model = Unigram()
    engine = engine_for(model, MinimumRiskTrainingEngine, rl_objective=objective, rl_mrt_alpha=0.5)
    rollout = hand_made_rollout(actors)
    loss, metrics = engine.loss(make_batch(2), rollout)
    loss.backward()
    theta = model.theta.detach().clone().requires_grad_(True)
    log_p = unigram_log_p(theta, rollout.candidates).view(2, 2)[:, actors]
    advantage = (rollout.scores - rollout.baselines)[:, actors]
    if objective == "mrt":
        expected = -((0.5 * log_p).softmax(dim=1) * advantage).sum(dim=1).mean()
    else:
        expected = -(advantage * log_p).mean()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(model.theta.grad, theta.grad)
    assert metrics == pytest.approx({
        "loss": float(expected.detach()), "reward": float(rollout.rewards[:, actors].mean()),
        "baseline": float(rollout.baselines[:, actors].mean()), "advantage": float(advantage.mean()),
        "adv_std": float(advantage.std(correction=0)),
        "len_ratio": 4 / 8,  # output tokens 2 + 1 + 1 + 0, reference tokens 2 per candidate
        "no_eos": 0.0,
    })


# ---------------------------------------------------------------- overriding one of them


class FixedRollout(MinimumRiskTrainingEngine):
    """A researcher's rollout (here a hand-made one), with the library's loss."""

    def rollout(self, batch):
        assert not torch.is_grad_enabled()  # compute_loss runs it without a graph
        return hand_made_rollout([True, True])


class BestOfN(MinimumRiskTrainingEngine):
    """A researcher's loss on the library's rollout: the MLE loss of each source's best candidate."""

    def loss(self, batch, rollout):
        self.seen = rollout
        batch_size, n = rollout.scores.shape
        best = rollout.scores.argmax(dim=1) + torch.arange(batch_size) * n  # |best| = (batch_size,)
        loss = -sequence_log_probs(self.model, batch["src"], batch["src_lengths"], rollout.candidates[best]).mean()
        return loss, {"loss": float(loss.detach())}


def test_a_subclass_overrides_the_rollout_alone():
    model = Unigram()
    engine = engine_for(model, FixedRollout)
    loss, _ = engine.compute_loss(make_batch(2))
    expected, _ = engine_for(Unigram(), MinimumRiskTrainingEngine).loss(make_batch(2), hand_made_rollout([True, True]))
    torch.testing.assert_close(loss, expected)


def test_a_subclass_overrides_the_loss_alone():
    torch.manual_seed(1)
    model = Unigram()
    engine = engine_for(model, BestOfN, rl_baseline="loo")
    before = model.theta.detach().clone()
    engine.run([make_batch(3)], max_epochs=1)
    rollout = engine.seen
    torch.testing.assert_close(rollout.rewards, count_token_4(strip_eos(rollout.candidates), None).view(3, 4))
    assert not torch.equal(model.theta.detach(), before)
    assert engine.state.output["loss"] > 0


# ---------------------------------------------------------------- what a reward sees


SRC_LINES = ["a b", "c", "a a c", "b c", "c a"]
TGT_LINES = ["x y", "z", "x x z", "y zebra", "z x"]  # 'zebra' is not in the vocabulary: UNK in the ids


def corpus_batch(order: list[int]) -> tuple[dict[str, torch.Tensor], TextField]:
    """A batch of the examples at ``order`` of a dataset that dropped line 2 (too long): its index holds the
    line numbers of the files, not the positions in the dataset."""
    src_field = TextField(Tokenizer(), Vocab.build([line.split() for line in SRC_LINES]))
    tgt_field = TextField(Tokenizer(), Vocab(Vocab.build([["x", "y", "z"]]).itos))  # ids 4, 5, 6 as Unigram's
    assert len(tgt_field.vocab) == VOCAB
    data = ParallelDataset([src_field.to_ids(line) for line in SRC_LINES],
                           [tgt_field.to_ids(line) for line in TGT_LINES], max_length=2)
    return collate([data[i] for i in order]), tgt_field


class SeesEverything:
    """A reward that takes every input, checks that they line up with the rows, and counts its calls."""

    def __init__(self, tgt_field: TextField):
        self.tgt_field, self.calls = tgt_field, []

    def __call__(self, hyps, refs, *, src, src_text, hyp_text, ref_text, index):
        rows = hyps.size(0)
        assert src.size(0) == len(src_text) == len(hyp_text) == len(ref_text) == index.size(0) == rows
        for k, line in enumerate(index.tolist()):
            assert src_text[k] == SRC_LINES[line] and ref_text[k] == TGT_LINES[line]
            assert hyp_text[k] == self.tgt_field.to_text(hyps[k].tolist())
        self.calls.append((rows, src, index))
        return (hyps == 4).sum(dim=1)  # an integer count: taken as float32


@pytest.mark.parametrize("baseline", ["loo", "greedy"])
def test_a_reward_gets_the_sources_lines_and_texts_of_its_rows(baseline):
    torch.manual_seed(2)
    batch, tgt_field = corpus_batch([2, 0, 3])  # dataset positions 2, 0, 3: lines 3, 0, 4
    assert batch["index"].tolist() == [3, 0, 4]
    reward = SeesEverything(tgt_field)
    config = default_config(max_length=6, rl_n_samples=3, rl_baseline=baseline)
    model = Unigram()
    engine = MinimumRiskTrainingEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), config,
                                       tgt_field=tgt_field, reward=reward, src_lines=SRC_LINES, tgt_lines=TGT_LINES)
    rollout = engine.rollout(batch)
    # one call for the samples (4 rows per source), one for the greedy outputs (1 per source)
    assert [rows for rows, _, _ in reward.calls] == ([12, 3] if baseline == "greedy" else [12])
    for rows, src, index in reward.calls:
        n = rows // 3
        assert torch.equal(src, batch["src"].repeat_interleave(n, dim=0))
        assert torch.equal(index, batch["index"].repeat_interleave(n, dim=0))
    torch.testing.assert_close(rollout.rewards, (rollout.candidates == 4).sum(dim=1).float().view(3, 4))


def test_a_text_reward_scores_the_raw_reference_line_not_unk():
    torch.manual_seed(3)
    batch, tgt_field = corpus_batch([2, 3])  # lines 3 ('y zebra') and 4
    assert UNK in batch["tgt"][0].tolist()
    config = default_config(max_length=6, rl_n_samples=3, rl_reward="chrf")
    model = Unigram()
    engine = MinimumRiskTrainingEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), config,
                                       tgt_field=tgt_field, tgt_lines=TGT_LINES)
    rollout = engine.rollout(batch)
    hyp_text = [tgt_field.to_text(row) for row in rollout.candidates.tolist()]
    refs = [TGT_LINES[i] for i in batch["index"].repeat_interleave(4).tolist()]
    expected = [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyp_text, refs)]
    torch.testing.assert_close(rollout.rewards.view(-1), torch.tensor(expected))
    rebuilt = [tgt_field.to_text(tgt_field.to_ids(r)) for r in refs]  # what the ids say: 'y <unk>'
    as_unk = [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyp_text, rebuilt)]
    assert rebuilt[0] == "y <unk>" and expected[:4] != as_unk[:4]


def test_rewards_missing_what_they_take_are_refused_at_construction():
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    _, tgt_field = corpus_batch([0])
    config = default_config(max_length=6)

    def src_text_reward(hyps, refs, src_text):
        return hyps.sum(dim=1)

    model = Unigram()
    for kwargs, message in [
        ({"reward": "chrf", "tgt_field": tgt_field}, r"^reward 'chrf' takes ref_text: pass tgt_lines= to the engine"),
        ({"reward": "sacrebleu", "tgt_lines": TGT_LINES}, r"^reward 'sacrebleu' takes hyp_text: pass tgt_field="),
        ({"reward": src_text_reward, "tgt_lines": TGT_LINES},
         r"^reward .*src_text_reward takes src_text: pass src_lines= to the engine \(the raw source lines"),
        ({"src_lines": SRC_LINES, "tgt_lines": TGT_LINES[:2]}, r"^5 src_lines but 2 tgt_lines"),
    ]:
        with pytest.raises(ValueError, match=message):
            MinimumRiskTrainingEngine(model, sgd(model), config, **kwargs)

    def anything(hyps, refs, **inputs):  # gets what there is: no lines here, no refusal
        anything.seen = set(inputs)
        return hyps.sum(dim=1)

    engine = MinimumRiskTrainingEngine(model, sgd(model), config, tgt_field=tgt_field, reward=anything)
    engine.rollout(corpus_batch([0, 1])[0])
    assert anything.seen == set(REWARD_INPUTS) - {"src_text", "ref_text"}
    engine.reward = lambda hyps, refs, index: hyps.sum(dim=1)
    with pytest.raises(ValueError, match=r"^reward .*<lambda> takes the examples' line numbers .* the batch has no "):
        engine.rollout(make_batch(2))


# ---------------------------------------------------------------- names and checks


def module_reward(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    return (hyps == 5).sum(dim=1).float()


def test_the_engine_records_the_name_of_its_reward_so_that_a_resumed_run_rebuilds_it():
    model = Unigram()

    def build(config, **kwargs):
        return MinimumRiskTrainingEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), config, **kwargs)

    config = default_config(max_length=6)
    assert build(config).config.rl_reward == "bleu"
    assert build(config, reward="gleu").config.rl_reward == "gleu"
    engine = build(config, reward=module_reward)
    assert engine.config.rl_reward == f"{__name__}:module_reward"
    assert build(engine.config).reward is module_reward  # what a resumed run does with the stored config
    assert build(config, reward=f"{__name__}:module_reward").reward is module_reward
    engine.reward = lambda hyps, refs: hyps.sum(dim=1)  # no importable name: None, and a resumed run must pass one
    assert engine.config.rl_reward is None
    with pytest.raises(ValueError, match="no reward: config.rl_reward is None"):
        build(engine.config)
    with pytest.raises(ValueError, match=r"^reward 'no_such_module:f' does not import"):
        build(config, reward="no_such_module:f")


EXPECTED = r"; expected a real-valued tensor of shape \(12,\), one score per row$"


@pytest.mark.parametrize("reward, message", [
    (lambda hyps, refs: torch.zeros(len(hyps), 3), r"a tensor of shape \(12, 3\) and dtype torch.float32" + EXPECTED),
    (lambda hyps, refs: hyps.sum().float(), r"a tensor of shape \(\) and dtype torch.float32" + EXPECTED),
    (lambda hyps, refs: hyps.sum(dim=1).tolist(), "a list" + EXPECTED),
    (lambda hyps, refs: torch.full((hyps.size(0),), float("nan")), r"non-finite scores \(e.g. nan\); expected finite"),
])
def test_a_wrong_reward_output_is_one_line_naming_the_reward(reward, message):
    engine = engine_for(Unigram(), MinimumRiskTrainingEngine)
    engine.reward = reward
    with pytest.raises(ValueError, match=rf"^reward <lambda> returned {message}"):
        engine.compute_loss(make_batch(3))


def test_the_kl_penalty_start_model_is_a_checkpoint_object():
    model = Unigram()
    plain = engine_for(model, MinimumRiskTrainingEngine)
    kl = engine_for(model, MinimumRiskTrainingEngine, rl_kl_weight=0.1)
    assert "reference" not in plain.checkpoint_objects()
    objects = kl.checkpoint_objects()
    assert objects["reference"] is kl.reference and objects.keys() - {"reference"} == plain.checkpoint_objects().keys()


def test_rl_epsilon_reaches_the_search_and_is_left_out_when_off():
    seen = []

    class Spy(Unigram):
        def search(self, *args, **kwargs):
            seen.append(kwargs.get("epsilon"))
            return super().search(*args, **kwargs)

    for epsilon in (0.0, 0.05):
        engine_for(Spy(), rl_epsilon=epsilon).rollout(make_batch())
    assert seen == [None, 0.05]
