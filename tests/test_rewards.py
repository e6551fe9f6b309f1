"""Rewards: parity with sacrebleu / nltk, edge cases, devices, registry, inputs, scoring candidates."""

from __future__ import annotations

import itertools
import random

import pytest
import sacrebleu
import torch
from nltk.translate.gleu_score import sentence_gleu as nltk_gleu

from simple_nmt.data import EOS, SpecialIds
from simple_nmt.rewards import (
    REWARD_INPUTS,
    REWARDS,
    SacreBLEUReward,
    after_eos,
    as_reward,
    checked_scores,
    get_reward,
    import_reward,
    reward_inputs,
    reward_label,
    reward_name,
    score_candidates,
    sentence_bleu,
    sentence_gleu,
    strip_eos,
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


@pytest.mark.parametrize("smooth,smooth_value", SMOOTHS)
def test_bleu_without_brevity_penalty_is_sacrebleus_score_over_its_brevity_penalty(pairs, smooth, smooth_value):
    hyps, refs, h, r = pairs
    metric = sacrebleu.metrics.BLEU(tokenize="none", smooth_method=smooth, smooth_value=smooth_value,
                                    effective_order=True)
    scores = [metric.sentence_score(_join(hyp), [_join(ref)]) for hyp, ref in zip(hyps, refs)]
    expected = [s.score / s.bp if s.bp > 0 else 0.0 for s in scores]  # sacrebleu's score is bp * precisions
    got = sentence_bleu(h, r, PAD, smooth=smooth, smooth_value=smooth_value, brevity_penalty=False)
    _close(got, torch.tensor(expected, dtype=torch.float64))
    short = torch.tensor([0 < len(a) < len(b) for a, b in zip(hyps, refs)])
    assert (got[short] > sentence_bleu(h, r, PAD, smooth=smooth, smooth_value=smooth_value)[short]).any()


def test_the_bleu_precision_reward_is_bleu_without_its_brevity_penalty(pairs):
    _, _, h, r = pairs
    reward = get_reward("bleu_precision", n_gram=3, pad_id=PAD)
    torch.testing.assert_close(reward(h, r), sentence_bleu(h, r, PAD, max_order=3, brevity_penalty=False))


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


def _texts(hyps: list[list[int]], refs: list[list[int]]) -> dict[str, list[str]]:
    return {"hyp_text": [_decode(h) for h in hyps], "ref_text": [_decode(r) for r in refs]}


@pytest.mark.parametrize("name, metric, score", [("sacrebleu", "bleu", sacrebleu.sentence_bleu),
                                                  ("chrf", "chrf", sacrebleu.sentence_chrf)])
def test_sacrebleu_rewards_score_the_texts_they_are_given(name, metric, score):
    hyps, refs, h, r = _text_batch()
    expected = torch.tensor([score(_decode(a), [_decode(b)]).score for a, b in zip(hyps, refs)], dtype=torch.float64)
    out = SacreBLEUReward(metric)(h, r, **_texts(hyps, refs))
    assert out.shape == (len(hyps),) and out.dtype == torch.float32
    _close(out, expected)
    reward = get_reward(name)
    assert reward_inputs(reward) == {"hyp_text", "ref_text"}  # a text reward: the engine gives it the texts
    _close(reward(h, r, **_texts(hyps, refs)), expected)
    # the texts are what is scored, not the ids: each reference against itself
    ref_text = _texts(hyps, refs)["ref_text"]
    same = reward(h, r, hyp_text=ref_text, ref_text=ref_text)
    assert same[[bool(line) for line in ref_text]].tolist() == pytest.approx([100.0] * sum(map(bool, ref_text)))


def test_sacrebleu_reward_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        SacreBLEUReward(metric="ter")
    h = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="2 rows but 1 hypothesis and 2 reference texts"):
        SacreBLEUReward()(h, h, hyp_text=["a"], ref_text=["a", "b"])


def test_get_reward_names(pairs):
    _, _, h, r = pairs
    assert set(REWARDS) == {"bleu", "bleu_precision", "gleu", "chrf", "sacrebleu"}
    torch.testing.assert_close(get_reward("bleu")(h, r), sentence_bleu(h, r, PAD))
    torch.testing.assert_close(get_reward("gleu")(h, r), sentence_gleu(h, r, PAD))
    torch.testing.assert_close(get_reward("bleu", n_gram=2)(h, r), sentence_bleu(h, r, PAD, max_order=2))
    torch.testing.assert_close(get_reward("gleu", n_gram=3)(h, r), sentence_gleu(h, r, PAD, max_order=3))
    h1, r1 = h.masked_fill(h == PAD, 99), r.masked_fill(r == PAD, 99)
    torch.testing.assert_close(get_reward("bleu", pad_id=99)(h1, r1), sentence_bleu(h, r, PAD))
    for name in REWARDS:
        assert callable(get_reward(name))


def test_get_reward_errors():
    with pytest.raises(ValueError, match="unknown reward 'rouge'; known: bleu, bleu_precision, gleu, chrf, sacrebleu"):
        get_reward("rouge")


def length_reward(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """A module-level reward: storable by name."""
    return (hyps != PAD).sum(dim=1).float()


class Rewards:
    @staticmethod
    def static(hyps, refs):
        return length_reward(hyps, refs)

    def method(self, hyps, refs):
        return length_reward(hyps, refs)

    def __call__(self, hyps, refs):
        return length_reward(hyps, refs)


def test_rewards_by_module_and_function_name(pairs):
    _, _, h, r = pairs
    name = f"{__name__}:length_reward"
    assert get_reward(name) is length_reward and as_reward(name) is length_reward
    assert import_reward(f"{__name__}:Rewards.static") is Rewards.static
    for bad, message in [
        ("no_such_module_xyz:f", r"^reward 'no_such_module_xyz:f' does not import: ModuleNotFoundError: No module "),
        ("math:nope", r"^reward 'math:nope' does not import: module math has no nope$"),
        ("math:pi", r"^reward 'math:pi' is not callable: it is a float$"),
        (":f", r"^reward ':f' does not import: ValueError"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            get_reward(bad)
        assert "\n" not in str(error.value)


def test_reward_names_are_what_rebuilds_the_reward():
    assert reward_name("chrf") == "chrf" and reward_name("my.module:f") == "my.module:f"
    assert reward_name(length_reward) == f"{__name__}:length_reward"
    assert reward_name(Rewards.static) == f"{__name__}:Rewards.static"
    assert reward_name(sentence_bleu) == "simple_nmt.rewards:sentence_bleu"
    # neither a lambda, a closure, a bound method, an instance nor a library reward built by name
    for unnamed in (lambda hyps, refs: hyps, get_reward("bleu"), Rewards().method, Rewards(), get_reward("chrf")):
        assert reward_name(unnamed) is None
    assert reward_label(lambda hyps, refs: hyps) == "test_reward_names_are_what_rebuilds_the_reward.<locals>.<lambda>"
    assert reward_label(Rewards()) == "Rewards" and reward_label("bleu") == "'bleu'"


def test_reward_inputs_are_read_from_the_signature():
    def plain(hyps, refs):
        return hyps

    def source_aware(hyps, refs, src, *, index, other=None):
        return hyps

    def anything(hyps, refs, **kwargs):
        return hyps

    assert reward_inputs(plain) == frozenset() and reward_inputs(len) == frozenset()
    assert reward_inputs(source_aware) == {"src", "index"}
    assert reward_inputs(anything) == set(REWARD_INPUTS)
    # what cannot be given: refused when named, left out for **kwargs
    unavailable = {"ref_text": "pass tgt_lines= to the engine", "hyp_text": "pass tgt_field="}
    assert reward_inputs(anything, unavailable) == {"src", "src_text", "index"}
    assert reward_inputs(source_aware, unavailable) == {"src", "index"}
    with pytest.raises(ValueError, match=r"^reward 'chrf' takes hyp_text: pass tgt_field=$"):
        reward_inputs(get_reward("chrf"), unavailable, label="'chrf'")


def test_checked_scores_accept_real_tensors_of_one_score_per_row():
    torch.testing.assert_close(checked_scores(torch.tensor([1, 2, 3]), 3, "r"), torch.tensor([1.0, 2.0, 3.0]))
    assert checked_scores(torch.tensor([True, False]), 2, "r").tolist() == [1.0, 0.0]
    assert checked_scores(torch.tensor([0.5], dtype=torch.float64), 1, "r").dtype == torch.float32
    expected = r"expected a real-valued tensor of shape \(3,\), one score per row$"
    for out, returned in [
        (torch.zeros(3, 1), r"a tensor of shape \(3, 1\) and dtype torch.float32"),
        (torch.zeros(4), r"a tensor of shape \(4,\) and dtype torch.float32"),
        (torch.zeros(3, dtype=torch.complex64), r"a tensor of shape \(3,\) and dtype torch.complex64"),
        ([1.0, 2.0, 3.0], "a list"),
    ]:
        with pytest.raises(ValueError, match=f"^reward my_reward returned {returned}; {expected}"):
            checked_scores(out, 3, "my_reward")
    with pytest.raises(ValueError, match=r"^reward r returned non-finite scores \(e.g. nan\); expected finite ones$"):
        checked_scores(torch.tensor([1.0, float("nan"), 2.0]), 3, "r")
    checked_scores(torch.tensor([1.0, float("inf")]), 2, "r", check_finite=False)


def test_strip_eos_keeps_what_comes_before_the_first_eos():
    ids = torch.tensor([[4, 5, EOS, 6, EOS], [EOS, 4, 4, 4, 4], [4, PAD, 5, 6, 7]])
    assert after_eos(ids).tolist() == [[False, False, False, True, True], [False, True, True, True, True],
                                       [False] * 5]
    assert strip_eos(ids).tolist() == [[4, 5, PAD, PAD, PAD], [PAD] * 5, [4, PAD, 5, 6, 7]]
    marian = SpecialIds(pad=9, unk=1, bos=9, eos=0)  # EOS 0 and PAD last, as Marian's
    assert strip_eos(torch.tensor([[4, 0, 5]]), marian).tolist() == [[4, 9, 9]]


# ---------------------------------------------------------------- scoring candidates


def _candidates(sources: int, n: int, length: int, seed: int) -> torch.Tensor:
    """Random candidates with EOS inside some rows (junk after it), empty ones (EOS first) and PAD inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 9, (sources, n, length), generator=g)
    ends = torch.randint(0, length + 3, (sources, n), generator=g)  # >= length: no EOS
    for s in range(sources):
        for i in range(n):
            if ends[s, i] < length:
                ids[s, i, ends[s, i]] = EOS
    ids[0, 0, 0] = EOS  # an empty candidate
    ids[ids.size(0) - 1, n - 1, 1] = PAD
    return ids


def _loop(candidates: torch.Tensor, references: torch.Tensor, reward) -> torch.Tensor:
    """The reward of every pair, one pair at a time, on the tokens before the first EOS."""
    def content(row: torch.Tensor) -> torch.Tensor:
        tokens = row.tolist()
        tokens = tokens[: tokens.index(EOS)] if EOS in tokens else tokens
        return torch.tensor([[t for t in tokens if t != PAD] or [PAD]])

    return torch.tensor([[[float(reward(content(c), content(r))[0]) for r in refs] for c in cands]
                         for cands, refs in zip(candidates, references)])


@pytest.mark.parametrize("name, reference", [("bleu", sentence_bleu), ("gleu", sentence_gleu)])
def test_score_candidates_equals_a_loop_over_the_pairs(name, reference):
    candidates = _candidates(3, 5, 9, seed=0)
    references = _candidates(3, 4, 7, seed=1)
    expected = _loop(candidates, references, lambda h, r: reference(h, r, PAD))
    for chunk_rows in (1, 7, 60, 4096):  # one pair, uneven chunks, all pairs in one chunk, more
        got = score_candidates(candidates, references, name, chunk_rows=chunk_rows)
        assert got.shape == (3, 5, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected)
    assert (got[0, 0] == 0).all()  # the empty candidate


def test_score_candidates_against_the_candidates_themselves():
    candidates = _candidates(2, 6, 8, seed=2)
    got = score_candidates(candidates, candidates, chunk_rows=10)
    torch.testing.assert_close(got, _loop(candidates, candidates, lambda h, r: sentence_bleu(h, r, PAD)))
    nonempty = (strip_eos(candidates.view(12, -1)) != PAD).any(dim=1).view(2, 6)
    diagonal = got.diagonal(dim1=1, dim2=2)  # each candidate against itself: 100, or 0 when empty
    torch.testing.assert_close(diagonal, torch.where(nonempty, 100.0, 0.0))
    # one source as 2-D tensors: (n, m)
    torch.testing.assert_close(score_candidates(candidates[1], candidates[1]), got[1])


def test_score_candidates_with_a_callable_and_a_text_reward():
    candidates, references = _candidates(2, 3, 6, seed=3), _candidates(2, 2, 5, seed=4)
    lengths = score_candidates(candidates, references, length_reward)
    expected = (strip_eos(candidates.view(6, -1)) != PAD).sum(dim=1).float().view(2, 3, 1).expand(-1, -1, 2)
    torch.testing.assert_close(lengths, expected)

    def text(ids):
        return " ".join(WORDS[i] for i in ids if i != PAD)

    got = score_candidates(candidates, references, "chrf", to_text=text, chunk_rows=5)
    expected = _loop(candidates, references, lambda h, r: torch.tensor([sacrebleu.sentence_chrf(
        text(h[0].tolist()), [text(r[0].tolist())]).score]))
    torch.testing.assert_close(got, expected)


def test_score_candidates_refusals():
    ids = torch.full((2, 3, 4), 5)

    def source_aware(hyps, refs, src):
        return hyps

    def bad_shape(hyps, refs):
        return hyps.float()

    with pytest.raises(ValueError, match="reward 'chrf' takes hyp_text: pass to_text"):
        score_candidates(ids, ids, "chrf")
    with pytest.raises(ValueError, match="takes src: score_candidates gives the candidates and references only"):
        score_candidates(ids, ids, source_aware)
    with pytest.raises(ValueError, match=r"reward .*bad_shape returned a tensor of shape \(4, 4\)"):
        score_candidates(ids, ids, bad_shape, chunk_rows=4)
    with pytest.raises(ValueError, match="2 sources of candidates but 1 of references"):
        score_candidates(ids, ids[:1])
    with pytest.raises(ValueError, match=r"got shapes \(2, 3, 4\) and \(3, 4\)"):
        score_candidates(ids, ids[0])
    with pytest.raises(ValueError, match="chunk_rows must be at least 1"):
        score_candidates(ids, ids, chunk_rows=0)


def test_as_reward_passthrough_and_names(pairs):
    _, _, h, r = pairs

    def my_reward(hyps, refs):
        return (hyps != PAD).sum(dim=1).float()

    assert as_reward(my_reward) is my_reward
    torch.testing.assert_close(as_reward("bleu")(h, r), sentence_bleu(h, r, PAD))
    torch.testing.assert_close(as_reward("gleu", n_gram=2)(h, r), sentence_gleu(h, r, PAD, max_order=2))
    with pytest.raises(ValueError, match="unknown reward"):
        as_reward("nope")


def test_score_candidates_gives_to_text_the_ids_without_eos_and_pad():
    seen = []

    def to_text(ids):
        seen.append(list(ids))
        return " ".join(map(str, ids))

    def length(hyps, refs, hyp_text, ref_text):
        return torch.tensor([len(h.split()) - len(r.split()) for h, r in zip(hyp_text, ref_text)])

    candidates = torch.tensor([[[5, 6, EOS, 7], [5, PAD, PAD, PAD]]])
    scores = score_candidates(candidates, candidates, length, to_text=to_text)
    assert scores.tolist() == [[[0.0, 1.0], [-1.0, 0.0]]]
    assert all(PAD not in ids and EOS not in ids for ids in seen)


def test_sentence_bleu_in_float64_is_sacrebleu_to_1e_9():
    import sacrebleu

    g = torch.Generator().manual_seed(0)
    hyps, refs = torch.randint(4, 12, (200, 15), generator=g), torch.randint(4, 12, (200, 12), generator=g)
    scores = sentence_bleu(hyps, refs, PAD, dtype=torch.float64)
    bleu = sacrebleu.metrics.BLEU(tokenize="none", effective_order=True)
    expected = [bleu.sentence_score(" ".join(map(str, h)), [" ".join(map(str, r))]).score
                for h, r in zip(hyps.tolist(), refs.tolist())]
    assert scores.dtype == torch.float64 and scores.tolist() == pytest.approx(expected, rel=0, abs=1e-9)
