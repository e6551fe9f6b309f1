"""The RL estimator: gradient, baselines, masking after EOS, direction of an update."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_tiny_model

from simple_nmt.config import default_config
from simple_nmt.data import BOS, EOS, PAD, ParallelDataset, TextField, Tokenizer, Vocab, collate
from simple_nmt.models import Seq2Seq, Transformer, build_model
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.rewards import sentence_bleu
from simple_nmt.rl_trainer import (
    MinimumRiskTrainingEngine,
    after_eos,
    baseline_and_actors,
    encodes_once,
    projected_log_probs,
    projects_features,
    returns_logits,
    selected_log_probs,
    sequence_log_probs,
    strip_eos,
)
from simple_nmt.toy import make_corpus
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine

VOCAB = 7  # PAD UNK BOS EOS and tokens 4, 5, 6


class Unigram(EncoderDecoder):
    """P(y_t | x, y_<t) = softmax(theta) at every step: log P(y) has a hand-computable gradient."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 0.3, 0.5, -0.2, 0.1]))

    def _log_probs(self) -> torch.Tensor:
        return self.theta.log_softmax(dim=-1)

    def encode(self, src, src_lengths):
        return {"src": src}

    def decode_step(self, y_prev, state):
        return self._log_probs().expand(y_prev.size(0), -1), state

    def forward(self, src, src_lengths, tgt_in):
        return self._log_probs().expand(tgt_in.size(0), tgt_in.size(1), -1)


def count_token_4(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """A user reward: how many times token 4 occurs."""
    return (hyps == 4).sum(dim=1).float()


class Recording(MinimumRiskTrainingEngine):
    """Keeps the samples it drew, so that the test can compute the gradient by hand."""

    def sample(self, *args, **kwargs):
        self.samples = super().sample(*args, **kwargs)
        return self.samples


def make_batch(batch_size: int = 3):
    src = torch.full((batch_size, 2), 5)
    tgt = torch.tensor([[BOS, 4, 4, EOS]] * batch_size)
    return {"src": src, "src_lengths": torch.full((batch_size,), 2), "tgt": tgt}


def engine_for(model, engine_class=Recording, **options):
    config = default_config(**{"max_length": 6, "rl_n_samples": 3, "max_grad_norm": 0.0, **options})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return engine_class(model, optimizer, config, reward=count_token_4)


def analytic_log_prob_grad(model: Unigram, ids: torch.Tensor) -> torch.Tensor:
    """d log P(y) / d theta = sum_t (onehot(y_t) - softmax(theta)) over the counted tokens, per row."""
    p = model.theta.detach().softmax(dim=-1)
    counted = ~(after_eos(ids) | (ids == PAD))
    onehots = torch.nn.functional.one_hot(ids, VOCAB).float() * counted[..., None]
    return onehots.sum(dim=1) - counted.sum(dim=1, keepdim=True) * p


@pytest.mark.parametrize("baseline", ["mean", "loo", "none"])
def test_loss_gradient_equals_the_analytic_reinforce_gradient(baseline):
    torch.manual_seed(0)
    model = Unigram()
    engine = engine_for(model, rl_baseline=baseline)
    loss, _ = engine.compute_loss(make_batch())
    loss.backward()

    samples = engine.samples.view(3, 4, -1)  # (batch_size, K + 1, length)
    rewards = count_token_4(strip_eos(engine.samples), None).view(3, 4)
    grads = analytic_log_prob_grad(model, engine.samples).view(3, 4, VOCAB)
    if baseline == "mean":
        advantage = rewards[:, 0] - rewards[:, 1:].mean(dim=1)
        expected = -(advantage[:, None] * grads[:, 0]).mean(dim=0)
    else:
        base = (rewards.sum(1, keepdim=True) - rewards) / 3 if baseline == "loo" else torch.zeros_like(rewards)
        expected = -((rewards - base)[..., None] * grads).mean(dim=(0, 1))
    assert samples.size(2) >= 1
    torch.testing.assert_close(model.theta.grad, expected, atol=1e-5, rtol=1e-5)


def test_mrt_gradient_matches_the_risk_over_the_sample_set():
    torch.manual_seed(1)
    model = Unigram()
    engine = engine_for(model, rl_objective="mrt", rl_mrt_alpha=0.5)
    loss, _ = engine.compute_loss(make_batch())
    loss.backward()
    theta = model.theta.detach().clone().requires_grad_(True)
    log_p_table = theta.log_softmax(dim=-1)
    ids = engine.samples
    counted = ~(after_eos(ids) | (ids == PAD))
    log_p = (log_p_table[ids] * counted).sum(dim=1).view(3, 4)
    rewards = count_token_4(strip_eos(ids), None).view(3, 4)
    risk = -((0.5 * log_p).softmax(dim=1) * rewards).sum(dim=1).mean()
    risk.backward()
    torch.testing.assert_close(model.theta.grad, theta.grad, atol=1e-5, rtol=1e-5)


def test_baselines_algebra():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 8.0]])
    actors, base = baseline_and_actors(rewards, "mean")
    assert actors.tolist() == [True, False, False, False]
    torch.testing.assert_close(base[:, 0], torch.tensor([11 / 3, 4.0]))
    actors, base = baseline_and_actors(rewards, "loo")
    assert actors.all()
    torch.testing.assert_close(base, torch.tensor([[11 / 3, 10 / 3, 3.0, 2.0], [4.0, 4.0, 8 / 3, 4 / 3]]))
    # leave-one-out advantages of a source sum to zero
    torch.testing.assert_close((rewards - base).sum(dim=1), torch.zeros(2))
    _, base = baseline_and_actors(rewards, "greedy", torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(base, torch.tensor([[5.0] * 4, [1.0] * 4]))
    _, base = baseline_and_actors(rewards, "none")
    assert not base.any()


def test_tokens_after_eos_change_nothing():
    model = Unigram()
    ids = torch.tensor([[4, 5, EOS, PAD, PAD], [6, EOS, PAD, PAD, PAD], [4, 4, 4, 4, 4]])
    noisy = ids.clone()
    noisy[0, 3:] = torch.tensor([4, 6])
    noisy[1, 2:] = torch.tensor([EOS, 4, 5])
    src, lengths = torch.ones(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long)
    torch.testing.assert_close(sequence_log_probs(model, src, lengths, noisy),
                               sequence_log_probs(model, src, lengths, ids))
    assert torch.equal(strip_eos(noisy), strip_eos(ids))
    assert strip_eos(ids).tolist()[1] == [6, PAD, PAD, PAD, PAD]
    expected = model.theta.log_softmax(-1)[[4, 5, EOS]].sum()
    torch.testing.assert_close(sequence_log_probs(model, src, lengths, ids)[0], expected)


class ForwardOnly(torch.nn.Module):
    """A research model with a forward of its own: scored with each output's source repeated."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, src, src_lengths, tgt_in, normalize=True):
        self.shapes.append((src.size(0), src.size(1), tgt_in.size(1)))
        return self.inner(src, src_lengths, tgt_in, normalize)


@pytest.mark.parametrize("cls", [Seq2Seq, Transformer])
@pytest.mark.parametrize("path", ["encode once", "forward"])
def test_log_probs_by_length_groups_equal_one_full_forward(cls, path):
    model = make_tiny_model(cls, 11, 9)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 11, (3, 5), generator=g)
    src_lengths = torch.tensor([5, 3, 2])
    src[1, 3:], src[2, 2:] = PAD, PAD
    ids = torch.randint(4, 9, (6, 20), generator=g)  # two outputs per source; row 0 never ends
    for row, end in [(1, 6), (2, 2), (3, 5), (4, 0), (5, 12)]:
        ids[row, end], ids[row, end + 1:] = EOS, PAD
    calls = []
    encode, decode = model.encode, model.decode_features
    model.encode = lambda src, src_lengths: calls.append(("encode", *src.shape)) or encode(src, src_lengths)
    model.decode_features = lambda tgt_in, state: calls.append(("decode", *tgt_in.shape)) or decode(tgt_in, state)
    scorer = model if path == "encode once" else ForwardOnly(model)
    log_p = sequence_log_probs(scorer, src, src_lengths, ids)
    # one group per length class, lengths 7 and 6 (rows 1 and 3) together
    if path == "encode once":  # the encoder runs once over the 3 sources
        assert encodes_once(model) and calls == [("encode", 3, 5), ("decode", 1, 1), ("decode", 1, 3),
                                                 ("decode", 2, 7), ("decode", 1, 13), ("decode", 1, 20)]
    else:  # (rows, source width, output width): each output's source, as wide as the group's longest
        assert not encodes_once(scorer) and scorer.shapes == [(1, 2, 1), (1, 3, 3), (2, 5, 7), (1, 2, 13), (1, 5, 20)]
    del model.encode, model.decode_features
    log_p.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the reference: one forward over the whole padded batch, each source repeated for its outputs
    tgt_in = torch.cat([torch.full((6, 1), BOS), ids[:, :-1]], dim=1)
    repeated = src.repeat_interleave(2, dim=0), src_lengths.repeat_interleave(2, dim=0)
    token_log_probs = model(*repeated, tgt_in).gather(2, ids[:, :, None]).squeeze(2)
    expected = token_log_probs.masked_fill(after_eos(ids) | (ids == PAD), 0.0).sum(dim=1)
    expected.sum().backward()
    torch.testing.assert_close(log_p, expected)
    for p, grad in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, grad)
    with pytest.raises(ValueError, match="5 outputs for 3 sources"):
        sequence_log_probs(scorer, src, src_lengths, ids[:5])


def test_hooked_patched_or_compiled_models_are_called_as_they_are():
    model = make_tiny_model(Transformer, 11, 9)
    g = torch.Generator().manual_seed(2)
    src, src_lengths = torch.randint(4, 11, (2, 4), generator=g), torch.full((2,), 4)
    ids = torch.randint(4, 9, (4, 5), generator=g)  # no EOS: every token is scored
    tgt_in = torch.cat([torch.full((4, 1), BOS), ids[:, :-1]], dim=1)
    plain = sequence_log_probs(model, src, src_lengths, ids).detach()
    handle = model.register_forward_hook(lambda module, args, out: out * 0.5)  # e.g. a logit scaling
    assert not encodes_once(model)
    hooked = model(src.repeat_interleave(2, 0), src_lengths.repeat_interleave(2, 0), tgt_in, normalize=False)
    expected = selected_log_probs(hooked, ids).sum(dim=1)
    torch.testing.assert_close(sequence_log_probs(model, src, src_lengths, ids), expected)
    assert not torch.allclose(expected, plain)
    handle.remove()
    assert encodes_once(model)
    model.forward = model.forward
    assert not encodes_once(model)
    del model.forward
    model.compile()
    assert not encodes_once(model)


def test_the_engine_encodes_each_source_once_for_search_and_once_for_rescoring():
    model = make_tiny_model(Transformer, 11, 9).train()
    sizes = []
    encode = model.encode
    model.encode = lambda src, src_lengths: sizes.append(src.size(0)) or encode(src, src_lengths)
    engine = engine_for(model, MinimumRiskTrainingEngine, rl_baseline="loo")  # K + 1 = 4 actors per source
    engine.run([make_batch(2)], max_epochs=1)
    assert sizes == [2, 2]


def test_selected_log_probs_equal_log_softmax_and_gather():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 4, 7, generator=g, dtype=torch.float64)).requires_grad_()
    ids = torch.randint(0, 7, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    expected = logits.log_softmax(-1).gather(2, ids[:, :, None]).squeeze(2)
    (expected_grad,) = torch.autograd.grad((weights * expected).sum(), logits)
    got = selected_log_probs(logits, ids)
    (grad,) = torch.autograd.grad((weights * got).sum(), logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(selected_log_probs, (logits, ids))
    # bfloat16 logits are summed in float32: as close to the float64 result as float32 rounding of the input allows
    half = logits.detach().bfloat16().requires_grad_()
    (half_grad,) = torch.autograd.grad((weights * selected_log_probs(half, ids)).sum(), half)
    exact = half.detach().double().requires_grad_()
    (exact_grad,) = torch.autograd.grad((weights * selected_log_probs(exact, ids)).sum(), exact)
    torch.testing.assert_close(selected_log_probs(half, ids).double(), selected_log_probs(exact, ids),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half_grad.double(), exact_grad, atol=1e-2, rtol=1e-2)
    with pytest.raises(RuntimeError):  # a second derivative is refused, not silently wrong
        (g2,) = torch.autograd.grad(selected_log_probs(logits, ids).sum(), logits, create_graph=True)
        g2.sum().backward()


@pytest.mark.parametrize("bias", [True, False])
def test_projected_log_probs_equal_the_layer_then_selected_log_probs(bias):
    """Chunked logits, remade in backward: the same values and gradients for every chunk size."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(5, 7, bias=bias).double()
    features = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, 7, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    params = [features, *layer.parameters()]
    expected = selected_log_probs(layer(features), ids)
    expected_grads = torch.autograd.grad((weights * expected).sum(), params)
    for chunk_elements in (1, 7, 3 * 7, 12 * 7, 10**6):  # 1 position (at least), 3 (uneven), all, more than all
        got = projected_log_probs(features, layer, ids, chunk_elements=chunk_elements)
        torch.testing.assert_close(got, expected)
        for grad, expected_grad in zip(torch.autograd.grad((weights * got).sum(), params), expected_grads):
            torch.testing.assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(lambda *p: projected_log_probs(p[0], layer, ids, chunk_elements=14), (features,))
    # under bfloat16 autocast: the products in bfloat16, as the layer's own, the log-softmax in float32
    layer32, features32 = layer.float(), features.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = projected_log_probs(features32, layer32, ids, chunk_elements=14)
        reference = selected_log_probs(layer32(features32).float(), ids)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference)
    (half_grad,) = torch.autograd.grad((weights.float() * half).sum(), features32)
    (reference_grad,) = torch.autograd.grad((weights.float() * reference).sum(), features32)
    torch.testing.assert_close(half_grad, reference_grad, atol=2e-2, rtol=2e-2)
    assert layer32.weight.dtype == torch.float32


@pytest.mark.parametrize("cls", [Seq2Seq, Transformer])
def test_rescoring_never_holds_the_logits_whole(cls):
    """The built-in models are re-scored from their output layer's input: no (n, t, V) tensor is kept
    for backward, and a model that defines only ``decode`` is re-scored from its logits."""
    vocab = 4000  # large enough that one chunk (2**20 logits) is a fraction of the 40 x 12 x V logits
    model = make_tiny_model(cls, 11, vocab).train()
    g = torch.Generator().manual_seed(3)
    src, src_lengths = torch.randint(4, 11, (8, 5), generator=g), torch.full((8,), 5)
    ids = torch.randint(4, vocab, (40, 12), generator=g)  # 5 outputs per source, none ends
    saved = []
    torch.manual_seed(0)  # the same dropout masks in both passes
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        log_p = sequence_log_probs(model, src, src_lengths, ids, bucket_ratio=float("inf"))
    assert projects_features(model) and log_p.shape == (40,)
    assert max(saved) < 40 * 12 * vocab / 2

    class LogitsOnly(type(model)):
        def decode(self, tgt_in, state):
            return self.generator(self.decode_features(tgt_in, state)).float()

    model.__class__ = LogitsOnly
    saved.clear()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        same = sequence_log_probs(model, src, src_lengths, ids, bucket_ratio=float("inf"))
    assert not projects_features(model) and max(saved) == 40 * 12 * vocab
    torch.testing.assert_close(same, log_p)


@pytest.mark.parametrize("cls", [Seq2Seq, Transformer])
def test_log_probs_from_logits_equal_a_model_that_gives_log_probs(cls):
    """The built-in models give logits to sequence_log_probs; a forward without normalize gives log-probs."""
    model = make_tiny_model(cls, 11, 9).eval()
    g = torch.Generator().manual_seed(1)
    src, src_lengths = torch.randint(4, 11, (4, 5), generator=g), torch.full((4,), 5)
    ids = torch.randint(4, 9, (4, 8), generator=g)
    ids[1, 3], ids[1, 4:] = EOS, PAD

    class LogProbsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, src, src_lengths, tgt_in):
            return self.inner(src, src_lengths, tgt_in)

    assert returns_logits(model) and returns_logits(torch.compile(model)) and not returns_logits(LogProbsOnly())
    results = []
    for scorer in (model, LogProbsOnly()):
        model.zero_grad()
        log_p = sequence_log_probs(scorer, src, src_lengths, ids)
        log_p.sum().backward()
        results.append((log_p.detach(), [p.grad.clone() for p in model.parameters()]))
    (log_p, grads), (expected, expected_grads) = results
    torch.testing.assert_close(log_p, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(model(src, src_lengths, ids, normalize=False).log_softmax(-1),
                               model(src, src_lengths, ids))


class FixedSamples(MinimumRiskTrainingEngine):
    """Always 'samples' the same two outputs per source: A = (4, 4, EOS) and B = (5, EOS)."""

    def sample(self, src, src_lengths, n, is_greedy=False):
        pair = torch.tensor([[4, 4, EOS], [5, EOS, PAD]])
        return pair.repeat(src.size(0), 1)


def test_one_sgd_step_raises_the_better_sample_and_lowers_the_worse():
    model = Unigram()
    engine = engine_for(model, FixedSamples, rl_n_samples=1, rl_baseline="loo")
    pair = torch.tensor([[4, 4, EOS], [5, EOS, PAD]])
    src, lengths = torch.ones(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    before = sequence_log_probs(model, src, lengths, pair).detach()
    engine.run([make_batch(2)], max_epochs=1)
    after = sequence_log_probs(model, src, lengths, pair).detach()
    assert after[0] > before[0] and after[1] < before[1]
    assert engine.state.output["reward"] == pytest.approx(1.0)  # mean over the actors: (2 + 0) / 2


def test_zero_advantage_is_no_error_and_changes_nothing():
    model = Unigram()
    engine = engine_for(model, FixedSamples, rl_n_samples=1, rl_baseline="loo")
    engine.reward = lambda hyps, refs: torch.full((hyps.size(0),), 7.0)
    before = model.theta.detach().clone()
    engine.run([make_batch(2)], max_epochs=1)
    assert engine.state.n_skipped_steps == 0
    torch.testing.assert_close(model.theta.detach(), before)


def test_research_model_without_n_samples_gets_repeated_sources():
    class PlainSearch(Unigram):
        def search(self, src, src_lengths, is_greedy=True, max_length=255, temperature=1.0, top_k=0, top_p=1.0):
            return super().search(src, src_lengths, is_greedy=is_greedy, max_length=max_length)

    torch.manual_seed(0)
    engine = engine_for(PlainSearch())
    engine.compute_loss(make_batch())
    assert engine.samples.size(0) == 3 * 4




@pytest.mark.parametrize("kind", ["transformer", "seq2seq"])
def test_rl_fine_tuning_raises_held_out_greedy_bleu(kind):
    src, tgt = make_corpus(700, seed=11)
    fields = [TextField(Tokenizer(), Vocab.build([line.split() for line in lines])) for lines in (src, tgt)]
    data = ParallelDataset([fields[0].to_ids(x) for x in src], [fields[1].to_ids(y) for y in tgt])
    train = [collate([data[i] for i in range(j, min(j + 32, 600))]) for j in range(0, 600, 32)]
    held_out = collate([data[i] for i in range(600, 700)])
    config = default_config(**TINY[kind], max_length=30, rl_n_samples=8, rl_baseline="loo", rl_temperature=0.5)
    torch.manual_seed(0)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))

    def held_out_bleu() -> float:
        model.eval()
        ids, _ = model.search(held_out["src"], held_out["src_lengths"], max_length=30)
        return float(sentence_bleu(strip_eos(ids), strip_eos(held_out["tgt"][:, 1:]), PAD).mean())

    MaximumLikelihoodEstimationEngine(model, torch.optim.Adam(model.parameters(), lr=3e-3), config).run(
        train, max_epochs=8)
    before = held_out_bleu()
    torch.manual_seed(1)
    MinimumRiskTrainingEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), config).run(train, max_epochs=4)
    after = held_out_bleu()
    assert after > before + 3.0, (before, after)


class RecordingCandidates(Recording):
    """Also keeps the n-best lists it added."""

    def n_best(self, *args, **kwargs):
        self.beams, self.beam_log_p = super().n_best(*args, **kwargs)
        return self.beams, self.beam_log_p


def unigram_log_p(theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log P(ids) under the Unigram model with parameters ``theta``, up to and including EOS."""
    counted = ~(after_eos(ids) | (ids == PAD))
    return (theta.log_softmax(dim=-1)[ids] * counted).sum(dim=1)


def test_kl_penalty_shapes_each_reward_by_the_log_ratio_to_the_frozen_start_model():
    torch.manual_seed(2)
    model = Unigram()
    engine = engine_for(model, rl_baseline="loo", rl_kl_weight=0.7)
    assert engine.reference is not model and not engine.reference.theta.requires_grad
    with torch.no_grad():
        engine.reference.theta.copy_(torch.tensor([0.0, 0.0, 0.0, -0.4, 0.9, 0.2, -0.3]))
        start = engine.reference.theta.clone()
    loss, output = engine.compute_loss(make_batch())
    loss.backward()
    ids = engine.samples[0]  # (ids, log_probs) of the search
    log_ratio = (unigram_log_p(model.theta.detach(), ids) - unigram_log_p(start, ids)).view(3, 4)
    scores = count_token_4(strip_eos(ids), None).view(3, 4) - 0.7 * log_ratio
    advantage = scores - (scores.sum(1, keepdim=True) - scores) / 3
    grads = analytic_log_prob_grad(model, ids).view(3, 4, VOCAB)
    torch.testing.assert_close(model.theta.grad, -(advantage[..., None] * grads).mean(dim=(0, 1)),
                               atol=1e-5, rtol=1e-5)
    assert output["kl"] == pytest.approx(float(log_ratio.mean()), abs=1e-5)
    assert torch.equal(engine.reference.theta, start)  # frozen


def test_length_term_and_kl_penalty_shape_each_reward_apart_from_the_reward_itself():
    torch.manual_seed(5)
    model = Unigram()
    engine = engine_for(model, rl_baseline="loo", rl_length_weight=0.3, rl_kl_weight=0.7)
    with torch.no_grad():
        engine.reference.theta.copy_(torch.tensor([0.0, 0.0, 0.0, -0.4, 0.9, 0.2, -0.3]))
        start = engine.reference.theta.clone()
    loss, output = engine.compute_loss(make_batch())
    loss.backward()
    ids = engine.samples[0]
    hyps = strip_eos(ids)
    rewards = count_token_4(hyps, None).view(3, 4)
    # the references are "4 4": two tokens; an empty hypothesis counts as one
    lengths = (hyps != PAD).sum(dim=1).clamp(min=1).double()
    length_term = (100 * (lengths / 2).log().abs()).view(3, 4)
    assert length_term.max() > 0  # samples of other lengths than the reference's: the term is exercised
    log_ratio = (unigram_log_p(model.theta.detach(), ids) - unigram_log_p(start, ids)).view(3, 4)
    scores = rewards - 0.3 * length_term.float() - 0.7 * log_ratio
    advantage = scores - (scores.sum(1, keepdim=True) - scores) / 3
    grads = analytic_log_prob_grad(model, ids).view(3, 4, VOCAB)
    torch.testing.assert_close(model.theta.grad, -(advantage[..., None] * grads).mean(dim=(0, 1)),
                               atol=1e-4, rtol=1e-4)
    assert output["reward"] == pytest.approx(float(rewards.mean()), abs=1e-5)  # the reward as it is, unshaped


@pytest.mark.parametrize("objective", ["reinforce", "mrt"])
def test_advantages_normalised_per_source_by_the_std_of_its_rewards(objective):
    torch.manual_seed(3)
    model = Unigram()
    engine = engine_for(model, rl_baseline="loo", rl_adv_norm=True, rl_objective=objective, rl_mrt_alpha=0.5)
    batch = make_batch(4)
    loss, _ = engine.compute_loss(batch)
    loss.backward()
    ids = engine.samples
    rewards = count_token_4(strip_eos(ids), None).view(4, 4)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    theta = model.theta.detach().clone().requires_grad_(True)
    if objective == "reinforce":
        advantage = rewards - (rewards.sum(1, keepdim=True) - rewards) / 3
        advantage = torch.where(std > 0, advantage / std, torch.zeros_like(advantage))
        expected = -(advantage * unigram_log_p(theta, ids).view(4, 4)).mean()
    else:
        normalised = torch.where(std > 0, rewards / std, torch.zeros_like(rewards))
        expected = -((0.5 * unigram_log_p(theta, ids).view(4, 4)).softmax(dim=1) * normalised).sum(dim=1).mean()
    expected.backward()
    torch.testing.assert_close(model.theta.grad, theta.grad, atol=1e-5, rtol=1e-5)


def test_mrt_over_samples_and_the_n_best_list_of_a_beam_search():
    torch.manual_seed(4)
    model = Unigram()
    engine = engine_for(model, RecordingCandidates, rl_objective="mrt", rl_mrt_alpha=0.5, rl_n_best=2)
    loss, _ = engine.compute_loss(make_batch())
    loss.backward()
    beams = engine.beams.view(3, 2, -1)
    batch = make_batch()
    hyps, _ = model.batch_beam_search(batch["src"], batch["src_lengths"], beam_size=2, max_length=6, n_best=2)
    for per_source, rows in zip(hyps, beams.tolist()):  # the n-best lists, ended by EOS unless cut, then PAD
        assert [h + [PAD] * (beams.size(2) - len(h)) for h in per_source] == rows
    samples = engine.samples.view(3, 4, -1)
    length = max(samples.size(2), beams.size(2))
    pad = lambda x: torch.nn.functional.pad(x, (0, length - x.size(2)), value=PAD)  # noqa: E731
    candidates = torch.cat([pad(samples), pad(beams)], dim=1).view(18, length)
    theta = model.theta.detach().clone().requires_grad_(True)
    rewards = count_token_4(strip_eos(candidates), None).view(3, 6)
    risk = -((0.5 * unigram_log_p(theta, candidates).view(3, 6)).softmax(dim=1) * rewards).sum(dim=1).mean()
    risk.backward()
    torch.testing.assert_close(model.theta.grad, theta.grad, atol=1e-5, rtol=1e-5)


def test_mrt_over_the_n_best_list_alone_with_the_kl_penalty_from_the_beams_log_probs():
    torch.manual_seed(5)
    model = Unigram()
    engine = engine_for(model, RecordingCandidates, rl_objective="mrt", rl_mrt_alpha=0.5, rl_n_best=3,
                        rl_n_best_only=True, rl_kl_weight=0.4)
    with torch.no_grad():
        engine.reference.theta.copy_(torch.tensor([0.0, 0.0, 0.0, 0.6, -0.5, 0.4, 0.0]))
        start = engine.reference.theta.clone()
    engine.samples = None
    loss, output = engine.compute_loss(make_batch())
    loss.backward()
    assert engine.samples is None  # nothing sampled
    beams = engine.beams  # |beams| = (3 * 3, length)
    assert beams.size(0) == 9
    # the beam's scores are the candidates' log P under the model
    torch.testing.assert_close(engine.beam_log_p, unigram_log_p(model.theta.detach(), beams))
    log_ratio = (unigram_log_p(model.theta.detach(), beams) - unigram_log_p(start, beams)).view(3, 3)
    scores = count_token_4(strip_eos(beams), None).view(3, 3) - 0.4 * log_ratio
    theta = model.theta.detach().clone().requires_grad_(True)
    risk = -((0.5 * unigram_log_p(theta, beams).view(3, 3)).softmax(dim=1) * scores).sum(dim=1).mean()
    risk.backward()
    torch.testing.assert_close(model.theta.grad, theta.grad, atol=1e-5, rtol=1e-5)
    assert output["kl"] == pytest.approx(float(log_ratio.mean()), abs=1e-5)


def test_kl_penalty_over_samples_and_the_n_best_list_takes_each_candidates_search_log_p():
    torch.manual_seed(6)
    model = Unigram()
    engine = engine_for(model, RecordingCandidates, rl_objective="mrt", rl_mrt_alpha=0.5, rl_n_best=2,
                        rl_kl_weight=0.4)
    with torch.no_grad():
        engine.reference.theta.copy_(torch.tensor([0.0, 0.0, 0.0, 0.6, -0.5, 0.4, 0.0]))
    _, output = engine.compute_loss(make_batch())
    samples, beams = engine.samples[0].view(3, 4, -1), engine.beams.view(3, 2, -1)
    length = max(samples.size(2), beams.size(2))
    pad = lambda x: torch.nn.functional.pad(x, (0, length - x.size(2)), value=PAD)  # noqa: E731
    candidates = torch.cat([pad(samples), pad(beams)], dim=1).view(18, length)
    log_ratio = unigram_log_p(model.theta.detach(), candidates) - unigram_log_p(engine.reference.theta, candidates)
    assert output["kl"] == pytest.approx(float(log_ratio.mean()), abs=1e-5)


def test_n_best_candidates_need_the_risk_objective():
    with pytest.raises(ValueError, match="--rl_n_best 2: beam-search candidates are not samples"):
        default_config(rl_n_best=2)
    with pytest.raises(ValueError, match="--rl_n_best_only needs --rl_n_best N"):
        default_config(rl_objective="mrt", rl_n_best_only=True)
    with pytest.raises(ValueError, match="rl_kl_weight: must be >= 0.0"):
        default_config(rl_kl_weight=-1.0)
