"""The data of a training run: tokenizers and vocabularies built from the training text, and the loaders."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import ignite.distributed as idist
from torch.utils.data import DataLoader

from simple_nmt.config import (
    Config,
    ConfigError,
)
from simple_nmt.data import (
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


def build_fields(config: Config, src_lines: list[str], tgt_lines: list[str]) -> tuple[TextField, TextField]:
    """Tokenizers (SentencePiece if ``--spm_vocab_size``) and vocabularies from the training text."""
    fields = []
    for lang, lines in zip(split_lang(config.lang), (src_lines, tgt_lines)):
        if config.spm_vocab_size > 0:
            try:
                tokenizer = SentencePieceTokenizer.train(lines, config.spm_vocab_size, seed=config.seed)
            except RuntimeError as e:  # fewer pieces than the text's characters and the special pieces
                needed = re.search(r"(\d+) vs (\d+)", str(e))
                hint = f"it needs at least {needed.group(2)}" if needed else "it needs more pieces"
                raise ConfigError(f"--spm_vocab_size {config.spm_vocab_size}: too small for SentencePiece on "
                                  f"{config.train}.{lang}; {hint}") from None
        else:
            tokenizer = Tokenizer()
        vocab = Vocab.build([tokenizer.encode(line) for line in lines], config.max_vocab, config.min_freq)
        fields.append(TextField(tokenizer, vocab))
    return fields[0], fields[1]


class Corpus:
    """Training and validation data of a run, ready for the loaders.

    Args:
        fields: the source and target fields (built from the training text when None).
    """

    def __init__(self, config: Config, fields: tuple[TextField, TextField] | None, log: Callable[[str], None]):
        if not config.train or not config.valid:
            raise DataError("--train and --valid are required")
        src, tgt, n_replaced = read_parallel(config.train, config.lang, config.encoding_errors)
        self.train_lines = src, tgt  # the raw lines, by line number: what text rewards score against
        self.fields = fields or build_fields(config, src, tgt)
        # the target field's special ids (a Hugging Face model's own) pad and bracket the batches
        self.collate = functools.partial(collate, ids=self.fields[1].special_ids)
        src_field, tgt_field = self.fields
        self.train = ParallelDataset([src_field.to_ids(x) for x in src], [tgt_field.to_ids(y) for y in tgt],
                                     config.max_length)
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
