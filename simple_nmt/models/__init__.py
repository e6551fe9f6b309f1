"""The model factory used by training, fine-tuning and translation alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from simple_nmt.models.base import EncoderDecoder
from simple_nmt.models.seq2seq import Seq2Seq
from simple_nmt.models.transformer import Transformer

__all__ = ["EncoderDecoder", "Seq2Seq", "Transformer", "build_model"]


def build_model(config: Mapping[str, Any], src_vocab_size: int, tgt_vocab_size: int) -> EncoderDecoder:
    """Build a ``Transformer`` if ``config["use_transformer"]`` else a ``Seq2Seq``.

    Args:
        config: the run options (``word_vec_size``, ``hidden_size``, ``n_layers``,
            ``n_splits``, ``dropout``, ``use_transformer``, ``tie_embeddings``).
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
    """
    if config.get("use_transformer", False):
        return Transformer(
            src_vocab_size, tgt_vocab_size, hidden_size=config["hidden_size"],
            n_splits=config["n_splits"], n_layers=config["n_layers"], dropout=config["dropout"],
            tie_embeddings=config.get("tie_embeddings", False),
        )
    return Seq2Seq(
        src_vocab_size, tgt_vocab_size, word_vec_size=config["word_vec_size"],
        hidden_size=config["hidden_size"], n_layers=config["n_layers"], dropout=config["dropout"],
        tie_embeddings=config.get("tie_embeddings", False),
    )
