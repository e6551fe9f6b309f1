"""The data of a training run: tokenizers and vocabularies built from the training text, and the loaders."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

import ignite.distributed as idist
from torch.utils.data import DataLoader

from simple_nmt.cache import (
    CacheError,
    CorpusArrays,
    Encoded,
    TokenizerTrainingError,
    cacheable,
    count_tokens,
    default_processes,
    encode_pieces,
    fields_digest,
    file_digest,
    load_fields,
    make_key,
    save_fields,
    train_tokenizers,
    write_arrays,
)
from simple_nmt.config import (
    Config,
    ConfigError,
)
from simple_nmt.data import (
    SPM_SAMPLE_SIZE,
    BucketBatchSampler,
    DataError,
    ParallelDataset,
    SentencePieceTokenizer,
    TextField,
    Tokenizer,
    Vocab,
    collate,
    read_parallel,
    split_lang,
)


def build_fields(config: Config, src_lines: list[str], tgt_lines: list[str], processes: int = 1
                 ) -> tuple[TextField, TextField]:
    """Tokenizers (SentencePiece if ``--spm_vocab_size``, trained on at most ``SPM_SAMPLE_SIZE`` sentences)
    and vocabularies from the training text: one of each per language, or with ``--joint_vocab`` one field
    built from both sides, for both.

    Args:
        processes: processes that train the two SentencePiece models and count the tokens of a large corpus.
    """
    return fields_and_pieces(config, src_lines, tgt_lines, processes)[0]


def fields_and_pieces(config: Config, src_lines: list[str], tgt_lines: list[str], processes: int = 1
                      ) -> tuple[tuple[TextField, TextField], tuple[Encoded | None, Encoded | None]]:
    """``build_fields``, and each side's lines as the ids of their SentencePiece pieces (None without
    SentencePiece), from which the corpus is encoded without tokenizing it again."""
    langs = split_lang(config.lang)
    if config.joint_vocab:
        sides = [(src_lines + tgt_lines, "+".join(f"{config.train}.{lang}" for lang in langs))]
    else:
        sides = [(lines, f"{config.train}.{lang}") for lang, lines in zip(langs, (src_lines, tgt_lines))]
    if config.spm_vocab_size > 0:
        try:
            tokenizers: list[Tokenizer] = train_tokenizers(
                [(lines, config.spm_vocab_size, config.seed) for lines, _ in sides], processes)
        except TokenizerTrainingError as e:  # fewer pieces than the text's characters and the special pieces
            needed = re.search(r"(\d+) vs (\d+)", str(e))
            hint = f"it needs at least {needed.group(2)}" if needed else "it needs more pieces"
            raise ConfigError(f"--spm_vocab_size {config.spm_vocab_size}: too small for SentencePiece on "
                              f"{sides[e.index][1]}; {hint}") from None
    else:
        tokenizers = [Tokenizer() for _ in sides]
    fields, pieces = [], []
    for tokenizer, (lines, _) in zip(tokenizers, sides):
        encoded = encode_pieces(tokenizer, lines, processes) if isinstance(tokenizer, SentencePieceTokenizer) \
            else None
        counts = count_tokens(tokenizer, lines, processes, encoded)
        fields.append(TextField(tokenizer, Vocab.from_counts(counts, config.max_vocab, config.min_freq)))
        pieces.append(encoded)
    if config.joint_vocab:
        return (fields[0], fields[0]), pieces[0].split(len(src_lines)) if pieces[0] is not None else (None, None)
    return (fields[0], fields[1]), (pieces[0], pieces[1])


def cache_folder(config: Config) -> Path | None:
    """The corpus cache of ``config`` (``--cache_dir``, by default beside the training files, or in the user's
    cache folder, ``$XDG_CACHE_HOME/simple-nmt`` or ``~/.cache/simple-nmt``, where that folder cannot be
    written: a read-only data set); None when off."""
    if config.cache_dir == "off":
        return None
    if config.cache_dir:
        return Path(config.cache_dir)
    beside = Path(f"{config.train}.{config.lang}.cache")
    if os.access(beside.parent, os.W_OK | os.X_OK):
        return beside
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simple-nmt" / beside.name


def cached_corpus(config: Config, fields: tuple[TextField, TextField] | None, folder: Path,
                  log: Callable[[str], None]) -> tuple[tuple[TextField, TextField], CorpusArrays]:
    """The fields (``fields``, or those built from the training text) and the encoded training pairs,
    read from the cache ``folder``.

    Under torchrun rank 0 builds what the cache lacks while the other ranks wait, then they open it.
    """
    digests = [file_digest(f"{config.train}.{lang}") for lang in split_lang(config.lang)]
    fields_fn = folder / "fields-{}.json".format(make_key(
        "fields", digests, config.lang, config.encoding_errors, config.spm_vocab_size, config.joint_vocab,
        config.max_vocab, config.min_freq, config.seed if config.spm_vocab_size else None, SPM_SAMPLE_SIZE))

    def entry(fields: tuple[TextField, TextField]) -> tuple[Path, str, tuple[int, int]]:
        key = make_key("corpus", digests, config.lang, config.encoding_errors, fields_digest(fields))
        return folder / key, key, (len(fields[0]), len(fields[1]))

    error = None
    if idist.get_rank() == 0:
        try:
            fields, arrays = _open_or_build(config, fields, fields_fn, entry, log)
        except (DataError, ConfigError) as e:  # the other ranks stop too, when they find no cache
            error = e
    idist.barrier()
    if error is not None:
        raise error
    if idist.get_rank() != 0:
        try:
            fields = fields or load_fields(fields_fn)
            arrays = CorpusArrays(*entry(fields))
        except CacheError as e:
            raise CacheError(f"{e} (rank 0 did not write it)") from None
    return fields, arrays


def _open_or_build(config: Config, fields: tuple[TextField, TextField] | None, fields_fn: Path,
                   entry: Callable[[tuple[TextField, TextField]], tuple[Path, str, tuple[int, int]]],
                   log: Callable[[str], None]) -> tuple[tuple[TextField, TextField], CorpusArrays]:
    """What ``cached_corpus`` opens, built first where the cache lacks it or holds it damaged."""
    if fields is None and fields_fn.exists():
        try:
            fields = load_fields(fields_fn)
        except CacheError as e:
            log(f"{e}; building it again")
    if fields is not None:
        folder, key, sizes = entry(fields)
        try:
            arrays = CorpusArrays(folder, key, sizes)
            log(f"{folder}: reusing the encoded training corpus")
            return fields, arrays
        except CacheError as e:
            if folder.exists():
                log(f"{e}; building it again")
    src, tgt, n_replaced = read_parallel(config.train, config.lang, config.encoding_errors)
    processes = default_processes()
    try:
        pieces: tuple[Encoded | None, Encoded | None] = (None, None)
        if fields is None:
            fields, pieces = fields_and_pieces(config, src, tgt, processes)
            save_fields(fields_fn, fields)
        folder, key, sizes = entry(fields)
        write_arrays(folder, key, fields, (src, tgt), n_replaced, processes, pieces)
    except OSError as e:
        raise DataError(f"{fields_fn.parent}: cannot write the corpus cache ({e.strerror or e}); pass --cache_dir "
                        "a writable folder, or --cache_dir off") from None
    log(f"{folder}: encoded the training corpus ({len(src)} pairs)")
    return fields, CorpusArrays(folder, key, sizes)


class Corpus:
    """Training and validation data of a run, ready for the loaders.

    The training pairs are encoded once into the corpus cache (``--cache_dir``) and read
    from it by later runs and every torchrun rank; with ``--cache_dir off`` or a Hugging Face
    model's fields they are encoded in memory.

    Args:
        fields: the source and target fields (built from the training text when None).
    """

    def __init__(self, config: Config, fields: tuple[TextField, TextField] | None, log: Callable[[str], None]):
        if not config.train or not config.valid:
            raise DataError("--train and --valid are required")
        folder = cache_folder(config)
        if folder is not None and (fields is None or cacheable(fields)):
            self.fields, arrays = cached_corpus(config, fields, folder, log)
            src, tgt, n_replaced, lengths = arrays.src, arrays.tgt, arrays.n_replaced, arrays.lengths
            self.train_lines = arrays.src_lines, arrays.tgt_lines
        else:
            src_lines, tgt_lines, n_replaced = read_parallel(config.train, config.lang, config.encoding_errors)
            self.train_lines = src_lines, tgt_lines  # the raw lines, by line number: what text rewards score against
            self.fields = fields or build_fields(config, src_lines, tgt_lines)
            src = [self.fields[0].to_ids(x) for x in src_lines]
            tgt = [self.fields[1].to_ids(y) for y in tgt_lines]
            lengths = None
        # the target field's special ids (a Hugging Face model's own) pad and bracket the batches
        self.collate = functools.partial(collate, ids=self.fields[1].special_ids)
        src_field, tgt_field = self.fields
        self.train = ParallelDataset(src, tgt, config.max_length, lengths)
        log(f"{config.train}: {len(src)} pairs, {len(self.train)} kept, {self.train.n_dropped} dropped "
            f"(longer than --max_length {config.max_length}); vocabularies {len(src_field)} / "
            f"{len(tgt_field)}" + (f"; {n_replaced} lines with replaced bytes" if n_replaced else ""))
        if len(self.train) == 0:
            raise DataError(f"{config.train}: every pair is longer than --max_length {config.max_length}")
        v_src, v_tgt, _ = read_parallel(config.valid, config.lang, config.encoding_errors)
        self.valid = ParallelDataset([src_field.to_ids(x) for x in v_src], [tgt_field.to_ids(y) for y in v_tgt])
        self.valid_references = [tgt_field.reference(y) for y in v_tgt]

    def loaders(self, config: Config) -> tuple[BucketBatchSampler, DataLoader, DataLoader]:
        """The training batch sampler (call ``set_epoch``), training and validation loaders.

        In a distributed run they give this rank's share of the batches: as many
        training batches on every rank, every validation batch on one rank.
        """
        shard = {"num_replicas": idist.get_world_size(), "rank": idist.get_rank()}
        sampler = BucketBatchSampler(self.train.lengths(), config.batch_size, config.max_tokens,
                                     shuffle=True, seed=config.seed, **shard)
        if len(sampler) == 0:
            raise DataError(f"{config.train}: fewer training batches than the {shard['num_replicas']} "
                            "processes; lower --batch_size or --max_tokens")
        valid_sampler = BucketBatchSampler(self.valid.lengths(), config.batch_size, config.max_tokens,
                                           shuffle=False, equal_shards=False, **shard)
        return (sampler, DataLoader(self.train, batch_sampler=sampler, collate_fn=self.collate),
                DataLoader(self.valid, batch_sampler=valid_sampler, collate_fn=self.collate))
