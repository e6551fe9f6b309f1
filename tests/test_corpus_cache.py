"""The corpus cache: the same batches as the in-memory lists; reused; rebuilt when its inputs change or break."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TRANSFORMER, run_main
from test_distributed import helper

from simple_nmt import cache, cli
from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.config import default_config
from simple_nmt.corpus import Corpus, build_fields
from simple_nmt.data import (
    BucketBatchSampler,
    DataError,
    ParallelDataset,
    SentencePieceTokenizer,
    TextField,
    Vocab,
    read_parallel,
)


@pytest.fixture
def data(toy_dir, tmp_path):
    """A copy of the toy corpus that a test may change, and a cache folder beside it."""
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        shutil.copy(toy_dir / name, tmp_path / name)
    return tmp_path


def corpus(data, logs: list[str] | None = None, fields=None, **options) -> Corpus:
    options = {"train": str(data / "train"), "valid": str(data / "valid"), "max_length": 12,
               "batch_size": 16, "cache_dir": str(data / "cache"), **options}
    return Corpus(default_config(**options), fields, (logs if logs is not None else []).append)


def batches(c: Corpus, config_options: dict, epoch: int) -> list[dict[str, torch.Tensor]]:
    sampler, train_loader, _ = c.loaders(default_config(batch_size=16, **config_options))
    sampler.set_epoch(epoch)
    return list(train_loader)


def entries(data) -> list[str]:
    return sorted(p.name for p in (data / "cache").iterdir() if p.is_dir())


@pytest.mark.parametrize("options", [{}, {"spm_vocab_size": 60, "max_length": 0}, {"max_tokens": 120},
                                     {"joint_vocab": True}, {"joint_vocab": True, "spm_vocab_size": 80}])
def test_the_cache_gives_the_same_batches_as_the_lists(data, options):
    lists = corpus(data, cache_dir="off", **options)
    built, reused = corpus(data, **options), corpus(data, **options)
    assert [f.stored() for f in built.fields] == [f.stored() for f in lists.fields]
    assert built.train.n_dropped == lists.train.n_dropped and len(built.train) == len(lists.train)
    for epoch in (1, 2):
        expected = batches(lists, options, epoch)
        for c in (built, reused):
            got = batches(c, options, epoch)
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert all(torch.equal(a[k], b[k]) for k in ("index", "src", "src_lengths", "tgt"))
    for side in (0, 1):  # the raw lines that text rewards read by index
        assert list(reused.train_lines[side]) == list(lists.train_lines[side])


def test_one_cache_serves_every_max_length_and_a_resume_with_the_checkpoint_fields(data):
    logs: list[str] = []
    first = corpus(data, logs, max_length=8)
    second = corpus(data, logs, max_length=30)
    resumed = corpus(data, logs, fields=first.fields, max_length=30)
    assert len(entries(data)) == 1 and len(first.train) < len(second.train) == len(resumed.train)
    assert "encoded the training corpus (600 pairs)" in logs[0]
    assert [line.endswith("reusing the encoded training corpus") for line in logs if "corpus" in line] == \
        [False, True, True]


def test_a_changed_training_file_or_tokenizer_builds_again(data):
    logs: list[str] = []
    corpus(data, logs)
    lines = (data / "train.de").read_text().splitlines()
    (data / "train.de").write_text("\n".join(["ein neuer satz", *lines[1:]]) + "\n")
    changed = corpus(data, logs)
    corpus(data, logs, spm_vocab_size=60)
    assert len(entries(data)) == 3 and sum("encoded the training corpus" in line for line in logs) == 3
    assert changed.train_lines[1][0] == "ein neuer satz"
    assert changed.fields[1].to_text(changed.train[0][2]) == "ein neuer satz"


def damage(entry, how: str) -> None:
    manifest = entry / "manifest.json"
    if how == "truncated array":
        ids = entry / "src.ids.npy"
        ids.write_bytes(ids.read_bytes()[:-10])
    elif how == "other version":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 999}))
    elif how == "bad manifest":
        manifest.write_text("{\"format\": ")
    elif how == "half-written":
        manifest.unlink()
    elif how == "offsets out of place":
        offsets = np.load(entry / "tgt.offsets.npy")
        np.save(entry / "tgt.offsets.npy", offsets[::-1].copy())
    elif how == "lengths that do not fit the offsets":
        lengths = np.load(entry / "lengths.npy")
        lengths[3, 1] += 1
        np.save(entry / "lengths.npy", lengths)
    elif how == "ids beyond the vocabulary":
        ids = np.load(entry / "tgt.ids.npy")
        np.save(entry / "tgt.ids.npy", np.full_like(ids, 60000))


@pytest.mark.parametrize("how", ["truncated array", "other version", "bad manifest", "half-written",
                                 "offsets out of place", "lengths that do not fit the offsets",
                                 "ids beyond the vocabulary"])
def test_a_damaged_cache_is_built_again_in_one_line(data, how):
    expected = corpus(data, cache_dir="off")
    corpus(data)
    damage(data / "cache" / entries(data)[0], how)
    logs: list[str] = []
    rebuilt = corpus(data, logs)
    notes = [line for line in logs if "building it again" in line]
    assert len(notes) == 1 and "\n" not in notes[0] and str(data / "cache") in notes[0]
    assert [rebuilt.train[i] for i in range(len(rebuilt.train))] == \
        [expected.train[i] for i in range(len(expected.train))]
    again: list[str] = []
    corpus(data, again)
    assert again[0].endswith("reusing the encoded training corpus")


def test_a_damaged_fields_file_is_built_again(data):
    corpus(data)
    (fields_fn,) = (data / "cache").glob("fields-*.json")
    fields_fn.write_text("not json")
    logs: list[str] = []
    corpus(data, logs)
    assert f"{fields_fn}: not a readable corpus cache (JSONDecodeError); building it again" in logs


def test_a_damaged_cache_that_rank_0_did_not_rebuild_is_refused_in_one_line(data):
    built = corpus(data)
    entry = data / "cache" / entries(data)[0]
    damage(entry, "other version")
    with pytest.raises(cache.CacheError,
                       match=rf"manifest\.json: a corpus cache of version 999, this is version {cache.VERSION}$"):
        cache.CorpusArrays(entry, entry.name, (len(built.fields[0]), len(built.fields[1])))


@pytest.mark.parametrize("bad, message", [
    (lambda d: (d / "train.de").write_text("eins\n"), r"train\.en has 600 lines but .*train\.de has 1"),
    (lambda d: (d / "train.en").write_bytes(b"ok\n\xff\xfe\n" + b"x\n" * 598), r"train\.en:2: not valid UTF-8"),
])
def test_bad_input_keeps_its_one_line_error_and_writes_no_cache(data, bad, message):
    bad(data)
    with pytest.raises(DataError, match=message):
        corpus(data)
    assert not (data / "cache").exists() or entries(data) == []


def test_an_unwritable_cache_folder_is_a_one_line_error(data):
    (data / "cache").write_text("a file where the folder should be")
    with pytest.raises(DataError, match=r"cache: cannot write the corpus cache .*--cache_dir off$"):
        corpus(data)


def test_encoding_in_processes_gives_the_same_ids_and_counts(data, monkeypatch):
    src, tgt, _ = read_parallel(str(data / "train"), "ende")
    fields = build_fields(default_config(spm_vocab_size=60), src, tgt)
    expected_ids = [i for line in src for i in fields[0].to_ids(line)]
    expected_counts = cache.count_tokens(fields[0].tokenizer, src, 1)
    monkeypatch.setattr(cache, "PARALLEL_LINES", 0)
    monkeypatch.setattr(cache, "CHUNK_LINES", 50)
    ids, lengths = cache.encode(fields[0], src, 2)
    assert ids.dtype == np.uint16 and ids.tolist() == expected_ids
    assert lengths.tolist() == [len(fields[0].to_ids(line)) for line in src]
    assert cache.count_tokens(fields[0].tokenizer, src, 2) == expected_counts


def test_encoding_from_sentencepiece_ids_is_to_ids_also_for_characters_the_model_never_saw(data):
    src, tgt, _ = read_parallel(str(data / "train"), "ende")
    tokenizer = SentencePieceTokenizer.train(src[:300], 60, seed=1)
    lines = [*tgt[:40], "zß ж 乙乙 dog", "", "ж"]  # German letters and characters the model has never seen
    fields = [TextField(tokenizer, Vocab.from_counts(cache.count_tokens(tokenizer, src + tgt, 1)))]
    # a vocabulary (of a checkpoint built before) that holds a character the model does not know as its own token
    fields.append(TextField(tokenizer, Vocab([*fields[0].vocab.itos, "ж"])))
    for field in fields:
        expected = [field.to_ids(line) for line in lines]
        pieces = cache.encode_pieces(tokenizer, lines, 1)
        assert (pieces.ids == tokenizer.unk_id()).any()
        for given in (None, pieces):
            ids, lengths = cache.encode(field, lines, 1, given)
            assert ids.tolist() == [i for line in expected for i in line]
            assert lengths.tolist() == [len(line) for line in expected]
    assert fields[1].to_ids("ж")[-1] == len(fields[0].vocab)  # its own id, not <unk>
    # counted from the ids, a character the model has never seen is its unknown piece, which is no token
    assert "ж" not in fields[0].vocab.stoi and "乙" not in fields[0].vocab.stoi


def test_the_two_sentencepiece_models_trained_in_two_processes_are_those_trained_one_after_the_other(data):
    src, tgt, _ = read_parallel(str(data / "train"), "ende")
    jobs = [(src, 60, 1), (tgt, 70, 2)]
    one, two = cache.train_tokenizers(jobs, 1), cache.train_tokenizers(jobs, 2)
    assert [t.model_bytes() for t in one] == [t.model_bytes() for t in two]
    assert [t.model_bytes() for t in one] == [SentencePieceTokenizer.train(*job).model_bytes() for job in jobs]


def test_the_dataset_keeps_the_cache_lengths_without_a_copy_when_it_drops_nothing(data):
    built = corpus(data, max_length=0)
    entry = data / "cache" / entries(data)[0]
    arrays = cache.CorpusArrays(entry, entry.name, (len(built.fields[0]), len(built.fields[1])))
    assert arrays.lengths.dtype == np.int32 and arrays.lengths.tolist() == built.train.lengths().tolist()
    kept = ParallelDataset(arrays.src, arrays.tgt, 0, arrays.lengths)
    assert kept.lengths() is arrays.lengths and kept.line_numbers == range(len(arrays.lengths))
    limited = ParallelDataset(arrays.src, arrays.tgt, 8, arrays.lengths)
    assert limited.n_dropped > 0 and (limited.lengths() <= 8).all() and limited.line_numbers.dtype == np.int32
    assert limited.lengths().tolist() == [[len(s), len(t)] for _, s, t in (limited[i] for i in range(len(limited)))]


def test_sentencepiece_trains_on_a_bounded_sample(data):
    src, _, _ = read_parallel(str(data / "train"), "ende")
    whole = SentencePieceTokenizer.train(src, 60, seed=1)
    sampled = [SentencePieceTokenizer.train(src, 60, seed=1, sample_size=200).model_bytes() for _ in range(2)]
    assert sampled[0] == sampled[1] != whole.model_bytes()
    assert SentencePieceTokenizer.train(src, 60, seed=1, sample_size=len(src)).model_bytes() == whole.model_bytes()


def train(data, model_fn, *extra: str):
    return run_main(cli.main_train, "--model_fn", str(model_fn), "--train", str(data / "train"), "--valid",
                    str(data / "valid"), "--max_length", "20", "--verbose", "1", "--optimizer", "adam", "--lr",
                    "3e-3", "--n_epochs", "1", "--spm_vocab_size", "60", *TINY_TRANSFORMER, *extra)


def test_a_second_run_reuses_the_cache_and_trains_the_same_weights(data):
    runs = [train(data, data / f"m{i}.pth", *extra)
            for i, extra in enumerate([(), (), ("--cache_dir", "off")])]
    assert "encoded the training corpus" in runs[0].stdout
    assert "reusing the encoded training corpus" in runs[1].stdout
    assert not any("corpus (" in line or "reusing" in line for line in runs[2].stdout.splitlines())
    weights = [load_checkpoint(data / f"m{i}.pth")["model"] for i in range(3)]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


def test_under_torchrun_rank_0_builds_the_cache_and_the_other_ranks_map_it(data):
    proc = helper(data / "out", "train", "--model_fn", str(data / "out" / "m.pth"), "--train", str(data / "train"),
                  "--valid", str(data / "valid"), "--max_length", "20", "--verbose", "1", "--n_epochs", "1",
                  "--cache_dir", str(data / "cache"), *TINY_TRANSFORMER, n_processes=2)
    assert proc.stdout.count("encoded the training corpus") == 1 and len(entries(data)) == 1
    rank0, rank1 = (torch.load(data / "out" / f"mle.rank{r}.pth", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])


def list_batches(lengths: list[tuple[int, int]], batch_size: int, max_tokens: int, shuffle: bool, seed: int,
                 epoch: int, num_replicas: int, rank: int, equal_shards: bool) -> list[list[int]]:
    """The batches of ``BucketBatchSampler`` as it made them on lists, before the length arrays: the oracle."""
    rng = random.Random(seed * 100_003 + epoch)
    keys = [rng.random() if shuffle else 0.0 for _ in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], keys[i]))
    batches, batch, width = [], [], 0
    for i in order:
        new_width = max(width, *lengths[i])
        full = len(batch) >= batch_size if max_tokens <= 0 else new_width * (len(batch) + 1) > max_tokens
        if batch and full:
            batches.append(batch)
            batch, new_width = [], max(lengths[i])
        batch.append(i)
        width = new_width
    if batch:
        batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    if equal_shards:
        batches = batches[: len(batches) - len(batches) % num_replicas]
    return batches[rank::num_replicas]


@pytest.mark.parametrize("batch_size, max_tokens", [(16, 0), (7, 0), (64, 90), (64, 25)])
@pytest.mark.parametrize("shuffle, num_replicas, rank, equal_shards", [
    (True, 1, 0, True), (False, 1, 0, True), (True, 3, 2, True), (False, 2, 1, False)])
def test_the_sampler_on_length_arrays_makes_the_batches_it_made_on_lists(batch_size, max_tokens, shuffle,
                                                                         num_replicas, rank, equal_shards):
    rng = random.Random(batch_size + max_tokens)
    lengths = [(rng.randint(0, 30), rng.randint(0, 30)) for _ in range(997)]
    sampler = BucketBatchSampler(np.array(lengths), batch_size, max_tokens, shuffle=shuffle, seed=5,
                                 num_replicas=num_replicas, rank=rank, equal_shards=equal_shards)
    for epoch, skip in ((1, 0), (2, 3), (1, 1)):
        sampler.set_epoch(epoch, skip)
        expected = list_batches(lengths, batch_size, max_tokens, shuffle, 5, epoch, num_replicas, rank, equal_shards)
        assert len(sampler) == len(expected) and list(sampler) == expected[skip:]
    assert list(BucketBatchSampler([], batch_size, max_tokens)) == []


def test_a_read_only_data_folder_caches_in_the_users_cache_folder(tmp_path, monkeypatch):
    from simple_nmt import corpus
    from simple_nmt.config import Config

    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = Config(train=str(data / "train"), lang="ende")
    assert corpus.cache_folder(config) == data / "train.ende.cache"
    # a folder this process cannot write (as root can write any, its answer is stood in for)
    monkeypatch.setattr(corpus.os, "access", lambda path, mode: str(path) != str(data))
    assert corpus.cache_folder(config) == tmp_path / "xdg" / "simple-nmt" / "train.ende.cache"
