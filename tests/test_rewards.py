"""Rewards: parity with sacrebleu / nltk, edge cases, devices, registry."""

from __future__ import annotations

import itertools
import random

import pytest
import sacrebleu
import torch
from nltk.translate.gleu_score import sentence_gleu as nltk_gleu

from simple_nmt.rewards import (
    REWARDS,
    SacreBLEUReward,
    as_reward,
    get_reward,
    sentence_bleu,
    sentence_gleu,
)

PAD = 0
SMOOTHS = [("exp", None), ("floor", None), ("add-k", None), ("none", None)]
CUSTOM_SMOOTHS = [("floor", 0.5), ("add-k", 0.5), ("add-k", 0)]


def _random_pairs(n: int, seed: int, max_len: int = 30, vocab: int = 8):
    rng = random.Random(seed)

    def seq():
        return [rng.randint(1, vocab) for _ in range(rng.randint(0, max_len))]

    hyps, refs = [seq() for _ in range(n)], [seq() for _ in range(n)]
    for i in range(0, n, 11):  # some identical pairs
        refs[i] = list(hyps[i])
    for i in range(5, n, 13):  # some hypotheses that copy a piece of the reference
        a = rng.randint(0, len(refs[i]))
        hyps[i] = refs[i][a : a + rng.randint(0, 6)]
    return hyps, refs


def _pad(seqs: list[list[int]], seed: int, pad_id: int = PAD, inside: bool = True) -> torch.Tensor:
    """Right-pad to a common length, after inserting pads at random places inside."""
    rng = random.Random(seed)
    rows = []
    for s in seqs:
        s = list(s)
        for _ in range(rng.randint(0, 4) if inside else 0):
            s.insert(rng.randint(0, len(s)), pad_id)
        rows.append(s)
    width = max((len(s) for s in rows), default=0) + 3
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in rows], dtype=torch.long)


def _join(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def _sacrebleu(hyps, refs, max_order=4, smooth="exp", smooth_value=None) -> torch.Tensor:
    metric = sacrebleu.metrics.BLEU(
        tokenize="none",
        smooth_method=smooth,
        smooth_value=smooth_value,
        effective_order=True,
        max_ngram_order=max_order,
    )
    scores = [metric.sentence_score(_join(h), [_join(r)]).score for h, r in zip(hyps, refs)]
    return torch.tensor(scores, dtype=torch.float64)


def _nltk(hyps, refs, max_order=4, min_order=1) -> torch.Tensor:
    scores = [
        100 * nltk_gleu([list(map(str, r))], list(map(str, h)), min_len=min_order, max_len=max_order)
        for h, r in zip(hyps, refs)
    ]
    return torch.tensor(scores, dtype=torch.float64)


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    assert got.shape == expected.shape
    diff = (got.double() - expected).abs()
    worst = int(diff.argmax())
    assert diff[worst] <= atol, f"row {worst}: got {got[worst].item()}, expected {expected[worst].item()}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The batches are small: one thread avoids oversubscription on busy machines.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def pairs():
    hyps, refs = _random_pairs(2000, seed=1)
    return hyps, refs, _pad(hyps, seed=2), _pad(refs, seed=3)


# ---------------------------------------------------------------- BLEU parity


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("smooth,smooth_value", SMOOTHS)
def test_bleu_matches_sacrebleu(pairs, max_order, smooth, smooth_value):
    hyps, refs, h, r = pairs
    got = sentence_bleu(h, r, PAD, max_order=max_order, smooth=smooth, smooth_value=smooth_value)
    _close(got, _sacrebleu(hyps, refs, max_order, smooth, smooth_value))


@pytest.mark.parametrize("smooth,smooth_value", CUSTOM_SMOOTHS)
def test_bleu_custom_smooth_values(pairs, smooth, smooth_value):
    hyps, refs, h, r = pairs
    got = sentence_bleu(h, r, PAD, smooth=smooth, smooth_value=smooth_value)
    _close(got, _sacrebleu(hyps, refs, 4, smooth, smooth_value))


def test_bleu_larger_vocab_and_lengths():
    hyps, refs = _random_pairs(500, seed=4, max_len=60, vocab=40)
    got = sentence_bleu(_pad(hyps, 5), _pad(refs, 6), PAD)
    _close(got, _sacrebleu(hyps, refs))


@pytest.mark.parametrize("fn", [sentence_bleu, sentence_gleu])
def test_pads_inside_equal_trailing_pads(pairs, fn):
    hyps, refs, h, r = pairs
    assert (h[:, :-1] == PAD).logical_and(h[:, 1:] != PAD).any()  # pads do sit inside
    plain_h = _pad(hyps, seed=0, inside=False)
    plain_r = _pad(refs, seed=0, inside=False)
    torch.testing.assert_close(fn(h, r, PAD), fn(plain_h, plain_r, PAD))


def test_other_pad_id():
    hyps, refs = _random_pairs(200, seed=7)
    # ids 2..9, pad 1
    h = _pad([[t + 1 for t in s] for s in hyps], seed=8, pad_id=1)
    r = _pad([[t + 1 for t in s] for s in refs], seed=9, pad_id=1)
    _close(sentence_bleu(h, r, pad_id=1), _sacrebleu(hyps, refs))
    _close(sentence_gleu(h, r, pad_id=1), _nltk(hyps, refs))


# ---------------------------------------------------------------- GLEU parity


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_gleu_matches_nltk(pairs, max_order):
    hyps, refs, h, r = pairs
    _close(sentence_gleu(h, r, PAD, max_order=max_order), _nltk(hyps, refs, max_order))


def test_gleu_min_order(pairs):
    hyps, refs, h, r = pairs
    got = sentence_gleu(h[:500], r[:500], PAD, max_order=4, min_order=2)
    _close(got, _nltk(hyps[:500], refs[:500], 4, min_order=2))


def test_gleu_is_symmetric(pairs):
    _, _, h, r = pairs
    torch.testing.assert_close(sentence_gleu(h, r, PAD), sentence_gleu(r, h, PAD))


# ---------------------------------------------------------------- edge cases

EDGE_PAIRS = [
    ([], []),  # both empty
    ([], [1, 2, 3]),  # empty hypothesis
    ([1, 2, 3], []),  # empty reference
    ([1], [1]),  # identical, shorter than every n > 1
    ([1, 2], [1, 2]),
    ([5, 6, 7, 8, 9], [5, 6, 7, 8, 9]),
    ([1], [1, 2, 3, 4, 5]),  # hypothesis shorter than n, brevity penalty
    ([1, 2], [2, 1]),  # unigram matches only
    ([3], [4]),  # no match
    ([1, 1, 1, 1, 1, 1], [1, 1]),  # clipping
    ([1, 2, 1, 2, 1, 2], [1, 2, 1, 2]),
    ([2, 2, 2, 2, 2, 2, 2, 2], [2, 2, 2, 2, 2, 2, 2, 2]),
]


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("smooth,smooth_value", SMOOTHS + CUSTOM_SMOOTHS)
def test_bleu_edge_cases(max_order, smooth, smooth_value):
    hyps, refs = [p[0] for p in EDGE_PAIRS], [p[1] for p in EDGE_PAIRS]
    got = sentence_bleu(
        _pad(hyps, 10),
        _pad(refs, 11),
        PAD,
        max_order=max_order,
        smooth=smooth,
        smooth_value=smooth_value,
    )
    _close(got, _sacrebleu(hyps, refs, max_order, smooth, smooth_value))


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_gleu_edge_cases(max_order):
    hyps, refs = [p[0] for p in EDGE_PAIRS], [p[1] for p in EDGE_PAIRS]
    _close(
        sentence_gleu(_pad(hyps, 12), _pad(refs, 13), PAD, max_order),
        _nltk(hyps, refs, max_order),
    )


@pytest.mark.parametrize("smooth,smooth_value", SMOOTHS)
def test_empty_sentences_score_zero(smooth, smooth_value):
    # sacrebleu and nltk both give 0 (no division error) when either side is empty.
    h = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 2, 3]])
    r = torch.tensor([[0, 0, 0], [1, 2, 3], [0, 0, 0]])
    zero = torch.zeros(3)
    torch.testing.assert_close(sentence_bleu(h, r, PAD, smooth=smooth, smooth_value=smooth_value), zero)
    torch.testing.assert_close(sentence_gleu(h, r, PAD), zero)
    assert sacrebleu.metrics.BLEU(tokenize="none", effective_order=True).sentence_score("", [""]).score == 0
    assert nltk_gleu([[]], []) == 0


@pytest.mark.parametrize("smooth,smooth_value", SMOOTHS + CUSTOM_SMOOTHS)
def test_identical_pairs_score_100(smooth, smooth_value):
    hyps, _ = _random_pairs(300, seed=14)
    hyps = [h for h in hyps if h]
    h = _pad(hyps, 15)
    r = _pad(hyps, 16)
    hundred = torch.full((len(hyps),), 100.0)
    torch.testing.assert_close(
        sentence_bleu(h, r, PAD, smooth=smooth, smooth_value=smooth_value),
        hundred,
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(sentence_gleu(h, r, PAD), hundred, atol=1e-4, rtol=0)


@pytest.mark.parametrize("base", [60_000, 2**31 - 3, 2**62])
def test_large_ids(base):
    hyps, refs = _random_pairs(300, seed=17, vocab=6)

    def big(seqs):
        return [[base + t for t in s] for s in seqs]

    h, r = _pad(big(hyps), 18), _pad(big(refs), 19)
    _close(sentence_bleu(h, r, PAD), _sacrebleu(big(hyps), big(refs)))
    _close(sentence_gleu(h, r, PAD), _nltk(big(hyps), big(refs)))
    # ids are only compared for equality: shifting them changes nothing
    torch.testing.assert_close(sentence_bleu(h, r, PAD), sentence_bleu(_pad(hyps, 18), _pad(refs, 19), PAD))


@pytest.mark.parametrize("shift", [8, 16, 24, 40, 56])
def test_ids_that_differ_only_in_a_high_byte(shift):
    # ids are compared byte by byte: these share every byte but one
    hyps, refs = _random_pairs(300, seed=23, vocab=6)

    def high(seqs):
        return [[t << shift for t in s] for s in seqs]

    h, r = _pad(high(hyps), 24), _pad(high(refs), 25)
    _close(sentence_bleu(h, r, PAD), _sacrebleu(high(hyps), high(refs)))
    _close(sentence_gleu(h, r, PAD), _nltk(high(hyps), high(refs)))


@pytest.mark.parametrize("length", [300, 1100])
def test_long_sentences_with_many_repeats(length):
    # past 255 tokens the counts leave bytes, past 1024 the clipped counts sum in float64;
    # three tokens repeat hundreds of times each
    rng = random.Random(length)
    hyps = [[rng.randint(1, 3) for _ in range(length)], [rng.randint(1, 3) for _ in range(length // 3)]]
    refs = [[rng.randint(1, 3) for _ in range(length // 2)], [rng.randint(1, 3) for _ in range(length)]]
    h, r = _pad(hyps, 26), _pad(refs, 27)
    _close(sentence_bleu(h, r, PAD), _sacrebleu(hyps, refs))
    _close(sentence_gleu(h, r, PAD), _nltk(hyps, refs))


def test_negative_pad_id_on_empty_sentences():
    # rows of a negative pad id only score 0; real tokens beside it still match
    h, r = torch.full((2, 150), -100), torch.full((2, 140), -100)
    for fn in (sentence_bleu, sentence_gleu):
        torch.testing.assert_close(fn(h, r, -100), torch.zeros(2))
    h[1, :2] = torch.tensor([5, 6])
    r[1, :2] = torch.tensor([5, 6])
    torch.testing.assert_close(sentence_bleu(h, r, -100), torch.tensor([0.0, 100.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pad_id", [2**53 + 1, 2**63 - 1, -(2**53 + 1)])
def test_huge_pad_id_with_different_widths(pad_id):
    # widening the narrower side must write the pad id exactly, not a float's rounding of it
    h, r = torch.tensor([[1, 2], [3, pad_id]]), torch.tensor([[1, 2, pad_id], [3, 4, 5]])
    for fn in (sentence_bleu, sentence_gleu):
        torch.testing.assert_close(fn(h, r, pad_id)[0], torch.tensor(100.0), atol=1e-4, rtol=0)
    _close(sentence_bleu(h, r, pad_id), _sacrebleu([[1, 2], [3]], [[1, 2], [3, 4, 5]]))


def test_negative_token_ids():
    # ids are only compared, negative ones too: -255, -254, -253 share their low byte with 1, 2, 3
    hyps, refs = _random_pairs(200, seed=28, vocab=6)

    def signed(seqs):
        return [[t if t <= 3 else t - 3 - 256 for t in s] for s in seqs]

    h, r = _pad(signed(hyps), 29), _pad(signed(refs), 30)
    _close(sentence_bleu(h, r, PAD), _sacrebleu(signed(hyps), signed(refs)))
    _close(sentence_gleu(h, r, PAD), _nltk(signed(hyps), signed(refs)))


def test_different_widths_and_all_pad_columns():
    h = torch.tensor([[1, 2, 3, 4, 0, 0, 0, 0, 0, 0]])
    r = torch.tensor([[0, 1, 2, 0, 3, 4]])
    torch.testing.assert_close(sentence_bleu(h, r, PAD), torch.tensor([100.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(sentence_gleu(h, r, PAD), torch.tensor([100.0]), atol=1e-4, rtol=0)


def _all_sequences(vocab: int, max_len: int) -> list[list[int]]:
    return [list(t) for n in range(max_len + 1) for t in itertools.product(range(1, vocab + 1), repeat=n)]


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_exhaustive_small_pairs(max_order):
    # every pair of sequences over {1, 2} of length 0..4 (961 pairs)
    seqs = _all_sequences(2, 4)
    hyps = [h for h in seqs for _ in seqs]
    refs = [r for _ in seqs for r in seqs]
    h, r = _pad(hyps, 23), _pad(refs, 24)
    for smooth, smooth_value in SMOOTHS:
        got = sentence_bleu(h, r, PAD, max_order=max_order, smooth=smooth, smooth_value=smooth_value)
        _close(got, _sacrebleu(hyps, refs, max_order, smooth, smooth_value))
    _close(sentence_gleu(h, r, PAD, max_order=max_order), _nltk(hyps, refs, max_order))


# ---------------------------------------------------------------- shapes, dtypes, devices


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("fn", [sentence_bleu, sentence_gleu])
def test_shape_dtype_device(device, fn):
    h = torch.tensor([[1, 2, 3, 0], [4, 0, 5, 6], [0, 0, 0, 0]], device=device)
    r = torch.tensor([[1, 2, 3], [4, 5, 7], [1, 0, 0]], device=device)
    out = fn(h, r, PAD)
    assert out.shape == (3,)
    assert out.dtype == torch.float32
    assert out.device == h.device
    expected = fn(h.cpu(), r.cpu(), PAD)
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("fn", [sentence_bleu, sentence_gleu])
def test_int32_ids_and_empty_batch(fn):
    h = torch.tensor([[1, 2, 3, 0]], dtype=torch.int32)
    r = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    torch.testing.assert_close(fn(h, r, PAD), torch.tensor([100.0]), atol=1e-4, rtol=0)
    out = fn(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 7, dtype=torch.long), PAD)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_invalid_arguments():
    h = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="smooth"):
        sentence_bleu(h, h, PAD, smooth="bogus")
    with pytest.raises(ValueError, match="2-D"):
        sentence_bleu(h[0], h[0], PAD)
    with pytest.raises(ValueError, match="batch sizes"):
        sentence_bleu(h, torch.tensor([[1], [2]]), PAD)
    with pytest.raises(ValueError, match="integer"):
        sentence_gleu(h.float(), h.float(), PAD)
    with pytest.raises(ValueError, match="max_order"):
        sentence_bleu(h, h, PAD, max_order=0)
    with pytest.raises(ValueError, match="min_order"):
        sentence_gleu(h, h, PAD, max_order=2, min_order=3)


# ---------------------------------------------------------------- text rewards and registry

WORDS = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", ".", "Hello,", "world!"]


def _decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def _text_batch():
    hyps, refs = _random_pairs(60, seed=20, max_len=12, vocab=len(WORDS) - 1)
    return hyps, refs, _pad(hyps, 21), _pad(refs, 22)


def test_sacrebleu_reward_bleu():
    hyps, refs, h, r = _text_batch()
    expected = [sacrebleu.sentence_bleu(_decode(a), [_decode(b)]).score for a, b in zip(hyps, refs)]
    out = SacreBLEUReward(_decode, metric="bleu", pad_id=PAD)(h, r)
    assert out.shape == (len(hyps),) and out.dtype == torch.float32
    _close(out, torch.tensor(expected, dtype=torch.float64))
    _close(
        get_reward("sacrebleu", decode=_decode)(h, r),
        torch.tensor(expected, dtype=torch.float64),
    )


def test_sacrebleu_reward_chrf():
    hyps, refs, h, r = _text_batch()
    expected = [sacrebleu.sentence_chrf(_decode(a), [_decode(b)]).score for a, b in zip(hyps, refs)]
    _close(
        SacreBLEUReward(_decode, metric="chrf")(h, r),
        torch.tensor(expected, dtype=torch.float64),
    )
    _close(
        get_reward("chrf", decode=_decode)(h, r),
        torch.tensor(expected, dtype=torch.float64),
    )


def test_sacrebleu_reward_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        SacreBLEUReward(_decode, metric="ter")


def test_get_reward_names(pairs):
    _, _, h, r = pairs
    assert set(REWARDS) == {"bleu", "gleu", "chrf", "sacrebleu"}
    torch.testing.assert_close(get_reward("bleu")(h, r), sentence_bleu(h, r, PAD))
    torch.testing.assert_close(get_reward("gleu")(h, r), sentence_gleu(h, r, PAD))
    torch.testing.assert_close(get_reward("bleu", n_gram=2)(h, r), sentence_bleu(h, r, PAD, max_order=2))
    torch.testing.assert_close(get_reward("gleu", n_gram=3)(h, r), sentence_gleu(h, r, PAD, max_order=3))
    h1, r1 = h.masked_fill(h == PAD, 99), r.masked_fill(r == PAD, 99)
    torch.testing.assert_close(get_reward("bleu", pad_id=99)(h1, r1), sentence_bleu(h, r, PAD))
    for name in REWARDS:
        assert callable(get_reward(name, decode=_decode))


def test_get_reward_errors():
    with pytest.raises(ValueError, match="unknown reward 'rouge'; known: bleu, gleu, chrf, sacrebleu"):
        get_reward("rouge")
    for name in ("chrf", "sacrebleu"):
        with pytest.raises(ValueError, match="decode"):
            get_reward(name)


def test_as_reward_passthrough_and_names(pairs):
    _, _, h, r = pairs

    def my_reward(hyps, refs):
        return (hyps != PAD).sum(dim=1).float()

    assert as_reward(my_reward) is my_reward
    torch.testing.assert_close(as_reward("bleu")(h, r), sentence_bleu(h, r, PAD))
    torch.testing.assert_close(as_reward("gleu", n_gram=2)(h, r), sentence_gleu(h, r, PAD, max_order=2))
    with pytest.raises(ValueError, match="unknown reward"):
        as_reward("nope")
