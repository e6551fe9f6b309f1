"""Decoding: greedy, sampling and beam search over the models' step interface.

Most exact checks use ``Scripted``, a model whose next-token distribution is a
hand-written table keyed by the prefix generated so far, so that the expected
beams, hypotheses and scores can be worked out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import make_tiny_model

from simple_nmt.data import BOS, EOS, LIBRARY_IDS, PAD, UNK, SpecialIds
from simple_nmt.models import Seq2Seq, Transformer
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.search import (
    _greedy,
    _sample,
    block_argmax,
    block_topk,
    draw,
    exp,
    filter_logits,
    float_log_softmax,
    length_penalty,
    logsumexp,
    repeat_state,
    select_state,
)

A, B, C = 4, 5, 6
V = 7  # PAD, UNK, BOS, EOS, a, b, c
NEG_INF = float("-inf")

Dist = dict[int, float]


# --------------------------------------------------------------------------- scripted model


class Scripted(EncoderDecoder):
    """Next-token probabilities from ``dist(source ids without PAD, prefix without BOS)``.

    The prefix lives in the state as a batch-first tensor of ids, so that the
    search functions' repeat / select of the state carries it along the beams.
    """

    def __init__(self, dist: Callable[[tuple[int, ...], tuple[int, ...]], Dist]):
        super().__init__()
        self.dist = dist
        self.cache: dict[tuple, list[float]] = {}
        self.n_encode = 0

    def log_prob_row(self, src: tuple[int, ...], prefix: tuple[int, ...]) -> list[float]:
        key = (src, prefix)
        if key not in self.cache:
            probs = self.dist(src, prefix)
            assert abs(sum(probs.values()) - 1.0) < 1e-9, probs
            self.cache[key] = [math.log(probs[i]) if probs.get(i, 0.0) > 0 else NEG_INF for i in range(V)]
        return self.cache[key]

    def encode(self, src, src_lengths):
        self.n_encode += 1
        return {
            "src": src.clone(),
            "prefix": src.new_empty(src.size(0), 0),  # BOS, then the tokens generated so far
            "nested": [{"lengths": src_lengths.clone()}],
            "tag": "scripted",  # not a tensor: passed through untouched
        }

    def decode_step(self, y_prev, state):
        assert state["tag"] == "scripted"
        prefix = torch.cat([state["prefix"], y_prev[:, None]], dim=1)
        assert prefix.size(0) == state["src"].size(0) == state["nested"][0]["lengths"].size(0)
        rows = []
        for s, p in zip(state["src"].tolist(), prefix.tolist()):
            assert p[0] == BOS, p
            rows.append(self.log_prob_row(tuple(t for t in s if t != PAD), tuple(p[1:])))
        return torch.tensor(rows, dtype=torch.float32), dict(state, prefix=prefix)

    def forward(self, src, src_lengths, tgt_in):  # not used by search
        raise NotImplementedError


def table_model(table: dict[tuple[int, ...], Dist], default: Dist | Callable[[tuple[int, ...]], Dist]) -> Scripted:
    def dist(src, prefix):
        if prefix in table:
            return table[prefix]
        return default(prefix) if callable(default) else default

    return Scripted(dist)


def src_batch(lengths: list[int], token: int = A) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = token
    return src, torch.tensor(lengths)


def lp(*probs: float) -> float:
    """Sum of log-probabilities, i.e. the raw score of a path."""
    return sum(math.log(p) for p in probs)


def gnmt(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def assert_close(actual, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def strip(ids: list[int]) -> list[int]:
    """An output row up to and including its first EOS, without the PAD after it."""
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


# --------------------------------------------------------------------------- tables

# "Flip" table. Beam trace, beam 2 (probabilities of the whole prefix):
#   step 1: [a] .5, [b] .4
#   step 2: [b a] .36, [a </s>] .30            (others: [a a] .1, [a b] .05, [b x] .01 ...)
#   step 3: [a </s>] .30 (kept, PAD at no cost), [b a </s>] .27  -> all finished
# With beam 3 the third beam is [a a] (.1) -> [a a </s>] .096.
# Without a length penalty the early [a] (.30) beats [b a] (.27), though [b a] led at step 2;
# with alpha = 1, [b a] wins: ln .27 / (8/6) = -0.982 > ln .30 / (7/6) = -1.032.
FLIP = {
    (): {A: 0.5, B: 0.4, C: 0.04, EOS: 0.03, UNK: 0.03},
    (A,): {EOS: 0.6, A: 0.2, B: 0.1, C: 0.06, UNK: 0.04},
    (B,): {A: 0.9, EOS: 0.025, B: 0.025, C: 0.025, UNK: 0.025},
    (B, A): {EOS: 0.75, A: 0.0625, B: 0.0625, C: 0.0625, UNK: 0.0625},
}
FLIP_DEFAULT = {EOS: 0.96, A: 0.01, B: 0.01, C: 0.01, UNK: 0.01}

# "Early" table: [a </s>] finishes at step 2 with .30 while the b-branch goes on
# (b b b ... at .9 a step) and never finishes before max_length.
#   step 1: [a] .6, [b] .3
#   step 2: [a </s>] .30, [b b] .27
#   step 3: [a </s>] .30, [b b b] .243 ... step n: [b]*n = .3 * .9 ** (n - 1)
EARLY = {
    (): {A: 0.6, B: 0.3, C: 0.05, EOS: 0.03, UNK: 0.02},
    (A,): {EOS: 0.5, A: 0.25, B: 0.15, C: 0.05, UNK: 0.05},
}
B_RUN = {B: 0.9, EOS: 0.04, A: 0.03, C: 0.02, UNK: 0.01}
A_END = {EOS: 0.9, A: 0.04, B: 0.03, C: 0.02, UNK: 0.01}


def early_default(prefix):
    return B_RUN if prefix and prefix[0] == B else A_END


# --------------------------------------------------------------------------- state helpers


def test_repeat_and_select_state_nested():
    x = torch.arange(6).view(3, 2)
    state = {"a": x, "l": [(x, x + 10)], "n": 7, "s": "keep"}
    rep = repeat_state(state, 2)
    assert rep["a"].tolist() == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]]
    assert isinstance(rep["l"], list) and isinstance(rep["l"][0], tuple)
    assert rep["l"][0][1].tolist() == [[10, 11], [10, 11], [12, 13], [12, 13], [14, 15], [14, 15]]
    assert rep["n"] == 7 and rep["s"] == "keep"
    sel = select_state(state, torch.tensor([2, 0, 0]))
    assert sel["a"].tolist() == [[4, 5], [0, 1], [0, 1]]
    assert sel["l"][0][1].tolist() == [[14, 15], [10, 11], [10, 11]]
    assert sel["n"] == 7 and sel["s"] == "keep"


# --------------------------------------------------------------------------- filter_logits


def test_filter_logits_top_k_exact():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert out.tolist() == [[NEG_INF, 3.0, 2.0, NEG_INF], [NEG_INF, NEG_INF, 4.0, 2.0]]
    assert filter_logits(logits, top_k=1).tolist() == [[NEG_INF, 3.0, NEG_INF, NEG_INF],
                                                       [NEG_INF, NEG_INF, 4.0, NEG_INF]]
    # 0 and >= vocab size keep everything
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=4), logits)
    assert torch.equal(filter_logits(logits, top_k=9), logits)
    # the input is not modified in place
    assert logits.tolist() == [[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 2.0]]


def test_filter_logits_top_k_keeps_existing_minus_inf():
    logits = torch.tensor([[NEG_INF, 1.0, NEG_INF, 0.0]])
    assert filter_logits(logits, top_k=3).tolist() == [[NEG_INF, 1.0, NEG_INF, 0.0]]
    assert filter_logits(logits, top_k=1).tolist() == [[NEG_INF, 1.0, NEG_INF, NEG_INF]]


def test_filter_logits_top_p_exact_and_boundaries():
    # probabilities .5, .25, .125, .0625, .0625 (dyadic: the cumulative sums are exact),
    # in a shuffled order
    probs = torch.tensor([[0.125, 0.5, 0.0625, 0.25, 0.0625]])
    logits = probs.log()

    def kept(top_p):
        out = filter_logits(logits, top_p=top_p)
        assert torch.equal(out[out > NEG_INF], logits[out > NEG_INF])  # kept logits unchanged
        return sorted((out[0] > NEG_INF).nonzero().view(-1).tolist())

    assert kept(1.0) == [0, 1, 2, 3, 4]
    assert kept(0.1) == [1]  # the most probable token is always kept
    assert kept(0.5) == [1]  # boundary: .5 alone reaches .5
    assert kept(0.51) == [1, 3]
    assert kept(0.75) == [1, 3]  # boundary: .5 + .25 reaches .75 exactly
    assert kept(0.7501) == [0, 1, 3]
    assert kept(0.875) == [0, 1, 3]
    assert kept(0.9) == [0, 1, 2, 3] or kept(0.9) == [0, 1, 3, 4]  # tie between the two .0625
    assert len(kept(0.9)) == 4
    assert kept(0.99) == [0, 1, 2, 3, 4]


def test_filter_logits_top_p_temperature_free_and_rowwise():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    out = filter_logits(logits, top_p=0.6)
    # row 0: uniform .25 each -> 3 tokens needed to reach .6; row 1: the first has > .99
    assert (out[0] > NEG_INF).sum().item() == 3
    assert out[1].tolist() == [10.0, NEG_INF, NEG_INF, NEG_INF]


def test_filter_logits_top_k_then_top_p():
    logits = torch.tensor([[0.125, 0.5, 0.0625, 0.25, 0.0625]]).log()
    # after top-3 the renormalised probabilities are .5/.875, .25/.875, .125/.875
    out = filter_logits(logits, top_k=3, top_p=0.8)
    # .5/.875 = .571 < .8, (.5+.25)/.875 = .857 >= .8 -> two tokens
    assert ((out[0] > NEG_INF).nonzero().view(-1).tolist()) == [1, 3]
    out = filter_logits(logits, top_k=3, top_p=0.9)
    assert ((out[0] > NEG_INF).nonzero().view(-1).tolist()) == [0, 1, 3]


# --------------------------------------------------------------------------- beam search, scripted


@pytest.mark.parametrize(
    "beam_size, alpha, n_best, expected",
    [
        (2, 0.0, 2, [([A, EOS], lp(0.5, 0.6)), ([B, A, EOS], lp(0.4, 0.9, 0.75))]),
        (2, 1.0, 2, [([B, A, EOS], lp(0.4, 0.9, 0.75) / gnmt(3, 1.0)), ([A, EOS], lp(0.5, 0.6) / gnmt(2, 1.0))]),
        (2, 0.5, 2, [([A, EOS], lp(0.5, 0.6) / gnmt(2, 0.5)), ([B, A, EOS], lp(0.4, 0.9, 0.75) / gnmt(3, 0.5))]),
        (2, 0.0, 1, [([A, EOS], lp(0.5, 0.6))]),
        (2, 1.0, 1, [([B, A, EOS], lp(0.4, 0.9, 0.75) / gnmt(3, 1.0))]),
        (3, 0.0, 3, [([A, EOS], lp(0.5, 0.6)), ([B, A, EOS], lp(0.4, 0.9, 0.75)), ([A, A, EOS], lp(0.5, 0.2, 0.96))]),
        (3, 1.0, 3, [([B, A, EOS], lp(0.4, 0.9, 0.75) / (8 / 6)), ([A, EOS], lp(0.5, 0.6) / (7 / 6)),
                     ([A, A, EOS], lp(0.5, 0.2, 0.96) / (8 / 6))]),
        (3, 1.0, 5, [([B, A, EOS], lp(0.4, 0.9, 0.75) / (8 / 6)), ([A, EOS], lp(0.5, 0.6) / (7 / 6)),
                     ([A, A, EOS], lp(0.5, 0.2, 0.96) / (8 / 6))]),  # n_best is capped at beam_size
    ],
)
def test_beam_search_flip_table(beam_size, alpha, n_best, expected):
    model = table_model(FLIP, FLIP_DEFAULT)
    src, src_lengths = src_batch([3])
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=beam_size, length_penalty=alpha,
                                           n_best=n_best, max_length=20)
    assert hyps == [[h for h, _ in expected]]
    assert scores.shape == (1, len(expected))
    assert scores[0].tolist() == pytest.approx([s for _, s in expected], abs=1e-6)
    assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)  # best first


def random_dist(src: tuple[int, ...], prefix: tuple[int, ...]) -> Dist:
    """A distribution of its own for each (source, prefix), PAD and BOS often the most likely tokens."""
    g = torch.Generator().manual_seed(hash((src, prefix)) % 2**31)
    probs = torch.rand(V, generator=g, dtype=torch.float64) ** 3 + 0.01
    probs[[PAD, BOS]] *= 4
    return dict(enumerate((probs / probs.sum()).tolist()))


def reference_beam(model: Scripted, src: tuple[int, ...], k: int, max_length: int) -> list[tuple[list[int], float]]:
    """Beam search written plainly: every hypothesis extended by every token but PAD and BOS (a finished one
    by PAD at no cost), the k best kept; the k final hypotheses (EOS-ended unless cut) and their log-probs, best
    first."""
    beams = [([], 0.0, False)]
    for _ in range(max_length):
        candidates = []
        for tokens, score, ended in beams:
            if ended:
                candidates.append((tokens, score, True))
                continue
            row = model.log_prob_row(src, tuple(tokens))
            candidates += [(tokens + [w], score + row[w], w == EOS) for w in range(V) if w not in (PAD, BOS)]
        beams = sorted(candidates, key=lambda c: -c[1])[:k]
        if all(ended for _, _, ended in beams):
            break
    return [(tokens, score) for tokens, score, _ in beams]


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_beam_search_equals_plain_beam_search_on_random_distributions(beam_size):
    """The batched search, which ranks only each hypothesis's best tokens, against ``reference_beam`` over
    every token; five of the seven tokens can be emitted, so that beam 5 takes all of them at the first step."""
    model = Scripted(random_dist)
    src = torch.tensor([[A, B, PAD], [C, PAD, PAD], [B, B, A], [A, PAD, PAD]])
    src_lengths = (src != PAD).sum(1)
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=beam_size, n_best=beam_size,
                                           max_length=6, length_penalty=0.0)
    for i, row in enumerate(src.tolist()):
        expected = reference_beam(model, tuple(t for t in row if t != PAD), beam_size, max_length=6)
        assert hyps[i] == [h for h, _ in expected]
        assert scores[i].tolist() == pytest.approx([s for _, s in expected], abs=1e-5)
    assert len({len(h) for per in hyps for h in per}) > 1


def test_beam_search_flip_table_penalty_changes_winner():
    model = table_model(FLIP, FLIP_DEFAULT)
    src, src_lengths = src_batch([2])
    raw, _ = model.batch_beam_search(src, src_lengths, beam_size=2, length_penalty=0.0)
    pen, _ = model.batch_beam_search(src, src_lengths, beam_size=2, length_penalty=1.0)
    assert raw == [[[A, EOS]]] and pen == [[[B, A, EOS]]]


@pytest.mark.parametrize(
    "alpha, max_length, short_wins",
    [
        (0.0, 3, True),  # ln .30 = -1.204 > ln .243 = -1.415
        (0.0, 5, True),  # ln .30 > ln .19683 = -1.625
        (1.0, 3, True),  # -1.204 / (7/6) = -1.032 > -1.415 / (8/6) = -1.061
        (1.0, 5, False),  # -1.032 < -1.625 / (10/6) = -0.975: the penalty favours the long one
    ],
)
def test_beam_search_early_finish_vs_longer(alpha, max_length, short_wins):
    """[a </s>] finishes at step 2 while the b-branch goes on and is cut at max_length (no EOS)."""
    model = table_model(EARLY, early_default)
    src, src_lengths = src_batch([4])
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=2, length_penalty=alpha,
                                           n_best=2, max_length=max_length)
    short = ([A, EOS], lp(0.6, 0.5) / gnmt(2, alpha))  # a </s>: 2 tokens with EOS
    long_ = ([B] * max_length, lp(0.3, *[0.9] * (max_length - 1)) / gnmt(max_length, alpha))
    expected = [short, long_] if short_wins else [long_, short]
    assert hyps == [[h for h, _ in expected]]
    assert scores[0].tolist() == pytest.approx([s for _, s in expected], abs=1e-6)


def test_beam_search_max_length_ratio_per_source():
    """limits: ceil(ratio * src_len) + 1, capped by max_length, per source in one batch."""
    model = table_model(EARLY, early_default)
    src, src_lengths = src_batch([1, 3, 2])
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=2, length_penalty=0.0, n_best=2,
                                           max_length=100, max_length_ratio=1.5)
    limits = [math.ceil(1.5 * n) + 1 for n in (1, 3, 2)]  # 3, 6, 4
    assert hyps == [[[A, EOS], [B] * n] for n in limits]
    for i, n in enumerate(limits):
        assert scores[i].tolist() == pytest.approx([lp(0.6, 0.5), lp(0.3, *[0.9] * (n - 1))], abs=1e-6)
    # the absolute limit still applies: min(4, ...) -> 3, 4, 4
    hyps, _ = model.batch_beam_search(src, src_lengths, beam_size=2, length_penalty=0.0, n_best=2,
                                      max_length=4, max_length_ratio=1.5)
    assert hyps == [[[A, EOS], [B] * n] for n in (3, 4, 4)]
    # ratio 0 means no ratio limit
    hyps, _ = model.batch_beam_search(src, src_lengths, beam_size=2, length_penalty=0.0, n_best=2,
                                      max_length=5, max_length_ratio=0.0)
    assert hyps == [[[A, EOS], [B] * 5]] * 3


def test_beam_search_batch_of_scripted_sources_independent():
    """Sources with different tables in one batch (the table depends on the source)."""
    tables = {A: (FLIP, FLIP_DEFAULT), B: (EARLY, early_default)}

    def dist(src, prefix):
        table, default = tables[src[0]]
        if prefix in table:
            return table[prefix]
        return default(prefix) if callable(default) else default

    model = Scripted(dist)
    src = torch.tensor([[A, A], [B, PAD], [A, PAD]])
    hyps, scores = model.batch_beam_search(src, torch.tensor([2, 1, 1]), beam_size=2, length_penalty=0.0,
                                           n_best=2, max_length=4)
    assert hyps == [[[A, EOS], [B, A, EOS]], [[A, EOS], [B] * 4], [[A, EOS], [B, A, EOS]]]
    assert_close(scores, [[lp(0.5, 0.6), lp(0.4, 0.9, 0.75)], [lp(0.6, 0.5), lp(0.3, 0.9, 0.9, 0.9)],
                          [lp(0.5, 0.6), lp(0.4, 0.9, 0.75)]])
    assert model.n_encode == 1  # encoded once, the state repeated for the beams


def test_greedy_equals_beam_one_scripted():
    model = table_model(FLIP, FLIP_DEFAULT)
    src, src_lengths = src_batch([1, 2])
    ids, log_probs = model.search(src, src_lengths, is_greedy=True)
    assert ids.tolist() == [[A, EOS], [A, EOS]]
    assert_close(log_probs, [[math.log(0.5), math.log(0.6)]] * 2)
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=1, length_penalty=0.0)
    assert hyps == [[[A, EOS]], [[A, EOS]]]  # as the greedy rows
    assert_close(scores, [[lp(0.5, 0.6)]] * 2)


# --------------------------------------------------------------------------- specials

SPECIAL_HEAVY = {PAD: 0.4, BOS: 0.3, A: 0.15, EOS: 0.1, B: 0.05}


def test_pad_and_bos_never_generated():
    model = Scripted(lambda src, prefix: SPECIAL_HEAVY)
    src, src_lengths = src_batch([2, 3])
    ids, log_probs = model.search(src, src_lengths, is_greedy=True, max_length=6)
    assert ids.tolist() == [[A] * 6] * 2
    assert_close(log_probs, [[math.log(0.15)] * 6] * 2)

    torch.manual_seed(0)
    ids, _ = model.search(src, src_lengths, is_greedy=False, max_length=8, n_samples=300)
    for row in ids.tolist():
        assert BOS not in row
        body = row[: row.index(EOS) + 1] if EOS in row else row
        assert PAD not in body
    torch.manual_seed(0)
    ids, _ = model.search(src, src_lengths, is_greedy=False, max_length=1, n_samples=500, top_k=2)
    assert set(ids.view(-1).tolist()) == {A, EOS}  # top-k among the allowed tokens

    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=3, length_penalty=0.0, n_best=3,
                                           max_length=3)
    # best raw scores: [a a a] .15^3 (cut), [</s>] .1, [a </s>] .015 -> .1 > .015 > .003375
    assert hyps == [[[EOS], [A, EOS], [A, A, A]]] * 2
    assert_close(scores, [[lp(0.1), lp(0.15, 0.1), lp(0.15, 0.15, 0.15)]] * 2)


# --------------------------------------------------------------------------- sampling

DYADIC = {A: 0.5, B: 0.25, C: 0.125, EOS: 0.0625, UNK: 0.0625}
SKEWED = {A: 0.4, B: 0.3, C: 0.15, EOS: 0.1, UNK: 0.05}


def first_tokens(model, n, **kwargs) -> torch.Tensor:
    src, src_lengths = src_batch([2])
    ids, _ = model.search(src, src_lengths, is_greedy=False, max_length=1, n_samples=n, **kwargs)
    assert ids.shape == (n, 1)
    return ids[:, 0]


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


@pytest.mark.parametrize("top_k, allowed", [(1, {A}), (2, {A, B}), (3, {A, B, C})])
def test_sampling_top_k(top_k, allowed):
    torch.manual_seed(1)
    tokens = first_tokens(Scripted(lambda s, p: SKEWED), 2000, top_k=top_k)
    assert set(tokens.tolist()) == allowed
    # renormalised among the top k
    freq = frequencies(tokens)
    mass = sum(SKEWED[t] for t in allowed)
    for t in allowed:
        assert abs(freq[t].item() - SKEWED[t] / mass) < 0.04


@pytest.mark.parametrize("top_p, allowed", [(0.5, {A}), (0.75, {A, B}), (0.76, {A, B, C}), (0.875, {A, B, C})])
def test_sampling_top_p_nucleus(top_p, allowed):
    torch.manual_seed(2)
    tokens = first_tokens(Scripted(lambda s, p: DYADIC), 3000, top_p=top_p)
    assert set(tokens.tolist()) == allowed


@pytest.mark.parametrize("temperature, allowed", [(1.0, {A, B}), (2.0, {A, B, C}), (0.5, {A})])
def test_sampling_top_p_on_tempered_distribution(temperature, allowed):
    """The nucleus is taken on the distribution after temperature. T = 2: ~ sqrt(p), i.e.
    .343, .243, .172, .121, .121, so top_p = .75 needs three tokens (two without temperature).
    T = .5: ~ p ** 2, i.e. .744, .186, ..., so top_p = .74 needs one token (two without)."""
    torch.manual_seed(9)
    top_p = 0.74 if temperature == 0.5 else 0.75
    tokens = first_tokens(Scripted(lambda s, p: DYADIC), 3000, top_p=top_p, temperature=temperature)
    assert set(tokens.tolist()) == allowed


def test_sampling_frequencies_match_distribution():
    torch.manual_seed(3)
    freq = frequencies(first_tokens(Scripted(lambda s, p: SKEWED), 20000))
    expected = torch.tensor([SKEWED.get(i, 0.0) for i in range(V)], dtype=torch.float64)
    assert (freq - expected).abs().max().item() < 0.02
    assert freq[PAD] == 0 and freq[BOS] == 0


@pytest.mark.parametrize("vocab_size", [5, 64, 150])
def test_draw_matches_the_distribution_and_never_draws_a_zero_weight(vocab_size):
    g = torch.Generator().manual_seed(vocab_size)
    weights = torch.rand(vocab_size, generator=g, dtype=torch.float64) ** 3
    weights[torch.randperm(vocab_size, generator=g)[: vocab_size // 3]] = 0.0  # zeros, also inside blocks
    weights[-1] = 0.0
    weights *= 7.0  # unnormalised
    torch.manual_seed(0)
    n = 60000
    ids = draw(weights.expand(n, -1).contiguous(), block=16)
    freq = torch.bincount(ids, minlength=vocab_size).double() / n
    assert ids.max() < vocab_size and (freq[weights == 0] == 0).all()
    expected = weights / weights.sum()
    assert (freq - expected).abs().max().item() < 4 * (expected.max().item() / n) ** 0.5 + 1e-3
    # one-hot rows, anywhere in the vocabulary, give their token every time
    one_hot = torch.eye(vocab_size, dtype=torch.float32)[torch.arange(vocab_size).flip(0)]
    assert draw(one_hot, block=16).tolist() == list(range(vocab_size))[::-1]


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_exp_and_logsumexp_equal_torchs(dtype, rtol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 1000, generator=g, dtype=torch.float64) * 8).to(dtype)
    x[1] = float("-inf")  # a row without any weight
    x[2, :10] = float("-inf")
    x[3, 5] = float("inf")
    torch.testing.assert_close(exp(x[4:], 0.5), (x[4:] * 0.5).exp(), rtol=rtol, atol=0)
    assert exp(x[1]).eq(0).all() and exp(x[3]).isinf().any()
    torch.testing.assert_close(logsumexp(x), x.logsumexp(dim=-1), rtol=rtol, atol=0)
    y = x.clone()
    assert exp(y, in_place=True) is y
    torch.testing.assert_close(y[4:], x[4:].exp(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_equal_log_softmax_and_leave_the_logits(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 3000, generator=g) * 5).to(dtype)
    expected = logits.float().log_softmax(dim=-1)
    before = logits.clone()
    out = float_log_softmax(logits)
    assert torch.equal(out, expected) and torch.equal(logits, before)  # the logits are left as they are
    if dtype == torch.bfloat16:  # written into their float32 copy: rows read before they are written
        copy = logits.float()
        assert torch.equal(torch.log_softmax(copy, dim=-1, out=copy), expected)
    # with a graph, a new tensor, which backward goes through
    leaf = torch.randn(4, 30, generator=g, requires_grad=True)
    out = float_log_softmax(leaf * 2)
    out[:, 3].sum().backward()
    torch.testing.assert_close(leaf.grad, torch.func.grad(lambda x: (x * 2).log_softmax(-1)[:, 3].sum())(leaf.detach()))


@pytest.mark.parametrize("size", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_argmax_and_topk_equal_torchs(size, dtype):
    """The block searches give torch's argmax (the first of equal maxima) and topk: random rows, rows with
    ties (few distinct values), rows of -inf but for one column, and a k above the number of blocks."""
    g = torch.Generator().manual_seed(size)
    rows = [torch.randn(40, size, generator=g),
            torch.randint(0, 3, (40, size), generator=g).float(),  # many equal values
            torch.full((40, size), float("-inf")).scatter(1, torch.randint(0, size, (40, 1), generator=g), 1.0)]
    for x in (r.to(dtype) for r in rows):
        assert torch.equal(block_argmax(x, block=16), x.argmax(dim=-1))
        for k in sorted({1, min(3, size), size}):
            values, columns = block_topk(x, k, block=16)
            expected = x.topk(k, dim=-1).values
            assert torch.equal(values, expected)
            assert torch.equal(x.gather(1, columns), expected)  # the columns hold those values
            assert (columns.sort(dim=-1).values.diff(dim=-1) > 0).all()  # k distinct columns


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.01])
def test_sampling_draws_from_the_tempered_softmax_of_the_tokens_other_than_pad_and_bos(temperature):
    """Without top-k / top-p, sampling draws from exp((logits - max) / T) unnormalised (one pass over the
    vocabulary); where PAD and BOS hold most of that, from the softmax. Both draw what the softmax over
    the allowed tokens draws, from the same random numbers, from logits shifted by any amount per row as
    from log-probs; the tokens' log-probs (at temperature 1) are those of the log-softmax."""
    g = torch.Generator().manual_seed(7)
    log_probs = (torch.randn(500, 8000, generator=g) * 3).log_softmax(dim=-1)
    pad_heavy = log_probs.clone()
    pad_heavy[:5, PAD] = math.log(0.9)  # rows where PAD holds most of the mass
    pad_heavy = pad_heavy.log_softmax(dim=-1)
    shifts = torch.randn(500, 1, generator=g) * 20
    for batch in (log_probs, pad_heavy):
        allowed = batch.clone()
        allowed[:, [PAD, BOS]] = NEG_INF
        torch.manual_seed(0)
        reference = draw((allowed / temperature).softmax(dim=-1))
        for scores in (batch, batch + shifts):
            torch.manual_seed(0)
            tokens, token_log_probs = _sample(scores, LIBRARY_IDS, temperature, 0, 1.0)
            assert int((tokens != reference).sum()) <= 1  # a draw on a rounding boundary may differ
            assert not bool(((tokens == PAD) | (tokens == BOS)).any())
            torch.testing.assert_close(token_log_probs, batch.gather(1, tokens[:, None]).squeeze(1),
                                       rtol=1e-5, atol=1e-5)


def test_sampled_log_probs_where_bos_is_pad():
    """Marian and T5 decode from PAD: one never-emitted token, whose mass counts once in the normaliser."""
    ids = SpecialIds(pad=3, unk=1, bos=3, eos=0)
    log_probs = (torch.randn(50, 40, generator=torch.Generator().manual_seed(9)) * 2).log_softmax(dim=-1)
    for temperature in (1.0, 0.7):
        tokens, token_log_probs = _sample(log_probs + 3.0, ids, temperature, 0, 1.0)
        assert not bool((tokens == 3).any())
        torch.testing.assert_close(token_log_probs, log_probs.gather(1, tokens[:, None]).squeeze(1))


def test_greedy_picks_the_best_token_other_than_pad_and_bos_with_its_log_prob():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(300, 1000, generator=g) * 4
    logits[:7, BOS] = 50.0  # rows whose best token is BOS
    tokens, token_log_probs = _greedy(logits, LIBRARY_IDS)
    allowed = logits.clone()
    allowed[:, [PAD, BOS]] = NEG_INF
    assert torch.equal(tokens, allowed.argmax(dim=-1))
    torch.testing.assert_close(token_log_probs, logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1))


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return -(p * p.log()).sum().item()


def test_sampling_temperature():
    model = Scripted(lambda s, p: SKEWED)
    probs = torch.tensor([SKEWED.get(i, 0.0) for i in range(V)], dtype=torch.float64)
    entropies = []
    for temperature in (0.5, 1.0, 2.0):
        torch.manual_seed(4)
        freq = frequencies(first_tokens(model, 20000, temperature=temperature))
        expected = probs ** (1.0 / temperature)
        expected /= expected.sum()
        assert (freq - expected).abs().max().item() < 0.02
        entropies.append(entropy(freq))
    assert entropies[0] < entropies[1] < entropies[2]


def lengthy_dist(src, prefix):
    """len(src) tokens of a/b, then </s> with .7 (else c) at every step."""
    if len(prefix) < len(src):
        return {A: 0.6, B: 0.4}
    return {EOS: 0.7, C: 0.3}


@pytest.mark.parametrize("is_greedy", [True, False])
def test_outputs_padded_after_eos_and_log_probs(is_greedy):
    model = Scripted(lengthy_dist)
    src, src_lengths = src_batch([1, 4, 2])
    torch.manual_seed(5)
    k = 1 if is_greedy else 50
    ids, log_probs = model.search(src, src_lengths, is_greedy=is_greedy, max_length=15, n_samples=k)
    assert ids.shape == log_probs.shape == (3 * k, ids.size(1))
    ends = []
    for r, (row, lps) in enumerate(zip(ids.tolist(), log_probs.tolist())):
        n = src_lengths[r // k].item()
        assert EOS in row  # .3 ** 10 is out of reach
        end = row.index(EOS)
        ends.append(end)
        assert all(t in (A, B) for t in row[:n])
        assert all(t == C for t in row[n:end])
        assert all(t == PAD for t in row[end + 1:])
        assert all(x == 0.0 for x in lps[end + 1:])
        expected = [model.log_prob_row(tuple(src[r // k, :n].tolist()), tuple(row[:j]))[row[j]]
                    for j in range(end + 1)]
        assert lps[: end + 1] == pytest.approx(expected, abs=1e-6)
    assert ids.size(1) == max(ends) + 1  # stops once every row has finished
    if is_greedy:
        assert ids.tolist() == [[A, EOS, PAD, PAD, PAD], [A, A, A, A, EOS], [A, A, EOS, PAD, PAD]]


def test_greedy_max_length_cuts():
    model = Scripted(lambda s, p: {A: 0.9, EOS: 0.1})
    src, src_lengths = src_batch([3])
    ids, log_probs = model.search(src, src_lengths, is_greedy=True, max_length=4)
    assert ids.tolist() == [[A] * 4]
    assert_close(log_probs, [[math.log(0.9)] * 4])


@pytest.mark.parametrize("is_greedy", [True, False])
def test_n_samples_rows_are_source_major(is_greedy):
    """The first token is the source's own first token with probability 1."""

    def dist(src, prefix):
        if not prefix:
            return {src[0]: 1.0}
        return {EOS: 0.5, A: 0.2, B: 0.2, C: 0.1}

    model = Scripted(dist)
    src = torch.tensor([[B, A, A], [C, PAD, PAD], [A, B, PAD], [UNK, C, PAD]])
    k = 5
    torch.manual_seed(6)
    ids, log_probs = model.search(src, torch.tensor([3, 1, 2, 2]), is_greedy=is_greedy, max_length=10,
                                  n_samples=k)
    assert ids.size(0) == 4 * k
    assert ids[:, 0].tolist() == [t for t in (B, C, A, UNK) for _ in range(k)]
    assert log_probs[:, 0].tolist() == [0.0] * (4 * k)
    assert model.n_encode == 1


# --------------------------------------------------------------------------- real models

SRC_V, TGT_V = 17, 13


def make_model(cls, seed: int = 0) -> EncoderDecoder:
    model = make_tiny_model(cls, SRC_V, TGT_V, seed)
    with torch.no_grad():  # changed so that, with these seeds, the outputs differ in length
        if cls is Seq2Seq:
            model.generator.weight.mul_(3.0)
        else:
            model.generator.bias[EOS] += 0.5
    return model.eval()


def random_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, SRC_V, (n,), generator=g)
    return src, torch.tensor(lengths)


LENGTHS = [5, 2, 7, 3, 6, 1]
MODELS = [Seq2Seq, Transformer]


def sequence_log_prob(model, src, src_lengths, i, hyp) -> float:
    """The model's log-probability of ``hyp`` (its EOS included) for source i, by teacher forcing."""
    tgt_in = torch.tensor([[BOS] + hyp[:-1]])
    with torch.no_grad():
        out = model(src[i: i + 1, : src_lengths[i]], src_lengths[i: i + 1], tgt_in)
    return out[0].gather(1, torch.tensor(hyp)[:, None]).sum().item()


@pytest.mark.parametrize("cls", MODELS)
def test_greedy_equals_beam_size_one(cls):
    model = make_model(cls)
    src, src_lengths = random_batch(LENGTHS)
    ids, log_probs = model.search(src, src_lengths, is_greedy=True, max_length=12)
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=1, max_length=12, length_penalty=0.0)
    greedy = [[t for t in row if t != PAD] for row in ids.tolist()]  # the rows without their PAD
    assert [h[0] for h in hyps] == greedy
    assert scores[:, 0].tolist() == pytest.approx(log_probs.sum(1).tolist(), abs=1e-4)
    assert len({len(h) for h in greedy}) > 1  # the test exercises different lengths
    for row in ids.tolist():
        assert BOS not in row


def record_steps(model: EncoderDecoder, what: Callable) -> list:
    """Wrap the model's ``decode_step``: the list it returns gets ``what(y_prev, state)`` of every step."""
    seen, decode_step = [], model.decode_step

    def recording_step(y, state):
        seen.append(what(y, state))
        return decode_step(y, state)

    model.decode_step = recording_step
    return seen


@pytest.mark.parametrize("cls", MODELS)
def test_batched_greedy_stops_decoding_ended_rows_and_equals_per_sentence(cls):
    model = make_model(cls)
    src, src_lengths = random_batch(LENGTHS, seed=5)
    rows_decoded = record_steps(model, lambda y, state: y.size(0))
    ids, log_probs = model.search(src, src_lengths, is_greedy=True, max_length=12)
    assert rows_decoded[0] == len(LENGTHS) and rows_decoded[-1] < len(LENGTHS) / 2
    for i, n in enumerate(LENGTHS):
        one_ids, one_log_probs = model.search(src[i: i + 1, :n], src_lengths[i: i + 1], is_greedy=True,
                                              max_length=12)
        assert strip(one_ids[0].tolist()) == strip(ids[i].tolist())
        assert one_log_probs.sum().item() == pytest.approx(log_probs[i].sum().item(), abs=1e-4)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("alpha, ratio", [(1.0, 0.0), (0.0, 1.5)])
def test_batched_beam_equals_per_sentence(cls, alpha, ratio):
    model = make_model(cls)
    src, src_lengths = random_batch(LENGTHS, seed=1)
    kwargs = dict(beam_size=4, n_best=3, max_length=10, length_penalty=alpha, max_length_ratio=ratio)
    hyps, scores = model.batch_beam_search(src, src_lengths, **kwargs)
    assert scores.shape == (len(LENGTHS), 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    for i, n in enumerate(LENGTHS):
        one_hyps, one_scores = model.batch_beam_search(src[i: i + 1, :n], src_lengths[i: i + 1], **kwargs)
        assert one_hyps[0] == hyps[i]
        assert one_scores[0].tolist() == pytest.approx(scores[i].tolist(), abs=1e-4)
    assert len({len(h) for per in hyps for h in per}) > 1


@pytest.mark.parametrize("cls", MODELS)
def test_beam_search_keeps_source_only_state_and_equals_reordering_all_of_it(cls):
    model = make_model(cls)
    src, src_lengths = random_batch(LENGTHS, seed=3)
    seen = record_steps(model, lambda y, state: (y.size(0), state["group"], {key: state[key] for key in
                                                                             cls.source_state_keys}))
    kwargs = dict(beam_size=4, n_best=2, max_length=10, max_length_ratio=1.0)  # sources end at different steps
    hyps, scores = model.batch_beam_search(src, src_lengths, **kwargs)
    assert {group for _, group, _ in seen} == {4}  # one copy per source, also after sources stop being decoded
    assert seen[-1][0] < seen[0][0]  # sources stopped being decoded
    for (rows, _, before), (rows_after, _, after) in zip(seen, seen[1:]):
        for key in cls.source_state_keys:  # neither copied nor reordered between steps, unless sources ended
            assert (after[key] is before[key]) == (rows_after == rows)
    model.source_state_keys = ()  # reorder every entry of the state, repeated for every row
    model.repeat_state = lambda state, n: repeat_state(state, n)
    again, again_scores = model.batch_beam_search(src, src_lengths, **kwargs)
    assert again == hyps
    # the Transformer's grouped cross-attention (one per source) rounds differently from one per row
    torch.testing.assert_close(again_scores, scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", MODELS)
def test_beam_scores_are_model_log_probs(cls):
    """With alpha = 0 a hypothesis' score is the model's log-probability of it (its EOS included: it ends with
    EOS unless it was cut at the length limit)."""
    model = make_model(cls)
    src, src_lengths = random_batch(LENGTHS, seed=2)
    max_length = 8
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=4, n_best=4, max_length=max_length,
                                           length_penalty=0.0)
    for i, per_source in enumerate(hyps):
        assert len(set(map(tuple, per_source))) == 4  # distinct hypotheses
        for j, hyp in enumerate(per_source):
            assert all(t not in (PAD, BOS, EOS) for t in hyp[:-1]) and (hyp[-1] == EOS or len(hyp) == max_length)
            expected = sequence_log_prob(model, src, src_lengths, i, hyp)
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)
    # and with a penalty the score is that log-probability over ((5 + len) / 6) ** alpha
    hyps, pen_scores = model.batch_beam_search(src, src_lengths, beam_size=4, n_best=1, max_length=max_length,
                                               length_penalty=0.7)
    for i, (hyp,) in enumerate(hyps):
        raw = sequence_log_prob(model, src, src_lengths, i, hyp)
        expected = raw / length_penalty(torch.tensor([len(hyp)]), 0.7).item()
        assert pen_scores[i, 0].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("cls", MODELS)
def test_sampled_log_probs_match_forward(cls):
    model = make_model(cls)
    src, src_lengths = random_batch(LENGTHS[:3], seed=3)
    torch.manual_seed(7)
    k = 4
    ids, log_probs = model.search(src, src_lengths, is_greedy=False, max_length=9, n_samples=k, top_k=5,
                                  temperature=1.3)
    assert ids.shape[0] == 3 * k
    for r, (row, lps) in enumerate(zip(ids.tolist(), log_probs.tolist())):
        i = r // k
        end = row.index(EOS) + 1 if EOS in row else len(row)
        assert BOS not in row and PAD not in row[:end]
        assert all(t == PAD for t in row[end:]) and all(x == 0.0 for x in lps[end:])
        tgt_in = torch.tensor([[BOS] + row[: end - 1]])
        with torch.no_grad():
            out = model(src[i: i + 1, : src_lengths[i]], src_lengths[i: i + 1], tgt_in)
        expected = out[0].gather(1, torch.tensor(row[:end])[:, None]).view(-1).tolist()
        assert lps[:end] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("cls", MODELS)
def test_real_models_never_emit_pad_or_bos(cls):
    model = make_model(cls)
    with torch.no_grad():
        model.generator.bias[PAD] += 20.0
        model.generator.bias[BOS] += 20.0
    src, src_lengths = random_batch(LENGTHS[:3], seed=4)
    ids, _ = model.search(src, src_lengths, is_greedy=True, max_length=6)
    torch.manual_seed(8)
    sampled, _ = model.search(src, src_lengths, is_greedy=False, max_length=6, n_samples=10)
    for row in ids.tolist() + sampled.tolist():
        end = row.index(EOS) if EOS in row else len(row)
        assert BOS not in row and PAD not in row[:end]
    hyps, scores = model.batch_beam_search(src, src_lengths, beam_size=3, n_best=3, max_length=6)
    assert all(t not in (PAD, BOS) for per in hyps for h in per for t in h)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("cls", [Seq2Seq, Transformer])
def test_greedy_and_sampling_read_logits_unless_decode_step_is_overridden(cls):
    """A library model's greedy decoding and sampling read its logits (``decode_scores``), whose float32
    log-softmax is its ``decode_step``. A subclass's or an instance's own ``decode_step`` is what they read."""
    model = make_tiny_model(cls, 12, 15)
    src, lengths = torch.tensor([[4, 5, 6, EOS], [7, 8, EOS, PAD]]), torch.tensor([4, 3])
    y = torch.full((2,), BOS)
    logits, _ = model.decode_scores(y, model.encode(src, lengths))
    log_probs, _ = model.decode_step(y, model.encode(src, lengths))
    assert not torch.allclose(logits.logsumexp(dim=-1), torch.zeros(2), atol=1e-3)  # not normalised
    torch.testing.assert_close(log_probs, logits.float().log_softmax(dim=-1))

    def no_eos(step):
        def decode_step(y_prev, state):
            log_probs, state = step(y_prev, state)
            return log_probs.index_fill(1, torch.tensor([EOS]), NEG_INF), state
        return decode_step

    class NoEos(cls):
        def decode_step(self, y_prev, state):
            return no_eos(super().decode_step)(y_prev, state)

    subclassed, instance = make_tiny_model(cls, 12, 15), make_tiny_model(cls, 12, 15)
    subclassed.__class__ = NoEos
    instance.decode_step = no_eos(instance.decode_step)
    for m in (subclassed, instance):
        scores, _ = m.decode_scores(y, m.encode(src, lengths))
        assert bool((scores[:, EOS] == NEG_INF).all())
        for is_greedy in (True, False):
            ids, _ = m.search(src, lengths, is_greedy=is_greedy, max_length=6)
            assert not bool((ids == EOS).any())


# Epsilon sampling (Hewitt et al., 2022)


def test_epsilon_drops_the_tokens_below_it_and_keeps_the_most_probable():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    kept = filter_logits(probs.log(), epsilon=0.1).isfinite()
    assert kept.tolist() == [[True, True, True, False], [True, True, True, True], [True, True, True, True]]
    # every token below epsilon: the most probable alone is kept
    assert filter_logits(probs.log(), epsilon=0.6).isfinite().tolist() == [[True, False, False, False],
                                                                          [True, False, False, False],
                                                                          [True, False, False, False]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_epsilon_sampling_never_draws_a_token_below_epsilon(temperature):
    model = make_tiny_model(Transformer, 12, 15, seed=2)
    src, lengths = torch.randint(4, 12, (6, 5)), torch.full((6,), 5)
    epsilon = 0.05
    torch.manual_seed(0)
    ids, _ = model.search(src, lengths, is_greedy=False, max_length=8, n_samples=20, temperature=temperature,
                          epsilon=epsilon)
    # the distribution each token was drawn from: teacher forcing, at the temperature, PAD and BOS left out
    tgt_in = torch.cat([torch.full_like(ids[:, :1], BOS), ids[:, :-1]], dim=1)
    with torch.no_grad():
        log_probs = model(src.repeat_interleave(20, 0), lengths.repeat_interleave(20, 0), tgt_in)
    logits = log_probs / temperature
    logits[..., [PAD, BOS]] = float("-inf")
    probs = logits.softmax(dim=-1)  # |probs| = (rows, length, vocab_size)
    drawn = probs.gather(2, ids[:, :, None]).squeeze(2)
    live = ~((ids == EOS).long().cumsum(dim=1) - (ids == EOS).long()).bool() & (ids != PAD)
    is_best = ids == probs.argmax(dim=-1)
    assert bool(((drawn >= epsilon - 1e-6) | is_best)[live].all())
    # without the cut some draws fall below epsilon: the test could fail
    torch.manual_seed(0)
    plain, _ = model.search(src, lengths, is_greedy=False, max_length=8, n_samples=20, temperature=temperature)
    tgt_in = torch.cat([torch.full_like(plain[:, :1], BOS), plain[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(src.repeat_interleave(20, 0), lengths.repeat_interleave(20, 0), tgt_in) / temperature
    logits[..., [PAD, BOS]] = float("-inf")
    below = logits.softmax(dim=-1).gather(2, plain[:, :, None]).squeeze(2) < epsilon
    assert bool((below & (plain != PAD)).any())


def test_epsilon_zero_is_plain_sampling():
    model = make_tiny_model(Seq2Seq, 12, 15, seed=1)
    src, lengths = torch.randint(4, 12, (3, 4)), torch.full((3,), 4)
    torch.manual_seed(5)
    plain = model.search(src, lengths, is_greedy=False, max_length=9, n_samples=4)
    torch.manual_seed(5)
    zero = model.search(src, lengths, is_greedy=False, max_length=9, n_samples=4, epsilon=0.0)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
