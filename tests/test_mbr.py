"""MBR selection: parity with brute-force sacrebleu loops, duplicates, empty strings, ties, chunking, ids."""

from __future__ import annotations

import math
import random

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from simple_nmt.data import SpecialIds
from simple_nmt.mbr import MBRResult, mbr_select, mbr_select_ids

# with a separator that sacrebleu's chrF takes for whitespace and Rust's split_whitespace does not
WORDS = "the a cat dog sat on mat , . Haus über naïve 日本 -- 's don't U.S. 3.5 &quot; (y) 1,000 e-mail".split()
WORDS.append("x\x1cy")
METRICS = {"bleu": BLEU(effective_order=True), "chrf": CHRF()}


def _sentence(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 13, 21])))
    return text + rng.choice(["", "", " ", "  \t"])  # trailing whitespace: a distinct string, the same tokens


def _sources(seed: int, sources: int = 6, most: int = 14) -> list[list[str]]:
    """Candidate lists with duplicates, empty and near-identical strings."""
    rng = random.Random(seed)
    out = []
    for _ in range(sources):
        source = [_sentence(rng) for _ in range(rng.randint(1, most))]
        source += rng.choices(source, k=rng.randint(0, 4)) + [""] * rng.randint(0, 1)
        rng.shuffle(source)
        out.append(source)
    return out


def _brute_force(candidates: list[str], references: list[str], metric: str) -> list[float]:
    """What the mbrs library does: sacrebleu's sentence score of every (candidate, reference) pair, averaged."""
    score = METRICS[metric].sentence_score
    return [math.fsum(score(c, [r]).score for r in references) / len(references) for c in candidates]


def _check(result: MBRResult, candidates: list[list[str]], references: list[list[str]] | None, metric: str) -> None:
    """Expected utilities as the brute-force loop's, and the selection its best candidate.

    Expected utilities within 1e-6 of the loop's (BLEU from ``rewards.sentence_bleu`` in float64). The
    selected candidate is the first of the highest expected utility as computed, which is the brute-force
    best up to that precision (the loop's own floats can put equal utilities one ulp apart: the same
    BLEU reached by different computations).
    """
    assert len(result.selected) == len(result.utilities) == len(candidates)
    for s, source in enumerate(candidates):
        expected = _brute_force(source, source if references is None else references[s], metric)
        got = result.utilities[s]
        if metric == "chrf":
            assert got == pytest.approx(expected, rel=0, abs=1e-9)
        else:
            assert got == pytest.approx(expected, rel=0, abs=1e-6)
        assert result.selected[s] == got.index(max(got))
        assert expected[result.selected[s]] >= max(expected) - 1e-5


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_pseudo_references_match_sacrebleu(metric: str) -> None:
    if metric == "chrf":
        pytest.importorskip("fastchrf")
    candidates = _sources(seed=1)
    _check(mbr_select(candidates, utility=metric), candidates, None, metric)


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_separate_references_match_sacrebleu(metric: str) -> None:
    if metric == "chrf":
        pytest.importorskip("fastchrf")
    candidates, references = _sources(seed=2), _sources(seed=3)
    references[0].append("")  # an empty reference
    _check(mbr_select(candidates, references, utility=metric), candidates, references, metric)


def test_clear_winners_are_selected_exactly() -> None:
    candidates = [["a cat sat on the mat .", "the cat sat on the mat .", "the cat sat on a mat .", "dogs !"],
                  ["", "x", "the dog barked ."]]
    references = [["the cat sat on the mat ."], ["the dog barked loudly ."]]
    for metric in ("bleu", "sacrebleu"):
        assert mbr_select(candidates, references, metric).selected == [1, 2]
        # the candidate closest to all others: the middle one
        assert mbr_select([candidates[0]], utility=metric).selected == [1]


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_empty_candidates_score_zero(metric: str) -> None:
    if metric == "chrf":
        pytest.importorskip("fastchrf")
    result = mbr_select([["", " ", "a b"]], [["a b", "", "c"]], metric)
    assert result.utilities[0][:2] == [0.0, 0.0]
    assert result.selected == [2]
    assert mbr_select([[""]], utility=metric).utilities == [[0.0]]  # empty against empty, as sacrebleu


def test_ties_go_to_the_first_index() -> None:
    # nothing in common with the reference: all zero
    assert mbr_select([["a", "b", "c"]], [["z"]]).selected == [0]
    # symmetric: the same two utilities in another order
    for pair in (["a b", "b a"], ["b a", "a b"]):
        result = mbr_select([pair])
        assert result.utilities[0][0] == result.utilities[0][1]
        assert result.selected == [0]
    # duplicates: the first occurrence, the same utility for each copy
    result = mbr_select([["z", "a b c d", "a b c", "a b c", "a b c e"]])
    assert result.selected == [2]
    assert result.utilities[0][2] == result.utilities[0][3]
    assert result.ranking()[0][:2] == [2, 3]
    # different strings, the same tokens: the same utilities, the first
    assert mbr_select([["x", "a b c ", "a b c", "a b"]]).selected == [1]


def test_ranking_orders_by_expected_utility() -> None:
    result = MBRResult(selected=[1, 0], utilities=[[1.0, 3.0, 2.0, 3.0], [5.0]])
    assert result.ranking() == [[1, 3, 2, 0], [0]]


def test_duplicates_are_scored_once_and_counted() -> None:
    scored = []

    def reference_length(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        scored.append(hyps.size(0))
        return (refs != 0).sum(dim=1).float()

    candidates = [["a", "b b", "b b", "c c c c", "b b"]]
    result = mbr_select(candidates, utility=reference_length)
    # 3 distinct candidates against 3 distinct references; the reference lengths weighted by multiplicity
    assert sum(scored) == 9
    assert result.utilities == [[11 / 5] * 5]
    assert result.selected == [0]


def test_other_rewards_score_the_13a_tokens() -> None:
    nltk_gleu = pytest.importorskip("nltk.translate.gleu_score").sentence_gleu
    candidates = [["Hello, world!", "hello world", "Hello, world !"]]
    tokens = [s.replace(",", " ,").replace("!", " !").split() for s in candidates[0]]
    expected = [math.fsum(100 * nltk_gleu([r], h) for r in tokens) / 3 for h in tokens]
    assert mbr_select(candidates, utility="gleu").utilities[0] == pytest.approx(expected, abs=1e-4)
    seen = []

    def text_reward(hyps: torch.Tensor, refs: torch.Tensor, *, hyp_text: list[str]) -> torch.Tensor:
        seen.extend(hyp_text)
        return torch.zeros(hyps.size(0))

    mbr_select([["Hello, world!"]], utility=text_reward)
    assert seen == ["Hello , world !"]


def test_tokens_are_sacrebleus_13a_tokens() -> None:
    """Words are tokenized one at a time: the same tokens as sacrebleu's for the whole line."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    pieces = list("ab9.,-&;<>'\"()/") + [" ", " ", "\t", "\xa0", "\x1c", "\u3000", "&quot;", "&amp;", "<skipped>",
                                         "-\n", "\n", "1.5", "U.S."]
    rng = random.Random(7)
    texts = list(dict.fromkeys("".join(rng.choices(pieces, k=rng.randint(0, 12))) for _ in range(3000)))
    seen = []

    def text_reward(hyps: torch.Tensor, refs: torch.Tensor, *, hyp_text: list[str]) -> torch.Tensor:
        seen.extend(hyp_text)
        return torch.zeros(hyps.size(0))

    mbr_select([texts], [["x"]], utility=text_reward, chunk_rows=len(texts))  # one call, in order
    tokenize = Tokenizer13a()
    assert seen == [tokenize(text.rstrip()) for text in texts]


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_chunks_give_the_same_result(metric: str) -> None:
    if metric == "chrf":
        pytest.importorskip("fastchrf")
    candidates = _sources(seed=4, sources=9, most=30)
    references = _sources(seed=5, sources=9, most=5)
    for refs in (None, references):
        whole = mbr_select(candidates, refs, metric)
        for chunk_rows in (1, 7, 100):
            assert mbr_select(candidates, refs, metric, chunk_rows=chunk_rows) == whole


def _ids(rows: list[list[int]], width: int, eos: int, pad: int) -> torch.Tensor:
    """Rows with EOS after each (then junk), right-padded."""
    out = []
    for k, row in enumerate(rows):
        row = row + [eos] + [5 + k % 3] * (k % 2)
        out.append(row + [pad] * (width - len(row)))
    return torch.tensor(out)


def test_ids_match_sacrebleu_on_ids() -> None:
    rng = random.Random(6)
    specials = SpecialIds(pad=1, unk=0, bos=2, eos=3)
    sources = []
    for _ in range(3):
        rows = [[rng.randint(4, 9) for _ in range(rng.randint(0, 12))] for _ in range(8)]
        sources.append(rows + rows[:3])  # duplicates, with other junk after EOS
    candidates = torch.stack([_ids(rows, 16, specials.eos, specials.pad) for rows in sources])
    refs = [[[rng.randint(4, 9) for _ in range(rng.randint(0, 12))] for _ in range(4)] for _ in sources]
    references = torch.stack([_ids(rows, 16, specials.eos, specials.pad) for rows in refs])
    bleu = BLEU(tokenize="none", effective_order=True)

    def brute_force(hyps: list[list[int]], targets: list[list[int]]) -> list[float]:
        return [math.fsum(bleu.sentence_score(" ".join(map(str, h)), [" ".join(map(str, r))]).score
                          for r in targets) / len(targets) for h in hyps]

    for given, targets in ((None, sources), (references, refs)):
        result = mbr_select_ids(candidates, given, "bleu", specials, chunk_rows=10)
        for s, hyps in enumerate(sources):
            expected = brute_force(hyps, targets[s])
            assert result.utilities[s] == pytest.approx(expected, rel=0, abs=1e-6)
            assert result.selected[s] == result.utilities[s].index(max(result.utilities[s]))
            assert expected[result.selected[s]] >= max(expected) - 1e-5


def test_ids_text_rewards_use_the_text_path() -> None:
    pytest.importorskip("fastchrf")
    words = {4: "the", 5: "cat", 6: "sat", 7: "mat"}

    def to_text(ids: list[int]) -> str:
        return " ".join(words[i] for i in ids)

    rows = [[4, 5, 6], [4, 7], [5, 6, 4, 7], [4, 5, 6]]
    candidates = _ids(rows, 6, eos=3, pad=0)[None]
    texts = [[to_text(r) for r in rows]]
    for reward, utility in (("chrf", "chrf"), ("sacrebleu", "bleu")):
        assert mbr_select_ids(candidates, reward=reward, to_text=to_text) == mbr_select(texts, utility=utility)
    with pytest.raises(ValueError, match="to_text"):
        mbr_select_ids(candidates, reward="chrf")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="one list of strings per source"):
        mbr_select(["a", "b"])
    with pytest.raises(ValueError, match="source 1: none given"):
        mbr_select([["a"], []])
    with pytest.raises(ValueError, match="2 sources of candidates but 1"):
        mbr_select([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="chunk_rows"):
        mbr_select([["a"]], chunk_rows=0)
    with pytest.raises(ValueError, match=r"\(sources, n, length\)"):
        mbr_select_ids(torch.ones(3, 4, dtype=torch.long))
