"""Property-based tests: arbitrary text through the reader, random id tensors through the rewards."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simple_nmt.data import PAD, DataError, Tokenizer, Vocab, read_parallel
from simple_nmt.rewards import sentence_bleu, sentence_gleu

SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
lines = st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40), min_size=1, max_size=8)


@SETTINGS
@given(src=lines, tgt=lines)
def test_reader_never_crashes_on_arbitrary_unicode(tmp_path, src, tgt):
    (tmp_path / "c.en").write_text("\n".join(src), encoding="utf-8")
    (tmp_path / "c.de").write_text("\n".join(tgt), encoding="utf-8")
    try:
        read_src, read_tgt, n_replaced = read_parallel(str(tmp_path / "c"), "ende")
    except DataError as e:  # the only acceptable failure: a one-line message naming a file
        assert "\n" not in str(e) and ("c.en" in str(e) or "c.de: every line is blank" in str(e))
        return
    assert len(read_src) == len(read_tgt) and n_replaced == 0
    tokens = [Tokenizer().encode(line) for line in read_src]
    vocab = Vocab.build(tokens)
    assert all(vocab.decode(vocab.encode(t)) == t for t in tokens if "<unk>" not in t and "<pad>" not in t
               and "<s>" not in t and "</s>" not in t)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_reader_reports_bad_bytes_with_a_line_number(tmp_path, raw):
    (tmp_path / "c.en").write_bytes(raw)
    (tmp_path / "c.de").write_bytes(raw)
    try:
        read_parallel(str(tmp_path / "c"), "ende")
    except DataError as e:
        assert "\n" not in str(e) and ("c.en:" in str(e) or "c.en: file is empty" in str(e))
    try:
        src, tgt, _ = read_parallel(str(tmp_path / "c"), "ende", encoding_errors="replace")
        assert len(src) == len(tgt) and all("\n" not in line for line in src)
    except DataError as e:  # with replacement, only a file without text is an error
        assert str(e).endswith(("c.en: file is empty", "c.en: every line is blank; there is no text to read"))


def id_rows(max_id: int):
    return st.lists(st.lists(st.integers(0, max_id), max_size=12), min_size=1, max_size=6)


def to_tensor(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)


@SETTINGS
@given(hyps=id_rows(6), refs=id_rows(6), big=st.booleans())
def test_reward_invariants(hyps, refs, big):
    n = min(len(hyps), len(refs))
    offset = 60_000 if big else 0
    h = to_tensor(hyps[:n])
    r = to_tensor(refs[:n])
    h = torch.where(h == PAD, h, h + offset)
    r = torch.where(r == PAD, r, r + offset)
    for score in (sentence_bleu(h, r, PAD), sentence_gleu(h, r, PAD)):
        assert score.shape == (n,) and bool(((score >= 0) & (score <= 100 + 1e-4)).all())
    # GLEU is symmetric in its inputs
    torch.testing.assert_close(sentence_gleu(h, r, PAD), sentence_gleu(r, h, PAD))
    # identical non-empty pairs score 100
    nonempty = (h != PAD).any(dim=1)
    torch.testing.assert_close(sentence_bleu(h, h, PAD)[nonempty], torch.full((int(nonempty.sum()),), 100.0))
    torch.testing.assert_close(sentence_gleu(h, h, PAD)[nonempty], torch.full((int(nonempty.sum()),), 100.0))
