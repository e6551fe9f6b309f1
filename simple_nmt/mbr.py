"""Minimum Bayes risk (MBR) selection over candidate translations, on the library's rewards.

For each source, N candidates (e.g. sampled translations) are scored against a set of references, by
default the candidates themselves ("pseudo-references": sampling-based MBR), and the candidate of the
highest expected utility is selected. A candidate's expected utility is the mean of
``utility(hypothesis=candidate, reference=r)`` over the references ``r``, the candidate itself included
when the references are the candidates.

Identical candidates (and identical references) are scored once and counted with their multiplicity,
and the (candidate, reference) pairs are scored a chunk at a time, so that memory stays bounded for
N = 1,024 candidates per source and more.

``mbr_select`` takes strings. Its BLEU is sacrebleu's sentence BLEU with its defaults (13a tokens,
exponential smoothing) and effective order, the utility of the ``mbrs`` library and of the MBR papers,
computed by ``rewards.sentence_bleu`` on the 13a tokens; its chrF is sacrebleu's chrF (character
6-grams, beta 2), computed by ``fastchrf``; ``translate.py --mbr`` selects with it, on the detokenized
candidates. ``mbr_select_ids`` takes id tensors (``search``'s output) and any reward of the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

import torch

from simple_nmt.data import LIBRARY_IDS, SPECIALS, SpecialIds
from simple_nmt.rewards import Reward, score_candidates, sentence_bleu, strip_eos

T = TypeVar("T", bound=Hashable)

# A block of one source's candidates: (source, first candidate, the candidate after the last).
Block = tuple[int, int, int]
# Scores blocks, each against all the references of its source: one float64 (rows, m) tensor per block.
Scorer = Callable[[list[Block]], list[torch.Tensor]]

# Python's str.split, with which sacrebleu's chrF removes whitespace, also splits on these four ASCII
# separators, and Rust's (fastchrf's) does not: they are turned into spaces first.
_SEPARATORS = str.maketrans("\x1c\x1d\x1e\x1f", "    ")

# (candidate, reference) pairs per call of a utility, by default. A pair takes about 4 * length**2 bytes
# in the tensor rewards (2,048 was the fastest of 512 to 8,192 on one CPU thread, for 64 and 256
# candidates of about 30 tokens), a few dozen in fastchrf's output.
CHUNK_ROWS = 2048
CHRF_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class MBRResult:
    """The outcome of MBR selection, one entry per source.

    Attributes:
        selected: the index of the selected candidate: the highest expected utility, and among equal
            ones the lowest index (so the first of identical candidates).
        utilities: the expected utility of every candidate, in the input order (the scale of the
            utility: 0-100 for BLEU and chrF).
    """

    selected: list[int]
    utilities: list[list[float]]

    def ranking(self) -> list[list[int]]:
        """Per source, the candidate indices from the highest expected utility to the lowest, equal ones
        by index (``ranking()[s][0] == selected[s]``): the order of ``translate.py --n_best`` under MBR."""
        return [sorted(range(len(u)), key=lambda i: -u[i]) for u in self.utilities]


@dataclass(frozen=True)
class _Distinct(Generic[T]):
    """The distinct items of one source, in order of first occurrence."""

    items: list[T]
    first: list[int]  # the index of each distinct item's first occurrence
    inverse: list[int]  # the position in ``items`` of each item given
    counts: list[int]  # how many times each distinct item was given


def _distinct(items: Sequence[T]) -> _Distinct[T]:
    """The distinct items of ``items``, where each one first occurs, and their positions and counts."""
    position: dict[T, int] = {}
    first, inverse = [], []
    for i, item in enumerate(items):
        k = position.setdefault(item, len(position))
        if k == len(first):
            first.append(i)
        inverse.append(k)
    counts = [0] * len(first)
    for k in inverse:
        counts[k] += 1
    return _Distinct(list(position), first, inverse, counts)


def mbr_select(
    candidates: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]] | None = None,
    utility: str | Reward = "bleu",
    chunk_rows: int | None = None,
) -> MBRResult:
    """Select, for each source, the candidate of the highest expected utility against the references.

    Args:
        candidates: one non-empty list of candidate strings per source.
        references: one non-empty list of reference strings per source; None: the candidates of the
            same source (pseudo-references, each candidate counted as often as it is given).
        utility: ``"bleu"`` (or ``"sacrebleu"``): sacrebleu's sentence BLEU, 13a tokens, exp smoothing,
            effective order (each pair's score rounded to float32 by ``rewards.sentence_bleu``, within
            1e-7 of sacrebleu's, relatively); ``"chrf"``: sacrebleu's chrF, computed by ``fastchrf`` (``pip install
            fastchrf``); or any other reward that ``rewards.score_candidates`` takes (``"gleu"``, a
            callable on ids), given the 13a tokens of each string as ids of a vocabulary made for the
            call (and, if it takes ``hyp_text`` / ``ref_text``, those tokens joined by spaces).
        chunk_rows: the most (candidate, reference) pairs per call of the utility, what bounds memory;
            None: ``CHRF_CHUNK_ROWS`` for chrF, else ``CHUNK_ROWS``.

    Returns:
        The selected indices and the expected utilities (``MBRResult``).
    """
    _check_texts(candidates, "candidates")
    if references is not None:
        _check_texts(references, "references")
        if len(references) != len(candidates):
            raise ValueError(f"{len(candidates)} sources of candidates but {len(references)} of references")
    cands = [_distinct(source) for source in candidates]
    refs = cands if references is None else [_distinct(source) for source in references]
    cand_texts = [c.items for c in cands]
    ref_texts = cand_texts if references is None else [r.items for r in refs]
    if utility == "chrf":
        chunk_rows = CHRF_CHUNK_ROWS if chunk_rows is None else chunk_rows
        scorer = _chrf_scorer(cand_texts, ref_texts)
    else:
        chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
        scorer = _token_scorer(cand_texts, ref_texts, "bleu" if utility == "sacrebleu" else utility, chunk_rows)
    return _result(_pairwise([(len(c.items), len(r.items)) for c, r in zip(cands, refs)], scorer, chunk_rows),
                   cands, refs)


def mbr_select_ids(
    candidates: torch.Tensor,
    references: torch.Tensor | None = None,
    reward: str | Reward = "bleu",
    specials: SpecialIds = LIBRARY_IDS,
    chunk_rows: int | None = None,
    to_text: Callable[[Sequence[int]], str] | None = None,
) -> MBRResult:
    """``mbr_select`` on id tensors, with any reward of the library.

    A row is read as ``rewards.score_candidates`` reads it: everything from its first EOS on is
    ignored, and PAD wherever it stands; rows that are the same once read so are identical.

    Args:
        candidates: |candidates| = (sources, n, length) ids.
        references: |references| = (sources, m, length') ids; None: the candidates.
        reward: a reward that ``rewards.score_candidates`` takes: a name of ``rewards.REWARDS``,
            ``"module:function"`` or a callable. With ``to_text``, ``"chrf"`` and ``"sacrebleu"`` score
            the texts as ``mbr_select``'s ``"chrf"`` and ``"bleu"`` do (the same scores, faster).
        specials: the vocabulary's special ids (EOS and PAD are read).
        chunk_rows: the most (candidate, reference) pairs per call of the reward, what bounds memory;
            None: as ``mbr_select``.
        to_text: ids (EOS and PAD removed) to text, for a reward on texts.

    Returns:
        The selected indices and the expected utilities (``MBRResult``).
    """
    if candidates.dim() != 3 or (references is not None and (references.dim() != 3
                                                             or references.size(0) != candidates.size(0))):
        raise ValueError(f"candidates and references must be (sources, n, length) and (sources, m, length') ids, "
                         f"got shapes {tuple(candidates.shape)} and "
                         f"{None if references is None else tuple(references.shape)}")
    cand_ids, cand_keys = _contents(candidates, specials)
    ref_ids, ref_keys = (cand_ids, cand_keys) if references is None else _contents(references, specials)
    if isinstance(reward, str) and reward in ("chrf", "sacrebleu") and to_text is not None:
        def texts(keys: list[list[tuple[int, ...]]]) -> list[list[str]]:
            return [[to_text(key) for key in source] for source in keys]

        return mbr_select(texts(cand_keys), None if references is None else texts(ref_keys), reward, chunk_rows)
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    cands = [_distinct(source) for source in cand_keys]
    refs = cands if references is None else [_distinct(source) for source in ref_keys]
    # the rows of each source's distinct candidates (references), EOS and after turned into PAD
    cand_rows = [ids[c.first] for ids, c in zip(cand_ids, cands)]
    ref_rows = cand_rows if references is None else [ids[r.first] for ids, r in zip(ref_ids, refs)]
    scorer = partial(_score_blocks, cands=cand_rows, refs=ref_rows, reward=reward, specials=specials,
                     chunk_rows=chunk_rows, to_text=to_text)
    return _result(_pairwise([(len(c.items), len(r.items)) for c, r in zip(cands, refs)], scorer, chunk_rows),
                   cands, refs)


def _check_texts(sources: Sequence[Sequence[str]], name: str) -> None:
    """Refuse anything but one non-empty list of strings per source."""
    if isinstance(sources, str):
        raise ValueError(f"{name} must be one list of strings per source, got a string")
    for s, source in enumerate(sources):
        if isinstance(source, str) or not all(isinstance(text, str) for text in source):
            raise ValueError(f"{name} must be one list of strings per source; source {s} is not")
        if not source:
            raise ValueError(f"{name} of source {s}: none given")


def _contents(ids: torch.Tensor, specials: SpecialIds) -> tuple[torch.Tensor, list[list[tuple[int, ...]]]]:
    """The ids with EOS and what follows it turned into PAD, and each row's ids without PAD.

    Args:
        ids: |ids| = (sources, rows, length).
    """
    if ids.size(1) == 0:
        raise ValueError("every source needs at least one candidate and one reference, got none")
    stripped = strip_eos(ids.reshape(-1, ids.size(-1)), specials).view_as(ids)  # |stripped| = |ids|
    keys = [[tuple(t for t in row if t != specials.pad) for row in source] for source in stripped.tolist()]
    return stripped, keys


def _pairwise(sizes: list[tuple[int, int]], scorer: Scorer, chunk_rows: int) -> list[torch.Tensor]:
    """Each source's n candidates scored against its m references, ``sizes[s] = (n, m)``.

    A source of more than ``chunk_rows`` pairs is cut into blocks of candidates (one candidate at least).
    The blocks are sorted by their number of pairs, and consecutive ones are scored together while
    ``blocks * most rows * most references`` (the pairs once padded to the same shape) stays within
    ``chunk_rows``.

    Returns:
        Per source, float64 |scores| = (n, m).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    blocks = []
    for s, (n, m) in enumerate(sizes):
        rows = max(1, chunk_rows // m)
        blocks += [(s, start, min(start + rows, n)) for start in range(0, n, rows)]
    blocks.sort(key=lambda b: (b[2] - b[1]) * sizes[b[0]][1])
    groups: list[list[Block]] = []
    rows = refs = 0  # the most candidates and references of a block of the last group
    for s, start, stop in blocks:
        if groups and (len(groups[-1]) + 1) * max(rows, stop - start) * max(refs, sizes[s][1]) <= chunk_rows:
            groups[-1].append((s, start, stop))
            rows, refs = max(rows, stop - start), max(refs, sizes[s][1])
        else:
            groups.append([(s, start, stop)])
            rows, refs = stop - start, sizes[s][1]
    parts: list[list[tuple[int, torch.Tensor]]] = [[] for _ in sizes]
    for group in groups:
        for (s, start, _), scores in zip(group, scorer(group)):
            parts[s].append((start, scores))
    return [torch.cat([scores for _, scores in sorted(part, key=lambda p: p[0])]) for part in parts]


def _result(scores: list[torch.Tensor], cands: list[_Distinct], refs: list[_Distinct]) -> MBRResult:
    """The expected utilities and selection from the scores of the distinct candidates and references."""
    utilities = []
    for source_scores, c, r in zip(scores, cands, refs):
        # |source_scores| = (distinct candidates, distinct references)
        weighted = source_scores * torch.tensor(r.counts, dtype=torch.float64, device=source_scores.device)
        # exact sums: utilities that are the same up to their order give the same expected utility
        expected = [math.fsum(row) / sum(r.counts) for row in weighted.tolist()]
        utilities.append([expected[k] for k in c.inverse])
    return MBRResult([max(range(len(u)), key=u.__getitem__) for u in utilities], utilities)


def _stack(rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Id tensors |rows[k]| = (n_k, length_k) stacked into (len(rows), max n_k, max length_k), PAD-padded."""
    out = rows[0].new_full((len(rows), max(r.size(0) for r in rows), max(r.size(1) for r in rows)), pad)
    for k, r in enumerate(rows):
        out[k, : r.size(0), : r.size(1)] = r
    return out


def _score_blocks(blocks: list[Block], cands: list[torch.Tensor], refs: list[torch.Tensor], reward: str | Reward,
                  specials: SpecialIds, chunk_rows: int, to_text: Callable[[Sequence[int]], str] | None
                  ) -> list[torch.Tensor]:
    """A ``Scorer`` on id tensors: one call of ``score_candidates`` for all the blocks.

    Args:
        cands: per source, the ids of its distinct candidates, |cands[s]| = (n, length).
        refs: per source, the ids of its distinct references, |refs[s]| = (m, length').
    """
    hyps = _stack([cands[s][start:stop] for s, start, stop in blocks], specials.pad)  # |hyps| = (blocks, rows, length)
    targets = _stack([refs[s] for s, _, _ in blocks], specials.pad)  # |targets| = (blocks, m, length')
    if reward == "bleu":  # in float64: the expected utilities agree with sacrebleu's to 1e-6
        reward = partial(sentence_bleu, pad_id=specials.pad, dtype=torch.float64)
    # |scores| = (blocks, rows, m)
    scores = score_candidates(hyps, targets, reward, specials, chunk_rows, to_text, dtype=torch.float64)
    return [scores[k, : stop - start, : refs[s].size(0)] for k, (s, start, stop) in enumerate(blocks)]


def _token_scorer(cands: list[list[str]], refs: list[list[str]], reward: str | Reward, chunk_rows: int) -> Scorer:
    """A ``Scorer`` of strings through their 13a tokens (as sacrebleu's BLEU reads them) as library ids.

    The 13a rules look at most one character beside the one they split at, and treat every whitespace
    character alike, so a line's tokens are its words' tokens one after the other: each distinct word
    is tokenized once. Not so across a line break ("-\\n" joins two words): such a line is tokenized whole.
    """
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    vocab: dict[str, int] = {}  # token -> id, after the library's special ids
    words: dict[str, list[int]] = {}  # word -> the ids of its tokens

    def token_ids(text: str) -> list[int]:
        return [vocab.setdefault(t, len(SPECIALS) + len(vocab)) for t in tokenize(text.rstrip()).split()]

    def line_ids(text: str) -> list[int]:
        if "\n" in text:
            return token_ids(text)
        ids = []
        for word in text.split():
            if word not in words:
                words[word] = token_ids(word)
            ids += words[word]
        return ids

    def encode(texts: list[str]) -> torch.Tensor:
        ids = [line_ids(text) for text in texts]
        width = max(map(len, ids))
        return torch.tensor([row + [LIBRARY_IDS.pad] * (width - len(row)) for row in ids], dtype=torch.long)

    cand_ids = [encode(source) for source in cands]  # |cand_ids[s]| = (n, length)
    ref_ids = cand_ids if refs is cands else [encode(source) for source in refs]  # |ref_ids[s]| = (m, length')
    tokens = list(vocab)

    def to_text(ids: Sequence[int]) -> str:
        return " ".join(tokens[i - len(SPECIALS)] for i in ids if i != LIBRARY_IDS.pad)

    return partial(_score_blocks, cands=cand_ids, refs=ref_ids, reward=reward, specials=LIBRARY_IDS,
                   chunk_rows=chunk_rows, to_text=to_text)


def _chrf_scorer(cands: list[list[str]], refs: list[list[str]]) -> Scorer:
    """A ``Scorer`` of strings by sacrebleu's chrF (character 6-grams, beta 2), computed by fastchrf."""
    try:
        from fastchrf import pairwise_chrf
    except ImportError as e:
        raise ImportError("MBR with chrF needs fastchrf: pip install fastchrf") from e
    same = refs is cands
    cands = [[text.translate(_SEPARATORS) for text in source] for source in cands]
    refs = cands if same else [[text.translate(_SEPARATORS) for text in source] for source in refs]

    def score(blocks: list[Block]) -> list[torch.Tensor]:
        scores = pairwise_chrf([cands[s][start:stop] for s, start, stop in blocks], [refs[s] for s, _, _ in blocks])
        return [torch.tensor(block, dtype=torch.float64) for block in scores]

    return score
