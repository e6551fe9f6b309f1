"""Reading parallel text, vocabularies, tokenizers and batching."""

from __future__ import annotations

import pytest

from simple_nmt.data import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    BucketBatchSampler,
    DataError,
    ParallelDataset,
    SentencePieceTokenizer,
    Vocab,
    collate,
    read_parallel,
    split_lang,
)
from simple_nmt.toy import make_corpus


def write_pair(tmp_path, src: bytes, tgt: bytes):
    (tmp_path / "c.en").write_bytes(src)
    (tmp_path / "c.de").write_bytes(tgt)
    return str(tmp_path / "c")


def test_read_parallel_reads_aligned_lines(tmp_path):
    prefix = write_pair(tmp_path, b"a b\n\nc\n", b"x\ny y\nz\n")
    src, tgt, n_replaced = read_parallel(prefix, "ende")
    assert src == ["a b", "", "c"] and tgt == ["x", "y y", "z"] and n_replaced == 0


def test_different_line_counts_name_both_files(tmp_path):
    prefix = write_pair(tmp_path, b"a\nb\n", b"x\n")
    with pytest.raises(DataError, match=r"c\.en has 2 lines but .*c\.de has 1"):
        read_parallel(prefix, "ende")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.en: cannot read"):
        read_parallel(str(tmp_path / "nope"), "ende")
    prefix = write_pair(tmp_path, b"", b"")
    with pytest.raises(DataError, match=r"c\.en: file is empty"):
        read_parallel(prefix, "ende")


def test_non_utf8_names_file_and_line_or_is_replaced(tmp_path):
    prefix = write_pair(tmp_path, b"ok\nbad \xff byte\n", b"x\ny\n")
    with pytest.raises(DataError, match=r"c\.en:2: not valid UTF-8"):
        read_parallel(prefix, "ende")
    src, _, n_replaced = read_parallel(prefix, "ende", encoding_errors="replace")
    assert n_replaced == 1 and src[1] == "bad \ufffd byte"


def test_split_lang():
    assert split_lang("ende") == ("en", "de")
    with pytest.raises(ValueError, match="--lang"):
        split_lang("english")


def test_vocab_specials_frequency_order_and_limits():
    sentences = [["b", "a", "b"], ["c", "b", "a"], ["d"]]
    vocab = Vocab.build(sentences)
    assert vocab.itos[:4] == SPECIALS and vocab.itos[4:] == ["b", "a", "c", "d"]
    assert Vocab.build(sentences, min_freq=2).itos[4:] == ["b", "a"]
    assert len(Vocab.build(sentences, max_vocab=5)) == 5
    assert vocab.encode(["a", "zzz"]) == [vocab.stoi["a"], UNK]
    assert vocab.decode([BOS, vocab.stoi["a"], PAD, vocab.stoi["c"], EOS, vocab.stoi["d"]]) == ["a", "c"]


def test_dataset_drops_long_pairs_and_counts_them():
    ds = ParallelDataset([[5], [5] * 4, [5] * 2], [[6] * 3, [6], [6] * 5], max_length=3)
    assert len(ds) == 1 and ds.n_dropped == 2 and ds[0] == (0, [5], [6, 6, 6])


def test_an_example_keeps_its_line_number_when_longer_pairs_before_it_are_dropped():
    ds = ParallelDataset([[5] * 4, [5], [5] * 9, [5, 5]], [[6], [6], [6], [6]], max_length=3)
    assert [ds[i][0] for i in range(len(ds))] == [1, 3]
    with pytest.raises(ValueError, match="3 sources but 2 targets"):
        ParallelDataset([[5], [5], [5]], [[6], [6]])


def test_collate_pads_and_wraps_target():
    batch = collate([(7, [4, 5], [6]), (8, [4], [6, 7])])
    assert batch["index"].tolist() == [7, 8]
    assert batch["src"].tolist() == [[4, 5], [4, PAD]]
    assert batch["src_lengths"].tolist() == [2, 1]
    assert batch["tgt"].tolist() == [[BOS, 6, EOS, PAD], [BOS, 6, 7, EOS]]


def _lengths(n=200):
    return [((i * 7) % 13 + 1, (i * 5) % 11 + 1) for i in range(n)]


@pytest.mark.parametrize("kwargs", [{"batch_size": 16}, {"max_tokens": 64}])
def test_bucket_sampler_covers_everything_once_and_is_reproducible(kwargs):
    lengths = _lengths()
    sampler = BucketBatchSampler(lengths, seed=5, **{"batch_size": 1000, **kwargs})
    sampler.set_epoch(1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    if "max_tokens" in kwargs:
        assert all(len(b) * max(max(lengths[i]) for i in b) <= 64 for b in batches)
    else:
        assert all(len(b) <= 16 for b in batches)
    again = BucketBatchSampler(lengths, seed=5, **{"batch_size": 1000, **kwargs})
    again.set_epoch(1)
    assert list(again) == batches
    again.set_epoch(2)
    assert list(again) != batches


def test_bucket_sampler_groups_similar_lengths():
    lengths = _lengths(400)
    batches = list(BucketBatchSampler(lengths, batch_size=40, seed=1))
    spread = [max(lengths[i][0] for i in b) - min(lengths[i][0] for i in b) for b in batches]
    assert max(spread) <= 2


def test_bucket_sampler_shards_for_replicas():
    lengths = _lengths()  # 25 batches of 8
    shards = [list(BucketBatchSampler(lengths, batch_size=8, seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}
    # rank r takes every 2nd batch of the one global order, from the r-th on
    everything = list(BucketBatchSampler(lengths, batch_size=8, seed=2))
    assert [b for pair in zip(*shards) for b in pair] == everything[:24]
    # too few batches for the replicas: none for anyone (the CLI says so), never some ranks only
    assert [len(BucketBatchSampler(lengths[:8], batch_size=8, num_replicas=2, rank=r)) for r in (0, 1)] == [0, 0]


def test_bucket_sampler_keeps_every_batch_for_validation():
    lengths = _lengths()
    shards = [list(BucketBatchSampler(lengths, batch_size=8, shuffle=False, num_replicas=2, rank=r,
                                      equal_shards=False)) for r in (0, 1)]
    assert [len(s) for s in shards] == [13, 12]
    assert sorted(i for s in shards for b in s for i in b) == list(range(len(lengths)))


def test_sentencepiece_round_trip_and_serialisation():
    src, _ = make_corpus(300, seed=1)
    tokenizer = SentencePieceTokenizer.train(src, vocab_size=60)
    line = src[0]
    pieces = tokenizer.encode(line)
    assert tokenizer.decode(pieces) == line
    again = SentencePieceTokenizer(tokenizer.model_bytes())
    assert again.encode(line) == pieces
